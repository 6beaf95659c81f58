"""The ingress gateway process: control plane (blocking queries) and data plane (asyncio Protocols).

Theory of operation
-------------------
*Control plane.* `Gateway.run()` starts blocking-query loops against the local agent: the
`ingress-gateway` entry named after the gateway's service, every kind of config entry a chain reads,
the CA roots, the gateway's own leaf, and `/v1/health/connect/<svc>` for every service any chain can
send to. Each loop stores what it got and sets one `asyncio.Event`; the compiler task wakes on it,
recompiles every chain (pure `compile_chain`) and swaps `self.snapshot` whole. A request reads the
snapshot once when it starts, so in-flight requests finish on the chain they began with. Listener
ports follow the entry: new ports are bound, removed ones closed.

*Data plane.* `Downstream` parses requests with httptools and serves them in order (keep-alive and
pipelining). For each request: Host -> exposed service -> chain -> `decide()` (route, split, retry
policy, timeout, header changes) -> `select_target()` (failover order, health, subset filters,
locally ejected instances) -> `pick_instance()` (LB policy) -> a pooled keep-alive mTLS connection
to the instance's sidecar (`Upstream`, one request at a time, HTTP/1.1), opened with the gateway's
own leaf, the server's SPIFFE id checked against the target service. Retries, the route timeout
(504 `upstream request timeout`) and header changes happen here; no body is buffered beyond what a
retry needs (the request body; the response streams once its status is accepted).

*Observability* (both optional, off unless configured). With `-otlp-endpoint` every request gets an
inbound (SERVER) span, continuing the caller's W3C/B3 context or starting a trace, and one outbound
(CLIENT) span per upstream attempt, whose context is what the sidecar receives in `traceparent`; a
retried request shows one outbound span per try and `retry.count` plus a `retry` event per retry on
the inbound span. With `-access-log` each request appends one JSON line. Both only append to a
bounded queue on the event loop; encoding and I/O run in a background thread (lictor.tracing,
lictor.accesslog).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httptools
import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from lictor.accesslog import AccessLog
from lictor.agent.proxy.tls import TLSMaterial, client_context, peer_uris
from lictor.gateway.chain import ChainError, CompiledChain, HeaderMods, Target, compile_chain
from lictor.gateway.ingress import IngressListener, build_listeners
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
    ATTR_CLIENT_ADDRESS,
    ATTR_INSTANCE,
    ATTR_METHOD,
    ATTR_PATH,
    ATTR_PEER_SPIFFE_ID,
    ATTR_PROXY,
    ATTR_RETRY_COUNT,
    ATTR_ROUTE,
    ATTR_SERVICE,
    ATTR_SPLIT_TARGET,
    ATTR_TARGET,
    ATTR_UPSTREAM,
    CLIENT,
    SERVER,
    TRACE_HEADERS,
    OtlpExporter,
    SpanRecord,
    TraceContext,
    Tracer,
    header_lines,
    new_span_id,
    span_name,
)

__all__ = ["DEFAULT_REQUEST_TIMEOUT", "Gateway", "GatewayConfig", "Snapshot"]

log = logging.getLogger("lictor.gateway")

DEFAULT_REQUEST_TIMEOUT = 15.0  # Envoy's route timeout when neither route nor resolver sets one
DEFAULT_BLOCKING_WAIT = "30s"
EJECTION_TIME = 10.0  # an instance that refused a connection is skipped this long (passive health)
MAX_IDLE_PER_INSTANCE = 256
MAX_PIPELINED = 16
CHAIN_KINDS = ("service-defaults", "proxy-defaults", "service-router", "service-splitter", "service-resolver")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                         "upgrade", "content-length"})
_HOP_BY_HOP_AND_TRACE = _HOP_BY_HOP | TRACE_HEADERS
_RESPONSE_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "trailer",
                           "upgrade"})
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    service: str
    agent_addr: str = "127.0.0.1:8500"
    bind_address: str = "127.0.0.1"
    metrics_port: int = 0  # 0 = no admin/metrics listener
    token: str = ""
    blocking_wait: str = DEFAULT_BLOCKING_WAIT
    otlp_endpoint: str = ""  # "" = no tracing; spans go to <endpoint>/v1/traces (OTLP/HTTP JSON)
    trace_sample_ratio: float = 1.0  # for traces this gateway starts; a caller's sampled flag wins
    access_log: str = ""  # "" = off, "-" = stdout, else a file (JSON lines)

    @property
    def agent_url(self) -> str:
        return self.agent_addr if self.agent_addr.startswith(("http://", "https://")) else f"http://{self.agent_addr}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a request needs, swapped whole (never mutated) on any change."""

    listeners: Mapping[int, IngressListener] = field(default_factory=dict)
    chains: Mapping[str, CompiledChain] = field(default_factory=dict)
    instances: Mapping[str, tuple[Instance, ...]] = field(default_factory=dict)  # target id -> healthy
    errors: Mapping[str, str] = field(default_factory=dict)  # service -> why it has no chain


class UpstreamError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "connect" | "reset"


# -------------------------------------------------------------------------------- upstream side

