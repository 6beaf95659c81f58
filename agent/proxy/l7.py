"""HTTP upstreams: the sidecar's outbound listener parses requests and routes them by the discovery chain.

Theory of operation
-------------------
*Control plane* (`ChainWatcher`). Blocking queries follow every config-entry kind a chain reads
(`/v1/config/{service-defaults,proxy-defaults,service-router,service-splitter,service-resolver}`)
and `/v1/health/connect/<svc>?passing` for every service any compiled chain can send to. On any
change the chain of each upstream is recompiled (pure `lictor.gateway.chain.compile_chain`) and the
upstream's `RouteTable` (chain + healthy instances per target, subset filters applied) is replaced
whole. A request reads the table once when it starts, so in-flight requests finish on the chain they
began with and the next request (even on the same keep-alive connection) uses the new one. A chain
that needs a service whose health is not known yet is held back (up to `HEALTH_WAIT` s) until that
service's first answer arrives, so a new split never sends requests to a target with no instances.

The protocol of an upstream is the destination's service-defaults `Protocol`, else proxy-defaults
`Config.protocol`, else the upstream's own `Config.protocol`, else tcp. Only `http` (HTTP/1.1) is
routed here; tcp, http2 and grpc upstreams stay on the L4 relay (`outbound.py`).

*Data plane* (`HTTPOutbound` + `L7Router.handle`). Per request: `decide()` (route, split, retry
policy, timeout, header changes) -> `select_target()` (failover order, health, locally ejected
instances) -> `pick_instance()` (LB policy) -> a pooled keep-alive mTLS connection to the instance's
sidecar (`lictor.gateway.proxy.Pool`, which checks the server's SPIFFE id is the *target* service: a
split to another service means another identity). NumRetries / RetryOnConnectFailure /
RetryOnStatusCodes / RetryOn, RequestTimeout (504) and header changes happen here. The request body
is buffered (a retry needs it); the response streams once its status is accepted.

*Traces and access logs* (`L7Router.obs`, see `observe.py`). The app's W3C/B3 context (or a new
trace, sampled by ratio) is continued by one CLIENT span `outbound <service>` per attempt (upstream,
route, split target, attempt; the server's SPIFFE id once connected; status and retry count at the
end), whose context replaces the app's trace headers on that attempt. An unsampled request only gets
the context passed on under a fresh span id. With an access log each request writes one line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from lictor.agent.proxy.observe import Observer
from lictor.agent.proxy.watch import AgentClient, follow_index
from lictor.gateway.chain import ChainError, CompiledChain, HeaderMods, chain_protocol, compile_chain
from lictor.gateway.proxy import HTTPDownstream, Pool, UpstreamError, route_label
from lictor.gateway.proxy import Upstream as PooledConn
from lictor.gateway.router import (
    BalancerState,
    Instance,
    RequestHead,
    apply_header_mods,
    decide,
    hash_key,
    instances_by_target,
    pick_instance,
    select_target,
    should_retry,
)
from lictor.tracing import (
    ATTR_ATTEMPT,
    ATTR_INSTANCE,
    ATTR_PEER_SPIFFE_ID,
    ATTR_PROXY,
    ATTR_RETRY_COUNT,
    ATTR_ROUTE,
    ATTR_SERVICE,
    ATTR_SPLIT_TARGET,
    ATTR_TARGET,
    ATTR_UPSTREAM,
    CLIENT,
    TRACE_HEADERS,
    SpanRecord,
    TraceContext,
    Tracer,
    header_lines,
    new_span_id,
    span_name,
)

if TYPE_CHECKING:
    from lictor.agent.proxy.outbound import Upstream

__all__ = ["CHAIN_KINDS", "ChainWatcher", "HTTPOutbound", "L7Router", "RouteTable", "upstream_protocol"]

log = logging.getLogger("lictor.proxy.l7")

CHAIN_KINDS = ("service-defaults", "proxy-defaults", "service-router", "service-splitter", "service-resolver")
DEFAULT_REQUEST_TIMEOUT = 15.0  # Envoy's route timeout when neither route nor resolver sets one
EJECTION_TIME = 10.0  # an instance that refused a connection is skipped this long
HEALTH_WAIT = 2.0  # how long a new chain waits for the first health answer of a new service
MAX_PIPELINED = 16
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                         "upgrade", "content-length", "expect"})
_HOP_BY_HOP_AND_TRACE = _HOP_BY_HOP | TRACE_HEADERS  # a traced request carries its attempt's context instead
_RESPONSE_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "trailer",
                           "upgrade"})
_REASONS = {400: "Bad Request", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def upstream_protocol(destination: str, entries: Mapping[str, Mapping[str, Mapping[str, Any]]],
                      upstream_default: str = "") -> str:
    """service-defaults Protocol, else proxy-defaults Config.protocol, else the upstream's, else tcp."""
    return chain_protocol(destination, entries, default=(upstream_default or "tcp").lower())


