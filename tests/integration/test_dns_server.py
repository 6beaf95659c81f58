"""Real sockets + real `dig` against an in-process DnsServer."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from lictor.dns.resolver import DnsConfig
from lictor.dns.server import DnsServer
from lictor.dns.view import CatalogView

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")


def _snapshot() -> dict[str, Any]:
    nodes = [{"Node": f"n{i}", "Address": f"10.0.0.{i}", "Meta": {"rack": "r1"}} for i in range(1, 41)]
    services: list[dict[str, Any]] = []
    for i in range(1, 4):
        services.append({"Node": f"n{i}", "ID": "api", "Service": "api", "Tags": [f"v{i}"], "Port": 9000 + i})
    for i in range(1, 41):
        services.append({"Node": f"n{i}", "ID": "big", "Service": "big", "Address": f"10.1.0.{i}", "Port": 7000 + i})
    return {"Nodes": nodes, "Services": services, "Checks": []}


async def dig(port: int, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "dig",
        "@127.0.0.1",
        "-p",
        str(port),
        "+time=2",
        "+tries=1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode()


def _answers(out: str, rtype: str) -> list[list[str]]:
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if line and not line.startswith(";") and len(parts) >= 5 and parts[3] == rtype:
            rows.append(parts)
    return rows


@pytest.fixture(params=[True, False], ids=["udp-batch", "udp-protocol"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[DnsServer]:
    view = CatalogView.from_snapshot(_snapshot(), "dc1")
    srv = DnsServer(lambda: view, DnsConfig(), port=0, rng=random.Random(7), udp_batch=request.param)
    await asyncio.wait_for(srv.start(), 5)
    yield srv
    await asyncio.wait_for(srv.stop(), 5)


async def test_srv_three_instances(server: DnsServer) -> None:
    out = await dig(server.port, "api.service.consul", "SRV")
    assert "status: NOERROR" in out and " aa" in out
    srv = _answers(out, "SRV")
    assert sorted(int(r[6]) for r in srv) == [9001, 9002, 9003]
    assert {r[7] for r in srv} == {"n1.node.dc1.consul.", "n2.node.dc1.consul.", "n3.node.dc1.consul."}
    assert len(_answers(out, "A")) == 3  # additional section glue


async def test_tag_and_rfc2782(server: DnsServer) -> None:
    out = await dig(server.port, "v2.api.service.consul", "SRV")
    assert [int(r[6]) for r in _answers(out, "SRV")] == [9002]
    out = await dig(server.port, "_api._v3.service.consul", "SRV")
    assert [int(r[6]) for r in _answers(out, "SRV")] == [9003]
    out = await dig(server.port, "_api._tcp.service.consul", "SRV")
    assert len(_answers(out, "SRV")) == 3
    # Plain (no EDNS) queries take the cached fast path: check it twice.
    for _ in range(2):
        out = await dig(server.port, "+noedns", "API.Service.Consul", "A")
        assert len(_answers(out, "A")) == 3
        assert "API.Service.Consul." in out


async def test_udp_truncation_and_tcp(server: DnsServer) -> None:
    out = await dig(server.port, "+noedns", "+ignore", "big.service.consul", "SRV")
    assert " tc" in out.split("flags:")[1].split(";")[0]
    assert 0 < len(_answers(out, "SRV")) < 40
    out = await dig(server.port, "+tcp", "big.service.consul", "SRV")
    assert " tc" not in out.split("flags:")[1].split(";")[0]
    assert len(_answers(out, "SRV")) == 40
    # Without +ignore dig retries over TCP by itself and gets everything.
    out = await dig(server.port, "+noedns", "big.service.consul", "A")
    assert len(_answers(out, "A")) == 40


async def test_nxdomain_soa_and_refused(server: DnsServer) -> None:
    out = await dig(server.port, "missing.service.consul", "A")
    assert "status: NXDOMAIN" in out
    soa = _answers(out, "SOA")
    assert soa and soa[0][4:6] == ["ns.consul.", "hostmaster.consul."]
    out = await dig(server.port, "example.com", "A")
    assert "status: REFUSED" in out


async def test_forwarding_to_recursor(server: DnsServer) -> None:
    upstream_view = CatalogView.from_snapshot(_snapshot(), "dc9")
    upstream = DnsServer(lambda: upstream_view, DnsConfig(domain="upstream.test."), port=0)
    await asyncio.wait_for(upstream.start(), 5)
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    dead.bind(("127.0.0.1", 0))
    view = CatalogView.from_snapshot(_snapshot(), "dc1")
    fwd = DnsServer(
        lambda: view,
        DnsConfig(),
        port=0,
        recursors=[f"127.0.0.1:{dead.getsockname()[1]}", f"127.0.0.1:{upstream.port}"],
        recursor_timeout=0.5,
    )
    await asyncio.wait_for(fwd.start(), 5)
    try:
        out = await dig(fwd.port, "api.service.upstream.test", "SRV")
        assert "status: NOERROR" in out  # relayed verbatim, flags are the upstream's
        assert {r[7] for r in _answers(out, "SRV")} == {
            "n1.node.dc9.upstream.test.",
            "n2.node.dc9.upstream.test.",
            "n3.node.dc9.upstream.test.",
        }
        out = await dig(fwd.port, "+tcp", "nope.service.upstream.test", "A")
        assert "status: NXDOMAIN" in out
        # Upstream refuses names it does not own -> SERVFAIL after all recursors fail.
        out = await dig(fwd.port, "example.org", "A")
        assert "status: SERVFAIL" in out
        # Our own domain is still answered locally.
        out = await dig(fwd.port, "api.service.consul", "A")
        assert len(_answers(out, "A")) == 3
        assert " ra" in out.split("flags:")[1].split(";")[0]  # RA once recursors exist
    finally:
        await asyncio.wait_for(fwd.stop(), 5)
        await asyncio.wait_for(upstream.stop(), 5)
        dead.close()


async def _udp_query(port: int, data: bytes, timeout: float = 2.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, data)
        return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
    except TimeoutError:
        return None
    finally:
        sock.close()


async def test_garbage_then_still_answers(server: DnsServer) -> None:
    rng = random.Random(3)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for size in (0, 1, 5, 11, 12, 13, 40, 300, 1500):
            for _ in range(20):
                sock.sendto(bytes(rng.getrandbits(8) for _ in range(size)), ("127.0.0.1", server.port))
        loop_ptr = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
        sock.sendto(loop_ptr, ("127.0.0.1", server.port))
    finally:
        sock.close()
    formerr = await _udp_query(server.port, struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01")
    assert formerr is not None and formerr[:2] == b"\x00\x09" and formerr[3] & 0x0F == RCODE.FORMERR
    # Garbage over TCP: short length prefix closes the connection, the server lives on.
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 2)
    writer.write(b"\x00\x03abc")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    q = DNSRecord.question("api.service.consul", "A")
    resp = await _udp_query(server.port, bytes(q.pack()))
    assert resp is not None
    r = DNSRecord.parse(resp)
    assert r.header.id == q.header.id and len([x for x in r.rr if x.rtype == QTYPE.A]) == 3
    out = await dig(server.port, "api.service.consul", "SRV")
    assert len(_answers(out, "SRV")) == 3


async def test_tcp_pipelined_queries(server: DnsServer) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 2)
    try:
        ids = []
        for name in ("api.service.consul", "big.service.consul", "missing.service.consul"):
            q = DNSRecord.question(name, "A")
            ids.append(q.header.id)
            wire = bytes(q.pack())
            writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        got = []
        for _ in ids:
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 2), "big")
            got.append(DNSRecord.parse(await asyncio.wait_for(reader.readexactly(size), 2)))
        assert [r.header.id for r in got] == ids
        assert [len(r.rr) for r in got] == [3, 40, 0]
        assert got[2].header.rcode == RCODE.NXDOMAIN
    finally:
        writer.close()