class Upstream(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a sidecar; one exchange at a time."""

    __slots__ = ("pool_key", "transport", "parser", "head", "chunks", "done", "sink", "status", "headers",
                 "keep_alive", "closed", "received", "paused_by", "peer_id")

    def __init__(self, pool_key: tuple[str, int, str]) -> None:
        self.pool_key = pool_key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[None] | None = None
        self.done: asyncio.Future[None] | None = None
        self.chunks: list[bytes] = []
        self.sink: Callable[[bytes], None] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.closed = False
        self.received = False
        self.peer_id = ""  # the sidecar's SPIFFE id, checked at connect (spans and access logs report it)

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = UpstreamError("reset", "upstream connect error or disconnect/reset before headers")
        if self.head is not None and not self.head.done():
            self.head.set_exception(err)
        if self.done is not None and not self.done.done():
            self.done.set_exception(UpstreamError("reset", "upstream reset while streaming the body"))

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.keep_alive = False
            if self.head is not None and not self.head.done():
                self.head.set_exception(UpstreamError("reset", f"invalid upstream response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool | None:
        return False

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink(body)
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # used by the gateway
    def start(self, data: bytes, head_only: bool) -> None:
        loop = asyncio.get_running_loop()
        self.head = loop.create_future()
        self.done = loop.create_future()
        self.chunks = []
        self.sink = None
        self.headers = []
        self.status = 0
        self.received = False
        if head_only:  # the parser cannot know a HEAD response has no body: never reuse after one
            self.keep_alive = False
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()


class Pool:
    """Idle keep-alive connections per (address, port, expected service); LIFO keeps them warm."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int, str], list[Upstream]] = {}
        self.ssl: ssl.SSLContext | None = None
        self.trust_domain = ""
        self.handshakes = 0

    def set_tls(self, ctx: ssl.SSLContext, trust_domain: str) -> None:
        # New material applies to new connections; pooled ones keep theirs until they close.
        self.ssl = ctx
        self.trust_domain = trust_domain

    def take_idle(self, inst: Instance, target: Target) -> Upstream | None:
        idle = self.idle.get((inst.address, inst.port, target.service))
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def acquire(self, inst: Instance, target: Target, timeout: float) -> tuple[Upstream, bool]:
        key = (inst.address, inst.port, target.service)
        conn = self.take_idle(inst, target)
        if conn is not None:
            return conn, True
        if self.ssl is None:
            raise UpstreamError("connect", "no leaf certificate yet")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, conn = await loop.create_connection(
                    lambda: Upstream(key), inst.address, inst.port, ssl=self.ssl,
                    server_hostname=None if _is_ip(inst.address) else inst.address,
                    ssl_handshake_timeout=timeout)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise UpstreamError("connect", f"upstream connect error: {exc!r}") from None
        self.handshakes += 1
        uris = peer_uris(transport.get_extra_info("peercert"))
        if not _identity_ok(uris, target.service, self.trust_domain):
            transport.abort()
            raise UpstreamError("connect", f"upstream identity {uris} is not service {target.service!r}")
        conn.peer_id = uris[0]
        return conn, False

    def release(self, conn: Upstream) -> None:
        if conn.closed or not conn.keep_alive or conn.transport is None or conn.transport.is_closing():
            if conn.transport is not None and not conn.closed:
                conn.transport.close()
            return
        idle = self.idle.setdefault(conn.pool_key, [])
        if len(idle) >= MAX_IDLE_PER_INSTANCE:
            conn.transport.close()
        else:
            idle.append(conn)

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()


def _is_ip(host: str) -> bool:
    return host.replace(".", "").isdigit() or ":" in host


def _identity_ok(uris: list[str], service: str, trust_domain: str) -> bool:
    """Exactly one SPIFFE id, for `service`, in our trust domain (when we know it)."""
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return False
    rest = uris[0][len("spiffe://"):]
    domain, _, path = rest.partition("/")
    if trust_domain and domain.lower() != trust_domain.lower():
        return False
    return path.rsplit("/svc/", 1)[-1] == service and "/svc/" in f"/{path}"


# ------------------------------------------------------------------------------ downstream side

@dataclass(slots=True)
class _Request:
    method: str
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    http11: bool


def _status_line(status: int, reason: str = "") -> bytes:
    return f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}\r\n".encode()


def _error_response(status: int, text: str, keep_alive: bool, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    body = text.encode() + b"\n"
    hdrs = "".join(f"{k}: {v}\r\n" for k, v in extra)
    conn = "" if keep_alive else "connection: close\r\n"
    return (_status_line(status) + f"content-type: text/plain\r\ncontent-length: {len(body)}\r\n{hdrs}{conn}\r\n"
            .encode() + body)


class HTTPDownstream(asyncio.Protocol):
    """What every HTTP/1.1 client connection we serve shares (the gateway's listeners and a sidecar's
    http upstream ports): request parsing into url/headers/body, flow control, bad-request answers.

    Subclasses set `upgrade_refusal` and call `_init_http()` from `__init__`.
    """

    upgrade_refusal = "protocol upgrades are not supported"
    transport: asyncio.Transport | None
    upstream_paused: Upstream | None

    def _init_http(self) -> None:
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.peer = ""
        self.can_write: asyncio.Event | None = None
        self.upstream_paused = None

    def _resume_upstream(self) -> None:
        if self.upstream_paused is not None and self.upstream_paused.transport is not None:
            self.upstream_paused.transport.resume_reading()

    def pause_writing(self) -> None:
        self.can_write = asyncio.Event()

    def resume_writing(self) -> None:
        if self.can_write is not None:
            self.can_write.set()
            self.can_write = None
        self._resume_upstream()
        self.upstream_paused = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(501, self.upgrade_refusal)
        except httptools.HttpParserError:
            self._fail(400, "bad request")

    def _fail(self, status: int, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_error_response(status, text, keep_alive=False))
            self.transport.close()

    # httptools callbacks shared by both
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)


