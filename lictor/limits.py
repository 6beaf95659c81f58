"""Request limits: body and header size, slow clients, request rate and blocking queries per client.

Every refusal is a clear 4xx (413, 431, 408, 429) and counts in `lictor_limit_refusals{kind}`.

- `GuardedHttpTools`: uvicorn's httptools protocol with two things it lacks — a bound on the request
  head (httptools accepts headers of any size) and a deadline for receiving it (uvicorn only times
  out idle keep-alive connections, so a client sending its head one byte a second would hold a
  connection forever: slowloris).
- `LimitsMiddleware`: per-client-IP token bucket (429 `rate limit exceeded`), a cap on concurrent
  blocking queries per client IP (429), a body size cap (413), and caps on services/checks per agent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from typing import Any

from starlette.responses import PlainTextResponse
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

_refusals: Any = None


def count_refusal(kind: str) -> None:
    """One refused request, by kind (rate, blocking, body, header, slow_head, services, ...)."""
    global _refusals
    if _refusals is None:
        try:
            from prometheus_client import Counter

            from lictor.metrics import REGISTRY
        except ImportError:  # pragma: no cover - metrics land separately
            return
        try:
            _refusals = Counter("lictor_limit_refusals", "Requests refused by a limit or by ACLs, by kind", ["kind"],
                                registry=REGISTRY)
        except ValueError:  # already registered (several agents in one interpreter)
            return
    _refusals.labels(kind=kind).inc()


class TokenBuckets:
    """A token bucket per key (client IP), at most `max_keys` remembered (least recently used go)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 65536) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, int(rate * 2)))
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed


