"""Per-client DNS query rate: a token bucket per source IP, bounded in memory (issue #9).

Pure: no sockets, the clock is injected, so the decision is unit-tested without a server. The
server asks `allow(ip)` once per query (UDP datagram or TCP message); a refused query gets
`refused(query)`: REFUSED with the question echoed, never bigger than the query (no amplification).

Memory: at most `max_clients` buckets. When the table is full, buckets that have refilled to the
burst are dropped first (a fresh bucket starts full, so forgetting them changes nothing); if a
flood from many (spoofed) sources keeps them all busy, the least recently seen quarter goes. A
forgotten client starts again with a full burst: under memory pressure the limiter fails open
for the quietest clients, never for the busiest one.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

REFUSED = 5
# The UDP payload size we advertise in the OPT record echoed on a refusal (what resolve() uses).
_EDNS_UDP = 1232


class QueryRateLimiter:
    """Token bucket per key (source IP): `rate` queries/s sustained, `burst` at once."""

    __slots__ = ("rate", "burst", "max_clients", "evicted", "_clock", "_buckets")

    def __init__(
        self,
        rate: float,
        burst: int = 0,
        max_clients: int = 16384,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 (0 means no limiter at all)")
        self.rate = float(rate)
        # Same default as the HTTP limit: a burst of 2 s worth of queries, at least one.
        self.burst = float(burst) if burst > 0 else max(1.0, float(int(rate * 2)))
        self.max_clients = max(1, max_clients)
        self.evicted = 0  # buckets dropped to stay under max_clients (for tests and debugging)
        self._clock = clock
        # ip -> [tokens, last seen]; a list mutated in place: one dict lookup per query.
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, ip: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._shrink(now)
            self._buckets[ip] = [self.burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def _shrink(self, now: float) -> None:
        """Make room: O(n), but it leaves >= max_clients/4 free slots, so amortised O(1) per new client."""
        buckets = self._buckets
        before = len(buckets)
        rate, burst = self.rate, self.burst
        for ip in [ip for ip, b in buckets.items() if b[0] + (now - b[1]) * rate >= burst]:
            del buckets[ip]
        excess = len(buckets) - (self.max_clients - max(1, self.max_clients // 4))
        if excess > 0:
            # Everyone is busy (a flood from many sources): forget the least recently seen.
            # Sorting bare floats is several times cheaper than sorting items by a key.
            cutoff = sorted([b[1] for b in buckets.values()])[excess - 1]
            for ip in [ip for ip, b in buckets.items() if b[1] <= cutoff]:
                del buckets[ip]
        self.evicted += before - len(buckets)


def question_end(data: bytes) -> int:
    """End offset of the single question of `data`, or -1 (none, several, compressed, truncated)."""
    n = len(data)
    if n < 17 or data[4:6] != b"\x00\x01":
        return -1
    pos = 12
    while pos < n:
        ln = data[pos]
        if ln == 0:
            end = pos + 5
            return end if end <= n else -1
        if ln > 63:
            return -1  # a compression pointer in a question: not worth echoing
        pos += ln + 1
    return -1


def refused(data: bytes, ra: bool = False) -> bytes | None:
    """REFUSED for query `data`, echoing its question (and a bare OPT if it sent one).

    None (stay silent) for what is not a query we could answer: too short for a header, or a
    response (QR set), which must never be answered. The reply is never longer than `data`.
    """
    if len(data) < 12 or data[2] & 0x80:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    # Keep opcode and RD, set QR (and RA when recursors are configured, as other answers do).
    out_flags = 0x8000 | (flags & 0x7900) | (0x0080 if ra else 0) | REFUSED
    qend = question_end(data)
    if qend < 0:
        return struct.pack("!HHHHHH", ident, out_flags, 0, 0, 0, 0)
    # RFC 6891: answer an EDNS query with an OPT record; ours (11 bytes) is no bigger than theirs.
    edns = data[10:12] == b"\x00\x01" and len(data) >= qend + 11 and data[qend : qend + 3] == b"\x00\x00\x29"
    head = struct.pack("!HHHHHH", ident, out_flags, 1, 0, 0, 1 if edns else 0) + data[12:qend]
    if edns:
        head += struct.pack("!BHHIH", 0, 41, _EDNS_UDP, 0, 0)
    return head


def qtype_of(data: bytes) -> int:
    """The question's type for the queries-by-rcode metric (0 when there is no question to read)."""
    qend = question_end(data)
    return data[qend - 4] << 8 | data[qend - 3] if qend > 0 else 0
