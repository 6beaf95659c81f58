"""A client agent's HTTP/1.1 connections to the servers: keep-alive pools, one httptools parser each.

Forwarding a read through httpx cost a client agent ~3 ms of CPU (two thirds of its whole request):
httpcore's pool polls every pooled socket on each request, and the agent holds one connection per
blocking query in flight. Here a request takes the most recently used idle connection (no syscall),
writes one buffer and lets the C parser assemble the answer on the event loop's callbacks.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any
from urllib.parse import quote, urlsplit

import httptools

# Below the servers' keep-alive timeout (30 s, lictor/runtime.py): a connection idle longer may be
# closing on the far side while we write to it.
IDLE_TTL = 20.0
MAX_IDLE_PER_SERVER = 64
CONNECT_TIMEOUT = 2.0
_TARGET_SAFE = "/?&=%:@!$'()*+,;~[]"


class ServerHTTPError(OSError):
    """The request got no complete answer (refused, reset, timed out or malformed)."""


class _StaleConnection(ServerHTTPError):
    """A reused connection closed before any byte of the answer: the server never saw our request
    (it closes idle keep-alive connections), so sending it again on a new connection is safe."""


class Headers:
    """Response headers: case-insensitive lookups, original names kept for relaying."""

    __slots__ = ("_pairs", "_lower")

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs
        self._lower = {k.lower(): v for k, v in pairs}

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._lower.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._lower[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lower

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)


class ServerResponse:
    """The parts of a response the agent's callers use (the same names httpx.Response has)."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: Headers, content: bytes) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[ServerResponse] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.header_pairs: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.keep_alive = False
        self.got_bytes = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: the stream is out of step
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ServerHTTPError(f"malformed response from server: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = ServerHTTPError if self.got_bytes else _StaleConnection
        self._fail(error(f"server closed the connection{f': {exc}' if exc else ''}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_pairs.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(ServerResponse(self.status, Headers(self.header_pairs), b"".join(self.chunks)))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, request: bytes, timeout: float) -> ServerResponse:
        assert self.transport is not None
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await asyncio.wait_for(self.waiter, timeout)
        except TimeoutError:
            self.close()  # the answer may still come; this connection can't be reused
            raise ServerHTTPError(f"no answer from server within {timeout:g}s") from None
        finally:
            self.waiter = None


class ServerHTTP:
    """Keep-alive connections to each server, over TLS when the address says https://."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None) -> None:
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname  # -verify-server-hostname: the name every server's cert carries
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, content: bytes = b"",
                      timeout: float = 10.0) -> ServerResponse:
        parts = urlsplit(url)
        scheme, host = parts.scheme or "http", parts.hostname or "127.0.0.1"
        port = parts.port or (443 if scheme == "https" else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        # Whatever reaches the request line must be one token of printable ASCII.
        target = quote(target, safe=_TARGET_SAFE)
        head = [f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {len(content)}\r\n"]
        for name, value in (headers or {}).items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ServerHTTPError(f"header {name!r} contains a line break")
            head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        request = "".join(head).encode("latin-1") + content
        key = (scheme, host, port)
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return self._done(key, conn, await conn.exchange(request, timeout))
            except _StaleConnection:
                pass  # retried once below on a new connection
            except BaseException:
                conn.close()
                raise
        conn = await self._connect(scheme, host, port)
        try:
            return self._done(key, conn, await conn.exchange(request, timeout))
        except BaseException:
            conn.close()
            raise

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        stack = self._idle.get(key)
        now = time.monotonic()
        while stack:
            conn = stack.pop()  # most recently used: the likeliest to still be open
            if not conn.closed and now - conn.idle_since < IDLE_TTL:
                return conn
            conn.close()
        return None

    def _done(self, key: tuple[str, str, int], conn: _Connection, response: ServerResponse) -> ServerResponse:
        if conn.keep_alive and not conn.closed:
            stack = self._idle.setdefault(key, [])
            if len(stack) < MAX_IDLE_PER_SERVER:
                conn.idle_since = time.monotonic()
                stack.append(conn)
                return response
        conn.close()
        return response

    async def _connect(self, scheme: str, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = scheme == "https"
        if tls and self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    _Connection, host, port, ssl=self.ssl_context if tls else None,
                    server_hostname=(self.server_hostname or host) if tls else None,
                ),
                CONNECT_TIMEOUT,
            )
        except TimeoutError:
            raise ServerHTTPError(f"connecting to {host}:{port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise ServerHTTPError(f"cannot connect to {host}:{port}: {exc}") from None
        return conn

    async def close(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()
