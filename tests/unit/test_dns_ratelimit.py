"""The per-client DNS rate limit: bucket arithmetic, bounded memory and the REFUSED reply (no sockets)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from lictor.agent.dns_wiring import rate_limiter
from lictor.config import parse_agent_args
from lictor.dns.ratelimit import QueryRateLimiter, qtype_of, question_end, refused
from lictor.dns.resolver import DnsConfig
from lictor.dns.server import DnsServer
from lictor.dns.view import CatalogView


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refused_then_refill() -> None:
    clock = Clock()
    limiter = QueryRateLimiter(10, 5, clock=clock)
    assert [limiter.allow("10.0.0.1") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.05  # half a token
    assert not limiter.allow("10.0.0.1")
    clock.now += 0.06  # the half accumulated while refused still counts
    assert limiter.allow("10.0.0.1")
    assert not limiter.allow("10.0.0.1")
    clock.now += 100  # refill never exceeds the burst
    assert sum(limiter.allow("10.0.0.1") for _ in range(20)) == 5


def test_sustained_rate_is_honoured() -> None:
    clock = Clock()
    limiter = QueryRateLimiter(50, 10, clock=clock)
    allowed = 0
    for _ in range(10_000):  # 1,000 q/s for 10 s
        clock.now += 0.001
        allowed += limiter.allow("10.0.0.1")
    assert 10 + 500 - 2 <= allowed <= 10 + 500 + 1


def test_clients_are_independent() -> None:
    clock = Clock()
    limiter = QueryRateLimiter(1, 2, clock=clock)
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")
    assert limiter.allow("b") and limiter.allow("b") and not limiter.allow("b")


def test_default_burst_is_two_seconds_of_rate() -> None:
    assert QueryRateLimiter(100).burst == 200
    assert QueryRateLimiter(0.2).burst == 1  # at least one query
    with pytest.raises(ValueError):
        QueryRateLimiter(0)


def test_idle_buckets_are_forgotten_first() -> None:
    clock = Clock()
    limiter = QueryRateLimiter(10, 5, max_clients=100, clock=clock)
    for _ in range(10):
        limiter.allow("busy")  # drained: must survive any eviction
    for i in range(99):
        limiter.allow(f"idle-{i}")
    clock.now += 1.0  # the idle ones (1 query each) are full again; "busy" has 0 + 10 tokens... cap 5
    for _ in range(5):
        assert limiter.allow("busy")
    assert not limiter.allow("busy")
    limiter.allow("new")  # table full: the refilled idle buckets go, nothing else
    assert len(limiter) == 2 and limiter.evicted == 99
    assert not limiter.allow("busy")


def test_spoofed_flood_keeps_the_table_bounded_and_the_flooder_limited() -> None:
    clock = Clock()
    limiter = QueryRateLimiter(5, 5, max_clients=1000, clock=clock)
    flooder_allowed = 0
    for i in range(200_000):  # 200k distinct sources, each seen once, all within 2 s (none refills)
        clock.now += 0.00001
        limiter.allow(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        if i % 10 == 0:
            flooder_allowed += limiter.allow("192.0.2.1")
        assert len(limiter) <= 1000
    # The flooder is the most recently seen client, so eviction never resets its bucket.
    assert flooder_allowed <= 5 + 2 * 5 + 1
    assert limiter.evicted >= 199_000


def _query(name: str = "web.service.consul", qtype: str = "A", edns: bool = False) -> bytes:
    q = DNSRecord.question(name, qtype)
    if edns:
        q.add_ar(EDNS0(udp_len=4096))
    return bytes(q.pack())


@pytest.mark.parametrize("edns", [False, True])
def test_refused_echoes_the_question_and_is_never_bigger(edns: bool) -> None:
    data = _query("Web.Service.Consul", "SRV", edns)
    out = refused(data)
    assert out is not None and len(out) <= len(data)
    reply = DNSRecord.parse(out)
    query = DNSRecord.parse(data)
    assert reply.header.id == query.header.id and reply.header.qr == 1 and reply.header.rd == query.header.rd
    assert reply.header.rcode == RCODE.REFUSED
    assert str(reply.q.qname) == "Web.Service.Consul." and reply.q.qtype == QTYPE.SRV
    assert not reply.rr and not reply.auth
    assert (reply.header.ar == 1) == edns
    assert qtype_of(data) == QTYPE.SRV


def test_refused_with_edns_options_drops_them() -> None:
    q = DNSRecord.question("web.service.consul")
    q.add_ar(EDNS0(udp_len=4096, opts=[]))
    data = bytes(q.pack()) + b""
    # dig's default: an OPT carrying a COOKIE option (code 10, 8 bytes).
    with_cookie = data[:-2] + b"\x00\x0c" + b"\x00\x0a\x00\x08" + b"12345678"
    out = refused(with_cookie)
    assert out is not None and len(out) < len(with_cookie)
    assert DNSRecord.parse(out).header.rcode == RCODE.REFUSED


def test_refused_for_odd_packets() -> None:
    assert refused(b"\x00" * 11) is None  # shorter than a header: silence, as before
    response = bytearray(_query())
    response[2] |= 0x80
    assert refused(bytes(response)) is None  # never answer a response
    # No readable question (QDCOUNT 0, or a compression pointer): a bare header.
    bare = refused(b"\x12\x34\x01\x00" + b"\x00" * 8)
    assert bare is not None and len(bare) == 12 and bare[3] & 15 == RCODE.REFUSED
    pointer = bytearray(_query())
    pointer[12] = 0xC0
    out = refused(bytes(pointer))
    assert out is not None and len(out) == 12
    assert question_end(_query()[:-1]) == -1 and qtype_of(b"\x00" * 12) == 0


def test_server_refuse_counts_by_rcode_and_calls_back() -> None:
    view = CatalogView.from_snapshot({"Nodes": [], "Services": [], "Checks": []}, "dc1")
    calls: list[int] = []
    server = DnsServer(lambda: view, DnsConfig(), rng=random.Random(1), on_rate_limited=lambda: calls.append(1))
    out = server.refuse(_query(qtype="AAAA"))
    assert out is not None and DNSRecord.parse(out).header.rcode == RCODE.REFUSED
    assert server.qcounts == {QTYPE.AAAA << 4 | RCODE.REFUSED: 1}
    assert server.stats["rate_limited"] == 1 and calls == [1]
    assert server.refuse(b"\x00") is None and calls == [1]  # dropped packets are not counted


def test_flags_and_config_file(tmp_path: Path) -> None:
    assert rate_limiter(parse_agent_args(["-dev"])) is None  # off by default, like -http-rate-limit
    config = parse_agent_args(["-dev", "-dns-rate-limit", "250", "-dns-rate-burst", "1000"])
    limiter = rate_limiter(config)
    assert limiter is not None and limiter.rate == 250 and limiter.burst == 1000
    path = tmp_path / "limits.json"
    path.write_text('{"dns_rate_limit": 50}')
    limiter = rate_limiter(parse_agent_args(["-dev", "-config-file", str(path)]))
    assert limiter is not None and limiter.rate == 50 and limiter.burst == 100