@dataclass(frozen=True, slots=True)
class RouteTable:
    """What one HTTP upstream's requests read: swapped whole, never mutated."""

    chain: CompiledChain
    instances: Mapping[str, tuple[Instance, ...]] = field(default_factory=dict)  # target id -> healthy
    generation: int = 0

    def summary(self) -> dict[str, Any]:
        dest = self.chain.default_route.destination
        return {
            "Routes": len(self.chain.routes),
            "Splits": [{"Weight": s.weight, "Target": s.resolver.target.id} for s in dest.splits],
            "Targets": {tid: len(self.instances.get(tid, ())) for tid in sorted(self.chain.targets)},
            "Generation": self.generation,
        }


# ------------------------------------------------------------------------------ control plane

class ChainWatcher:
    """Follows config entries and target health; keeps every HTTP upstream's `RouteTable` current."""

    def __init__(self, client: AgentClient, datacenter: str = "dc1") -> None:
        self.client = client
        self.datacenter = datacenter
        self.entries: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in CHAIN_KINDS}
        self.health: dict[str, list[dict[str, Any]]] = {}
        self.upstreams: dict[tuple[str, int], Upstream] = {}
        self.ready = {k: asyncio.Event() for k in CHAIN_KINDS}
        self.tasks: list[asyncio.Task[None]] = []
        self.health_tasks: dict[str, asyncio.Task[None]] = {}
        self.generation = 0
        self._waiting_since: float | None = None
        self._retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for kind in CHAIN_KINDS:
            self.tasks.append(loop.create_task(
                follow_index(self.client, f"/v1/config/{kind}", {}, self._entries_setter(kind), ready=self.ready[kind],
                             allow_404=True, what=f"config {kind}"), name=f"config-{kind}"))

    async def wait_ready(self) -> None:
        await asyncio.gather(*(e.wait() for e in self.ready.values()))

    async def settled(self, timeout: float = HEALTH_WAIT + 1.0) -> None:
        """Until no chain waits for a first health answer (startup: route from the first request)."""
        deadline = time.monotonic() + timeout
        while self._waiting_since is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        tasks = [*self.tasks, *self.health_tasks.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # -- inputs -------------------------------------------------------------------------------

    def _entries_setter(self, kind: str) -> Callable[[Any], None]:
        def apply(body: Any) -> None:
            by_name = {e["Name"]: e for e in body or () if isinstance(e, dict) and e.get("Name")}
            if by_name != self.entries[kind]:
                self.entries[kind] = by_name
                self.recompile()

        return apply

    def _health_setter(self, service: str) -> Callable[[Any], None]:
        def apply(body: Any) -> None:
            entries = [e for e in body or () if isinstance(e, dict)]
            known = service in self.health
            self.health[service] = entries
            if known and self._waiting_since is None:
                self._refresh_instances()
            else:
                self.recompile()  # a chain may be waiting for this service's first answer

        return apply

    def attach(self, upstream: Upstream) -> None:
        self.upstreams[upstream.spec.listener_key] = upstream
        self.recompile()

    def detach(self, upstream: Upstream) -> None:
        self.upstreams.pop(upstream.spec.listener_key, None)
        self.recompile()

    # -- compiling ----------------------------------------------------------------------------

    def recompile(self) -> None:
        """Compile every upstream's chain from the current entries and swap the route tables."""
        chains: dict[tuple[str, int], CompiledChain | None] = {}
        for key, up in self.upstreams.items():
            dest = up.spec.destination
            protocol = upstream_protocol(dest, self.entries, up.spec.protocol)
            if protocol != "http":
                if protocol != "tcp":
                    log.debug("upstream %s: protocol %s is relayed at L4", dest, protocol)
                chains[key] = None
                continue
            try:
                chains[key] = compile_chain(dest, self.entries, protocol="http", datacenter=self.datacenter)
            except ChainError as exc:
                log.error("upstream %s: discovery chain does not compile (keeping the previous one): %s", dest, exc)
                chains[key] = up.route.chain if up.route is not None else None
        services = {t.service for c in chains.values() if c is not None for t in c.targets.values()}
        self._ensure_health_watches(services)
        missing = services - set(self.health)
        now = time.monotonic()
        if missing:
            if self._waiting_since is None:
                self._waiting_since = now
            if now - self._waiting_since < HEALTH_WAIT:
                # Hold the swap until the new services' instances are known; re-check soon anyway.
                if self._retry is None:
                    self._retry = asyncio.get_running_loop().call_later(0.25, self._retry_recompile)
                return
            log.warning("no health answer yet for %s; routing without their instances", ", ".join(sorted(missing)))
        self._waiting_since = None
        self.generation += 1
        for key, up in self.upstreams.items():
            chain = chains.get(key)
            old = up.route
            if chain is None:
                if old is not None:
                    log.info("upstream %s: L4 relay (protocol is not http)", up.spec.destination)
                up.route = None
                continue
            up.route = RouteTable(chain, instances_by_target(chain.targets.values(), self.health), self.generation)
            if old is None or old.chain != chain:
                log.info("upstream %s: discovery chain %s", up.spec.destination, up.route.summary())

    def _retry_recompile(self) -> None:
        self._retry = None
        if self._waiting_since is not None:
            self.recompile()

    def _refresh_instances(self) -> None:
        for up in self.upstreams.values():
            table = up.route
            if table is not None:
                up.route = RouteTable(table.chain, instances_by_target(table.chain.targets.values(), self.health),
                                      table.generation)

    def _ensure_health_watches(self, services: set[str]) -> None:
        loop = asyncio.get_running_loop()
        for name in services - set(self.health_tasks):
            self.health_tasks[name] = loop.create_task(
                follow_index(self.client, f"/v1/health/connect/{quote(name, safe='')}", {"passing": "1"},
                             self._health_setter(name), what=f"health/connect/{name}"), name=f"health-{name}")
        for name in set(self.health_tasks) - services:
            self.health_tasks.pop(name).cancel()
            self.health.pop(name, None)


# --------------------------------------------------------------------------------- data plane

@dataclass(slots=True)
class _Request:
    method: str
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool


def _error_response(status: int, text: str, keep_alive: bool) -> bytes:
    body = text.encode() + b"\n"
    conn = b"" if keep_alive else b"connection: close\r\n"
    return (b"HTTP/1.1 %d %b\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n%b\r\n%b"
            % (status, _REASONS.get(status, "Error").encode(), len(body), conn, body))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _same(data: bytes) -> bytes:
    return data


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class HTTPOutbound(HTTPDownstream):
    """The app's plain connection to an HTTP upstream's local port: parse, queue, serve in order."""

    upgrade_refusal = "protocol upgrades are not supported on an http upstream"

    def __init__(self, upstream: Upstream, router: L7Router) -> None:
        self._init_http()
        self.upstream = upstream
        self.router = router
        self.queue: list[_Request] = []
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._counted = False
        self.rec: _OutReq | None = None  # the request being served, when traced or logged

    # OutboundClient's interface for Upstream.stop()
    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        up = self.upstream
        if up.active >= up.spec.max_connections:
            up.state.stats.inc("upstream_overflow", upstream=up.spec.destination)
            log.warning("upstream %s: %d connections open, refusing (limit)", up.spec.destination, up.active)
            transport.abort()
            return
        up.active += 1
        self._counted = True
        up.clients.add(self)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.upstream.active -= 1
            self.upstream.clients.discard(self)  # type: ignore[arg-type]
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._resume_upstream()

    # httptools callbacks beyond the shared ones

    def on_headers_complete(self) -> None:
        # The body is buffered here (a retry needs it): a client waiting for 100 Continue gets it now.
        if self.transport is not None and any(k.lower() == b"expect" and v.lower() == b"100-continue"
                                              for k, v in self.headers):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_message_complete(self) -> None:
        p = self.parser
        self.queue.append(_Request(p.get_method().decode(), self.url, self.headers,
                                   b"".join(self.body) if self.body else b"", p.should_keep_alive()))
        if len(self.queue) >= MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve())
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.queue:
                    self.waiter = loop.create_future()
                    await self.waiter
                    self.waiter = None
                    continue
                req = self.queue.pop(0)
                keep = await self.router.handle(self, req)
                if self.transport is None or self.transport.is_closing():
                    return
                if not keep:
                    self.transport.close()
                    return
                if len(self.queue) < MAX_PIPELINED:
                    self.transport.resume_reading()
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one broken request must not leave the client hanging
            log.exception("upstream %s: request handling failed", self.upstream.spec.destination)
            if self.transport is not None:
                self.transport.abort()
        finally:
            self.task = None


