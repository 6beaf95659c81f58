"""Pure resolver tests: no sockets, deterministic rng."""

from __future__ import annotations

import random
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from lictor.dns.resolver import FORWARD, DnsConfig, resolve, resolve_wire
from lictor.dns.view import CatalogView


def _snapshot() -> dict[str, Any]:
    nodes = [
        {"ID": f"id{i}", "Node": f"n{i}", "Address": f"10.0.0.{i}", "Datacenter": "dc1", "Meta": {"rack": f"r{i}"}}
        for i in range(1, 41)
    ]
    nodes.append({"Node": "v6node", "Address": "2001:db8::1", "Meta": {"rfc1035-x": "plain"}})
    nodes.append({"Node": "dotted.name", "Address": "10.9.9.9"})
    services: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    # "web": 3 instances, n1 warning, n2 passing, n3 critical
    for i, tags in ((1, ["v1", "Primary"]), (2, ["v2"]), (3, ["v1"])):
        services.append(
            {
                "Node": f"n{i}",
                "ID": "web",
                "Service": "web",
                "Tags": tags,
                "Address": "",
                "Port": 8000 + i,
                "Meta": {"version": str(i)},
                "Weights": {"Passing": 10, "Warning": 3},
                "Kind": "",
            }
        )
    checks.append({"Node": "n1", "CheckID": "c1", "Status": "warning", "ServiceID": "web"})
    checks.append({"Node": "n3", "CheckID": "serfHealth", "Status": "critical", "ServiceID": ""})
    # "big": 40 instances with their own addresses (the one on n3 is critical via its node)
    for i in range(1, 41):
        services.append(
            {"Node": f"n{i}", "ID": "big", "Service": "big", "Tags": [], "Address": f"10.1.0.{i}", "Port": 9000 + i}
        )
    # "dead": only critical
    services.append({"Node": "n4", "ID": "dead", "Service": "dead", "Port": 1})
    checks.append({"Node": "n4", "CheckID": "d", "Status": "critical", "ServiceID": "dead"})
    # connect: a sidecar for web and a native service
    services.append(
        {
            "Node": "n5",
            "ID": "web-sidecar-proxy",
            "Service": "web-sidecar-proxy",
            "Port": 21000,
            "Kind": "connect-proxy",
            "Proxy": {"DestinationServiceName": "web"},
        }
    )
    services.append({"Node": "n6", "ID": "nat", "Service": "nat", "Port": 7000, "Connect": {"Native": True}})
    services.append({"Node": "n7", "ID": "igw", "Service": "igw", "Port": 8080, "Kind": "ingress-gateway"})
    services.append({"Node": "v6node", "ID": "v6svc", "Service": "v6svc", "Port": 80})
    services.append({"Node": "n8", "ID": "hosted", "Service": "hosted", "Address": "db.example.com", "Port": 5432})
    # duplicates: same address/port registered twice
    services.append({"Node": "n9", "ID": "dup1", "Service": "dup", "Port": 1})
    services.append({"Node": "n9", "ID": "dup2", "Service": "dup", "Port": 1})
    return {"Nodes": nodes, "Services": services, "Checks": checks}


VIEW = CatalogView.from_snapshot(_snapshot(), "dc1", ingress_services={"web": ["igw"]}, servers=["n1"], serial=42)
CFG = DnsConfig()


def ask(
    name: str,
    qtype: str = "A",
    *,
    cfg: DnsConfig = CFG,
    transport: str = "udp",
    seed: int = 1,
    edns: int | None = None,
) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    r = resolve(q, VIEW, cfg, random.Random(seed), transport)  # type: ignore[arg-type]
    assert isinstance(r, DNSRecord)
    # Round-trip through the wire to make sure it packs and parses.
    wire = bytes(r.pack())
    if transport == "udp":
        assert len(wire) <= max(512, edns or 0)
    return DNSRecord.parse(wire)


def rdatas(r: DNSRecord, qtype: str | None = None) -> list[str]:
    return [str(rr.rdata) for rr in r.rr if qtype is None or QTYPE[rr.rtype] == qtype]


# ----------------------------------------------------------------------------- services