class ConcurrencyCap:
    """At most `limit` in flight per key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        count = self.current.get(key, 0)
        if count >= self.limit:
            return False
        self.current[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self.current.get(key, 0) - 1
        if count <= 0:
            self.current.pop(key, None)
        else:
            self.current[key] = count


def _client_ip(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def _is_blocking(query_string: bytes) -> bool:
    for part in query_string.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == b"index" and value not in (b"", b"0"):
            return True
    return False


class LimitsMiddleware:
    def __init__(self, app: Any, config: Any, runtime: Any = None) -> None:
        self.app = app
        self.config = config
        self.runtime = runtime
        self.buckets = TokenBuckets(config.http_rate_limit, config.http_rate_burst) if config.http_rate_limit > 0 else None
        cap = config.http_max_blocking_per_client
        self.blocking = ConcurrencyCap(cap) if cap > 0 else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ip = _client_ip(scope)
        if self.buckets is not None and not self.buckets.allow(ip):
            count_refusal("rate")
            await PlainTextResponse("rate limit exceeded", status_code=429, headers={"Retry-After": "1"})(scope, receive, send)
            return
        max_body = _body_limit(scope["path"], self.config.http_max_body)
        if max_body > 0:
            declared = chunked = None
            for name, value in scope["headers"]:
                if name == b"content-length":
                    declared = value
                elif name == b"transfer-encoding":
                    chunked = value
            if declared is not None and declared.isdigit() and int(declared) > max_body:
                count_refusal("body")
                await PlainTextResponse(f"Request body too large: the limit is {max_body} bytes", status_code=413)(
                    scope, receive, send
                )
                return
            # The parser reads exactly Content-Length bytes (none without it or Transfer-Encoding):
            # only a chunked body's size is unknown up front and needs counting as it arrives.
            if chunked is not None or (declared is not None and not declared.isdigit()):
                receive, send = _cap_body(receive, send, max_body)
        if scope["method"] == "PUT" and scope["path"] == "/v1/agent/service/register" and self.config.max_services > 0:
            refusal, receive = await self._service_cap(receive)
            if refusal:
                count_refusal("services")
                await PlainTextResponse(refusal, status_code=429)(scope, receive, send)
                return
        if scope["method"] == "PUT" and scope["path"] == "/v1/agent/check/register" and self.config.max_checks > 0:
            local = getattr(self.runtime, "local", None)
            if local is not None and len(local.checks) >= self.config.max_checks:
                count_refusal("checks")
                await PlainTextResponse(f"Too many checks on this agent: the limit is {self.config.max_checks}",
                                        status_code=429)(scope, receive, send)
                return
        if self.blocking is not None and _is_blocking(scope.get("query_string", b"")):
            if not self.blocking.acquire(ip):
                count_refusal("blocking")
                await PlainTextResponse(
                    f"too many concurrent blocking queries from this client (limit {self.blocking.limit})", status_code=429
                )(scope, receive, send)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self.blocking.release(ip)
            return
        await self.app(scope, receive, send)

    async def _service_cap(self, receive: Any) -> tuple[str | None, Any]:
        local = getattr(self.runtime, "local", None)
        if local is None or len(local.services) < self.config.max_services:
            return None, receive
        from lictor.registry.acl_http import _buffer_body

        body, replay = await _buffer_body(receive, max(self.config.http_max_body, 1))
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return None, replay  # the handler answers 400
        if isinstance(data, dict):
            lower = {str(k).lower(): v for k, v in data.items()}
            sid = lower.get("id") or lower.get("name")
            if sid in local.services:
                return None, replay  # re-registering replaces: no growth
        return f"Too many services on this agent: the limit is {self.config.max_services}", replay


# Endpoints whose bodies are legitimately bigger than an API request: snapshot restore and an
# agent's full anti-entropy sync. Their handlers enforce these same bounds.
BIG_BODY_PATHS = {"/v1/snapshot": 256 * 1024 * 1024, "/v1/internal/agent/sync": 64 * 1024 * 1024,
                  "/v1/internal/agent/checks": 64 * 1024 * 1024}


def _body_limit(path: str, configured: int) -> int:
    if configured <= 0:
        return 0
    return max(configured, BIG_BODY_PATHS.get(path, 0))


def _cap_body(receive: Any, send: Any, limit: int) -> tuple[Any, Any]:
    """Stop reading a (chunked) body past `limit`: the app sees a disconnect, the client a 413."""
    state = {"size": 0, "over": False, "started": False}

    async def capped_receive() -> dict[str, Any]:
        if state["over"]:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            state["size"] += len(message.get("body", b""))
            if state["size"] > limit:
                state["over"] = True
                count_refusal("body")
                return {"type": "http.disconnect"}
        return message

    async def capped_send(message: dict[str, Any]) -> None:
        if state["over"]:
            if message["type"] == "http.response.start" and not state["started"]:
                state["started"] = True
                text = f"Request body too large: the limit is {limit} bytes".encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(text)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": text, "more_body": False})
            return
        if message["type"] == "http.response.start":
            state["started"] = True
        await send(message)

    return capped_receive, capped_send


# -- the HTTP protocol ---------------------------------------------------------------------------------


class CoalescingTransport:
    """What uvicorn writes within one event-loop iteration leaves in one send.

    uvicorn writes a response's head and body with two `transport.write` calls: two syscalls, two
    TCP segments, and two wake-ups of the reader, for every small reply. Held until the end of the
    iteration, they go out together (a simple read: ~20 % more req/s at the leader in A/B runs).
    Everything else is the real transport's.
    """

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.writelines(pending)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_CHECKED_NAMES: dict[bytes, bytes] = {}  # response header name -> lower-cased, once it passed HEADER_RE
_MAX_CHECKED_NAMES = 512


class LeanCycle(RequestResponseCycle):
    """uvicorn's request/response cycle with a cheaper response head.

    uvicorn runs two regex searches per response header (16 for a Consul read's eight headers).
    Here a header name is checked the first time it is seen (the API sends a few dozen distinct
    ones), and all values of a response in a single search over them joined by a tab: a tab is
    legal in a value, so the joined search matches exactly when one of the values would. Framing
    (Content-Length, chunked, Connection: close, HEAD) and the body path are uvicorn's. With the
    keep-alive timer below: a cached read 303 k -> 299 k instructions (bench/http_cost.py)."""

    async def send(self, message: Any) -> None:
        if self.response_started or self.access_log:
            await super().send(message)
            return
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if message["type"] != "http.response.start":
            raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")
        self.response_started = True
        self.waiting_for_100_continue = False
        status_code = message["status"]
        headers = self.default_headers + list(message.get("headers", []))
        if HEADER_VALUE_RE.search(b"\t".join([value for _, value in headers])):
            raise RuntimeError("Invalid HTTP header value.")
        content = [STATUS_LINE[status_code]]
        has_connection_close = False
        for raw_name, value in headers:
            name = _CHECKED_NAMES.get(raw_name)
            if name is None:
                if HEADER_RE.search(raw_name):
                    raise RuntimeError("Invalid HTTP header name.")
                name = raw_name.lower()
                if len(_CHECKED_NAMES) < _MAX_CHECKED_NAMES:
                    _CHECKED_NAMES[raw_name] = name
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [t.lower().strip() for t in value.split(b",")]:
                self.keep_alive = False
                has_connection_close = True
            content.extend((name, b": ", value, b"\r\n"))
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status_code not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.transport.write(b"".join(content))


class GuardedHttpTools(HttpToolsProtocol):
    """httptools + a bound on the request head's size and on the time to receive it, one re-armed
    timer per connection for the keep-alive timeout, and LeanCycle's cheaper response head."""

    max_head = 64 * 1024
    head_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        self._head_bytes = 0
        self._in_head = True  # an idle new connection must start (and finish) a request head in time
        self._head_deadline = self.loop.time() + self.head_timeout
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._check_head)
        self._idle_deadline: float | None = None  # set while kept alive between requests
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        super().connection_lost(exc)

    # Keep-alive: uvicorn arms a new timer after every response and cancels it when the next
    # request's bytes arrive (a TimerHandle made and cancelled per request). Here only the deadline
    # moves; the timer re-arms itself when it fires early, as the head timer does.
    def _unset_keepalive_if_required(self) -> None:
        self._idle_deadline = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_deadline = self.loop.time() + self.timeout_keep_alive
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._idle_deadline is None or self.transport.is_closing():
            return  # a request is in progress: its response arms the timer again
        remaining = self._idle_deadline - self.loop.time()
        if remaining > 0:
            self._idle_timer = self.loop.call_later(remaining, self._check_idle)
            return
        self.transport.close()

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > self.max_head:
                count_refusal("header")
                self._refuse(431, "Request Header Fields Too Large", f"request head exceeds {self.max_head} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:
            # The next request on a kept-alive connection: its head gets the same deadline. Only the
            # deadline moves per request; the one timer re-arms itself when it fires early (a new
            # timer and a cancelled one per request were ~5 % of a cached read's CPU).
            self._in_head = True
            self._head_bytes = 0
            self._head_deadline = self.loop.time() + self.head_timeout
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout, self._check_head)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        # uvicorn builds its own cycle here; its task has not run yet, so the cycle's send is still
        # to be looked up, and the subclass (no state of its own) takes over from the first message.
        if type(self.cycle) is RequestResponseCycle:
            self.cycle.__class__ = LeanCycle

    def _check_head(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return  # no head in progress: the next request's start arms the timer again
        remaining = self._head_deadline - self.loop.time()
        if remaining > 0:
            self._head_timer = self.loop.call_later(remaining, self._check_head)
            return
        count_refusal("slow_head")
        self._refuse(408, "Request Timeout", f"request head not received within {self.head_timeout:g}s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        body = message.encode()
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body
        )
        self._in_head = False
        self._cancel_head_timer()
        self.transport.close()


def protocol_for(config: Any) -> type[GuardedHttpTools]:
    """A protocol class bound to this agent's limits (uvicorn instantiates it per connection)."""
    return type(
        "LictorHttp",
        (GuardedHttpTools,),
        {"max_head": config.http_max_header_bytes or 1 << 30, "head_timeout": config.http_header_timeout or 1e9},
    )


def uvicorn_options(config: Any) -> dict[str, Any]:
    """Options for uvicorn.Config that carry the limits."""
    return {
        "http": protocol_for(config),
        "limit_concurrency": config.http_max_connections or None,
        "h11_max_incomplete_event_size": config.http_max_header_bytes or None,
    }


def wrap(app: Any, runtime: Any) -> Any:
    """The whole security stack around an agent's ASGI app: limits outside, ACLs inside."""
    from lictor.registry.acl_http import mount

    return LimitsMiddleware(mount(app, runtime), runtime.config, runtime)