class L7Router:
    """Serves requests of every HTTP upstream of one sidecar: shared pool, LB state and ejections."""

    def __init__(self, stats: Any, rng: random.Random | None = None) -> None:
        self.stats = stats
        self.rng = rng or random.Random()
        self.pool = Pool()
        self.lb_state = BalancerState()
        self.ejected: dict[str, float] = {}
        self.obs: Observer | None = None  # traces / access log (None or inactive: off)

    def set_tls(self, ctx: Any, trust_domain: str) -> None:
        self.pool.set_tls(ctx, trust_domain)

    def close(self) -> None:
        self.pool.close()

    def _excluded(self) -> set[str]:
        if not self.ejected:
            return set()
        now = time.monotonic()
        for iid in [i for i, until in self.ejected.items() if until <= now]:
            del self.ejected[iid]
        return set(self.ejected)

    def _reply(self, down: HTTPOutbound, req: _Request, dest: str, status: int, text: str) -> bool:
        if down.transport is not None and not down.transport.is_closing():
            down.transport.write(_error_response(status, text, req.keep_alive))
        self.stats.inc("upstream_rq", upstream=dest, code=str(status))
        if down.rec is not None:
            down.rec.status = status
            down.rec.error = text
        return req.keep_alive

    async def handle(self, down: HTTPOutbound, req: _Request) -> bool:
        """Serve one request; returns whether the app's connection stays open."""
        obs = self.obs
        if obs is None or (obs.tracer is None and obs.access_log is None):  # `not obs.active`, without a call
            return await self._handle(down, req, None)
        try:
            return await self._handle(down, req, obs)
        finally:
            rec, down.rec = down.rec, None
            if rec is not None:
                rec.finish(obs, down)

    async def _handle(self, down: HTTPOutbound, req: _Request, obs: Observer | None) -> bool:
        up = down.upstream
        dest = up.spec.destination
        table = up.route  # read once: this request finishes on this chain whatever changes meanwhile
        if table is None:
            # The destination is no longer http: close, so the app's next connection is relayed at L4.
            if down.transport is not None and not down.transport.is_closing():
                down.transport.write(_error_response(503, f"upstream {dest!r}: no http discovery chain", False))
            self.stats.inc("upstream_rq", upstream=dest, code="503")
            return False
        hdrs: dict[str, str] = {}
        for k, v in req.headers:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            hdrs[name] = f"{hdrs[name]},{value}" if name in hdrs else value
        url = req.url.decode("latin-1")
        path, _, query = url.partition("?")
        head = RequestHead(req.method, path, query, hdrs, down.peer)
        d = decide(table.chain, head, self.rng.random() * 100.0)
        lb = d.resolver.load_balancer
        key, set_cookie = hash_key(lb.hash_policies, head, self.rng) if lb.hash_policies else (None, None)
        # Tracing: `trace` is the header block every attempt sends (unsampled: a new trace's traceparent,
        # or PASS: the app's own trace headers go on as they came); a sampled request starts a span per
        # attempt instead (`rec.attempt`).
        rec: _OutReq | None = None
        trace = b""
        tracer = obs.tracer if obs is not None else None
        replace_trace = tracer is not None  # the app's trace headers are dropped (ours go instead)
        if obs is not None:
            span_id = None
            ctx: TraceContext | None
            if tracer is not None and obs.access_log is None:
                hop = tracer.hop_from(hdrs)  # unsampled: only the header lines, nothing else
                if isinstance(hop, bytes):
                    trace, ctx = hop, None
                    replace_trace = bool(hop)  # PASS (b""): the unsampled app's context goes on as is
                else:
                    ctx = hop
            else:
                ctx = TraceContext.from_headers(hdrs)
                if tracer is not None:
                    ctx = tracer.root(ctx)
                    if not ctx.sampled:
                        span_id = new_span_id()
                        trace = header_lines(ctx.trace_id, span_id, False, ctx.tracestate, ctx.b3)
            if (ctx is not None and ctx.sampled and tracer is not None) or obs.access_log is not None:
                rec = down.rec = _OutReq(tracer, ctx, span_id, req, path, dest, d)
        skip = _HOP_BY_HOP_AND_TRACE if replace_trace else _HOP_BY_HOP
        out_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers
                       if k.decode("latin-1").lower() not in skip]
        out_headers = apply_header_mods(out_headers, d.request_headers)
        target_path = d.path + (f"?{query}" if query else "")
        lines = [f"{req.method} {target_path} HTTP/1.1\r\n"]
        lines.extend(f"{k}: {v}\r\n" for k, v in out_headers)
        if req.body or req.method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(req.body)}\r\n")
        head_bytes = "".join(lines).encode("latin-1")
        payload = head_bytes + trace + b"\r\n" + req.body
        per_attempt = rec is not None and rec.sampled

        started = time.monotonic()
        deadline = started + (d.timeout or DEFAULT_REQUEST_TIMEOUT)
        loop = asyncio.get_running_loop()
        attempt = 0
        free_retries = 2  # a stale pooled connection closing under us is not the route's retry
        last_error = "no healthy upstream"
        instances = table.instances
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._reply(down, req, dest, 504, "upstream request timeout")
            pick = select_target(d.resolver, instances, self._excluded())
            if pick is None:
                current = up.route  # health may have moved on since the request started
                if current is not None and current.chain == table.chain:
                    instances = current.instances
                    pick = select_target(d.resolver, instances, self._excluded())
            if pick is None:
                return self._reply(down, req, dest, 503, last_error)
            inst = pick_instance(pick.instances, lb, self.lb_state, self.rng, key, pick.target.id)
            if rec is not None:
                rec.address = f"{inst.address}:{inst.port}"
                if per_attempt:
                    payload = head_bytes + rec.attempt(pick.target, inst, attempt) + b"\r\n" + req.body
            try:
                conn, reused = await self.pool.acquire(inst, pick.target, min(pick.target.connect_timeout, remaining))
            except UpstreamError as exc:
                last_error = str(exc)
                self.ejected[inst.id] = time.monotonic() + EJECTION_TIME
                self.stats.inc("upstream_connect_errors", upstream=dest)
                log.warning("upstream %s: %s %s: %s", dest, pick.target.id, inst.id, exc)
                if rec is not None:
                    rec.attempt_end(0, last_error)
                if should_retry(d.retry, attempt, connect_failure=True):
                    attempt += 1
                    self.stats.inc("upstream_rq_retry", upstream=dest)
                    if rec is not None:
                        rec.retries = attempt
                    continue
                if free_retries > 0 and (pick.failover or len(pick.instances) > 1 or len(d.resolver.targets) > 1):
                    free_retries -= 1  # another instance or a failover target may serve
                    continue
                return self._reply(down, req, dest, 503, last_error)
            self.lb_state.inflight[inst.id] = self.lb_state.inflight.get(inst.id, 0) + 1
            if rec is not None:
                rec.connected(conn.peer_id)
            try:
                conn.start(payload, req.method == "HEAD")
                assert conn.head is not None
                timer = loop.call_at(loop.time() + (deadline - time.monotonic()), _expire, conn.head)
                try:
                    await conn.head
                except TimeoutError:
                    conn.abort()
                    if rec is not None:
                        rec.attempt_end(0, "upstream request timeout")
                    return self._reply(down, req, dest, 504, "upstream request timeout")
                except UpstreamError as exc:
                    last_error = str(exc)
                    if rec is not None:
                        rec.attempt_end(0, last_error)
                    if reused and not conn.received and free_retries > 0:
                        free_retries -= 1
                        continue
                    if should_retry(d.retry, attempt, reset=True):
                        attempt += 1
                        self.stats.inc("upstream_rq_retry", upstream=dest)
                        if rec is not None:
                            rec.retries = attempt
                        continue
                    # Envoy's answer to a reset before headers (e.g. the far sidecar's intention
                    # closed the connection) is a 503, not a 502.
                    return self._reply(down, req, dest, 503, last_error)
                finally:
                    timer.cancel()
                status = conn.status
                if should_retry(d.retry, attempt, status=status):
                    attempt += 1
                    self.stats.inc("upstream_rq_retry", upstream=dest)
                    if rec is not None:
                        rec.attempt_end(status)
                        rec.retries = attempt
                    await self._discard(conn, deadline)
                    continue
                self.stats.inc("upstream_rq", upstream=dest, code=str(status))
                self.stats.inc("upstream_rq_target", upstream=dest, target=pick.target.id)
                if rec is not None:
                    rec.status = status
                    rec.attempt_end(status)
                return await self._relay(down, req, conn, d.response_headers, set_cookie, deadline)
            finally:
                self.lb_state.inflight[inst.id] -= 1

    async def _discard(self, conn: PooledConn, deadline: float) -> None:
        """Throw a retried response away; keep the connection only if its body ends soon."""
        assert conn.done is not None
        if not conn.done.done():
            try:
                async with asyncio.timeout(min(1.0, max(deadline - time.monotonic(), 0.001))):
                    await conn.done
            except (TimeoutError, UpstreamError):
                conn.abort()
                return
        self.pool.release(conn)

    async def _relay(self, down: HTTPOutbound, req: _Request, conn: PooledConn, mods: HeaderMods,
                     set_cookie: str | None, deadline: float) -> bool:
        transport = down.transport
        assert conn.done is not None
        if transport is None or transport.is_closing():
            conn.abort()
            return False
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in conn.headers]
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        headers = [(k, v) for k, v in headers if k.lower() not in _RESPONSE_HOP]
        headers = apply_header_mods(headers, mods)
        if set_cookie:
            headers.append(("set-cookie", set_cookie))
        no_body = req.method == "HEAD" or conn.status in (204, 304) or 100 <= conn.status < 200
        chunked = length is None and not no_body
        if chunked:
            headers.append(("transfer-encoding", "chunked"))
        keep = req.keep_alive
        if not keep:
            headers.append(("connection", "close"))
        reason = _REASONS.get(conn.status, "OK" if conn.status < 400 else "Error")
        head = (f"HTTP/1.1 {conn.status} {reason}\r\n".encode()
                + "".join(f"{k}: {v}\r\n" for k, v in headers).encode("latin-1") + b"\r\n")
        if no_body:
            transport.write(head)
            if not conn.done.done():
                conn.abort()
            else:
                self.pool.release(conn)
            return keep
        encode: Callable[[bytes], bytes] = _chunk if chunked else _same
        rec = down.rec
        if conn.done.done():  # the whole response is here already: one write
            body = b"".join(conn.chunks)
            if rec is not None:
                rec.sent = len(body)
            transport.write(head + (encode(body) if body else b"") + (b"0\r\n\r\n" if chunked else b""))
            self.pool.release(conn)
            return keep
        transport.write(head + b"".join(encode(c) for c in conn.chunks if c))
        if rec is not None:
            rec.sent = sum(len(c) for c in conn.chunks)

        def sink(chunk: bytes) -> None:
            if chunk:
                if rec is not None:
                    rec.sent += len(chunk)
                transport.write(encode(chunk))
                if down.can_write is not None and conn.transport is not None:
                    conn.transport.pause_reading()  # the app reads slower than the upstream sends
                    down.upstream_paused = conn

        conn.sink = sink
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                await conn.done
        except (TimeoutError, UpstreamError):
            conn.abort()
            transport.abort()  # the head is out: the only honest signal left is a reset
            return False
        if chunked:
            transport.write(b"0\r\n\r\n")
        conn.sink = None
        self.pool.release(conn)
        return keep


