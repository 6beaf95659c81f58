"""DNS through a real client agent (its view follows the server by blocking query), with `dig`."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import AgentProc, cluster_key, free_ports, wait_until

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (bind9-dnsutils) is not installed")


def dig(port: int, *args: str) -> str:
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args],
                         capture_output=True, text=True, timeout=10)
    return out.stdout


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc]]:
    http_s, raft_s, http_c, dns_c = free_ports(4)
    server = AgentProc("server", http_s, [
        "-server", "-bootstrap-expect", "1", "-node", "srv", "-data-dir", str(tmp_path / "srv"),
        "-http-port", str(http_s), "-raft-port", str(raft_s), "-encrypt", cluster_key(), "-dns-port", "-1"],
        tmp_path / "server.log", raft_port=raft_s)
    agent = AgentProc("agent", http_c, [
        "-node", "host-1", "-data-dir", str(tmp_path / "agent"), "-http-port", str(http_c),
        "-dns-port", str(dns_c), "-retry-join", server.http_addr], tmp_path / "agent.log", dns_port=dns_c)
    server.start()
    agent.start()
    try:
        server.wait_ready()
        agent.wait_ready()
        yield server, agent
    finally:
        agent.kill()
        server.kill()


def register(agent: AgentProc, sid: str, name: str, port: int, tags: list[str], address: str = "", ttl: bool = False) -> None:
    body: dict = {"ID": sid, "Name": name, "Port": port, "Tags": tags, "Address": address}
    if ttl:
        body["Check"] = {"TTL": "30s", "Status": "passing"}
    resp = agent.put("/v1/agent/service/register", json=body)
    assert resp.status_code == 200, resp.text


def test_dns_forms_health_truncation_and_nxdomain(pair: tuple[AgentProc, AgentProc]) -> None:
    _server, agent = pair
    port = agent.dns_port
    for i in range(3):
        register(agent, f"web-{i}", "web", 8000 + i, ["v1"] if i < 2 else ["v2"], f"10.0.0.{i + 1}", ttl=True)
    wait_until(lambda: len(dig(port, "web.service.consul", "SRV", "+short").strip().splitlines()) == 3, 5, what="3 SRV records")
    srv = dig(port, "web.service.consul", "SRV")
    assert "ANSWER: 3" in srv and "8000" in srv and "8002" in srv
    assert "0a000001.addr.dc1.consul." in srv  # target of an instance with its own address, A record in additional
    assert "ADDITIONAL: " in srv and "10.0.0.1" in srv
    assert sorted(dig(port, "v1.web.service.consul", "+short").split()) == ["10.0.0.1", "10.0.0.2"]
    assert "8002" in dig(port, "_web._v2.service.consul", "SRV", "+short")
    assert len(dig(port, "_web._tcp.service.consul", "SRV", "+short").strip().splitlines()) == 3
    assert "10.0.0.1" in dig(port, "WEB.Service.Consul", "+short")
    # A failing check takes the instance out within 1 s.
    failed = time.monotonic()
    assert agent.put("/v1/agent/check/fail/service:web-0", params={"note": "down"}).status_code == 200
    wait_until(lambda: "10.0.0.1" not in dig(port, "web.service.consul", "+short"), 2, 0.05, "failed instance gone")
    assert time.monotonic() - failed < 1.0 + 0.3  # +dig's own process start-up
    # 40 instances: truncated over UDP with TC, complete over TCP.
    for i in range(40):
        register(agent, f"big-{i}", "big", 9000 + i, [], f"10.1.{i // 200}.{i % 200 + 1}")
    wait_until(lambda: "big" in dig(port, "big.service.consul", "+tcp", "+short") or
               len(dig(port, "big.service.consul", "+tcp", "+short").split()) == 40, 5, what="big registered")
    wait_until(lambda: len(dig(port, "big.service.consul", "SRV", "+tcp", "+short").strip().splitlines()) == 40, 5, what="40 SRV")
    udp = dig(port, "big.service.consul", "SRV", "+ignore", "+noedns")
    assert " tc" in udp.split("flags:")[1].split(";")[0]
    tcp = dig(port, "big.service.consul", "SRV", "+tcp")
    assert "ANSWER: 40" in tcp and " tc" not in tcp.split("flags:")[1].split(";")[0]
    # Unknown names: NXDOMAIN with the SOA in authority.
    unknown = dig(port, "nope.service.consul")
    assert "NXDOMAIN" in unknown and "SOA" in unknown.split("AUTHORITY SECTION")[1]
    node = dig(port, "host-1.node.consul", "+short")
    assert node.strip() == "127.0.0.1"
    # Outside the domain with no recursors configured: REFUSED.
    assert "REFUSED" in dig(port, "example.com")


def test_dns_answers_servfail_past_max_stale(tmp_path: Path) -> None:
    http_s, raft_s, http_c, dns_c = free_ports(4)
    server = AgentProc("server", http_s, [
        "-server", "-bootstrap-expect", "1", "-node", "srv", "-data-dir", str(tmp_path / "srv"),
        "-http-port", str(http_s), "-raft-port", str(raft_s), "-encrypt", cluster_key(), "-dns-port", "-1"],
        tmp_path / "server.log", raft_port=raft_s)
    agent = AgentProc("agent", http_c, [
        "-node", "host-1", "-data-dir", str(tmp_path / "agent"), "-http-port", str(http_c), "-dns-port", str(dns_c),
        "-retry-join", server.http_addr, "-dns-max-stale", "2s"], tmp_path / "agent.log", dns_port=dns_c)
    server.start()
    agent.start()
    try:
        server.wait_ready()
        agent.wait_ready()
        register(agent, "web-0", "web", 80, [], "10.0.0.9")
        wait_until(lambda: "10.0.0.9" in dig(dns_c, "web.service.consul", "+short"), 10, what="answer")
        time.sleep(3)  # longer than max_stale while the servers are reachable: still answering
        assert "10.0.0.9" in dig(dns_c, "web.service.consul", "+short")
        server.kill()
        wait_until(lambda: "SERVFAIL" in dig(dns_c, "web.service.consul"), 15, 0.2, "SERVFAIL once stale")
    finally:
        agent.kill()
        server.kill()