class Downstream(HTTPDownstream):
    """A client connection to one listener: parse, queue, serve in order."""

    upgrade_refusal = "protocol upgrades are not supported by this gateway"

    def __init__(self, gateway: Gateway, port: int) -> None:
        self._init_http()
        self.gw = gateway
        self.port = port
        self.queue: list[_Request] = []
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        # The request being served (requests on a connection are served one at a time), when traced
        # or logged: the exit paths record status and bytes here without threading it through.
        self.obs: _Obs | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.gw.downstream.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gw.downstream.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._resume_upstream()

    def on_message_complete(self) -> None:
        p = self.parser
        req = _Request(p.get_method().decode(), self.url, self.headers,
                       b"".join(self.body) if self.body else b"", p.should_keep_alive(), p.get_http_version() == "1.1")
        self.queue.append(req)
        if len(self.queue) >= MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining this much waits for us
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve())
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _serve(self) -> None:
        # One task per connection, parked on a future between requests: a keep-alive client costs
        # a future per request, not a task.
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.queue:
                    self.waiter = loop.create_future()
                    await self.waiter
                    self.waiter = None
                    continue
                req = self.queue.pop(0)
                keep = await self.gw.handle(self, req)
                if self.transport is None or self.transport.is_closing():
                    return
                if not keep:
                    self.transport.close()
                    return
                if len(self.queue) < MAX_PIPELINED:
                    self.transport.resume_reading()
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one broken request must not kill the loop
            log.exception("gateway: request handling failed")
            if self.transport is not None:
                self.transport.abort()
        finally:
            self.task = None


# ----------------------------------------------------------------------------------- the gateway

