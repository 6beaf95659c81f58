"""lictor.metrics and lictor.monitor without processes: exposition shapes, labels, counting, log fan-out."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from dnslib import EDNS0, DNSRecord, EDNSOption
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lictor import metrics, monitor
from lictor.agent.checks import CheckRunner
from lictor.agent.definitions import decode_check_registration
from lictor.dns.resolver import DnsConfig
from lictor.dns.server import DnsServer
from lictor.dns.view import CatalogView


def _series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_consul_json_shape_and_dotted_names() -> None:
    reg = CollectorRegistry()
    Gauge("lictor_catalog_nodes", "n", registry=reg).set(3)
    c = Counter("lictor_http_requests", "r", ["method", "endpoint", "code"], registry=reg)
    c.labels("GET", "/v1/kv/{key:path}", "200").inc(4)
    h = Histogram("lictor_raft_commit_seconds", "h", registry=reg)
    h.observe(0.5)
    h.observe(1.5)
    data = metrics.consul_json(reg)
    assert set(data) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    assert data["Points"] == []
    assert {"Name": "lictor.catalog.nodes", "Value": 3.0, "Labels": {}} in data["Gauges"]
    [counter] = data["Counters"]
    assert counter["Name"] == "lictor.http.requests" and counter["Count"] == 4 and counter["Value"] == 4
    assert counter["Labels"] == {"method": "GET", "endpoint": "/v1/kv/{key:path}", "code": "200"}
    [sample] = data["Samples"]
    assert sample == {"Name": "lictor.raft.commit.seconds", "Count": 2.0, "Sum": 2.0, "Mean": 1.0, "Labels": {}}


def test_check_counts_are_plain_dicts_exported_at_scrape() -> None:
    before = _series(metrics.REGISTRY)
    metrics.count_check_run("http")
    metrics.count_check_run("http")
    metrics.count_check_state_change("warning")
    metrics.count_check_state_change("bogus")  # unknown statuses fold into one series
    after = _series(metrics.REGISTRY)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("lictor_check_runs_total", type="http") == 2
    assert delta("lictor_check_state_changes_total", status="warning") == 1
    assert delta("lictor_check_state_changes_total", status="other") == 1


async def test_check_runner_counts_ttl_reports_and_transitions() -> None:
    runner = CheckRunner(lambda *a: None)
    try:
        runner.add(decode_check_registration(b'{"ID": "t", "Name": "t", "TTL": "30s"}'))
        runs, changes = metrics.CHECK_RUNS.get("ttl", 0), dict(metrics.CHECK_STATE_CHANGES)
        runner.ttl_update("t", "passing", "ok")
        runner.ttl_update("t", "passing", "still ok")  # output only: a run, not a transition
        runner.ttl_update("t", "critical", "down")
        assert metrics.CHECK_RUNS["ttl"] - runs == 3
        assert metrics.CHECK_STATE_CHANGES["passing"] - changes.get("passing", 0) == 1
        assert metrics.CHECK_STATE_CHANGES["critical"] - changes.get("critical", 0) == 1
    finally:
        await runner.close()


def _app() -> Any:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def boom(request: Request) -> PlainTextResponse:
        raise RuntimeError("bug")

    app = Starlette(routes=[Route("/v1/health/service/{name}", ok, methods=["GET"]),
                            Route("/v1/boom", boom, methods=["GET"])])
    return metrics.HTTPMetricsMiddleware(app)


def test_http_middleware_labels_by_route_template() -> None:
    before = _series(metrics.REGISTRY)
    client = TestClient(_app(), raise_server_exceptions=False)
    for name in ("a", "b", "c"):
        assert client.get(f"/v1/health/service/{name}").status_code == 200
    assert client.put("/v1/health/service/a").status_code == 405
    assert client.get("/nope/x").status_code == 404
    assert client.get("/v1/boom").status_code == 500
    after = _series(metrics.REGISTRY)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    tmpl = "/v1/health/service/{name}"
    assert delta("lictor_http_requests_total", method="GET", endpoint=tmpl, code="200") == 3
    assert delta("lictor_http_request_seconds_count", method="GET", endpoint=tmpl) == 3
    assert delta("lictor_http_requests_total", method="PUT", endpoint=tmpl, code="405") == 1
    assert delta("lictor_http_requests_total", method="GET", endpoint="unmatched", code="404") == 1
    assert delta("lictor_http_requests_total", method="GET", endpoint="/v1/boom", code="500") == 1
    assert not any("/v1/health/service/a" == dict(labels).get("endpoint") for _, labels in after)


def _dns_server() -> DnsServer:
    view = CatalogView.from_snapshot(
        {"Nodes": [{"Node": "n1", "Address": "10.0.0.1"}],
         "Services": [{"Node": "n1", "ID": "web", "Service": "web", "Port": 80}], "Checks": []},
        "dc1",
    )
    return DnsServer(lambda: view, DnsConfig(), rng=random.Random(1))


def test_dns_counts_by_qtype_and_rcode_on_fast_and_slow_paths() -> None:
    server = _dns_server()
    for _ in range(3):
        server.handle(bytes(DNSRecord.question("web.service.consul", "A").pack()), "udp")  # fast path, cached
    server.handle(bytes(DNSRecord.question("nope.service.consul", "SRV").pack()), "udp")
    q = DNSRecord.question("web.service.consul", "AAAA")
    q.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, b"\x01" * 8)]))  # a cookie: not the fast path
    server.handle(bytes(q.pack()), "udp")
    counts: dict[tuple[str, str], int] = {}
    for key, n in server.qcounts.items():
        counts[metrics._dns_labels(key)] = counts.get(metrics._dns_labels(key), 0) + n
    assert counts == {("A", "NOERROR"): 3, ("SRV", "NXDOMAIN"): 1, ("AAAA", "NOERROR"): 1}


def test_runtime_collector_reads_dns_and_raft_from_the_agent() -> None:
    from lictor.agent.dns_wiring import DnsService
    from lictor.registry.raft import LocalLog

    server = _dns_server()
    server.handle(bytes(DNSRecord.question("web.service.consul", "A").pack()), "udp")

    agent = SimpleNamespace(
        config=SimpleNamespace(server=True),
        extras=[DnsService(follower=None, server=server)],  # type: ignore[arg-type]
        local=None,
        server=SimpleNamespace(log=LocalLog()),
    )
    reg = CollectorRegistry()
    reg.register(metrics.RuntimeCollector(agent))
    series = _series(reg)
    assert series[("lictor_dns_queries_total", (("qtype", "A"), ("rcode", "NOERROR")))] == 1
    assert series[("lictor_raft_term", ())] == 1
    assert series[("lictor_raft_wedged", ())] == 0
    assert series[("lictor_catalog_nodes", ())] == 0


# -- monitor ---------------------------------------------------------------------------------


@pytest.fixture
def hub() -> Any:
    h = monitor.LogHub(size=5)
    h.base_level = logging.WARNING
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(h)
    h._apply_level()
    try:
        yield h
    finally:
        root.removeHandler(h)
        root.setLevel(old_level)


async def test_hub_fans_out_by_level_and_from_threads(hub: monitor.LogHub) -> None:
    log = logging.getLogger("lictor.test_monitor")
    debug_sub = hub.subscribe(logging.DEBUG)
    assert logging.getLogger().level == logging.DEBUG  # lowered while a debug monitor listens
    warn_sub = hub.subscribe(logging.WARNING)
    log.debug("d1")
    thread = threading.Thread(target=lambda: log.warning("from %s", "thread"))
    thread.start()
    thread.join()
    first = await asyncio.wait_for(debug_sub.queue.get(), 1)
    second = await asyncio.wait_for(debug_sub.queue.get(), 1)
    assert (first.message, second.message) == ("d1", "from thread")
    only = await asyncio.wait_for(warn_sub.queue.get(), 1)
    assert only.message == "from thread" and warn_sub.queue.empty()
    hub.unsubscribe(debug_sub)
    hub.unsubscribe(warn_sub)
    assert logging.getLogger().level == logging.WARNING  # back to the configured level


async def test_ring_keeps_the_last_records_and_formats(hub: monitor.LogHub) -> None:
    log = logging.getLogger("lictor.ring")
    for i in range(8):
        log.error("e%d", i)
    assert [e.message for e in hub.recent(logging.INFO, 100)] == ["e3", "e4", "e5", "e6", "e7"]
    assert [e.message for e in hub.recent(logging.INFO, 2)] == ["e6", "e7"]
    assert hub.recent(logging.INFO, 0) == []
    entry = hub.recent(logging.INFO, 1)[0]
    text = monitor.format_text(entry)
    assert text.endswith(" [ERROR] lictor.ring: e7\n") and text[10] == "T"
    assert '"@level": "error"' in monitor.format_json(entry)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    assert "ValueError: boom" in hub.recent(logging.INFO, 1)[0].message


def test_levels_and_flags() -> None:
    for word in ("trace", "DEBUG", "info", "warn", "err", "error"):
        assert monitor.parse_level(word) is not None
    assert monitor.parse_level("chatty") is None
    assert monitor._split_eq(["-archive=false", "-output", "x"], {"-archive"}) == ["-archive", "false", "-output", "x"]
    assert monitor._split_eq(["-archive"], {"-archive"}) == ["-archive", "true"]


def test_gateway_request_metrics_are_plain_counts_rendered_at_scrape() -> None:
    """The gateway keeps ints per (service, status) and builds Prometheus families only when scraped."""
    import time

    from lictor.gateway.proxy import _Metrics

    m = _Metrics()
    now = time.monotonic()
    m.count("web", 200, now - 0.003)
    m.count("web", 200, now - 0.2)
    m.count("web", 503, now - 0.0001)
    m.count("", 404, now)
    m.retries = 3
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    requests = {(s.labels["service"], s.labels["code"]): s.value for s in families["lictor_gateway_requests"].samples}
    assert requests == {("web", "200"): 2, ("web", "503"): 1, ("", "404"): 1}
    web = {s.labels.get("le", s.name): s.value for s in families["lictor_gateway_request_seconds"].samples
           if s.labels["service"] == "web"}
    assert web["0.001"] == 1 and web["0.005"] == 2 and web["0.25"] == 3 and web["+Inf"] == 3
    assert web["lictor_gateway_request_seconds_count"] == 3
    assert 0.2 < web["lictor_gateway_request_seconds_sum"] < 0.21
    assert families["lictor_gateway_retries"].samples[0].value == 3
    off = _Metrics(enabled=False)  # no -metrics-port: nothing is kept
    off.count("web", 200, now)
    assert "lictor_gateway_requests_total{" not in off.render().decode()


def test_http_stats_export_what_prometheus_client_would() -> None:
    """The plain-number HTTP stats render the same buckets, counts and sums as a prometheus_client
    Counter and Histogram fed the same requests (bounds included in their bucket)."""
    from prometheus_client import generate_latest

    rng = random.Random(7)
    buckets = (0.001, 0.005, 0.01, 0.5, 1.0)
    stats = metrics.HTTPStats(buckets)
    reference = CollectorRegistry()
    counter = Counter("lictor_http_requests", "HTTP requests answered, by route template",
                      ["method", "endpoint", "code"], registry=reference)
    hist = Histogram("lictor_http_request_seconds",
                     "HTTP request duration (blocking queries included), by route template",
                     ["method", "endpoint"], buckets=buckets, registry=reference)
    for _ in range(500):
        method, endpoint, code = rng.choice(["GET", "PUT"]), rng.choice(["/a", "/b/{x}"]), rng.choice([200, 404])
        seconds = rng.choice([*buckets, 2.0, rng.uniform(0, 1.2)])
        stats.observe(method, endpoint, code, seconds)
        counter.labels(method, endpoint, str(code)).inc()
        hist.labels(method, endpoint).observe(seconds)
    ours = CollectorRegistry()
    ours.register(stats)

    def lines(registry: CollectorRegistry) -> list[str]:
        out = []
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("#") or "_created" in line:
                continue
            name, value = line.rsplit(" ", 1)
            out.append(f"{name} {float(value):.9g}")
        return sorted(out)

    assert lines(ours) == lines(reference)
