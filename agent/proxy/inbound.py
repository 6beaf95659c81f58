"""The inbound (public) listener: mTLS in, intentions enforced, plain TCP to the local app.

We accept raw sockets ourselves and hand each to `loop.connect_accepted_socket` with the *current*
server SSLContext, so a new leaf or new roots apply to the next connection without rebinding.
After the handshake (the ssl module has verified the chain against the roots) the caller's identity
is the URI SAN of its certificate; the L4 decision closes a denied connection at once. For an http
destination every request is parsed (httptools) and judged by the L7 rules; a denied one gets a 403.

Every open connection is kept in `live` with its caller's identity, so when intentions change
`reevaluate()` closes the ones that are now denied.

With tracing or an access log on (`ProxyState.obs`), an http destination's requests are observed:
after the intention decision a SERVER span `inbound <service>` starts under the caller's W3C/B3
context (or a new trace), the forwarded head carries the span's context instead of the caller's, and
the app's responses are parsed (httptools, on the app side, in order) to end each request's span with
its status and to write its access-log line. A denied request ends with 403 at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import time
from typing import Any

import httptools

from lictor.agent.proxy.authz import source_of
from lictor.agent.proxy.relay import Pipe
from lictor.agent.proxy.state import ProxyState
from lictor.agent.proxy.tls import peer_uris
from lictor.tracing import (
    ATTR_INTENTION,
    ATTR_METHOD,
    ATTR_PATH,
    ATTR_PEER_SPIFFE_ID,
    ATTR_PROXY,
    ATTR_SERVICE,
    SERVER,
    TRACE_HEADERS_BYTES,
    TraceContext,
    header_lines,
    new_span_id,
    span_name,
)

__all__ = ["HANDSHAKE_TIMEOUT", "InboundConn", "InboundHTTPConn", "InboundListener"]

log = logging.getLogger("lictor.proxy.inbound")

HANDSHAKE_TIMEOUT = 10.0
DENY_DRAIN_TIMEOUT = 5.0
_HOP_BY_HOP = frozenset({b"x-forwarded-client-cert"})
_HOP_BY_HOP_AND_TRACE = _HOP_BY_HOP | TRACE_HEADERS_BYTES  # a traced request carries our span's context instead
_HEAD = object()  # a pending HEAD request that is neither traced nor logged (its response has no body)


class _AppSide(Pipe):
    __slots__ = ()


# The inbound span's attribute names (its span record's `keys`, lictor.tracing.SpanRecord).
_SPAN_KEYS = (ATTR_SERVICE, ATTR_PROXY, ATTR_PEER_SPIFFE_ID, ATTR_INTENTION, ATTR_METHOD, ATTR_PATH)


def _end_span(span: tuple[Any, ...], status: int, error: str = "") -> None:
    """Hand an open inbound span (see `_InReq.span`) to the exporter as a span record."""
    tracer, name, trace_id, span_id, parent_id, tracestate, start_ns, values = span
    if tracer.submit is not None:
        tracer.submit((tracer, name, SERVER, trace_id, span_id, parent_id, tracestate, start_ns, time.time_ns(),
                       _SPAN_KEYS, values, status, error, None))


class _InReq:
    """One observed inbound request, from the intention decision until the app's response ends.

    `span` (sampled): the open SERVER span as plain fields, (tracer, name, trace_id, span_id,
    parent_id, tracestate, start_ns, attribute values); `_end_span` turns it into a span record."""

    __slots__ = ("span", "trace_id", "span_id", "started", "method", "path", "received")

    def __init__(self, span: tuple[Any, ...] | None, trace_id: str | None, span_id: str | None, method: str,
                 path: str) -> None:
        self.span = span
        self.trace_id = trace_id
        self.span_id = span_id
        self.started = time.monotonic()
        self.method = method
        self.path = path
        self.received = 0


class _ObservedApp(_AppSide):
    """The app side of an observed http connection: relays, then parses the responses for their status.

    Only the parser knows where one response ends and the next (maybe a sampled request's) begins,
    so responses are parsed from the connection's start while any request is awaited, with as few
    callbacks as that needs: the head (status, HEAD) and the end. The body's size is counted only
    for an access log (`_LoggedApp`, which parses every response).

    Without an access log, parsing pauses at a message boundary with nothing awaited, unless the
    caller has pipelined (see `InboundHTTPConn._expect`): the unrecorded requests that follow pass
    with their responses unparsed, and a recorded one restarts a fresh parser (`restart`). That
    restart point is a message boundary because a caller that does not pipeline sends a request only
    once it has the whole previous response, i.e. once we have relayed it. A caller that starts to
    pipeline while parsing is paused defeats this; its next response then most likely fails to
    parse (not "HTTP/" where one should start) and the connection is no longer observed, as after
    any unparsable response.
    """

    __slots__ = ("conn", "rparser", "status", "sent", "reset", "last", "broken")
    pauses = True  # may stop parsing while nothing is awaited (not with an access log)

    def __init__(self, conn: InboundHTTPConn) -> None:
        super().__init__()
        self.conn = conn
        self.rparser: Any = httptools.HttpResponseParser(self)
        self.status = 0
        self.sent = 0
        self.reset = False  # a HEAD response ended at its head: a fresh parser for what follows
        self.last = b""  # the previous chunk (a header end may straddle two)
        self.broken = False  # a response did not parse (or an upgrade): never parse again

    def restart(self) -> None:
        """Parse again from the next byte the app sends (a message boundary: see the class doc)."""
        if not self.broken:
            self.rparser = httptools.HttpResponseParser(self)
            self.status = self.sent = 0
            self.reset = False
            self.last = b""

    def data_received(self, data: bytes) -> None:
        # Every response of an observed connection passes here: Pipe.data_received and the parse are
        # inlined (each Python call is a measurable share of a hop).
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)  # type: ignore[union-attr]  # the caller first; parsing is bookkeeping
        else:
            self.send(data)
        p = self.rparser
        if p is None:
            return
        if self.conn._heads:
            self._feed_heads(data)
        else:  # no HEAD pending: no parser reset can happen (only a HEAD's head sets it)
            try:
                p.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._stop(exc)
        self.last = data

    def _stop(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):
            self.conn._response_done(self.status or 101, 0)
        else:
            log.debug("inbound: cannot parse the app's response (%s); not observing this connection further", exc)
        self.rparser = None  # after an upgrade the rest is not HTTP
        self.broken = True

    def _feed(self, data: bytes) -> bool:
        """Parse `data`; False once this connection is no longer observed."""
        try:
            self.rparser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._stop(exc)
        if self.reset:
            self.reset = False
            self.rparser = httptools.HttpResponseParser(self)
        return self.rparser is not None

    def _feed_heads(self, data: bytes) -> None:
        """A HEAD request awaits its answer: parse up to each header end separately.

        httptools cannot be told that a HEAD response has no body, so its parser would take the
        next response's bytes as that body. Cut at every `\\r\\n\\r\\n` (a response head ends at one of
        them; extra cuts are harmless) and start a fresh parser right after the HEAD response's head.
        """
        tail = self.last[-3:]
        joined = tail + data  # a head's end may begin in the previous chunk
        start = search = 0
        while start < len(data):
            i = joined.find(b"\r\n\r\n", search)
            end = len(data) if i < 0 else i + 4 - len(tail)
            search = i + 4
            if not self._feed(data[start:end]):
                return
            start = end

    # httptools callbacks (each one defined is a Python call per response)
    def on_headers_complete(self) -> None:
        if not self.conn._heads:
            return  # the status is read at the end
        self.status = status = self.rparser.get_status_code()
        pending = self.conn._inflight
        if status >= 200 and pending and (pending[0] is _HEAD or (
                isinstance(pending[0], _InReq) and pending[0].method == "HEAD")):
            self.conn._response_done(status, 0)  # no body follows, whatever the headers say
            self.reset = True

    def on_message_complete(self) -> None:
        self.status = status = self.rparser.get_status_code()
        if self.reset or (status < 200 and status != 101):
            return  # a HEAD answer (done) or an interim 1xx: the request's response is still to come
        conn = self.conn
        pending = conn._inflight
        if pending and pending[0] is None:
            pending.popleft()  # an unrecorded request's response: nothing else to do
        else:
            conn._response_done(status, self.sent)
        self.sent = 0
        if not pending and self.pauses and not conn._pipelined:
            # A boundary with nothing awaited: stop parsing until a recorded request (conn._expect).
            self.rparser = None
            conn._watching = False


class _LoggedApp(_ObservedApp):
    """`_ObservedApp` that also counts each response's body bytes (the access log's bytes_sent)."""

    __slots__ = ()
    pauses = False  # every request is logged: every response is parsed

    def on_body(self, body: bytes) -> None:
        self.sent += len(body)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.conn._flush_pending()


class InboundConn(Pipe):
    """TLS side of an inbound connection (L4: bytes are relayed untouched)."""

    __slots__ = ("listener", "source", "uri", "_task")

    def __init__(self, listener: InboundListener) -> None:
        super().__init__()
        self.listener = listener
        self.source = ""
        self.uri = ""
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        state = self.listener.state
        uris = peer_uris(transport.get_extra_info("peercert"))
        source = source_of(uris[0]) if len(uris) == 1 else None
        if source is None:
            state.stats.inc("inbound_denied", reason="identity")
            log.warning("inbound: closing connection without a Connect service identity (SANs %s)", uris)
            transport.close()
            return
        self.source, self.uri = source, uris[0]
        decision = state.authz.connection_allowed(source, state.l7)
        if not decision.allowed:
            state.stats.inc("inbound_denied", reason="intention")
            log.info("inbound: denied %s -> %s: %s", source, state.authz.destination, decision.reason)
            transport.close()
            return
        state.stats.inc("inbound_accepted")
        self.listener.live.add(self)
        self.on_lost = self.listener.forget
        self._task = asyncio.get_running_loop().create_task(self._connect_app())

    async def _connect_app(self) -> None:
        spec = self.listener.state.spec
        loop = asyncio.get_running_loop()
        try:
            _t, app = await loop.create_connection(self._app_side, spec.local_address, spec.local_port)
        except OSError as exc:
            self.listener.state.stats.inc("inbound_app_connect_failed")
            log.warning("inbound: local app %s:%s unreachable: %s", spec.local_address, spec.local_port, exc)
            if self.transport is not None:
                self.transport.close()
            return
        if self._lost:
            app.transport.close()  # type: ignore[union-attr]
            return
        self.link(app)

    def _app_side(self) -> Pipe:
        return _AppSide()


class InboundHTTPConn(InboundConn):
    """TLS side for an http destination: every request is parsed and judged before it is forwarded.

    The head is re-serialized (so a denied request's bytes never reach the app) and the body passed
    on as it arrives, re-chunked when the request is chunked. A denied request stops reading from
    the caller, half-closes the app connection so the responses to earlier (pipelined) requests
    drain, then answers 403 and closes.
    """

    __slots__ = ("parser", "_url", "_headers", "_allowed", "_chunked", "_denied", "_raw", "_forwarded",
                 "_deny_body", "_deny_timer", "_obs", "_inflight", "_heads", "_cur", "_down_addr", "_watching",
                 "_pipelined")

    def __init__(self, listener: InboundListener) -> None:
        super().__init__(listener)
        self.parser: Any = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._allowed = True
        self._chunked = False
        self._denied = False
        self._raw = False  # after an Upgrade the rest is relayed as bytes
        self._forwarded = 0
        self._deny_body = b""
        self._deny_timer: asyncio.TimerHandle | None = None
        obs = listener.state.obs
        self._obs = obs if obs is not None and obs.active else None
        # Forwarded requests awaiting their response, in order: an _InReq when traced or logged, else
        # None (_HEAD for a HEAD), so the app's responses pair with their requests.
        self._inflight: collections.deque[Any] = collections.deque()
        self._heads = 0  # HEAD requests among them (their responses are parsed with care)
        self._cur: _InReq | None = None  # the request whose body is arriving
        self._down_addr = ""
        self._watching = True  # the app's responses are parsed (paused: see _ObservedApp)
        self._pipelined = False  # a request came while an earlier one was awaited: never pause

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._obs is not None and self._obs.access_log is not None:
            peer = transport.get_extra_info("peername")
            self._down_addr = peer[0] if peer else ""
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._flush_pending()

    def _app_side(self) -> Pipe:
        if self._obs is None:
            return _AppSide()
        return _LoggedApp(self) if self._obs.access_log is not None else _ObservedApp(self)

    # observation --------------------------------------------------------------------------------
    def _observe(self, method: str, path: str, headers: dict[str, str], allowed: bool,
                 hop: TraceContext | bytes | None = None) -> bytes | None:
        """Start the request's span (when traced); returns the trace header lines to forward (None: as is).

        `hop`: `tracer.hop_from(headers)` when the caller already has it (a new trace's sampling is a
        random draw: it must be made once)."""
        obs = self._obs
        assert obs is not None
        tracer = obs.tracer
        span: tuple[Any, ...] | None = None
        hdr: bytes | None = None
        ctx: TraceContext | None
        if tracer is not None and obs.access_log is None:
            if hop is None:
                hop = tracer.hop_from(headers)
            if isinstance(hop, bytes):  # unsampled, unlogged: only the header lines (PASS: as is), no record
                if allowed:
                    self._expect(None, method)
                    return hop or None
                return None
            ctx = hop  # sampled: the span below continues it (root() returns a sampled context as is)
        else:
            ctx = TraceContext.from_headers(headers)
        if tracer is not None:
            root = tracer.root(ctx)
            if root.sampled:
                svc = self.listener.state.spec.destination_name
                trace_id: str | None = root.trace_id
                span_id: str | None = new_span_id()
                span = (tracer, span_name("inbound", svc), root.trace_id, span_id, root.span_id, root.tracestate,
                        time.time_ns(), (svc, "sidecar", self.uri, "allow" if allowed else "deny", method,
                                         path.partition("?")[0]))
                hdr = header_lines(root.trace_id, span_id, True, root.tracestate, root.b3)
            else:  # only propagate: a fresh span id under the same trace, no Span
                trace_id, span_id = root.trace_id, new_span_id()
                hdr = header_lines(trace_id, span_id, False, root.tracestate, root.b3)
        else:
            trace_id, span_id = (ctx.trace_id or None, None) if ctx is not None else (None, None)
        if not allowed:
            if span is not None:
                _end_span(span, 403, "denied by intention")
            if obs.access_log is not None:
                self._log(_InReq(None, trace_id, span_id, method, path), 403, 0, "deny")
            return None
        if span is None and obs.access_log is None:
            self._expect(None, method)
            return hdr
        self._expect(_InReq(span, trace_id, span_id, method, path), method)
        return hdr

    def _expect(self, rec: _InReq | None, method: str) -> None:
        """A forwarded request whose response comes next after the ones already awaited."""
        self._cur = rec
        if not self._watching:  # parsing paused at a boundary (_ObservedApp)
            if rec is None:
                return  # nothing to record: its response passes unparsed
            self._watching = True
            app = self.peer
            if isinstance(app, _ObservedApp):
                app.restart()
        elif self._inflight:
            self._pipelined = True
        if method != "HEAD":
            self._inflight.append(rec)
        else:
            self._heads += 1
            self._inflight.append(_HEAD if rec is None else rec)

    def _response_done(self, status: int, sent: int) -> None:
        if self._inflight:
            rec = self._inflight.popleft()
            if rec is _HEAD or (rec is not None and rec.method == "HEAD"):
                self._heads -= 1
            if rec is not None and rec is not _HEAD:
                self._finish(rec, status, sent)

    def _flush_pending(self) -> None:
        self._heads = 0
        while self._inflight:
            rec = self._inflight.popleft()
            if rec is not None and rec is not _HEAD:
                self._finish(rec, 0, 0, "connection closed before the app answered")

    def _finish(self, rec: _InReq, status: int, sent: int, error: str = "") -> None:
        if rec.span is not None:
            _end_span(rec.span, status, error)
        if self._obs is not None and self._obs.access_log is not None:
            self._log(rec, status, sent, "allow")

    def _log(self, rec: _InReq, status: int, sent: int, intention: str) -> None:
        obs = self._obs
        assert obs is not None and obs.access_log is not None
        spec = self.listener.state.spec
        obs.access_log.row(rec.started, (
            rec.trace_id, rec.span_id, "sidecar", self.source.rpartition("/")[2], spec.destination_name, None, None,
            f"{spec.local_address}:{spec.local_port}", rec.method, rec.path.partition("?")[0], status,
            round((time.monotonic() - rec.started) * 1000, 3), rec.received, sent, None, intention,
            self._down_addr, self.uri))

    # httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._chunked = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        path = self._url.decode("latin-1")
        headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in self._headers}
        state = self.listener.state
        decision = state.authz.request(self.source, method, path, headers)
        self._allowed = decision.allowed
        trace: bytes | None = None
        obs = self._obs
        if obs is not None:
            tracer = obs.tracer
            if tracer is not None and obs.access_log is None and decision.allowed and method != "HEAD":
                # The common observed request, inline: unsampled and unlogged means only a header.
                hop = tracer.hop_from(headers)
                if isinstance(hop, bytes):
                    trace = hop or None  # PASS (an unsampled caller): its trace headers go on as they came
                    self._cur = None
                    if self._watching:  # else: parsing is paused and this response needs none
                        if self._inflight:
                            self._pipelined = True
                        self._inflight.append(None)
                else:
                    trace = self._observe(method, path, headers, True, hop)
            else:
                trace = self._observe(method, path, headers, decision.allowed)
        if not decision.allowed:
            state.stats.inc("inbound_requests_denied")
            log.info("inbound: denied %s %s from %s: %s", method, path, self.source, decision.reason)
            self._deny(decision.reason)
            return
        state.stats.inc("inbound_requests_allowed")
        self._forwarded += 1
        self._chunked = headers.get("transfer-encoding", "").lower().endswith("chunked")
        version = self.parser.get_http_version()
        head = [self.parser.get_method(), b" ", self._url, b" HTTP/", version.encode(), b"\r\n"]
        skip = _HOP_BY_HOP if trace is None else _HOP_BY_HOP_AND_TRACE
        for name, value in self._headers:
            if name.lower() in skip:
                continue  # only we may assert the caller's identity (and a traced hop its context)
            head += [name, b": ", value, b"\r\n"]
        if trace is not None:
            head.append(trace)
        head += [b"X-Forwarded-Client-Cert: By=", state.own_uri.encode(), b";URI=", self.uri.encode(), b"\r\n\r\n"]
        self.send(b"".join(head))

    def on_body(self, body: bytes) -> None:
        if not self._allowed or self._denied:
            return
        if self._cur is not None:
            self._cur.received += len(body)
        if self._chunked:
            self.send(b"%x\r\n%b\r\n" % (len(body), body))
        else:
            self.send(body)

    def on_message_complete(self) -> None:
        if self._allowed and not self._denied and self._chunked:
            self.send(b"0\r\n\r\n")

    # data path --------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._raw:
            super().data_received(data)
            return
        if self._denied:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._raw = True
            offset = exc.args[0] if exc.args else len(data)
            if not self._denied and offset < len(data):
                self.send(data[offset:])
        except httptools.HttpParserError as exc:
            log.info("inbound: bad HTTP request from %s: %s", self.source, exc)
            self._reply_and_close(400, "Bad Request", b"bad request\n")

    def _deny(self, reason: str) -> None:
        self._denied = True
        self._deny_body = f"Forbidden: request denied by intention ({reason})\n".encode()
        if self.transport is not None:
            self.transport.pause_reading()
        peer = self.peer
        if self._forwarded == 0 or peer is None or peer.transport is None or peer.transport.is_closing():
            self._reply_and_close(403, "Forbidden", self._deny_body)
            return
        # Earlier requests may still be answering: half-close the app and answer once it is done.
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        self._deny_timer = asyncio.get_running_loop().call_later(DENY_DRAIN_TIMEOUT, self.peer_lost)

    def _write_eof(self) -> None:
        if self._denied and self._deny_body:  # the app finished the earlier responses: now the 403
            self.peer_lost()
            return
        super()._write_eof()

    def peer_lost(self) -> None:
        if self._denied and self._deny_body:
            if self._deny_timer is not None:
                self._deny_timer.cancel()
            self._reply_and_close(403, "Forbidden", self._deny_body)
            return
        super().peer_lost()

    def _reply_and_close(self, status: int, phrase: str, body: bytes) -> None:
        self._deny_body = b""
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(b"HTTP/1.1 %d %b\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                % (status, phrase.encode(), len(body), body))
        t.close()
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class InboundListener:
    """Binds the sidecar's public port and accepts mTLS connections."""

    def __init__(self, state: ProxyState, host: str, port: int) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.live: set[InboundConn] = set()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(4096)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _addr = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("inbound: accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            task = loop.create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        state = self.state
        ctx = state.server_ctx
        if ctx is None:
            conn.close()
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        factory = InboundHTTPConn if state.l7 else InboundConn
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: factory(self), conn, ssl=ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as exc:
            state.stats.inc("inbound_handshake_failed")
            # The transport owns `conn` now and closes it; closing it here could hit a reused fd.
            log.debug("inbound: TLS handshake failed: %s", exc)

    def forget(self, conn: Pipe) -> None:
        self.live.discard(conn)  # type: ignore[arg-type]

    def reevaluate(self) -> int:
        """Close open connections the current intentions deny; returns how many were closed."""
        closed = 0
        authz = self.state.authz
        for conn in list(self.live):
            decision = authz.connection_allowed(conn.source, isinstance(conn, InboundHTTPConn))
            if not decision.allowed:
                log.info("inbound: closing open connection from %s: %s", conn.source, decision.reason)
                self.state.stats.inc("inbound_closed_by_intention")
                self.live.discard(conn)
                conn.abort()
                closed += 1
        return closed

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for task in list(self._handshakes):
            task.cancel()
        for conn in list(self.live):
            conn.close()