class Gateway:
    """`Gateway(cfg).run()` until cancelled; `start()` / `stop()` for tests."""

    def __init__(self, cfg: GatewayConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.snapshot = Snapshot()
        self.pool = Pool()
        self.lb_state = BalancerState()
        self.ejected: dict[str, float] = {}
        self.downstream: set[Downstream] = set()
        self.servers: dict[int, asyncio.AbstractServer] = {}
        self.tcp_listeners: set[int] = set()
        # control-plane state, written by the watch loops
        self.ingress: dict[str, Any] | None = None
        self.entries: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in CHAIN_KINDS}
        self.health: dict[str, list[dict[str, Any]]] = {}
        self.catalog_services: set[str] = set()
        self.roots: dict[str, Any] | None = None
        self.leaf: dict[str, Any] | None = None
        self.changed = asyncio.Event()
        self.ready = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []
        self.health_tasks: dict[str, asyncio.Task[None]] = {}
        self.client: httpx.AsyncClient | None = None
        self.admin: asyncio.AbstractServer | None = None
        self.metrics = _Metrics(enabled=bool(cfg.metrics_port))
        self.compiles = 0
        self.tracer: Tracer | None = None
        if cfg.otlp_endpoint:
            self.tracer = Tracer(cfg.service, OtlpExporter(cfg.otlp_endpoint), cfg.trace_sample_ratio)
        self.access_log = AccessLog(cfg.access_log) if cfg.access_log else None
        self.observing = self.tracer is not None or self.access_log is not None
        self.metrics.tracer = self.tracer
        self.metrics.access_log = self.access_log

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        headers = {"X-Consul-Token": self.cfg.token} if self.cfg.token else {}
        self.client = httpx.AsyncClient(base_url=self.cfg.agent_url, headers=headers,
                                        timeout=httpx.Timeout(10.0, read=None))
        loop = asyncio.get_running_loop()
        svc = quote(self.cfg.service, safe="")
        self.tasks = [
            loop.create_task(self._watch(f"/v1/config/ingress-gateway/{svc}", self._set_ingress)),
            loop.create_task(self._watch("/v1/agent/connect/ca/roots", self._set_roots)),
            loop.create_task(self._watch(f"/v1/agent/connect/ca/leaf/{svc}", self._set_leaf)),
            loop.create_task(self._compiler()),
        ]
        for kind in CHAIN_KINDS:
            self.tasks.append(loop.create_task(self._watch(f"/v1/config/{kind}", self._entries_setter(kind))))
        if self.cfg.metrics_port:
            self.admin = await loop.create_server(lambda: _Admin(self), self.cfg.bind_address, self.cfg.metrics_port)

    async def stop(self) -> None:
        for task in [*self.tasks, *self.health_tasks.values()]:
            task.cancel()
        for task in [*self.tasks, *self.health_tasks.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in self.servers.values():
            server.close()
        if self.admin is not None:
            self.admin.close()
        for conn in list(self.downstream):
            if conn.transport is not None:
                conn.transport.close()
        self.pool.close()
        if self.client is not None:
            await self.client.aclose()
        # flush what is queued (bounded): spans and log lines of the last requests are the useful ones
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.close)
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)

    async def run(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    # -- control plane ------------------------------------------------------------------------------

    async def _watch(self, path: str, apply: Callable[[int, Any], None], extra: Mapping[str, str] | None = None
                     ) -> None:
        """One blocking query loop; `apply(status, body)` on every answer (404 -> body None)."""
        assert self.client is not None
        index = 0
        backoff = 0.1
        while True:
            params = dict(extra or {})
            if index:
                params |= {"index": str(index), "wait": self.cfg.blocking_wait}
            try:
                resp = await self.client.get(path, params=params, timeout=httpx.Timeout(10.0, read=400.0))
            except (httpx.HTTPError, OSError) as exc:
                log.warning("gateway: %s: %s; retrying in %.1fs", path, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if resp.status_code not in (200, 404):
                log.warning("gateway: %s: %s %s", path, resp.status_code, resp.text.strip()[:200])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            new_index = int(resp.headers.get("X-Consul-Index", "0") or 0)
            apply(resp.status_code, resp.json() if resp.status_code == 200 else None)
            if new_index < index or new_index == 0:
                new_index = 0  # Consul's rule: an index that goes backwards resets the watch
                await asyncio.sleep(1.0 if resp.status_code == 404 else 0.1)
            elif new_index == index and resp.status_code == 404:
                await asyncio.sleep(0.2)  # some endpoints do not block on a missing key
            index = new_index

    def _set_ingress(self, status: int, body: Any) -> None:
        if body != self.ingress:
            self.ingress = body
            self.changed.set()

    def _entries_setter(self, kind: str) -> Callable[[int, Any], None]:
        def apply(status: int, body: Any) -> None:
            by_name = {e["Name"]: e for e in body or () if isinstance(e, dict) and e.get("Name")}
            if by_name != self.entries[kind]:
                self.entries[kind] = by_name
                self.changed.set()

        return apply

    def _set_roots(self, status: int, body: Any) -> None:
        if body and body != self.roots:
            self.roots = body
            self._rebuild_tls()

    def _set_leaf(self, status: int, body: Any) -> None:
        if body and body != self.leaf:
            self.leaf = body
            self._rebuild_tls()

    def _rebuild_tls(self) -> None:
        if not self.roots or not self.leaf:
            return
        pems = tuple(r["RootCert"] for r in self.roots.get("Roots") or () if r.get("RootCert"))
        material = TLSMaterial(cert_pem=self.leaf["CertPEM"], key_pem=self.leaf["PrivateKeyPEM"], roots_pems=pems,
                               trust_domain=self.roots.get("TrustDomain", ""))
        try:
            ctx = client_context(material)
        except (ssl.SSLError, ValueError) as exc:
            log.error("gateway: cannot build the mTLS client context: %s", exc)
            return
        self.pool.set_tls(ctx, material.trust_domain)
        self.changed.set()

    def _health_setter(self, service: str) -> Callable[[int, Any], None]:
        def apply(status: int, body: Any) -> None:
            entries = list(body or ())
            if entries != self.health.get(service):
                self.health[service] = entries
                self._refresh_instances()

        return apply

    def _set_catalog(self, status: int, body: Any) -> None:
        names = set((body or {}).keys())
        if names != self.catalog_services:
            self.catalog_services = names
            self.changed.set()

    def _refresh_instances(self) -> None:
        snap = self.snapshot
        targets = [t for chain in snap.chains.values() for t in chain.targets.values()]
        self.snapshot = Snapshot(snap.listeners, snap.chains, instances_by_target(targets, self.health), snap.errors)

    async def _compiler(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            try:
                await self._recompile()
            except Exception:  # noqa: BLE001 - keep serving the last good snapshot
                log.exception("gateway: recompiling failed; keeping the previous routing table")
            await asyncio.sleep(0.05)  # coalesce bursts of changes into one compile

    def exposed_services(self, listeners: Iterable[IngressListener]) -> set[str]:
        names: set[str] = set()
        for listener in listeners:
            for svc in listener.services:
                if svc.name == "*":
                    names |= {n for n in self.catalog_services
                              if self._protocol(n) == listener.protocol and n != self.cfg.service}
                else:
                    names.add(svc.name)
        return names

    def _protocol(self, service: str) -> str:
        from lictor.gateway.chain import chain_protocol

        return chain_protocol(service, self.entries)

    async def _recompile(self) -> None:
        listeners = {lst.port: lst for lst in build_listeners(self.ingress or {})}
        wildcard = any(s.name == "*" for lst in listeners.values() for s in lst.services)
        if wildcard and "catalog" not in self.health_tasks:
            self.health_tasks["catalog"] = asyncio.get_running_loop().create_task(
                self._watch("/v1/catalog/services", self._set_catalog))
        chains: dict[str, CompiledChain] = {}
        errors: dict[str, str] = {}
        for name in sorted(self.exposed_services(listeners.values())):
            try:
                chains[name] = compile_chain(name, self.entries)
            except ChainError as exc:
                errors[name] = str(exc)
                log.error("gateway: discovery chain for %r does not compile: %s", name, exc)
        targets = [t for chain in chains.values() for t in chain.targets.values()]
        self.snapshot = Snapshot(listeners, chains, instances_by_target(targets, self.health), errors)
        self.compiles += 1
        self._ensure_health_watches({t.service for t in targets})
        await self._ensure_listeners(listeners)
        if self.pool.ssl is not None and self.ingress is not None:
            self.ready.set()

    def _ensure_health_watches(self, services: set[str]) -> None:
        loop = asyncio.get_running_loop()
        for name in services - set(self.health_tasks):
            path = f"/v1/health/connect/{quote(name, safe='')}"
            self.health_tasks[name] = loop.create_task(self._watch(path, self._health_setter(name)))
        for name in set(self.health_tasks) - services - {"catalog"}:
            self.health_tasks.pop(name).cancel()
            self.health.pop(name, None)

    async def _ensure_listeners(self, listeners: Mapping[int, IngressListener]) -> None:
        loop = asyncio.get_running_loop()
        for port in set(self.servers) - set(listeners):
            self.servers.pop(port).close()
        for port, listener in listeners.items():
            if port in self.servers:
                continue
            factory: Callable[[], asyncio.Protocol]
            if listener.protocol == "tcp":
                factory = lambda p=port: _TCPDownstream(self, p)  # noqa: E731
            else:
                factory = lambda p=port: Downstream(self, p)  # noqa: E731
            try:
                self.servers[port] = await loop.create_server(factory, self.cfg.bind_address, port, backlog=4096,
                                                              reuse_address=True)
                log.info("gateway: listening on %s:%d (%s)", self.cfg.bind_address, port, listener.protocol)
            except OSError as exc:
                log.error("gateway: cannot listen on %s:%d: %s", self.cfg.bind_address, port, exc)

    # -- data plane ---------------------------------------------------------------------------------

    def _excluded(self) -> set[str]:
        if not self.ejected:
            return set()  # the common case: nothing ejected, no allocation per request
        now = time.monotonic()
        for iid in [i for i, until in self.ejected.items() if until <= now]:
            del self.ejected[iid]
        return set(self.ejected)

    def _route(self, down: Downstream, req: _Request) -> tuple[Any, ...] | bytes:
        """Pure-ish part of a request: snapshot lookups and the routing decision, or an error reply."""
        snap = self.snapshot
        listener = snap.listeners.get(down.port)
        if listener is None:
            return _error_response(404, "no listener", req.keep_alive)
        host = ""
        hdrs: dict[str, str] = {}
        for k, v in req.headers:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            hdrs[name] = f"{hdrs[name]},{value}" if name in hdrs else value
        host = hdrs.get("host", "")
        found = listener.service_for_host(host, snap.chains)
        if found is None:
            return _error_response(404, f"no service for host {host!r} on port {down.port}", req.keep_alive)
        vhost, name = found
        chain = snap.chains.get(name)
        if chain is None:
            why = snap.errors.get(name, "no discovery chain yet")
            return _error_response(503, f"service {name!r} is unavailable: {why}", req.keep_alive)
        url = req.url.decode("latin-1")
        path, _, query = url.partition("?")
        head = RequestHead(req.method, path, query, hdrs, down.peer)
        decision = decide(chain, head, self.rng.random() * 100.0)
        return snap, vhost, name, head, decision

    async def handle(self, down: Downstream, req: _Request) -> bool:
        """Serve one request; returns whether the downstream connection stays open."""
        started = time.monotonic()
        routed = self._route(down, req)
        if not self.observing:
            return await self._handle(down, req, started, routed, None, None)
        # The context comes from the routed request's header dict (built for routing anyway): on this
        # box every extra pass over the headers in Python is a measurable share of a hop.
        headers: Mapping[str, str] | list[tuple[bytes, bytes]] = (
            req.headers if isinstance(routed, bytes) else routed[3].headers)
        tracer = self.tracer
        if tracer is not None and self.access_log is None:
            hop = tracer.hop_from(headers)
            if isinstance(hop, bytes):
                # Nothing to record, no bookkeeping: a new trace's traceparent, or (PASS, b"") an unsampled
                # caller's trace headers forwarded as they came.
                return await self._handle(down, req, started, routed, None, hop or None)
            ctx: TraceContext | None = hop
        else:
            ctx = TraceContext.from_headers(headers)
            if tracer is not None:
                ctx = tracer.root(ctx)
        obs = _Obs(self, down, req, ctx)
        down.obs = obs
        try:
            return await self._handle(down, req, started, routed, obs, obs.trace)
        finally:
            down.obs = None
            obs.finish()

    async def _handle(self, down: Downstream, req: _Request, started: float,
                      routed: tuple[Any, ...] | bytes, obs: _Obs | None,
                      trace: bytes | None) -> bool:
        """`trace`: the trace header lines every attempt carries (None: headers as received); a sampled
        request (`obs.sampled`) gets a span, and a header block, per attempt instead."""
        transport = down.transport
        assert transport is not None
        if isinstance(routed, bytes):
            transport.write(routed)
            self.metrics.count("", int(routed[9:12]), started)
            if obs is not None:
                obs.status = int(routed[9:12])
            return req.keep_alive
        snap, vhost, service, head, d = routed
        sampled = obs.routed(service, d) if obs is not None else False
        lb = d.resolver.load_balancer
        key, set_cookie = (hash_key(lb.hash_policies, head, self.rng) if lb.hash_policies else (None, None))
        # Request headers: hop-by-hop out, then ingress service, route and split changes.
        # a traced hop re-injects its own context
        skip = _HOP_BY_HOP_AND_TRACE if sampled or trace is not None else _HOP_BY_HOP
        out_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers
                       if k.lower().decode("latin-1") not in skip]
        out_headers = apply_header_mods(apply_header_mods(out_headers, vhost.request_headers), d.request_headers)
        xff = head.headers.get("x-forwarded-for")
        out_headers.append(("x-forwarded-for", f"{xff}, {down.peer}" if xff else down.peer))
        if "x-forwarded-proto" not in head.headers:
            out_headers.append(("x-forwarded-proto", "http"))
        target_path = d.path + (f"?{head.query}" if head.query else "")
        lines = [f"{req.method} {target_path} HTTP/1.1\r\n"]
        lines.extend(f"{k}: {v}\r\n" for k, v in out_headers)
        if req.body or req.method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(req.body)}\r\n")
        head_bytes = "".join(lines).encode("latin-1")
        # sampled: rebuilt per attempt with that attempt's context
        payload = head_bytes + (trace or b"") + b"\r\n" + req.body
        response_mods: HeaderMods = d.response_headers.then(vhost.response_headers)

        timeout = d.timeout or DEFAULT_REQUEST_TIMEOUT
        deadline = started + timeout
        loop = asyncio.get_running_loop()
        attempt = 0
        free_retries = 2  # a stale pooled connection that closes under us is not the route's retry
        last_error = "no healthy upstream"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._reply_error(down, req, service, started, 504, "upstream request timeout")
            pick = select_target(d.resolver, snap.instances, self._excluded())
            if pick is None:
                # The snapshot may have moved on (health changed) since the request started.
                snap = self.snapshot
                pick = select_target(d.resolver, snap.instances, self._excluded())
            if pick is None:
                return self._reply_error(down, req, service, started, 503, last_error)
            inst = pick_instance(pick.instances, lb, self.lb_state, self.rng, key, pick.target.id)
            if obs is not None:
                hdr = obs.attempt(pick.target, inst, attempt)
                if hdr is not None:
                    payload = head_bytes + hdr + req.body
            try:
                idle = self.pool.take_idle(inst, pick.target)
                if idle is not None:
                    conn, reused = idle, True
                else:
                    conn, reused = await self.pool.acquire(inst, pick.target,
                                                           min(pick.target.connect_timeout, remaining))
            except UpstreamError as exc:
                last_error = str(exc)
                self.ejected[inst.id] = time.monotonic() + EJECTION_TIME
                log.warning("gateway: %s %s: %s", service, inst.id, exc)
                if obs is not None:
                    obs.attempt_end(0, last_error)
                if should_retry(d.retry, attempt, connect_failure=True):
                    attempt += 1
                    self.metrics.retries += 1
                    if obs is not None:
                        obs.retried(attempt, "connect-failure")
                    continue
                if pick.failover or len(pick.instances) > 1 or len(d.resolver.targets) > 1:
                    # Another instance or a failover target may serve: that is failover, not a retry.
                    if free_retries > 0:
                        free_retries -= 1
                        continue
                return self._reply_error(down, req, service, started, 503, last_error)
            self.lb_state.inflight[inst.id] = self.lb_state.inflight.get(inst.id, 0) + 1
            if obs is not None:
                obs.connected(conn)
            try:
                conn.start(payload, req.method == "HEAD")
                assert conn.head is not None
                timer = loop.call_at(loop.time() + (deadline - time.monotonic()), _expire, conn.head)
                try:
                    await conn.head
                except TimeoutError:
                    conn.abort()
                    if obs is not None:
                        obs.attempt_end(0, "upstream request timeout")
                    return self._reply_error(down, req, service, started, 504, "upstream request timeout")
                except UpstreamError as exc:
                    last_error = str(exc)
                    if obs is not None:
                        obs.attempt_end(0, last_error)
                    if reused and not conn.received and free_retries > 0:
                        free_retries -= 1
                        continue
                    if should_retry(d.retry, attempt, reset=True):
                        attempt += 1
                        self.metrics.retries += 1
                        if obs is not None:
                            obs.retried(attempt, "reset")
                        continue
                    return self._reply_error(down, req, service, started, 502, last_error)
                finally:
                    timer.cancel()
                status = conn.status
                if should_retry(d.retry, attempt, status=status):
                    attempt += 1
                    self.metrics.retries += 1
                    if obs is not None:
                        obs.attempt_end(status)
                        obs.retried(attempt, f"status {status}")
                    await self._discard(conn, deadline)
                    continue
                keep = await self._relay(down, req, conn, response_mods, set_cookie, deadline)
                self.metrics.count(service, status, started)
                if obs is not None:
                    obs.status = status
                    obs.attempt_end(status)
                return keep
            finally:
                self.lb_state.inflight[inst.id] -= 1

    async def _discard(self, conn: Upstream, deadline: float) -> None:
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

    def _reply_error(self, down: Downstream, req: _Request, service: str, started: float, status: int,
                     text: str) -> bool:
        if down.transport is not None and not down.transport.is_closing():
            down.transport.write(_error_response(status, text, req.keep_alive))
        self.metrics.count(service, status, started)
        if down.obs is not None:
            down.obs.status = status
            down.obs.error = text
        return req.keep_alive

    async def _relay(self, down: Downstream, req: _Request, conn: Upstream, mods: HeaderMods,
                     set_cookie: str | None, deadline: float) -> bool:
        transport = down.transport
        assert transport is not None and conn.done is not None
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
        head = _status_line(conn.status, "") + "".join(f"{k}: {v}\r\n" for k, v in headers).encode("latin-1") + b"\r\n"
        if no_body:
            transport.write(head)
            if not conn.done.done():
                conn.abort()  # a HEAD/204 exchange: the parser might wait for a body that never comes
            else:
                self.pool.release(conn)
            return keep
        encode: Callable[[bytes], bytes] = _chunk if chunked else _same
        obs = down.obs
        if conn.done.done():  # the whole response is here already: one write
            body = b"".join(conn.chunks)
            if obs is not None:
                obs.bytes_sent = len(body)
            transport.write(head + (encode(body) if body else b"") + (b"0\r\n\r\n" if chunked else b""))
            self.pool.release(conn)
            return keep
        transport.write(head + b"".join(encode(c) for c in conn.chunks if c))
        if obs is not None:
            obs.bytes_sent = sum(len(c) for c in conn.chunks)

        def sink(chunk: bytes) -> None:
            if chunk:
                transport.write(encode(chunk))
                if obs is not None:
                    obs.bytes_sent += len(chunk)
                if down.can_write is not None and conn.transport is not None:
                    conn.transport.pause_reading()  # the client reads slower than upstream sends
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


# A sampled request's spans, as span records (lictor.tracing.SpanRecord): attribute names per kind.
_SERVER_KEYS = (ATTR_SERVICE, ATTR_PROXY, ATTR_METHOD, ATTR_PATH, ATTR_CLIENT_ADDRESS, ATTR_UPSTREAM, ATTR_ROUTE,
                ATTR_SPLIT_TARGET, ATTR_RETRY_COUNT, ATTR_PEER_SPIFFE_ID, ATTR_INSTANCE)
_TRY_KEYS = (ATTR_SERVICE, ATTR_UPSTREAM, ATTR_ROUTE, ATTR_SPLIT_TARGET, ATTR_TARGET, ATTR_INSTANCE, "server.address",
             ATTR_ATTEMPT, ATTR_PEER_SPIFFE_ID)


class _Obs:
    """One request's trace spans and access-log fields: a sampled or access-logged request only.

    A sampled request keeps its spans as plain fields and hands them to the exporter at the end as
    span records (one tuple per span, one queue item per request): no Span objects or attribute
    dicts on the event loop; the exporter's thread encodes them. An unsampled request (logged) has
    no spans: `trace` is its context under a fresh span id."""

    __slots__ = ("gw", "down", "req", "started", "ctx", "sampled", "start_ns", "records", "try_", "events", "trace",
                 "trace_id", "span_id", "service", "route", "split", "status", "error", "retries", "bytes_sent",
                 "instance", "address", "peer_id")

    def __init__(self, gw: Gateway, down: Downstream, req: _Request, ctx: TraceContext | None) -> None:
        self.gw = gw
        self.down = down
        self.req = req
        self.started = time.monotonic()
        self.service = ""
        self.route = ""
        self.split = ""
        self.status = 0
        self.error = ""
        self.retries = 0
        self.bytes_sent = 0
        self.instance = ""
        self.address = ""
        self.peer_id = ""
        self.ctx = ctx
        self.sampled = False
        self.start_ns = 0
        self.records: list[SpanRecord] = []  # the ended attempts' spans (sampled)
        self.try_: list[Any] | None = None  # the open attempt (sampled): see attempt()
        self.events: list[tuple[int, str, dict[str, Any]]] | None = None  # retries, on the inbound span
        self.trace: bytes | None = None  # header lines for every attempt (unsampled, traced)
        self.trace_id = ctx.trace_id or None if ctx is not None else None
        self.span_id: str | None = None
        if gw.tracer is not None and ctx is not None:  # ctx is tracer.root()'s: it has a trace id
            self.span_id = new_span_id()
            if ctx.sampled:
                self.sampled = True
                self.start_ns = time.time_ns()
            else:
                self.trace = header_lines(ctx.trace_id, self.span_id, False, ctx.tracestate, ctx.b3)

    def routed(self, service: str, d: Any) -> bool:
        """Note the routing decision; returns whether the request is sampled."""
        self.service = service
        self.route = route_label(d.route)
        self.split = d.resolver.name
        return self.sampled

    def attempt(self, target: Target, inst: Instance, attempt: int) -> bytes | None:
        """Note one upstream try; sampled: open its span and return its trace headers (+ the blank line)."""
        self.instance = inst.id
        self.address = address = f"{inst.address}:{inst.port}"
        if not self.sampled:
            return None
        if self.try_ is not None:
            self.attempt_end(0, "superseded")  # defensive: a try that was not ended
        ctx = self.ctx
        assert ctx is not None
        span_id = new_span_id()
        # [span id, upstream, target id, instance, address, attempt, peer id, start]
        self.try_ = [span_id, target.service, target.id, inst.id, address, attempt, None, time.time_ns()]
        return header_lines(ctx.trace_id, span_id, True, ctx.tracestate, ctx.b3) + b"\r\n"

    def connected(self, conn: Upstream) -> None:
        self.peer_id = conn.peer_id
        if self.try_ is not None and conn.peer_id:
            self.try_[6] = conn.peer_id

    def attempt_end(self, status: int, error: str = "") -> None:
        t = self.try_
        if t is not None:
            self.try_ = None
            ctx = self.ctx
            assert ctx is not None
            self.records.append((
                self.gw.tracer, span_name("outbound", t[1]), CLIENT, ctx.trace_id, t[0], self.span_id, ctx.tracestate,
                t[7], time.time_ns(), _TRY_KEYS,
                (self.gw.cfg.service, t[1], self.route, self.split, t[2], t[3], t[4], t[5], t[6]), status, error, None))

    def retried(self, attempt: int, reason: str) -> None:
        self.retries = attempt
        if self.sampled:
            if self.events is None:
                self.events = []
            self.events.append((time.time_ns(), "retry", {ATTR_ATTEMPT: attempt, "reason": reason}))

    def finish(self) -> None:
        gw = self.gw
        if self.sampled:
            self.attempt_end(0, "request ended before the upstream answered")  # cancelled mid-try
            ctx = self.ctx
            tracer = gw.tracer
            assert ctx is not None and tracer is not None
            status = self.status
            req = self.req
            self.records.append((
                tracer, span_name("inbound", self.service) if self.service else "inbound", SERVER, ctx.trace_id,
                self.span_id, ctx.span_id, ctx.tracestate, self.start_ns, time.time_ns(), _SERVER_KEYS,
                (gw.cfg.service, "gateway", req.method, req.url.decode("latin-1").partition("?")[0], self.down.peer,
                 self.service or None, self.route or None, self.split or None, self.retries, self.peer_id or None,
                 self.instance or None),
                status, self.error if status >= 500 else "", self.events))
            if tracer.submit is not None:
                tracer.submit(self.records)
        if gw.access_log is not None:
            # FIELDS' order; the gateway enforces no intention (the destination's sidecar does)
            gw.access_log.row(self.started, (
                self.trace_id, self.span_id, "gateway", gw.cfg.service, self.service or None, self.route or None,
                self.split or None, self.address or None, self.req.method,
                self.req.url.decode("latin-1").partition("?")[0], self.status,
                round((time.monotonic() - self.started) * 1000, 3), len(self.req.body), self.bytes_sent,
                self.retries, None, self.down.peer, self.peer_id or None))


_LABELS: dict[int, tuple[Any, str]] = {}  # id(route) -> (route, its label): routes live as long as their chain


def route_label(route: Any) -> str:
    """A short, stable name for a route: what it matches on (routes have no names in Consul).

    Remembered per route object: a sampled request needs it on the hot path."""
    hit = _LABELS.get(id(route))
    if hit is not None and hit[0] is route:
        return hit[1]
    if len(_LABELS) >= 4096:
        _LABELS.clear()
    label = _describe_route(route)
    _LABELS[id(route)] = (route, label)
    return label


def _describe_route(route: Any) -> str:
    if route.default:
        return "default"
    m = route.match
    if m.path_exact:
        return f"exact:{m.path_exact}"
    if m.path_prefix:
        return f"prefix:{m.path_prefix}"
    if m.path_regex is not None:
        return f"regex:{m.path_regex.pattern}"
    if m.headers:
        return "header:" + ",".join(h.name for h in m.headers)
    if m.query:
        return "query:" + ",".join(q.name for q in m.query)
    if m.methods:
        return "methods:" + ",".join(sorted(m.methods))
    return "match"


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _same(data: bytes) -> bytes:
    return data


# ------------------------------------------------------------------------------------ TCP (L4)

class _TCPDownstream(asyncio.Protocol):
    """A tcp listener: the one service's default route, then bytes both ways."""

    def __init__(self, gateway: Gateway, port: int) -> None:
        self.gw = gateway
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        snap = self.gw.snapshot
        listener = snap.listeners.get(self.port)
        found = listener.service_for_host("") if listener is not None else None
        chain = snap.chains.get(found[1]) if found else None
        if chain is None:
            self.transport.close()
            return
        resolver = chain.default_route.destination.splits[0].resolver
        for _ in range(3):
            pick = select_target(resolver, self.gw.snapshot.instances, self.gw._excluded())
            if pick is None:
                break
            inst = pick_instance(pick.instances, resolver.load_balancer, self.gw.lb_state, self.gw.rng,
                                 target_id=pick.target.id)
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(pick.target.connect_timeout):
                    peer, _ = await loop.create_connection(lambda: _TCPUpstream(self), inst.address, inst.port,
                                                           ssl=self.gw.pool.ssl)
            except (OSError, TimeoutError, ssl.SSLError):
                self.gw.ejected[inst.id] = time.monotonic() + EJECTION_TIME
                continue
            if not _identity_ok(peer_uris(peer.get_extra_info("peercert")), pick.target.service,
                                self.gw.pool.trust_domain):
                peer.abort()
                break
            self.peer = peer  # type: ignore[assignment]
            for data in self.pending:
                peer.write(data)  # type: ignore[attr-defined]
            self.pending.clear()
            return
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        if self.peer is not None and self.peer.can_write_eof():
            self.peer.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


class _TCPUpstream(asyncio.Protocol):
    def __init__(self, down: _TCPDownstream) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        if self.down.transport is not None:
            self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.down.transport is not None:
            self.down.transport.close()


# ------------------------------------------------------------------------------ admin / metrics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)


class _Metrics:
    """Request counts and latency, as plain integers updated on the event loop and turned into
    Prometheus families only at scrape time (`collect`).

    prometheus-client's `Counter.inc` and `Histogram.observe` take a lock and walk the buckets in
    Python: ~2-3 us per request on this box, a few % of a proxy hop. Here a request costs one dict
    lookup, a `bisect` and three additions. Only the event loop writes and reads them (the admin
    listener runs on it too), so no lock. `enabled=False` (no -metrics-port: nobody can scrape) skips
    even that.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.retries = 0
        self.tracer: Tracer | None = None
        self.access_log: AccessLog | None = None
        # (service, status) -> [requests per latency bucket (+Inf last)..., latency sum]: one lookup per request
        self._series: dict[tuple[str, int], list[Any]] = {}
        if not enabled:
            self.count = self._skip  # type: ignore[method-assign]

    def _skip(self, service: str, code: int, started: float) -> None:
        pass

    def count(self, service: str, code: int, started: float) -> None:
        elapsed = time.monotonic() - started
        h = self._series.get((service, code))
        if h is None:
            h = self._series[(service, code)] = [0] * (len(_LATENCY_BUCKETS) + 1) + [0.0]
        h[bisect.bisect_left(_LATENCY_BUCKETS, elapsed)] += 1  # le: a value equal to a bound is in it
        h[-1] += elapsed

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("lictor_gateway_requests", "Requests by service and status",
                                       labels=["service", "code"])
        by_service: dict[str, list[Any]] = {}
        for (service, code), h in sorted(self._series.items()):
            requests.add_metric([service, str(code)], sum(h[:-1]))
            total = by_service.setdefault(service, [0] * len(h))
            for i, v in enumerate(h):
                total[i] += v
        yield requests
        latency = HistogramMetricFamily("lictor_gateway_request_seconds", "Request latency", labels=["service"])
        for service, h in sorted(by_service.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*(repr(b) for b in _LATENCY_BUCKETS), "+Inf"), h[:-1], strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric([service], buckets, h[-1])
        yield latency
        retries = CounterMetricFamily("lictor_gateway_retries", "Upstream retries (not counting reconnects "
                                      "of stale pooled connections)")
        retries.add_metric([], self.retries)
        yield retries
        exporter = self.tracer.exporter if self.tracer is not None else None
        if isinstance(exporter, OtlpExporter):
            yield CounterMetricFamily("lictor_gateway_spans_exported", "Trace spans sent to the OTLP endpoint",
                                      value=exporter.sent)
            yield CounterMetricFamily("lictor_gateway_spans_dropped", "Trace spans dropped (queue full or "
                                      "the endpoint failed)", value=exporter.dropped + exporter.failed)
        if self.access_log is not None:
            yield CounterMetricFamily("lictor_gateway_access_log_lines", "Access-log lines written",
                                      value=self.access_log.sent)
            yield CounterMetricFamily("lictor_gateway_access_log_dropped", "Access-log lines dropped",
                                      value=self.access_log.dropped + self.access_log.failed)

    def describe(self) -> list[Metric]:
        return []

    def render(self, retries: int | None = None) -> bytes:
        """The Prometheus text exposition (`retries`: kept for callers that passed it; ignored)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)


class _Admin(asyncio.Protocol):
    """`GET /metrics`, `GET /ready`, `GET /v1/discovery-chain/<service>` on the metrics port."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        import json

        from lictor.gateway.chain import discovery_chain_json

        path = self.url.decode("latin-1").partition("?")[0]
        self.url = b""
        status, ctype, body = 404, "text/plain", b"not found\n"
        if path == "/metrics":
            status, ctype, body = 200, "text/plain; version=0.0.4", self.gw.metrics.render()
        elif path == "/ready":
            ok = self.gw.ready.is_set()
            status, body = (200, b"ready\n") if ok else (503, b"not ready\n")
        elif path.startswith("/v1/discovery-chain/"):
            name = path[len("/v1/discovery-chain/"):]
            chain = self.gw.snapshot.chains.get(name)
            if chain is None:
                try:
                    chain = compile_chain(name, self.gw.entries)
                except ChainError as exc:
                    status, body = 400, f"{exc}\n".encode()
            if chain is not None:
                td = (self.gw.roots or {}).get("TrustDomain", "")
                status, ctype, body = 200, "application/json", json.dumps(discovery_chain_json(chain, td)).encode()
        if self.transport is not None:
            self.transport.write(_status_line(status) + f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n"
                                 .encode() + body)
