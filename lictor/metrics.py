"""Process metrics (issue #7): one prometheus-client registry per process, served by /v1/agent/metrics.

Hot paths only touch pre-built metric children or plain counters; everything that can be read
from existing state (raft status, catalog sizes, DNS counts, local agent) is computed at scrape
time by `RuntimeCollector`, so an idle agent pays nothing for it.

Exposition: `?format=prometheus` gives the text format; the default is Consul's JSON shape
`{Timestamp, Gauges, Points, Counters, Samples}` with our names dotted (`lictor.raft.commit.seconds`).
Counters and samples are cumulative since the process started (Consul's are per 10 s interval).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response

from lictor import __version__

# Not the global default registry: tests and embedders may build several agents in one
# interpreter, and library code registering into the default must not leak into our scrape.
REGISTRY = CollectorRegistry()
disable_created_metrics()  # the `_created` series double the exposition and nobody reads them
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)

RAFT_COMMIT_SECONDS = Histogram(
    "lictor_raft_commit_seconds", "Time from submitting a command to seeing it applied (this node's writes)",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
RAFT_APPLY = Counter("lictor_raft_apply", "Commands applied to this replica's state machine", registry=REGISTRY)
RAFT_LEADER_CHANGES = Counter(
    "lictor_raft_leader_changes", "Times this node observed a new Raft leader (including the first)",
    registry=REGISTRY,
)


class InFlight:
    """A count kept as a plain integer (event-loop only, so no lock) and read at scrape time: a
    prometheus_client Gauge takes a lock per inc and dec, twice per blocking-query round."""

    def __init__(self) -> None:
        self.count = 0

    def inc(self) -> None:
        self.count += 1

    def dec(self) -> None:
        self.count -= 1


BLOCKING_IN_FLIGHT = InFlight()
Gauge(
    "lictor_blocking_queries_in_flight", "Blocking queries currently waiting for a change", registry=REGISTRY
).set_function(lambda: BLOCKING_IN_FLIGHT.count)
BLOCKING_COALESCED = Counter(
    "lictor_blocking_queries_coalesced",
    "Blocking queries woken by a change soon after they arrived and answered at the coalescing mark instead",
    registry=REGISTRY,
)
LOOP_LAG = Gauge(
    "lictor_event_loop_lag_seconds", "Oversleep of the last 0.25 s event-loop probe (loop responsiveness)",
    registry=REGISTRY,
)
LOOP_LAG_HIST = Histogram(
    "lictor_event_loop_oversleep_seconds", "Distribution of event-loop probe oversleep",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=REGISTRY,
)

_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH"})
_STATUSES = frozenset({"passing", "warning", "critical", "maintenance"})
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

# Check counts are bumped on the event loop only, thousands of times a second with many checks:
# plain dict increments (~0.1 us, no lock) exported at scrape time, instead of prometheus
# Counters (a lock per increment, ~5 us on a loaded box).
CHECK_RUNS: dict[str, int] = {}
CHECK_STATE_CHANGES: dict[str, int] = {}


def count_check_run(kind: str) -> None:
    CHECK_RUNS[kind] = CHECK_RUNS.get(kind, 0) + 1


def count_check_state_change(status: str) -> None:
    CHECK_STATE_CHANGES[status] = CHECK_STATE_CHANGES.get(status, 0) + 1


class _CheckCountsCollector:
    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("lictor_check_runs", "Health check evaluations, by check type", labels=["type"])
        for kind, count in sorted(CHECK_RUNS.copy().items()):
            runs.add_metric([kind or "unknown"], count)
        yield runs
        changes = CounterMetricFamily("lictor_check_state_changes", "Health check status transitions, by new status",
                                      labels=["status"])
        by_status: dict[str, int] = {}
        for status, count in CHECK_STATE_CHANGES.copy().items():
            label = status if status in _STATUSES else "other"
            by_status[label] = by_status.get(label, 0) + count
        for status, count in sorted(by_status.items()):
            changes.add_metric([status], count)
        yield changes


REGISTRY.register(_CheckCountsCollector())


class HTTPStats:
    """Requests per (method, route template, status) and a duration histogram per (method, route),
    kept as plain numbers: each request bumps them once, and prometheus_client's labelled children
    take a lock per increment and per bucket (~3 % of a cached read's CPU). Exported at scrape time
    as `lictor_http_requests_total` and `lictor_http_request_seconds`."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts: dict[tuple[str, str, str], int] = {}
        # per (method, endpoint): a count per bucket (not cumulative), one for +Inf, then the sum
        self.durations: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, endpoint: str, code: int, seconds: float) -> None:
        key = (method, endpoint, str(code))
        self.counts[key] = self.counts.get(key, 0) + 1
        slots = self.durations.get((method, endpoint))
        if slots is None:
            slots = self.durations[(method, endpoint)] = [0.0] * (len(self.buckets) + 2)
        slots[bisect.bisect_left(self.buckets, seconds)] += 1  # a bucket counts values <= its bound
        slots[-1] += seconds

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("lictor_http_requests", "HTTP requests answered, by route template",
                                       labels=["method", "endpoint", "code"])
        for labels, count in sorted(self.counts.copy().items()):
            requests.add_metric(list(labels), count)
        yield requests
        seconds = HistogramMetricFamily(
            "lictor_http_request_seconds", "HTTP request duration (blocking queries included), by route template",
            labels=["method", "endpoint"],
        )
        for labels, slots in sorted(self.durations.copy().items()):
            slots = list(slots)
            cumulative, buckets = 0.0, []
            for bound, count in zip(self.buckets, slots, strict=False):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            buckets.append(("+Inf", cumulative + slots[len(self.buckets)]))
            seconds.add_metric(list(labels), buckets, sum_value=slots[-1])
        yield seconds


