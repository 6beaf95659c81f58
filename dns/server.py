"""UDP/TCP DNS listener around the pure resolver, with a wire-level answer cache.

Hot path: a hand-rolled check of the query shape (one question, no
compression, optionally one bare OPT record) yields a cache key of the
lowercased question + flags + transport. Each key holds a small ring of
pre-packed, differently shuffled answers; a hit costs a few byte slices
(rewrite the ID and copy the client's question casing back in) instead of a
dnslib parse+pack. Anything unusual falls back to ``resolve_wire``. The cache
is dropped whenever ``view_getter`` returns a different view object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import replace

from .ratelimit import QueryRateLimiter, qtype_of, refused
from .resolver import FORWARD, DnsConfig, Forward, Transport, resolve_wire
from .view import CatalogView

log = logging.getLogger("lictor.dns")

_RING = 8  # shuffled variants kept per cache key
_SERVFAIL = 2


def _fast_parse(data: bytes) -> int:
    """Return the end offset of the question for simple queries, else -1."""
    n = len(data)
    # QR=0, opcode=0, QDCOUNT=1, ANCOUNT=0, NSCOUNT=0
    if n < 17 or n > 512 or data[2] & 0xF8 or data[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return -1
    pos = 12
    while True:
        if pos >= n:
            return -1
        ln = data[pos]
        if ln == 0:
            pos += 1
            break
        if ln > 63:
            return -1  # compression pointer or reserved bits: not a plain query
        pos += ln + 1
    qend = pos + 4
    if qend > n:
        return -1
    ar = data[10:12]
    if ar == b"\x00\x00":
        return qend if qend == n else -1
    # One OPT RR for the root with no options: what dnsperf -e / stub resolvers send.
    if ar == b"\x00\x01" and n - qend == 11 and data[qend : qend + 3] == b"\x00\x00\x29" and data[n - 2 :] == b"\x00\x00":
        return qend
    return -1


def _servfail(data: bytes) -> bytes | None:
    if len(data) < 12:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    # Echo the question when the query is simple enough to slice it out.
    qend = _fast_parse(data)
    if qend > 0:
        return struct.pack("!HHHHHH", ident, 0x8000 | (flags & 0x0100) | 0x0080 | _SERVFAIL, 1, 0, 0, 0) + data[12:qend]
    return struct.pack("!HHHHHH", ident, 0x8000 | (flags & 0x7900) | 0x0080 | _SERVFAIL, 0, 0, 0, 0)


class _Entry:
    __slots__ = ("ring", "fixed", "next")

    def __init__(self) -> None:
        self.ring: list[bytes | Forward] = []
        self.fixed = False  # answer does not depend on the shuffle: one variant is enough
        self.next = 0


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        server = self.server
        limiter = server.rate_limiter
        try:
            if limiter is not None and not limiter.allow(addr[0]):
                out = server.refuse(data)
            else:
                out = server.handle(data, "udp")
        except Exception:  # never let one packet kill the listener
            log.exception("dns: error handling UDP query")
            return
        if out is None:
            return
        if out is FORWARD:
            server._spawn_forward(data, addr, self)
            return
        assert self.transport is not None
        self.transport.sendto(out, addr)  # type: ignore[arg-type]

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients that went away


class _UdpSocket:
    """UDP listener that drains many datagrams per readiness event.

    asyncio's DatagramProtocol costs one selector wakeup per datagram; reading
    in batches from a non-blocking socket cuts that overhead a lot under load.
    Exposes the bits of DatagramTransport the forwarding path uses.
    """

    BATCH = 64

    def __init__(self, server: DnsServer, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.sock = sock
        self.loop = loop
        self.transport = self
        self._closed = False
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        sock = self.sock
        handle = self.server.handle
        limiter = self.server.rate_limiter  # None when off: the only cost is this test per packet
        for _ in range(self.BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ICMP errors surfaced on the socket
            try:
                if limiter is not None and not limiter.allow(addr[0]):
                    out = self.server.refuse(data)
                else:
                    out = handle(data, "udp")
            except Exception:  # never let one packet kill the listener
                log.exception("dns: error handling UDP query")
                continue
            if out is None:
                continue
            if out is FORWARD:
                self.server._spawn_forward(data, addr, self)
                continue
            self.sendto(out, addr)  # type: ignore[arg-type]

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            pass  # full send buffer or vanished client: UDP may drop, the client retries

    def is_closing(self) -> bool:
        return self._closed

    def get_extra_info(self, name: str) -> object:
        return self.sock.getsockname() if name == "sockname" else None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, ident: bytes) -> None:
        self.ident = ident
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:2] == self.ident and not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _parse_recursor(spec: str) -> tuple[str, int]:
    spec = spec.strip()
    if spec.startswith("["):  # [v6]:port
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, 53


class DnsServer:
    """Consul-style DNS listener (UDP + TCP on the same port)."""

    def __init__(
        self,
        view_getter: Callable[[], CatalogView | None],
        config: DnsConfig,
        host: str = "127.0.0.1",
        port: int = 8600,
        recursors: Sequence[str] = (),
        recursor_timeout: float = 2.0,
        *,
        rng: random.Random | None = None,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 512,
        max_inflight_forwards: int = 512,
        cache_size: int = 8192,
        udp_batch: bool = True,
        rate_limiter: QueryRateLimiter | None = None,
        on_rate_limited: Callable[[], None] | None = None,
    ) -> None:
        self._view_getter = view_getter
        self.recursors = [_parse_recursor(r) for r in recursors]
        # RA and forwarding depend on recursors being configured.
        self.config = replace(config, recursors=bool(self.recursors))
        self.host = host
        self.port = port
        self.recursor_timeout = recursor_timeout
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self.max_inflight_forwards = max_inflight_forwards
        self.cache_size = cache_size
        self.udp_batch = udp_batch  # False: plain asyncio DatagramProtocol
        # Per-source-IP query rate (UDP and TCP share a client's bucket); None = no limit.
        self.rate_limiter = rate_limiter
        self.on_rate_limited = on_rate_limited  # e.g. lictor_limit_refusals_total{kind="dns_rate"}
        self._rng = rng or random.Random()
        self._cache: dict[tuple[str, bytes, bytes, bytes], _Entry] = {}
        self._view: CatalogView | None = None
        self._udp: asyncio.DatagramTransport | _UdpSocket | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_conns = 0
        self.stats = {"queries": 0, "cache_hits": 0, "forwarded": 0, "rate_limited": 0}
        # Per (qtype, rcode) counts for lictor.metrics, read at scrape time. Hot-path keys are
        # `qtype << 4 | rcode` ints (one dict update per query); rare outcomes use (qtype, word).
        self.qcounts: dict[int | tuple[int, str], int] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        last_exc: OSError | None = None
        # With port 0 the UDP port picked by the kernel may be taken for TCP: retry.
        for _ in range(20 if self.port == 0 else 1):
            udp: asyncio.DatagramTransport | _UdpSocket
            if self.udp_batch:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                with contextlib.suppress(OSError):  # best effort: absorb bursts
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                try:
                    sock.bind((self.host, self.port))
                except OSError:
                    sock.close()
                    raise
                udp = _UdpSocket(self, sock, loop)
            else:
                udp, _proto = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, self.port), family=family
                )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, self.host, port, reuse_address=True)
            except OSError as exc:
                udp.close()
                last_exc = exc
                continue
            self._udp = udp
            self.port = port
            return
        raise last_exc or OSError("could not bind DNS listener")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._tcp is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)
            self._tcp = None

    # ------------------------------------------------------------------ query path

    def handle(self, data: bytes, transport: Transport) -> bytes | Forward | None:
        """Answer one wire query (sync; FORWARD means ask the recursors)."""
        self.stats["queries"] += 1
        view = self._view_getter()
        if view is None:  # no catalog view, or one older than the staleness bound: say so
            return _servfail(data)
        if view is not self._view:
            self._cache.clear()
            self._view = view
        qend = _fast_parse(data)
        if qend < 0:
            out = resolve_wire(data, view, self.config, self._rng, transport)
            self._count_slow(data, out)
            return out
        question = data[12:qend]
        key = (transport, data[2:4], question.lower(), data[qend:])
        entry = self._cache.get(key)
        if entry is None:
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]  # FIFO eviction keeps this O(1)
            entry = self._cache[key] = _Entry()
        ring = entry.ring
        if entry.fixed or len(ring) >= _RING:
            self.stats["cache_hits"] += 1
            i = entry.next
            entry.next = (i + 1) % len(ring)
            wire = ring[i]
        else:
            wire = self._fill(entry, data, qend, key[2], view, transport)
        qcounts = self.qcounts
        if wire is FORWARD or wire is None:
            key2 = (data[qend - 4] << 8 | data[qend - 3], "FORWARDED" if wire is FORWARD else "DROPPED")
            qcounts[key2] = qcounts.get(key2, 0) + 1
            return wire
        assert isinstance(wire, bytes)
        ckey = (data[qend - 4] << 12 | data[qend - 3] << 4) | (wire[3] & 15)
        qcounts[ckey] = qcounts.get(ckey, 0) + 1
        # Patch the ID and restore the client's question casing (0x20 randomisation).
        return data[:2] + wire[2:12] + question + wire[qend:]

    def refuse(self, data: bytes) -> bytes | None:
        """A query over its client's rate: REFUSED echoing the question, counted; None = silence."""
        out = refused(data, self.config.recursors)
        if out is None:
            return None  # not a query (too short, or a response): dropped, as handle() would
        self.stats["queries"] += 1
        self.stats["rate_limited"] += 1
        key = qtype_of(data) << 4 | 5
        self.qcounts[key] = self.qcounts.get(key, 0) + 1
        if self.on_rate_limited is not None:
            self.on_rate_limited()
        return out

    def _count_slow(self, data: bytes, out: bytes | Forward | None) -> None:
        """Count a query that missed the fast path (EDNS options, odd shapes): parse its qtype."""
        qtype, pos, n = 0, 12, len(data)
        while pos < n and 0 < data[pos] <= 63:
            pos += data[pos] + 1
        if pos + 3 <= n and data[pos] == 0:
            qtype = data[pos + 1] << 8 | data[pos + 2]
        if isinstance(out, bytes) and len(out) >= 4:
            key: int | tuple[int, str] = qtype << 4 | (out[3] & 15)
        else:
            key = (qtype, "FORWARDED" if out is FORWARD else "DROPPED")
        self.qcounts[key] = self.qcounts.get(key, 0) + 1

    def _fill(
        self, entry: _Entry, data: bytes, qend: int, qlower: bytes, view: CatalogView, transport: Transport
    ) -> bytes | Forward | None:
        canonical = b"\x00\x00" + data[2:12] + qlower + data[qend:]
        wire = resolve_wire(canonical, view, self.config, self._rng, transport)
        if wire is None:
            return None
        if isinstance(wire, Forward):
            entry.ring.append(wire)
            entry.fixed = True
            return wire
        if wire[12:qend] != qlower:
            # Unexpected re-encoding of the question: do not cache, answer as is.
            return wire
        entry.ring.append(wire)
        # Answers with <= 1 record cannot vary with the shuffle.
        if wire[6:8] in (b"\x00\x00", b"\x00\x01"):
            entry.fixed = True
        return wire

    # ------------------------------------------------------------------ forwarding

    def _spawn_forward(self, data: bytes, addr: tuple[str, int], proto: _UdpProtocol | _UdpSocket) -> None:
        if len(self._tasks) >= self.max_inflight_forwards:
            out = _servfail(data)
            if out is not None and proto.transport is not None:
                proto.transport.sendto(out, addr)  # type: ignore[arg-type]
            return

        async def run() -> None:
            out = await self.forward(data, "udp")
            if out is not None and proto.transport is not None and not proto.transport.is_closing():
                proto.transport.sendto(out, addr)  # type: ignore[arg-type]

        self._track(run())

    def _track(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def forward(self, data: bytes, transport: Transport) -> bytes | None:
        """Relay the first NOERROR/NXDOMAIN answer from the recursors, else SERVFAIL."""
        self.stats["forwarded"] += 1
        for host, port in self.recursors:
            try:
                if transport == "tcp":
                    resp = await asyncio.wait_for(self._ask_tcp(host, port, data), self.recursor_timeout)
                else:
                    resp = await asyncio.wait_for(self._ask_udp(host, port, data), self.recursor_timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                continue
            if len(resp) >= 12 and resp[:2] == data[:2] and (resp[3] & 0x0F) in (0, 3):
                return resp
        return _servfail(data)

    async def _ask_udp(self, host: str, port: int, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _UpstreamProtocol(data[:2]), remote_addr=(host, port)
        )
        try:
            transport.sendto(data)
            return await proto.future
        finally:
            transport.close()

    async def _ask_tcp(self, host: str, port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(len(data).to_bytes(2, "big") + data)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(size)
        finally:
            writer.close()

    # ------------------------------------------------------------------ TCP

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_conns >= self.max_tcp_connections:
            writer.close()
            return
        self._tcp_conns += 1
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)  # so stop() can cancel idle connections
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle_timeout)
                size = int.from_bytes(head, "big")
                if size < 12:
                    break  # cannot be a DNS message: drop the connection
                data = await asyncio.wait_for(reader.readexactly(size), self.tcp_idle_timeout)
                try:
                    limiter = self.rate_limiter
                    if limiter is not None and not limiter.allow(ip):
                        out = self.refuse(data)
                    else:
                        out = self.handle(data, "tcp")
                except Exception:
                    log.exception("dns: error handling TCP query")
                    out = _servfail(data)
                if out is FORWARD:
                    out = await self.forward(data, "tcp")
                if out is None:
                    continue
                assert isinstance(out, bytes)
                writer.write(len(out).to_bytes(2, "big") + out)
                await asyncio.wait_for(writer.drain(), self.tcp_idle_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tcp_conns -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()
