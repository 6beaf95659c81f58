"""Metrics, monitor and debug against real agent processes (issue #7).

Every scrape goes through prometheus-client's own text parser, so "it parses" is checked on every
process; counters are compared before/after the traffic each test drives.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import consul
import httpx
import pytest
from procs import AgentProc, Cluster, wait_until
from prometheus_client.parser import text_string_to_metric_families

Metrics = dict[str, dict[tuple[tuple[str, str], ...], float]]

# `lictor <cmd>` through the CLI dispatcher, with lictor.monitor's commands registered.
LICTOR_CMD = [sys.executable, "-c",
              "import sys; from lictor import monitor; from lictor.cli import main; sys.exit(main(sys.argv[1:]))"]


def scrape(agent: AgentProc) -> Metrics:
    resp = agent.get("/v1/agent/metrics", params={"format": "prometheus"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Metrics = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def val(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def total(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for key, v in metrics.get(name, {}).items() if want <= set(key))


def dig(port: int, *args: str) -> str:
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args],
                         capture_output=True, text=True, timeout=10)
    return out.stdout


def slow_check_warning(agent: AgentProc, check_id: str) -> str:
    """Register a check whose 100ms interval the agent clamps with a logged warning; return that text."""
    resp = agent.put("/v1/agent/check/register",
                     json={"ID": check_id, "Name": check_id, "TCP": "127.0.0.1:1", "Interval": "100ms"})
    assert resp.status_code == 200, resp.text
    return f"check {check_id!r} has interval 100ms below the minimum of 1s"


def test_dev_agent_counters_move_with_traffic(dev_agent: AgentProc) -> None:
    before = scrape(dev_agent)
    for name in ("lictor_raft_term", "lictor_raft_commit_index", "lictor_raft_last_applied", "lictor_raft_wedged",
                 "lictor_catalog_nodes", "lictor_catalog_services", "lictor_catalog_checks",
                 "lictor_blocking_queries_in_flight", "lictor_event_loop_lag_seconds", "lictor_raft_apply_total",
                 "lictor_raft_leader_changes_total", "lictor_raft_commit_seconds_count"):
        assert name in before, f"{name} missing from {sorted(before)}"
    assert val(before, "lictor_raft_wedged") == 0
    assert val(before, "lictor_raft_leader_changes_total") >= 1

    # Service with a TTL check, then pass and fail it.
    resp = dev_agent.put("/v1/agent/service/register",
                         json={"ID": "web-1", "Name": "web", "Port": 8080, "Check": {"TTL": "30s"}})
    assert resp.status_code == 200, resp.text
    assert dev_agent.put("/v1/agent/check/pass/service:web-1").status_code == 200
    assert dev_agent.put("/v1/agent/check/fail/service:web-1", params={"note": "down"}).status_code == 200
    assert dev_agent.put("/v1/agent/check/pass/service:web-1").status_code == 200
    for i in range(5):
        assert dev_agent.put(f"/v1/kv/metrics/k{i}", content=b"v").json() is True
    for name in ("web", "other-svc", "third"):
        dev_agent.get(f"/v1/health/service/{name}")
    assert dev_agent.get("/v1/no/such/route/xyz").status_code == 404

    if shutil.which("dig"):
        wait_until(lambda: dig(dev_agent.dns_port, "web.service.consul", "+short").strip() == "127.0.0.1", 5,
                   what="web in DNS")
        assert "NXDOMAIN" in dig(dev_agent.dns_port, "nope.service.consul")
        dig(dev_agent.dns_port, "web.service.consul", "SRV", "+noedns")  # the fast (cached) path

    after = scrape(dev_agent)
    assert val(after, "lictor_check_runs_total", type="ttl") - val(before, "lictor_check_runs_total", type="ttl") >= 3
    assert val(after, "lictor_check_state_changes_total", status="critical") > val(
        before, "lictor_check_state_changes_total", status="critical")
    assert val(after, "lictor_check_state_changes_total", status="passing") - val(
        before, "lictor_check_state_changes_total", status="passing") >= 2
    assert val(after, "lictor_raft_commit_seconds_count") - val(before, "lictor_raft_commit_seconds_count") >= 5
    assert val(after, "lictor_raft_apply_total") - val(before, "lictor_raft_apply_total") >= 5
    assert val(after, "lictor_raft_commit_index") > val(before, "lictor_raft_commit_index")
    assert val(after, "lictor_catalog_services") == val(before, "lictor_catalog_services") + 1
    assert val(after, "lictor_kv_entries") >= 5
    assert val(after, "lictor_http_requests_total", method="PUT", endpoint="/v1/agent/service/register", code="200") >= 1
    assert total(after, "lictor_http_requests_total", endpoint="unmatched", code="404") >= 1

    # Endpoint labels are route templates: the three service names share one series.
    endpoints = {dict(k)["endpoint"] for k in after["lictor_http_requests_total"]}
    assert not any(n in e for e in endpoints for n in ("other-svc", "third", "web-1", "metrics/k")), endpoints
    health = [e for e in endpoints if e.startswith("/v1/health/service/")]
    assert len(health) == 1 and "{" in health[0], health
    assert total(after, "lictor_http_requests_total", endpoint=health[0]) >= 3
    assert total(after, "lictor_http_request_seconds_count", endpoint=health[0]) >= 3

    if shutil.which("dig"):
        grew = {k: v - before.get("lictor_dns_queries_total", {}).get(k, 0.0)
                for k, v in after["lictor_dns_queries_total"].items()}
        assert grew.get((("qtype", "A"), ("rcode", "NOERROR")), 0) >= 1, grew
        assert grew.get((("qtype", "A"), ("rcode", "NXDOMAIN")), 0) >= 1, grew
        assert grew.get((("qtype", "SRV"), ("rcode", "NOERROR")), 0) >= 1, grew


def test_blocking_queries_in_flight_gauge(dev_agent: AgentProc) -> None:
    index = dev_agent.get("/v1/catalog/services").headers["X-Consul-Index"]
    results: list[int] = []

    def block() -> None:
        resp = dev_agent.get("/v1/catalog/services", params={"index": index, "wait": "20s"}, timeout=30.0)
        results.append(resp.status_code)

    thread = threading.Thread(target=block)
    thread.start()
    wait_until(lambda: val(scrape(dev_agent), "lictor_blocking_queries_in_flight") == 1, 10, what="one blocked query")
    dev_agent.put("/v1/agent/service/register", json={"Name": "wake", "Port": 1})
    thread.join(15)
    assert results == [200]
    wait_until(lambda: val(scrape(dev_agent), "lictor_blocking_queries_in_flight") == 0, 5, what="gauge back to 0")


def test_json_metrics_through_py_consul(dev_agent: AgentProc) -> None:
    c = consul.Consul(host="127.0.0.1", port=dev_agent.http_port, connections_timeout=10)
    c.kv.put("json/a", "1")
    data = c.agent.metrics()
    assert set(data) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    assert data["Timestamp"].endswith("+0000 UTC")
    gauges = {g["Name"]: g for g in data["Gauges"]}
    assert gauges["lictor.catalog.nodes"]["Value"] == 1
    assert gauges["lictor.raft.wedged"]["Value"] == 0
    assert all(set(g) == {"Name", "Value", "Labels"} for g in data["Gauges"])
    counters = {(x["Name"], json.dumps(x["Labels"], sort_keys=True)): x for x in data["Counters"]}
    assert counters[("lictor.raft.apply", "{}")]["Count"] >= 1
    samples = {s["Name"]: s for s in data["Samples"]}
    commit = samples["lictor.raft.commit.seconds"]
    assert commit["Count"] >= 1 and commit["Sum"] > 0 and commit["Mean"] > 0

    text = c.agent.metrics(format_prometheus=True)
    text = text.decode() if isinstance(text, bytes) else text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"lictor_raft_commit_seconds", "lictor_http_requests", "lictor_catalog_nodes"} <= names


def test_monitor_streams_lines_logged_after_it_starts(dev_agent: AgentProc) -> None:
    bad = dev_agent.get("/v1/agent/monitor", params={"loglevel": "chatty"})
    assert bad.status_code == 400 and bad.text == "Unknown log level: chatty"

    for as_json in (False, True):
        params: dict[str, Any] = {"loglevel": "info"}
        if as_json:
            params["logjson"] = "true"
        check_id = f"fast-{int(as_json)}"
        with httpx.stream("GET", dev_agent.url + "/v1/agent/monitor", params=params,
                          timeout=httpx.Timeout(10.0, read=15.0)) as resp:
            assert resp.status_code == 200
            assert resp.headers.get("transfer-encoding") == "chunked"
            # The request is in (headers are back) before the line is logged.
            needle = slow_check_warning(dev_agent, check_id)
            for line in resp.iter_lines():
                if needle in line:
                    break
            else:
                pytest.fail("stream ended without the logged line")
        if as_json:
            entry = json.loads(line)
            assert entry["@level"] == "warn" and needle in entry["@message"] and entry["@module"].startswith("lictor")
        else:
            assert "[WARN]" in line and line[:4].isdigit()

    # A warn-level monitor does not see info; history replays buffered lines (Lictor extension).
    with httpx.stream("GET", dev_agent.url + "/v1/agent/monitor", params={"loglevel": "err", "history": "50"},
                      timeout=httpx.Timeout(10.0, read=1.5)) as resp:
        with pytest.raises(httpx.ReadTimeout):
            for line in resp.iter_lines():
                assert "[WARN]" not in line
    with httpx.stream("GET", dev_agent.url + "/v1/agent/monitor", params={"loglevel": "warn", "history": "50"},
                      timeout=httpx.Timeout(10.0, read=5.0)) as resp:
        first = next(resp.iter_lines())
        assert "fast-0" in first


def test_monitor_cli_prints_until_interrupted(dev_agent: AgentProc) -> None:
    proc = subprocess.Popen([*LICTOR_CMD, "monitor", "-log-level", "debug", "-http-addr", dev_agent.http_addr],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        # Until the CLI's stream is attached, a logged line may be missed: log until one arrives.
        deadline = time.monotonic() + 20
        i = 0
        while time.monotonic() < deadline and not any("cli-fast" in line for line in lines):
            slow_check_warning(dev_agent, f"cli-fast-{i}")
            i += 1
            time.sleep(0.3)
        assert any("cli-fast" in line and "[WARN]" in line for line in lines), (lines, proc.poll())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_debug_writes_a_bundle(dev_agent: AgentProc, tmp_path: Path) -> None:
    needle = slow_check_warning(dev_agent, "before-debug")
    out = tmp_path / "bundle"
    run = subprocess.run([*LICTOR_CMD, "debug", "-output", str(out), "-duration", "2s", "-interval", "1s",
                          "-http-addr", dev_agent.http_addr], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Captured metrics sample 3/3" in run.stdout and "Capture complete" in run.stdout
    for name in ("agent.json", "members.json", "raft.json", "index.json", "lictor.log"):
        assert (out / name).is_file(), name
    assert json.loads((out / "agent.json").read_text())["Config"]["NodeName"] == "dev"
    assert json.loads((out / "members.json").read_text())[0]["Name"] == "dev"
    assert "Servers" in json.loads((out / "raft.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert index["Errors"] == {} and index["Node"] == "dev"
    for i in range(3):
        sample = json.loads((out / "metrics" / f"{i:02d}.json").read_text())
        assert "Gauges" in sample and "Counters" in sample
        prom = (out / "metrics" / f"{i:02d}.prom").read_text()
        assert any(f.name == "lictor_raft_term" for f in text_string_to_metric_families(prom))
    assert needle in (out / "lictor.log").read_text()  # recent lines, from the agent's ring buffer
    with tarfile.open(tmp_path / "bundle.tar.gz") as tar:
        names = tar.getnames()
    assert "bundle/agent.json" in names and "bundle/metrics/02.prom" in names

    again = subprocess.run([*LICTOR_CMD, "debug", "-output", str(out), "-http-addr", dev_agent.http_addr],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "already exists" in again.stderr


@pytest.mark.slow
def test_cluster_every_server_scrapes_and_commits_are_timed(cluster: Cluster) -> None:
    servers = cluster.servers
    # Leader changes are sampled each second by the raft watcher; every server sees the first election.
    wait_until(lambda: all(val(scrape(s), "lictor_raft_leader_changes_total") >= 1 for s in servers), 10,
               what="leader observed everywhere")
    before = {s.name: scrape(s) for s in servers}
    leaders = [s.name for s in servers if val(before[s.name], "lictor_raft_is_leader") == 1]
    assert len(leaders) == 1, leaders
    terms = {val(before[s.name], "lictor_raft_term") for s in servers}
    assert len(terms) == 1 and terms.pop() >= 1

    writer = servers[1]
    c = consul.Consul(host="127.0.0.1", port=writer.http_port, connections_timeout=10)
    for i in range(10):
        assert c.kv.put(f"timed/{i}", str(i)) is True

    after_writer = scrape(writer)
    grew = val(after_writer, "lictor_raft_commit_seconds_count") - val(before[writer.name], "lictor_raft_commit_seconds_count")
    assert grew >= 10
    assert val(after_writer, "lictor_raft_commit_seconds_sum") > val(before[writer.name], "lictor_raft_commit_seconds_sum")

    def replicated() -> bool:
        now = {s.name: scrape(s) for s in servers}
        return all(
            val(now[s.name], "lictor_raft_apply_total") - val(before[s.name], "lictor_raft_apply_total") >= 10
            and val(now[s.name], "lictor_kv_entries") >= 10
            and val(now[s.name], "lictor_raft_last_applied") >= val(before[s.name], "lictor_raft_commit_index") + 10
            for s in servers
        )

    wait_until(replicated, 10, what="applies counted on every replica")
    for s in servers:
        m = scrape(s)
        assert val(m, "lictor_raft_wedged") == 0
        assert val(m, "lictor_catalog_nodes") == 3
        assert val(m, "lictor_build_info", version=dict(next(iter(m["lictor_build_info"])))["version"], role="server") == 1
        data = consul.Consul(host="127.0.0.1", port=s.http_port, connections_timeout=10).agent.metrics()
        assert any(g["Name"] == "lictor.raft.commit.index" and g["Value"] >= 10 for g in data["Gauges"])