HTTP_STATS = HTTPStats(_HTTP_BUCKETS)
REGISTRY.register(HTTP_STATS)


def raft_applied(_index: int = 0) -> None:
    """A StateStore listener (called on the Raft tick thread; prometheus counters are thread-safe)."""
    RAFT_APPLY.inc()


# -- HTTP ------------------------------------------------------------------------------------


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by its route *template* (bounded label cardinality)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before answering, the server answers 500
        start = time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # Starlette's router records the matched route in the scope
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            if method not in _METHODS:
                method = "OTHER"
            HTTP_STATS.observe(method, endpoint, status, time.perf_counter() - start)


# -- scrape-time state -----------------------------------------------------------------------


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class RuntimeCollector:
    """Reads the running agent's state at scrape time: raft, catalog, local agent, DNS."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def describe(self) -> list[Metric]:
        return []  # no up-front collect (the agent is not started yet at registration)

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("lictor_build_info", "Build information", labels=["version", "role"])
        info.add_metric([__version__, "server" if self.agent.config.server else "client"], 1)
        yield info
        yield from self._raft()
        yield from self._local()
        yield from self._dns()

    def _raft(self) -> Iterator[Metric]:
        server = self.agent.server
        log = getattr(server, "log", None)
        if log is None:
            return
        try:
            status = log.status()
        except Exception:  # a half-started node must not break the whole scrape
            status = {}
        yield _gauge("lictor_raft_term", "Current Raft term", float(status.get("term") or 0))
        yield _gauge("lictor_raft_commit_index", "Highest log index known committed", float(status.get("commit_index") or 0))
        yield _gauge("lictor_raft_last_applied", "Highest log index applied to the state machine",
                     float(status.get("last_applied") or 0))
        yield _gauge("lictor_raft_wedged", "1 while the wedge detector reports this node stuck", 1.0 if status.get("wedged") else 0.0)
        yield _gauge("lictor_raft_is_leader", "1 on the current Raft leader", 1.0 if status.get("state") == "leader" else 0.0)
        tick_errors = CounterMetricFamily("lictor_raft_tick_errors", "Exceptions raised on the Raft tick thread")
        tick_errors.add_metric([], float(status.get("tick_errors") or 0))
        yield tick_errors
        acks_skipped = CounterMetricFamily(
            "lictor_raft_acks_skipped", "AppendEntries acknowledgements not repeated to the leader (nothing new to say)")
        acks_skipped.add_metric([], float(status.get("acks_skipped") or 0))
        yield acks_skipped
        store = log.store
        with store.lock:  # apply runs under this lock on the tick thread; sizes must be consistent
            nodes = len(store.nodes)
            services = sum(len(s) for s in store.services.values())
            checks = sum(len(c) for c in store.checks.values())
            names = len({svc.get("Service", "") for s in store.services.values() for svc in s.values()})
            kv = len(store.kv)
            index = store.index
        yield _gauge("lictor_catalog_nodes", "Nodes in the catalog", nodes)
        yield _gauge("lictor_catalog_services", "Service instances in the catalog", services)
        yield _gauge("lictor_catalog_service_names", "Distinct service names in the catalog", names)
        yield _gauge("lictor_catalog_checks", "Health checks in the catalog", checks)
        yield _gauge("lictor_kv_entries", "Keys in the KV store", kv)
        yield _gauge("lictor_state_index", "The state store's index", index)

    def _local(self) -> Iterator[Metric]:
        local = self.agent.local
        if local is None:
            return
        yield _gauge("lictor_agent_services", "Services registered on this agent", len(local.services))
        yield _gauge("lictor_agent_checks", "Checks registered on this agent", len(local.checks))
        yield _gauge("lictor_agent_in_sync", "1 when the local state is synced to the servers",
                     1.0 if getattr(local, "in_sync", False) else 0.0)
        stats = getattr(getattr(local, "runner", None), "stats", None)
        if stats is not None:
            skipped = CounterMetricFamily("lictor_check_skipped", "Interval check runs skipped", labels=["reason"])
            skipped.add_metric(["busy"], stats.skipped_busy)
            skipped.add_metric(["late"], stats.skipped_late)
            yield skipped
            yield _gauge("lictor_check_dispatch_lag_max_seconds", "Largest check dispatch lateness seen", stats.max_lag)

    def _dns(self) -> Iterator[Metric]:
        servers = [getattr(e, "server", None) for e in self.agent.extras]
        servers = [s for s in servers if s is not None and hasattr(s, "qcounts")]
        if not servers:
            return
        queries = CounterMetricFamily("lictor_dns_queries", "DNS queries answered, by qtype and rcode", labels=["qtype", "rcode"])
        totals: dict[tuple[str, str], int] = {}
        hits = forwarded = 0
        for server in servers:
            for key, count in list(server.qcounts.items()):
                qtype, rcode = _dns_labels(key)
                totals[(qtype, rcode)] = totals.get((qtype, rcode), 0) + count
            hits += server.stats.get("cache_hits", 0)
            forwarded += server.stats.get("forwarded", 0)
        for labels, count in sorted(totals.items()):
            queries.add_metric(list(labels), count)
        yield queries
        cache = CounterMetricFamily("lictor_dns_cache_hits", "DNS answers served from the wire cache")
        cache.add_metric([], hits)
        yield cache
        fwd = CounterMetricFamily("lictor_dns_forwarded", "DNS queries forwarded to recursors")
        fwd.add_metric([], forwarded)
        yield fwd


def _qtype_name(qtype: int) -> str:
    try:
        from dnslib import QTYPE

        return str(QTYPE.get(qtype))
    except Exception:
        return str(qtype)


def _dns_labels(key: int | tuple[int, str]) -> tuple[str, str]:
    """DnsServer.qcounts keys: `qtype << 4 | rcode` on the hot path, `(qtype, outcome)` otherwise."""
    if isinstance(key, tuple):
        return _qtype_name(key[0]), key[1]
    return _qtype_name(key >> 4), _RCODES.get(key & 15, str(key & 15))


# -- the runtime hook --------------------------------------------------------------------------


async def _probe_loop_lag(interval: float = 0.25) -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - start - interval)
        LOOP_LAG.set(lag)
        LOOP_LAG_HIST.observe(lag)


_std_registered = False


def _std_collectors() -> None:
    """Process/platform/GC collectors, into our registry (once per interpreter)."""
    global _std_registered
    if _std_registered:
        return
    _std_registered = True
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)
    GCCollector(registry=REGISTRY)


class MetricsRuntime:
    """What the runtime keeps in `extras`: the scrape-time collector and the loop-lag probe."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.collector = RuntimeCollector(agent)
        self._task: asyncio.Task[None] | None = None
        self._hooked_store: Any = None

    def start(self) -> None:
        _std_collectors()
        REGISTRY.register(self.collector)
        self._task = asyncio.get_running_loop().create_task(_probe_loop_lag(), name="loop-lag-probe")

    def hook_store(self) -> None:
        """Count applies: a listener on the state store (called once consensus is up)."""
        log = getattr(self.agent.server, "log", None)
        if log is not None and self._hooked_store is None:
            self._hooked_store = log.store
            log.store.listeners.append(raft_applied)

    async def stop(self) -> None:
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(self.collector)
        if self._hooked_store is not None:
            with contextlib.suppress(ValueError):
                self._hooked_store.listeners.remove(raft_applied)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


