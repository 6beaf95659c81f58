"""The inbound (public) listener: mTLS in, intentions enforced, plain TCP to the local app.

We accept raw sockets ourselves and hand each to `loop.connect_accepted_socket` with the *current*
server SSLContext, so a new leaf or new roots apply to the next connection without rebinding.
After the handshake (the ssl module has verified the chain against the roots) the caller's identity
is the URI SAN of its certificate; the L4 decision closes a denied connection at once. For an http
destination every request is parsed (httptools) and judged by the L7 rules; a denied one gets a 403.

Every open connection is kept in `live` with its caller's identity, so when intentions change
`reevaluate()` closes the ones that are now denied.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import httptools

from lictor.agent.proxy.authz import source_of
from lictor.agent.proxy.relay import Pipe
from lictor.agent.proxy.state import ProxyState
from lictor.agent.proxy.tls import peer_uris

__all__ = ["HANDSHAKE_TIMEOUT", "InboundConn", "InboundHTTPConn", "InboundListener"]

log = logging.getLogger("lictor.proxy.inbound")

HANDSHAKE_TIMEOUT = 10.0
DENY_DRAIN_TIMEOUT = 5.0
_HOP_BY_HOP = frozenset({b"x-forwarded-client-cert"})


class _AppSide(Pipe):
    __slots__ = ()


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
            _t, app = await loop.create_connection(_AppSide, spec.local_address, spec.local_port)
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


class InboundHTTPConn(InboundConn):
    """TLS side for an http destination: every request is parsed and judged before it is forwarded.

    The head is re-serialized (so a denied request's bytes never reach the app) and the body passed
    on as it arrives, re-chunked when the request is chunked. A denied request stops reading from
    the caller, half-closes the app connection so the responses to earlier (pipelined) requests
    drain, then answers 403 and closes.
    """

    __slots__ = ("parser", "_url", "_headers", "_allowed", "_chunked", "_denied", "_raw", "_forwarded",
                 "_deny_body", "_deny_timer")

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
        for name, value in self._headers:
            if name.lower() in _HOP_BY_HOP:
                continue  # only we may assert the caller's identity
            head += [name, b": ", value, b"\r\n"]
        head += [b"X-Forwarded-Client-Cert: By=", state.own_uri.encode(), b";URI=", self.uri.encode(), b"\r\n\r\n"]
        self.send(b"".join(head))

    def on_body(self, body: bytes) -> None:
        if not self._allowed or self._denied:
            return
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