def test_service_a_filters_critical_keeps_warning() -> None:
    r = ask("web.service.consul")
    assert r.header.rcode == RCODE.NOERROR
    assert r.header.aa == 1
    assert sorted(rdatas(r)) == ["10.0.0.1", "10.0.0.2"]


def test_only_passing_drops_warning() -> None:
    r = ask("web.service.consul", cfg=DnsConfig(only_passing=True))
    assert rdatas(r) == ["10.0.0.2"]


def test_srv_records_and_additional() -> None:
    r = ask("web.service.consul", "SRV")
    srvs = {rr.rdata.port: rr.rdata for rr in r.rr}
    assert set(srvs) == {8001, 8002}
    assert srvs[8001].weight == 3  # warning instance uses Weights.Warning
    assert srvs[8002].weight == 10
    assert all(s.priority == 1 for s in srvs.values())
    assert str(srvs[8002].target) == "n2.node.dc1.consul."
    extra = {(str(rr.rname), QTYPE[rr.rtype]): str(rr.rdata) for rr in r.ar}
    assert extra[("n2.node.dc1.consul.", "A")] == "10.0.0.2"
    assert extra[("n2.node.dc1.consul.", "TXT")] == '"rack=r2"'


def test_srv_target_is_addr_name_for_own_address() -> None:
    r = ask("big.service.consul", "SRV", transport="tcp")
    targets = {str(rr.rdata.target) for rr in r.rr}
    assert "0a010001.addr.dc1.consul." in targets
    extra = {str(rr.rname): str(rr.rdata) for rr in r.ar}
    assert extra["0a010001.addr.dc1.consul."] == "10.1.0.1"


def test_srv_hostname_target() -> None:
    r = ask("hosted.service.consul", "SRV")
    assert str(r.rr[0].rdata.target) == "db.example.com."
    r = ask("hosted.service.consul", "A")
    assert QTYPE[r.rr[0].rtype] == "CNAME"


def test_tag_filter_case_insensitive() -> None:
    assert rdatas(ask("v1.web.service.consul")) == ["10.0.0.1"]
    assert rdatas(ask("PRIMARY.web.service.consul")) == ["10.0.0.1"]
    assert rdatas(ask("v2.web.service.consul")) == ["10.0.0.2"]
    r = ask("v3.web.service.consul")
    assert r.header.rcode == RCODE.NXDOMAIN


def test_rfc2782_forms() -> None:
    for name in ("_web._tcp.service.consul", "_web._tcp.consul", "_web._tcp.service.dc1.consul", "_web._tcp.dc1.consul"):
        r = ask(name, "SRV")
        assert sorted(rr.rdata.port for rr in r.rr) == [8001, 8002], name
    r = ask("_web._v2.service.consul", "SRV")
    assert [rr.rdata.port for rr in r.rr] == [8002]


def test_case_insensitive_names() -> None:
    r = ask("WEB.Service.CONSUL", "SRV")
    assert len(r.rr) == 2
    assert str(r.q.qname) == "WEB.Service.CONSUL."


def test_datacenter_forms() -> None:
    assert len(ask("web.service.dc1.consul").rr) == 2
    assert len(ask("web.service.dc1.dc.consul").rr) == 2
    assert ask("web.service.dc2.consul").header.rcode == RCODE.NXDOMAIN


def test_alt_domain() -> None:
    cfg = DnsConfig(alt_domain="lictor.test.")
    r = ask("web.service.lictor.test", "SRV", cfg=cfg)
    assert len(r.rr) == 2
    assert str(r.rr[0].rdata.target).endswith(".node.dc1.lictor.test.")


def test_unknown_and_all_critical_are_nxdomain_with_soa() -> None:
    for name in ("nope.service.consul", "dead.service.consul", "what.ever.consul", "n1.bogus.consul"):
        r = ask(name)
        assert r.header.rcode == RCODE.NXDOMAIN, name
        assert len(r.auth) == 1 and QTYPE[r.auth[0].rtype] == "SOA"
        soa = r.auth[0].rdata
        assert str(soa.mname) == "ns.consul." and str(soa.rname) == "hostmaster.consul."
        assert soa.times[0] == 42