# -- exposition ------------------------------------------------------------------------------


def _dotted(name: str) -> str:
    """`lictor_raft_commit_seconds` → `lictor.raft.commit.seconds`: Consul-style dotted names, mechanically."""
    return name.replace("_", ".")


def consul_json(registry: CollectorRegistry = REGISTRY) -> dict[str, Any]:
    """Consul's /v1/agent/metrics shape from our registry."""
    gauges: list[dict[str, Any]] = []
    counters: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for family in registry.collect():
        if family.type == "counter":
            for s in family.samples:
                if s.name.endswith("_total"):
                    counters.append({"Name": _dotted(family.name), "Count": s.value, "Sum": s.value,
                                     "Value": s.value, "Labels": dict(s.labels)})
        elif family.type in ("histogram", "summary"):
            grouped: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("le", "quantile")))
                if s.name.endswith("_count"):
                    grouped.setdefault(labels, {})["count"] = s.value
                elif s.name.endswith("_sum"):
                    grouped.setdefault(labels, {})["sum"] = s.value
            for labels, agg in grouped.items():
                count, total = agg.get("count", 0.0), agg.get("sum", 0.0)
                samples.append({"Name": _dotted(family.name), "Count": count, "Sum": total,
                                "Mean": total / count if count else 0.0, "Labels": dict(labels)})
        else:  # gauge, info, unknown
            for s in family.samples:
                gauges.append({"Name": _dotted(s.name), "Value": s.value, "Labels": dict(s.labels)})
    return {
        "Timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC"),
        "Gauges": gauges,
        "Points": [],
        "Counters": counters,
        "Samples": samples,
    }


async def agent_metrics(request: Request) -> Response:
    """GET /v1/agent/metrics[?format=prometheus]."""
    import json

    if request.query_params.get("format") == "prometheus":
        return Response(generate_latest(REGISTRY), media_type=PROMETHEUS_CONTENT_TYPE)
    pretty = "pretty" in request.query_params
    body = json.dumps(consul_json(), indent=4 if pretty else None)
    return Response(body, media_type="application/json")
