"""The per-client DNS rate limit over real sockets: an in-process DnsServer (UDP + TCP, exact
counts with an injected clock) and a real `lictor agent -dev` asked by `dig`, with its metrics."""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord
from procs import AgentProc, running_dev_agent, wait_until

from lictor.dns.ratelimit import QueryRateLimiter
from lictor.dns.resolver import DnsConfig
from lictor.dns.server import DnsServer
from lictor.dns.view import CatalogView

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (bind9-dnsutils) is not installed")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _view() -> CatalogView:
    snapshot = {"Nodes": [{"Node": "n1", "Address": "10.0.0.1"}],
                "Services": [{"Node": "n1", "ID": "web", "Service": "web", "Port": 80}], "Checks": []}
    return CatalogView.from_snapshot(snapshot, "dc1")


async def _udp_ask(port: int, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, data)
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), 2.0)


async def test_udp_and_tcp_share_a_clients_bucket() -> None:
    view = _view()
    clock = Clock()
    refusals: list[int] = []
    server = DnsServer(lambda: view, DnsConfig(), port=0, rng=random.Random(1),
                       rate_limiter=QueryRateLimiter(1, 3, clock=clock), on_rate_limited=lambda: refusals.append(1))
    await server.start()
    try:
        rcodes = []
        for i in range(5):
            query = DNSRecord.question("web.service.consul")
            query.header.id = i + 1
            reply = DNSRecord.parse(await _udp_ask(server.port, bytes(query.pack())))
            assert reply.header.id == i + 1 and str(reply.q.qname) == "web.service.consul."
            rcodes.append(reply.header.rcode)
        assert rcodes == [RCODE.NOERROR] * 3 + [RCODE.REFUSED] * 2
        # Same client over TCP: still over the limit, the connection stays usable.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            for expected in (RCODE.REFUSED, RCODE.NOERROR):
                if expected == RCODE.NOERROR:
                    clock.now += 1.0  # one token back
                data = bytes(DNSRecord.question("web.service.consul", "SRV").pack())
                writer.write(struct.pack("!H", len(data)) + data)
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 2.0))[0]
                reply = DNSRecord.parse(await asyncio.wait_for(reader.readexactly(size), 2.0))
                assert reply.header.rcode == expected
        finally:
            writer.close()
        assert len(refusals) == 3 and server.stats["rate_limited"] == 3
        # A header-only packet over the limit: still silence, not counted.
        with pytest.raises(TimeoutError):
            await _udp_ask(server.port, b"\x00\x01\x00")
        assert len(refusals) == 3
    finally:
        await server.stop()


def dig(port: int, *args: str) -> str:
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args],
                         capture_output=True, text=True, timeout=20)
    return out.stdout


def statuses(out: str) -> list[str]:
    return re.findall(r"status: (\w+)", out)


def metric(agent: AgentProc, line_start: str) -> float:
    text = agent.get("/v1/agent/metrics", params={"format": "prometheus"}).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def limited_agent(tmp_path: Path) -> Iterator[AgentProc]:
    with running_dev_agent(tmp_path, "dns-limited", "-dns-rate-limit", "2", "-dns-rate-burst", "5") as agent:
        yield agent


def test_agent_refuses_a_burst_counts_it_and_recovers(limited_agent: AgentProc) -> None:
    agent = limited_agent
    port = agent.dns_port
    body = {"ID": "web-1", "Name": "web", "Port": 8080, "Address": "10.0.0.7"}
    assert agent.put("/v1/agent/service/register", json=body).status_code == 200
    # Wait (gently: a query each 0.6 s stays under 2/s) until the service resolves.
    wait_until(lambda: "10.0.0.7" in dig(port, "web.service.consul", "+short"), 10, 0.6, "web in DNS")
    time.sleep(3.0)  # let the bucket refill to its burst of 5
    refused_before = metric(agent, 'lictor_limit_refusals_total{kind="dns_rate"}')
    # One dig process, 12 queries back to back (milliseconds apart): 5 answered, then REFUSED.
    out = dig(port, *[arg for _ in range(12) for arg in ("web.service.consul", "A")])
    seen = statuses(out)
    assert len(seen) == 12, out
    assert seen[:5] == ["NOERROR"] * 5 and seen[-5:] == ["REFUSED"] * 5, seen
    assert "10.0.0.7" not in out.split("status: REFUSED", 1)[1]  # no answer records once refused
    refused = seen.count("REFUSED")
    # TCP from the same client is limited by the same bucket.
    assert statuses(dig(port, "web.service.consul", "+tcp")) == ["REFUSED"]
    refused += 1
    assert metric(agent, 'lictor_limit_refusals_total{kind="dns_rate"}') - refused_before == refused
    assert metric(agent, 'lictor_dns_queries_total{qtype="A",rcode="REFUSED"}') >= refused
    # After a pause (2 tokens/s), the client is served again.
    time.sleep(1.0)
    assert statuses(dig(port, "web.service.consul")) == ["NOERROR"]
