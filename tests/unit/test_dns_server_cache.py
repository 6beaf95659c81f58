"""DnsServer.handle(): the wire cache must be indistinguishable from the resolver (no sockets)."""

from __future__ import annotations

import random

from dnslib import EDNS0, RCODE, DNSRecord

from lictor.dns.resolver import FORWARD, DnsConfig
from lictor.dns.server import DnsServer, _fast_parse
from lictor.dns.view import CatalogView


def _view(n: int, dc: str = "dc1") -> CatalogView:
    return CatalogView.from_snapshot(
        {
            "Nodes": [{"Node": f"n{i}", "Address": f"10.0.0.{i}"} for i in range(1, n + 1)],
            "Services": [{"Node": f"n{i}", "ID": "web", "Service": "web", "Port": 80} for i in range(1, n + 1)],
            "Checks": [],
        },
        dc,
    )


def _ask(server: DnsServer, name: str, qtype: str = "A", edns: bool = False, transport: str = "udp") -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    out = server.handle(bytes(q.pack()), transport)  # type: ignore[arg-type]
    assert isinstance(out, bytes)
    r = DNSRecord.parse(out)
    assert r.header.id == q.header.id
    assert str(r.q.qname) == str(q.q.qname)  # casing echoed
    return r


def test_fast_parse_shapes() -> None:
    plain = bytes(DNSRecord.question("web.service.consul").pack())
    assert _fast_parse(plain) == len(plain)
    q = DNSRecord.question("web.service.consul")
    q.add_ar(EDNS0(udp_len=1232))
    assert _fast_parse(bytes(q.pack())) > 0
    assert _fast_parse(plain[:-1]) == -1
    assert _fast_parse(b"\x00" * 11) == -1


def test_cache_hits_match_resolver_and_follow_casing() -> None:
    view = _view(3)
    server = DnsServer(lambda: view, DnsConfig(), rng=random.Random(1))
    seen_orders = set()
    for i in range(40):
        name = "WeB.SERVICE.consul" if i % 2 else "web.service.consul"
        r = _ask(server, name)
        assert sorted(str(rr.rdata) for rr in r.rr) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        assert all(str(rr.rname) == name + "." for rr in r.rr)
        seen_orders.add(tuple(str(rr.rdata) for rr in r.rr))
    assert server.stats["cache_hits"] > 0
    assert len(seen_orders) > 1  # the ring keeps several shuffles
    r = _ask(server, "nope.service.consul")
    r = _ask(server, "nope.service.consul")
    assert r.header.rcode == RCODE.NXDOMAIN and r.auth


def test_cache_invalidated_on_new_view() -> None:
    views = [_view(3)]
    server = DnsServer(lambda: views[-1], DnsConfig())
    for _ in range(20):
        assert len(_ask(server, "web.service.consul").rr) == 3
    views.append(_view(5))
    assert len(_ask(server, "web.service.consul").rr) == 5


def test_edns_and_transport_are_distinct_keys() -> None:
    view = _view(40)
    server = DnsServer(lambda: view, DnsConfig())
    for _ in range(10):
        small = _ask(server, "web.service.consul")
        assert small.header.tc == 1
        big = _ask(server, "web.service.consul", edns=True)
        assert big.header.tc == 0 and len(big.rr) == 40
        tcp = _ask(server, "web.service.consul", transport="tcp")
        assert tcp.header.tc == 0 and len(tcp.rr) == 40


def test_forward_marker_and_refused() -> None:
    view = _view(1)
    plain = DnsServer(lambda: view, DnsConfig())
    assert _ask(plain, "example.com").header.rcode == RCODE.REFUSED
    fwd = DnsServer(lambda: view, DnsConfig(), recursors=["127.0.0.1:53"])
    q = bytes(DNSRecord.question("example.com").pack())
    assert fwd.handle(q, "udp") is FORWARD
    assert fwd.handle(q, "udp") is FORWARD  # cached marker
    assert _ask(fwd, "web.service.consul").header.ra == 1