def test_nodata_for_known_name_other_type() -> None:
    r = ask("web.service.consul", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and not r.rr
    assert QTYPE[r.auth[0].rtype] == "SOA"
    r = ask("web.service.consul", "MX")
    assert r.header.rcode == RCODE.NOERROR and not r.rr and r.auth


def test_service_txt_and_any() -> None:
    r = ask("v2.web.service.consul", "TXT")
    assert rdatas(r) == ['"version=2"']
    r = ask("v6svc.service.consul", "ANY")
    assert rdatas(r, "AAAA") == ["2001:db8::1"]
    assert rdatas(ask("v6svc.service.consul", "AAAA")) == ["2001:db8::1"]
    assert not ask("v6svc.service.consul", "A").rr


def test_dedup_same_address_port() -> None:
    r = ask("dup.service.consul", "SRV")
    assert len(r.rr) == 1


def test_service_ttl_wildcards() -> None:
    cfg = DnsConfig(service_ttl={"*": 5, "w*": 7, "web": 9, "bi*": 11}, node_ttl=13)
    assert ask("web.service.consul", cfg=cfg).rr[0].ttl == 9
    assert ask("big.service.consul", cfg=cfg).rr[0].ttl == 11
    assert ask("nat.service.consul", cfg=cfg).rr[0].ttl == 5
    assert ask("n1.node.consul", cfg=cfg).rr[0].ttl == 13
    assert cfg.ttl_for_service("wx") == 7


# ----------------------------------------------------------------------------- connect / ingress / node / addr


def test_connect_and_ingress() -> None:
    r = ask("web.connect.consul", "SRV")
    assert [rr.rdata.port for rr in r.rr] == [21000]
    assert [rr.rdata.port for rr in ask("nat.connect.consul", "SRV").rr] == [7000]
    assert ask("nope.connect.consul").header.rcode == RCODE.NXDOMAIN
    assert rdatas(ask("web.ingress.consul")) == ["10.0.0.7"]
    assert ask("nat.ingress.consul").header.rcode == RCODE.NXDOMAIN


def test_node_lookups() -> None:
    assert rdatas(ask("n2.node.consul")) == ["10.0.0.2"]
    assert rdatas(ask("n2.node.dc1.consul")) == ["10.0.0.2"]
    assert rdatas(ask("dotted.name.node.consul")) == ["10.9.9.9"]
    assert rdatas(ask("n2.node.consul", "TXT")) == ['"rack=r2"']
    any_r = ask("n2.node.consul", "ANY")
    assert sorted(QTYPE[rr.rtype] for rr in any_r.rr) == ["A", "TXT"]
    assert rdatas(ask("v6node.node.consul", "TXT")) == ['"plain"']  # rfc1035- prefix: value only
    r = ask("n2.node.consul", "MX")
    assert r.header.rcode == RCODE.NOERROR and not r.rr
    assert ask("ghost.node.consul").header.rcode == RCODE.NXDOMAIN


def test_addr_lookups() -> None:
    assert rdatas(ask("0a000001.addr.dc1.consul")) == ["10.0.0.1"]
    assert rdatas(ask("20010db8000000000000000000000001.addr.dc1.consul", "AAAA")) == ["2001:db8::1"]
    r = ask("0a000001.addr.dc1.consul", "AAAA")
    assert r.header.rcode == RCODE.NOERROR and not r.rr
    assert ask("zz.addr.dc1.consul").header.rcode == RCODE.NXDOMAIN


def test_apex_soa_ns() -> None:
    r = ask("consul", "SOA")
    assert QTYPE[r.rr[0].rtype] == "SOA"
    r = ask("consul", "NS")
    assert str(r.rr[0].rdata) == "n1.node.dc1.consul."
    assert rdatas(DNSRecord(rr=r.ar)) == ["10.0.0.1"]


def test_ptr_lookup() -> None:
    r = ask("2.0.0.10.in-addr.arpa", "PTR")
    assert rdatas(r) == ["n2.node.dc1.consul."]


# ----------------------------------------------------------------------------- outside domain / errors


def test_outside_domain_refused_or_forward() -> None:
    r = ask("example.com")
    assert r.header.rcode == RCODE.REFUSED
    q = DNSRecord.question("example.com", "A")
    assert resolve(q, VIEW, DnsConfig(recursors=True), random.Random(1), "udp") is FORWARD


def test_opcode_and_axfr() -> None:
    q = DNSRecord.question("web.service.consul", "A")
    q.header.opcode = 2
    r = resolve(q, VIEW, CFG, random.Random(1), "udp")
    assert isinstance(r, DNSRecord) and r.header.rcode == RCODE.NOTIMP
    r = ask("consul", "AXFR", transport="tcp")
    assert r.header.rcode == RCODE.NOTIMP


@pytest.mark.parametrize("count", [0, 2, 50])
def test_question_count_not_one_is_formerr(count: int) -> None:
    q = DNSRecord()
    for i in range(count):
        q.add_question(DNSRecord.question(f"x{i}.service.consul").q)
    out = resolve_wire(bytes(q.pack()), VIEW, CFG, random.Random(1), "udp")
    assert isinstance(out, bytes)
    assert DNSRecord.parse(out).header.rcode == RCODE.FORMERR


def test_garbage_wire() -> None:
    assert resolve_wire(b"\x00\x01", VIEW, CFG, random.Random(1)) is None
    out = resolve_wire(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff", VIEW, CFG, random.Random(1))
    assert isinstance(out, bytes) and out[:2] == b"\x12\x34" and out[3] & 0x0F == RCODE.FORMERR


# ----------------------------------------------------------------------------- sizes


def test_udp_truncation_and_tcp_complete() -> None:
    r = ask("big.service.consul", "SRV")
    assert r.header.tc == 1
    assert 0 < len(r.rr) < 40
    targets = {str(rr.rdata.target) for rr in r.rr}
    # Additional section trimmed to the targets that survived.
    assert {str(rr.rname) for rr in r.ar} <= targets
    full = ask("big.service.consul", "SRV", transport="tcp")
    assert full.header.tc == 0 and len(full.rr) == 39 and len(full.ar) == 39

    a = ask("big.service.consul", "A")
    assert a.header.tc == 1 and len(a.rr) < 40
    assert len(ask("big.service.consul", "A", transport="tcp").rr) == 39


def test_edns_allows_bigger_udp() -> None:
    r = ask("big.service.consul", "A", edns=4096)
    assert r.header.tc == 0 and len(r.rr) == 39
    assert any(rr.rtype == 41 for rr in r.ar)  # OPT echoed


def test_truncate_disabled_trims_silently() -> None:
    r = ask("big.service.consul", "A", cfg=DnsConfig(enable_truncate=False))
    assert r.header.tc == 0 and len(r.rr) < 40


def test_a_record_limit_all_transports() -> None:
    cfg = DnsConfig(a_record_limit=3)
    for transport in ("udp", "tcp"):
        assert len(ask("big.service.consul", cfg=cfg, transport=transport).rr) == 3


def test_udp_answer_limit() -> None:
    cfg = DnsConfig(udp_answer_limit=2)
    assert len(ask("big.service.consul", cfg=cfg).rr) == 2
    assert len(ask("big.service.consul", cfg=cfg, transport="tcp").rr) == 39


# ----------------------------------------------------------------------------- shuffle / health aggregation


def test_shuffle_uses_rng() -> None:
    orders = {tuple(rdatas(ask("big.service.consul", transport="tcp", seed=s))) for s in range(6)}
    assert len(orders) > 1
    assert ask("big.service.consul", transport="tcp", seed=3).rr[0].rdata == ask(
        "big.service.consul", transport="tcp", seed=3
    ).rr[0].rdata


def test_view_health_aggregation() -> None:
    inst = {i.node: i for i in VIEW.services["web"]}
    assert inst["n1"].status == "warning"
    assert inst["n2"].status == "passing"
    assert inst["n3"].status == "critical"  # node-level check
    assert VIEW.version > 0
    other = CatalogView.from_snapshot({}, "dc1")
    assert other.version != VIEW.version
    assert not other.services
