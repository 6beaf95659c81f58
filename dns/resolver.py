"""Pure Consul-compatible DNS resolver.

``resolve`` maps a parsed request plus a :class:`CatalogView` to a response,
with no I/O and no clock: randomness comes from the injected ``rng`` so tests
are deterministic. ``resolve_wire`` wraps it for raw bytes and never raises.
Names outside our domains yield :data:`FORWARD` so the server can ask the
recursors (or REFUSED when there are none).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)

from .view import CRITICAL, PASSING, CatalogView, ServiceInstance

Transport = Literal["udp", "tcp"]

UDP_PLAIN_MAX = 512
UDP_EDNS_MAX = 4096
TCP_MAX = 65535

_TYPE_LABELS = frozenset({b"service", b"connect", b"virtual", b"ingress", b"node", b"query", b"addr"})
_OPT = 41


class Forward:
    """Marker: the name is outside our domains and must go to the recursors."""

    _instance: Forward | None = None

    def __new__(cls) -> Forward:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "FORWARD"


FORWARD = Forward()


@dataclass(frozen=True, slots=True)
class SoaConfig:
    refresh: int = 3600
    retry: int = 600
    expire: int = 86400
    minttl: int = 0


@dataclass
class DnsConfig:
    domain: str = "consul."
    alt_domain: str | None = None
    node_ttl: int = 0
    # Per service name TTLs; keys ending in "*" are prefixes ("*" alone = all).
    service_ttl: Mapping[str, int] = field(default_factory=dict)
    only_passing: bool = False
    a_record_limit: int = 0  # 0 = unlimited; applies to A/AAAA on every transport
    udp_answer_limit: int | None = None
    enable_truncate: bool = True  # unlike Consul we set TC by default
    enable_additional_node_meta_txt: bool = True
    soa: SoaConfig = field(default_factory=SoaConfig)
    recursors: bool = False  # True when the server has recursors configured
    max_udp_size: int = UDP_EDNS_MAX

    def __post_init__(self) -> None:
        self._domains: list[tuple[tuple[bytes, ...], DNSLabel]] = []
        for d in (self.domain, self.alt_domain):
            if d:
                label = DNSLabel(d.lower())
                self._domains.append((tuple(label.label), label))

    def ttl_for_service(self, name: str) -> int:
        ttls = self.service_ttl
        if not ttls:
            return 0
        if name in ttls:
            return int(ttls[name])
        best = -1
        value = 0
        for key, ttl in ttls.items():
            if key.endswith("*"):
                prefix = key[:-1]
                if name.startswith(prefix) and len(prefix) > best:
                    best, value = len(prefix), int(ttl)
        return value


# --------------------------------------------------------------------------- helpers


def _header_reply(data: bytes, rcode: int) -> bytes | None:
    """Header-only reply for packets dnslib cannot parse; None means stay silent."""
    if len(data) < 12:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    if flags & 0x8000:
        return None  # never answer responses: avoids reflection loops
    opcode = flags & 0x7800
    out_flags = 0x8000 | opcode | (flags & 0x0100) | (rcode & 0x0F)
    return struct.pack("!HHHHHH", ident, out_flags, 0, 0, 0, 0)


def _udp_limit(request: DNSRecord, config: DnsConfig) -> int:
    for rr in request.ar:
        if rr.rtype == _OPT:
            # rclass of the OPT RR carries the advertised payload size.
            return max(UDP_PLAIN_MAX, min(int(rr.rclass), config.max_udp_size))
    return UDP_PLAIN_MAX


def _has_edns(request: DNSRecord) -> bool:
    return any(rr.rtype == _OPT for rr in request.ar)


def _ip_hex(addr: str) -> str | None:
    try:
        return ipaddress.ip_address(addr).packed.hex()
    except ValueError:
        return None


def _addr_record(name: DNSLabel, addr: str, ttl: int) -> RR | None:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        if not addr:
            return None
        return RR(name, QTYPE.CNAME, rdata=CNAME(addr), ttl=ttl)
    if ip.version == 4:
        return RR(name, QTYPE.A, rdata=A(str(ip)), ttl=ttl)
    return RR(name, QTYPE.AAAA, rdata=AAAA(str(ip)), ttl=ttl)


def _txt_records(name: DNSLabel, meta: tuple[tuple[str, str], ...], ttl: int) -> list[RR]:
    out = []
    for k, v in meta:
        # RFC 1464 key=value; Consul emits only the value for "rfc1035-" keys.
        text = v if k.startswith("rfc1035-") else f"{k}={v}"
        out.append(RR(name, QTYPE.TXT, rdata=TXT(text.encode()[:255]), ttl=ttl))
    return out


def _decode(label: bytes) -> str:
    return label.decode("utf-8", "replace")


class _Ctx:
    """Per-request state shared by the lookup helpers."""

    __slots__ = ("request", "view", "config", "rng", "transport", "reply", "domain", "qtype", "qname")

    def __init__(
        self,
        request: DNSRecord,
        view: CatalogView,
        config: DnsConfig,
        rng: random.Random,
        transport: Transport,
        reply: DNSRecord,
        domain: DNSLabel,
    ) -> None:
        self.request = request
        self.view = view
        self.config = config
        self.rng = rng
        self.transport = transport
        self.reply = reply
        self.domain = domain
        self.qtype = request.q.qtype
        self.qname = request.q.qname

    def soa(self) -> RR:
        c = self.config.soa
        rdata = SOA(
            self.domain.add("ns"),
            self.domain.add("hostmaster"),
            (self.view.serial, c.refresh, c.retry, c.expire, c.minttl),
        )
        return RR(self.domain, QTYPE.SOA, rdata=rdata, ttl=c.minttl)

    def nxdomain(self) -> DNSRecord:
        self.reply.header.rcode = RCODE.NXDOMAIN
        self.reply.add_auth(self.soa())
        return self.reply

    def nodata(self) -> DNSRecord:
        self.reply.add_auth(self.soa())
        return self.reply

    def local_dc(self, dc: list[bytes]) -> bool:
        # Accept "", "<dc>" and "<dc>.dc"; we only serve the local datacenter.
        if not dc:
            return True
        if len(dc) == 2 and dc[1] == b"dc":
            dc = dc[:1]
        return len(dc) == 1 and _decode(dc[0]) == self.view.datacenter.lower()


def _base_reply(request: DNSRecord, config: DnsConfig) -> DNSRecord:
    h = request.header
    header = DNSHeader(id=h.id, qr=1, aa=1, ra=1 if config.recursors else 0, rd=h.rd, opcode=h.opcode)
    header.cd = h.cd
    reply = DNSRecord(header, q=request.q)
    if _has_edns(request):
        reply.add_ar(EDNS0(udp_len=config.max_udp_size))
    return reply


def _rcode(request: DNSRecord, config: DnsConfig, rcode: int) -> DNSRecord:
    reply = _base_reply(request, config)
    reply.header.rcode = rcode
    return reply


# --------------------------------------------------------------------------- lookups


def _healthy(instances: tuple[ServiceInstance, ...], config: DnsConfig, tag: str | None) -> list[ServiceInstance]:
    out = []
    seen: set[tuple[str, int]] = set()
    for inst in instances:
        if inst.status == CRITICAL or (config.only_passing and inst.status != PASSING):
            continue
        if tag is not None and tag not in inst.tags_lower:
            continue
        key = (inst.address, inst.port)
        if key in seen:
            continue  # Consul drops duplicate node/addr/port records
        seen.add(key)
        out.append(inst)
    return out


def _service_lookup(ctx: _Ctx, instances: tuple[ServiceInstance, ...], name: str, tag: str | None) -> DNSRecord:
    cfg = ctx.config
    found = _healthy(instances, cfg, tag)
    if not found:
        return ctx.nxdomain()
    ctx.rng.shuffle(found)
    ttl = cfg.ttl_for_service(name)
    qtype = ctx.qtype
    reply = ctx.reply
    qname = ctx.qname
    if qtype == QTYPE.SRV:
        _srv_records(ctx, found, ttl)
    elif qtype in (QTYPE.A, QTYPE.AAAA, QTYPE.ANY):
        seen: set[str] = set()
        count = 0
        for inst in found:
            if inst.address in seen:
                continue
            rr = _addr_record(qname, inst.address, ttl)
            if rr is None or (qtype != QTYPE.ANY and rr.rtype != qtype and rr.rtype != QTYPE.CNAME):
                continue
            seen.add(inst.address)
            reply.add_answer(rr)
            count += 1
            if cfg.a_record_limit and count >= cfg.a_record_limit:
                break
    elif qtype == QTYPE.TXT:
        seen_txt: set[tuple[tuple[str, str], ...]] = set()
        for inst in found:
            if inst.meta and inst.meta not in seen_txt:
                seen_txt.add(inst.meta)
                for rr in _txt_records(qname, inst.meta, ttl):
                    reply.add_answer(rr)
    if not reply.rr:
        return ctx.nodata()
    return reply


def _srv_records(ctx: _Ctx, found: list[ServiceInstance], ttl: int) -> None:
    reply = ctx.reply
    dc = ctx.view.datacenter
    extra_seen: set[str] = set()
    for inst in found:
        if inst.own_address:
            hexip = _ip_hex(inst.address)
            if hexip is None:
                target = DNSLabel(inst.address)  # hostname: the target is the name itself
                extra = None
            else:
                target = ctx.domain.add(f"{hexip}.addr.{dc}")
                extra = _addr_record(target, inst.address, ttl)
            meta: tuple[tuple[str, str], ...] = ()
        else:
            target = ctx.domain.add(f"{inst.node}.node.{dc}")
            extra = _addr_record(target, inst.node_address, ttl)
            meta = inst.node_meta if ctx.config.enable_additional_node_meta_txt else ()
        reply.add_answer(
            RR(ctx.qname, QTYPE.SRV, rdata=SRV(priority=1, weight=inst.weight, port=inst.port, target=target), ttl=ttl)
        )
        key = str(target).lower()
        if key in extra_seen:
            continue
        extra_seen.add(key)
        if extra is not None:
            reply.add_ar(extra)
        for rr in _txt_records(target, meta, ttl):
            reply.add_ar(rr)


def _node_lookup(ctx: _Ctx, name: str) -> DNSRecord:
    node = ctx.view.nodes.get(name)
    if node is None:
        return ctx.nxdomain()
    ttl = ctx.config.node_ttl
    qtype = ctx.qtype
    reply = ctx.reply
    if qtype in (QTYPE.A, QTYPE.AAAA, QTYPE.ANY):
        rr = _addr_record(ctx.qname, node.address, ttl)
        if rr is not None and (qtype == QTYPE.ANY or rr.rtype in (qtype, QTYPE.CNAME)):
            reply.add_answer(rr)
            if qtype != QTYPE.ANY and ctx.config.enable_additional_node_meta_txt:
                for txt in _txt_records(ctx.qname, node.meta, ttl):
                    reply.add_ar(txt)
    if qtype in (QTYPE.TXT, QTYPE.ANY):
        for txt in _txt_records(ctx.qname, node.meta, ttl):
            reply.add_answer(txt)
    if not reply.rr:
        return ctx.nodata()
    return reply


def _addr_lookup(ctx: _Ctx, hexip: str) -> DNSRecord:
    try:
        raw = bytes.fromhex(hexip)
    except ValueError:
        return ctx.nxdomain()
    if len(raw) not in (4, 16):
        return ctx.nxdomain()
    rr = _addr_record(ctx.qname, str(ipaddress.ip_address(raw)), ctx.config.node_ttl)
    assert rr is not None
    if ctx.qtype in (rr.rtype, QTYPE.ANY):
        ctx.reply.add_answer(rr)
        return ctx.reply
    return ctx.nodata()


def _apex(ctx: _Ctx) -> DNSRecord:
    if ctx.qtype == QTYPE.SOA:
        ctx.reply.add_answer(ctx.soa())
        return ctx.reply
    if ctx.qtype == QTYPE.NS:
        view = ctx.view
        servers = [view.nodes[s.lower()] for s in view.servers if s.lower() in view.nodes]
        ctx.rng.shuffle(servers)
        if not servers:
            ctx.reply.add_answer(RR(ctx.domain, QTYPE.NS, rdata=NS(ctx.domain.add("ns")), ttl=0))
        for node in servers[:3]:
            target = ctx.domain.add(f"{node.name}.node.{view.datacenter}")
            ctx.reply.add_answer(RR(ctx.domain, QTYPE.NS, rdata=NS(target), ttl=0))
            glue = _addr_record(target, node.address, 0)
            if glue is not None:
                ctx.reply.add_ar(glue)
        return ctx.reply
    return ctx.nodata()


def _reverse_ip(labels: tuple[bytes, ...]) -> str | None:
    try:
        if labels[-2:] == (b"in-addr", b"arpa") and len(labels) == 6:
            return str(ipaddress.IPv4Address(".".join(_decode(x) for x in reversed(labels[:4]))))
        if labels[-2:] == (b"ip6", b"arpa") and len(labels) == 34:
            nibbles = "".join(_decode(x) for x in reversed(labels[:32]))
            return str(ipaddress.IPv6Address(bytes.fromhex(nibbles)))
    except ValueError:
        return None
    return None


def _lookup(ctx: _Ctx, sub: list[bytes]) -> DNSRecord:
    if not sub:
        return _apex(ctx)
    # RFC 2782 with the "service" label omitted: _svc._tag[.dc]
    if len(sub) in (2, 3) and sub[0][:1] == b"_" and sub[1][:1] == b"_" and not (len(sub) == 3 and sub[2] == b"service"):
        return _rfc2782(ctx, sub[0], sub[1], sub[2:])
    idx = -1
    for i in range(len(sub) - 1, -1, -1):
        if sub[i] in _TYPE_LABELS:
            idx = i
            break
    if idx <= 0:
        return ctx.nxdomain()
    kind, before, dc = sub[idx], sub[:idx], sub[idx + 1 :]
    if not ctx.local_dc(dc):
        return ctx.nxdomain()
    if kind == b"service":
        if len(before) == 2 and before[0][:1] == b"_" and before[1][:1] == b"_":
            return _rfc2782(ctx, before[0], before[1], [])
        name = _decode(before[-1])
        tag = _decode(b".".join(before[:-1])) if len(before) > 1 else None
        return _service_lookup(ctx, ctx.view.services.get(name, ()), name, tag)
    if kind in (b"connect", b"ingress"):
        if len(before) != 1:
            return ctx.nxdomain()
        name = _decode(before[0])
        index = ctx.view.connect if kind == b"connect" else ctx.view.ingress
        return _service_lookup(ctx, index.get(name, ()), name, None)
    if kind == b"node":
        return _node_lookup(ctx, _decode(b".".join(before)))
    if kind == b"addr" and len(before) == 1:
        return _addr_lookup(ctx, _decode(before[0]))
    # virtual/query (prepared queries, virtual IPs) are not served yet.
    return ctx.nxdomain()


def _rfc2782(ctx: _Ctx, svc: bytes, tag: bytes, dc: list[bytes]) -> DNSRecord:
    if not ctx.local_dc(dc):
        return ctx.nxdomain()
    name = _decode(svc[1:])
    tag_s: str | None = _decode(tag[1:])
    if tag_s == "tcp":
        tag_s = None  # "_tcp" is the protocol, not a tag
    return _service_lookup(ctx, ctx.view.services.get(name, ()), name, tag_s)


# --------------------------------------------------------------------------- truncation


def _fit(reply: DNSRecord, limit: int, config: DnsConfig) -> DNSRecord:
    """Trim ``reply`` to whole answer records so it packs within ``limit`` bytes."""
    if len(reply.pack()) <= limit:
        return reply
    answers = list(reply.rr)
    additional = list(reply.ar)

    def build(n: int) -> DNSRecord:
        kept = answers[:n]
        targets = {str(rr.rdata.target).lower() for rr in kept if rr.rtype == QTYPE.SRV}
        cand = DNSRecord(reply.header, q=reply.q)
        cand.rr = kept
        cand.auth = list(reply.auth)
        cand.ar = [rr for rr in additional if rr.rtype == _OPT or str(rr.rname).lower() in targets]
        return cand

    lo, hi = 0, len(answers)  # invariant: build(lo) fits (or lo == 0), build(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(build(mid).pack()) <= limit:
            lo = mid
        else:
            hi = mid
    out = build(lo)
    if len(out.pack()) > limit:
        out.ar = [rr for rr in out.ar if rr.rtype == _OPT]
        out.auth = []
    if config.enable_truncate:
        out.header.tc = 1
    return out


# --------------------------------------------------------------------------- entry points


def resolve(
    request: DNSRecord,
    view: CatalogView,
    config: DnsConfig,
    rng: random.Random,
    transport: Transport = "udp",
) -> DNSRecord | Forward:
    """Answer ``request`` from ``view``; FORWARD for names outside our domains."""
    h = request.header
    if h.opcode != 0:
        return _rcode(request, config, RCODE.NOTIMP)
    if len(request.questions) != 1:
        reply = _rcode(request, config, RCODE.FORMERR)
        reply.questions = []
        return reply
    q = request.q
    if q.qtype in (QTYPE.AXFR, QTYPE.IXFR):
        return _rcode(request, config, RCODE.NOTIMP)
    labels = tuple(x.lower() for x in q.qname.label)
    reply = _base_reply(request, config)
    for dlabels, dlabel in config._domains:
        n = len(dlabels)
        if labels[len(labels) - n :] == dlabels if n else True:
            ctx = _Ctx(request, view, config, rng, transport, reply, dlabel)
            result = _lookup(ctx, list(labels[: len(labels) - n]))
            break
    else:
        ip = _reverse_ip(labels) if q.qtype in (QTYPE.PTR, QTYPE.ANY) else None
        target = view.ptr.get(ip) if ip else None
        if target is None:
            return FORWARD if config.recursors else _rcode(request, config, RCODE.REFUSED)
        domain = config._domains[0][1]
        reply.add_answer(RR(q.qname, QTYPE.PTR, rdata=PTR(domain.add(target)), ttl=config.node_ttl))
        result = reply
    if transport == "udp" and config.udp_answer_limit is not None and len(result.rr) > config.udp_answer_limit:
        result.rr = result.rr[: config.udp_answer_limit]
    limit = _udp_limit(request, config) if transport == "udp" else TCP_MAX
    return _fit(result, limit, config)


def resolve_wire(
    data: bytes,
    view: CatalogView,
    config: DnsConfig,
    rng: random.Random,
    transport: Transport = "udp",
) -> bytes | Forward | None:
    """Resolve raw bytes. Never raises: FORMERR for unparsable queries, None for silence."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    try:
        request = DNSRecord.parse(data)
    except Exception:  # dnslib raises assorted errors on garbage
        return _header_reply(data, RCODE.FORMERR)
    try:
        result = resolve(request, view, config, rng, transport)
        if isinstance(result, Forward):
            return result
        return bytes(result.pack())
    except Exception:
        return _header_reply(data, RCODE.SERVFAIL)
