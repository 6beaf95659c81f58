"""Byte relay between two transports with asyncio Protocols (the data plane's hot path).

Each connection is a pair of `Pipe`s linked to each other: whatever one receives it writes to the
other's transport. Flow control is symmetric: when a transport's write buffer passes its high-water
mark asyncio calls `pause_writing()` on *its* protocol, which pauses reading on the peer; the matching
`resume_writing()` resumes it. Before the two sides are linked (the far side is still connecting),
received bytes are held in `_pending` and reading pauses once that passes PENDING_LIMIT.

Half-close is passed on where the far transport can write EOF (plain TCP); a TLS transport cannot,
so EOF there closes the pair after flushing what is buffered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["PENDING_LIMIT", "Pipe"]

PENDING_LIMIT = 256 * 1024


class Pipe(asyncio.Protocol):
    """One side of a relayed connection."""

    __slots__ = ("transport", "peer", "_pending", "_pending_size", "_eof_in", "_eof_out", "_lost",
                 "_paused", "on_lost")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self._pending: list[bytes] = []  # bytes for the peer, received before it was linked
        self._pending_size = 0
        self._eof_in = False  # we got EOF from our transport
        self._eof_out = False  # we wrote EOF to our transport
        self._lost = False
        self._paused = False  # reading paused by us while unlinked
        self.on_lost: Callable[[Pipe], None] | None = None

    # -- linking ------------------------------------------------------------------------------

    def link(self, peer: Pipe) -> None:
        """Join two sides and flush what each held for the other."""
        self.peer = peer
        peer.peer = self
        for side in (self, peer):
            other = side.peer
            assert other is not None
            if side._pending and other.transport is not None:
                other.transport.writelines(side._pending)
            side._pending = []
            side._pending_size = 0
            if side._paused and side.transport is not None and not side.transport.is_closing():
                side._paused = False
                side.transport.resume_reading()
            if side._eof_in:
                other._write_eof()
            if side._lost and other.transport is not None:
                other.transport.close()

    def send(self, data: bytes) -> None:
        """Write to the peer, or hold the bytes until there is one."""
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > PENDING_LIMIT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def close(self) -> None:
        """Close both sides (buffered bytes are flushed first)."""
        if self.transport is not None:
            self.transport.close()
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)  # type: ignore[union-attr]
        else:
            self.send(data)

    def _write_eof(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self._eof_out:
            return
        if t.can_write_eof():
            self._eof_out = True
            t.write_eof()
            if self._eof_in:
                t.close()
        else:
            t.close()

    def eof_received(self) -> bool:
        self._eof_in = True
        t = self.transport
        half_close = t is not None and t.can_write_eof()  # TLS transports cannot keep half-open
        peer = self.peer
        if peer is None:
            return half_close  # passed on at link time
        peer._write_eof()
        if not half_close or self._eof_out or peer.transport is None or peer.transport.is_closing():
            return False  # done with this side: let asyncio close it
        return True

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        peer = self.peer
        if peer is not None:
            peer.peer_lost()
        if self.on_lost is not None:
            cb, self.on_lost = self.on_lost, None
            cb(self)

    def peer_lost(self) -> None:
        """The other side went away: close ours once its buffered bytes are out."""
        if self.transport is not None:
            self.transport.close()