# A sampled request's attempt spans, as span records (lictor.tracing.SpanRecord): their attribute names.
_TRY_KEYS = (ATTR_SERVICE, ATTR_PROXY, ATTR_UPSTREAM, ATTR_ROUTE, ATTR_SPLIT_TARGET, ATTR_TARGET, ATTR_INSTANCE,
             "server.address", ATTR_ATTEMPT, ATTR_PEER_SPIFFE_ID, ATTR_RETRY_COUNT)


class _OutReq:
    """One traced or access-logged request on an http upstream: its attempts' spans and its log fields.

    A sampled request's attempt spans are plain fields until they end, then span records handed to
    the exporter together when the request finishes (no Span objects on the event loop)."""

    __slots__ = ("tracer", "ctx", "sampled", "trace_id", "span_id", "started", "method", "path", "received",
                 "upstream", "route", "split", "status", "error", "retries", "sent", "address", "peer_id",
                 "try_", "records")

    def __init__(self, tracer: Tracer | None, ctx: TraceContext | None, span_id: str | None, req: _Request,
                 path: str, upstream: str, d: Any) -> None:
        self.tracer = tracer
        self.ctx = ctx
        self.sampled = tracer is not None and ctx is not None and ctx.sampled
        self.trace_id = ctx.trace_id or None if ctx is not None else None
        self.span_id = span_id
        self.started = time.monotonic()
        self.method = req.method
        self.path = path
        self.received = len(req.body)
        self.upstream = upstream
        self.route = route_label(d.route)
        self.split = d.resolver.name
        self.status = 0
        self.error = ""
        self.retries = 0
        self.sent = 0
        self.address = ""
        self.peer_id = ""
        self.try_: list[Any] | None = None  # the open try: [span id, service, target id, instance, attempt, peer, start]
        self.records: list[SpanRecord] = []

    def attempt(self, target: Any, inst: Instance, attempt: int) -> bytes:
        """Open one try's CLIENT span; returns its context as header lines."""
        ctx = self.ctx
        assert self.tracer is not None and ctx is not None
        if self.try_ is not None:
            self.attempt_end(0, "superseded")  # defensive: a try that was not ended
        if not ctx.trace_id:  # a bare B3 decision: this hop starts the trace (tracer.root gives it an id)
            self.ctx = ctx = self.tracer.root(ctx)
            self.trace_id = ctx.trace_id
        self.span_id = span_id = new_span_id()
        self.try_ = [span_id, target.service, target.id, inst.id, attempt, None, time.time_ns()]
        return header_lines(ctx.trace_id, span_id, True, ctx.tracestate, ctx.b3)

    def connected(self, peer_id: str) -> None:
        self.peer_id = peer_id
        if self.try_ is not None and peer_id:
            self.try_[5] = peer_id

    def attempt_end(self, status: int, error: str = "") -> None:
        t = self.try_
        if t is not None:
            self.try_ = None
            ctx = self.ctx
            tracer = self.tracer
            assert ctx is not None and tracer is not None
            self.records.append((
                tracer, span_name("outbound", t[1]), CLIENT, ctx.trace_id, t[0], ctx.span_id, ctx.tracestate, t[6],
                time.time_ns(), _TRY_KEYS,
                (tracer.service, "sidecar", self.upstream, self.route, self.split, t[2], t[3], self.address, t[4], t[5],
                 self.retries), status, error, None))

    def finish(self, obs: Observer, down: HTTPOutbound) -> None:
        if self.try_ is not None:
            self.attempt_end(0, "request ended before the upstream answered")  # cancelled mid-try
        if self.records and self.tracer is not None and self.tracer.submit is not None:
            self.tracer.submit(self.records)
        if obs.access_log is not None:
            obs.access_log.row(self.started, (
                self.trace_id, self.span_id, "sidecar", obs.service, self.upstream, self.route, self.split,
                self.address or None, self.method, self.path, self.status,
                round((time.monotonic() - self.started) * 1000, 3), self.received, self.sent, self.retries, None,
                down.peer, self.peer_id or None))
