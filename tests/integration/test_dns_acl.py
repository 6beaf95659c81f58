"""DNS with ACLs on (issue #9): a server agent and a client agent answer only what the agent's
default token (-acl-token, or `PUT /v1/agent/token/default`; anonymous without one) may read."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from procs import AgentProc, cluster_key, free_ports, wait_until

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (bind9-dnsutils) is not installed")
MGMT = "0b7e3c55-9f3e-4d7a-8a61-2f1c3e5d7a90"
HEADERS = {"X-Consul-Token": MGMT}


def dig_short(port: int, name: str) -> str:
    out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", "+short", name],
                         capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def test_dns_answers_only_what_the_default_token_may_read(tmp_path: Path) -> None:
    http_s, raft_s, dns_s, http_c, dns_c = free_ports(5)
    acl = ["-acl-enabled", "-acl-agent-token", MGMT]
    server = AgentProc("server", http_s, [
        "-server", "-bootstrap-expect", "1", "-node", "srv", "-data-dir", str(tmp_path / "srv"), "-http-port", str(http_s),
        "-raft-port", str(raft_s), "-encrypt", cluster_key(), "-dns-port", str(dns_s), "-acl-initial-management", MGMT,
        *acl], tmp_path / "server.log", raft_port=raft_s, dns_port=dns_s)
    client = AgentProc("client", http_c, [
        "-node", "cli", "-data-dir", str(tmp_path / "cli"), "-http-port", str(http_c), "-dns-port", str(dns_c),
        "-retry-join", server.http_addr, *acl], tmp_path / "client.log", dns_port=dns_c)
    server.start()
    client.start()
    counter = itertools.count()

    def write(name: str, service: str, address: str) -> None:
        body = {"Node": name, "Address": address, "Service": {"Service": service, "Port": 80}}
        resp = httpx.put(server.url + "/v1/catalog/register", json=body, headers=HEADERS, timeout=10)
        assert resp.status_code == 200, resp.text

    try:
        wait_until(lambda: httpx.get(server.url + "/v1/status/leader", timeout=1).json(), 30, 0.1, "leader")
        wait_until(lambda: httpx.get(client.url + "/v1/agent/self", headers=HEADERS, timeout=1).status_code == 200,
                   30, 0.1, "client ready")
        write("ext-web", "web", "10.0.0.9")
        write("ext-secret", "secret", "10.0.0.10")
        # Anonymous (no default token, default policy deny): nothing, on either agent. The catalog
        # itself has both (the management token sees them).
        names = {s for s in httpx.get(server.url + "/v1/catalog/services", headers=HEADERS, timeout=5).json()}
        assert {"web", "secret"} <= names
        wait_until(lambda: dig_short(dns_s, "consul.service.consul") == "" and dig_short(dns_c, "consul.service.consul") == "",
                   10, 0.2, "dns up")
        for port in (dns_s, dns_c):
            assert dig_short(port, "web.service.consul") == ""
            assert dig_short(port, "secret.service.consul") == ""

        policy = httpx.put(server.url + "/v1/acl/policy", headers=HEADERS, timeout=10, json={
            "Name": "dns-web", "Rules": 'service "web" { policy = "read" }\nnode_prefix "" { policy = "read" }'})
        assert policy.status_code == 200, policy.text
        token = httpx.put(server.url + "/v1/acl/token", headers=HEADERS, timeout=10,
                          json={"Policies": [{"Name": "dns-web"}]}).json()["SecretID"]
        for agent in (server, client):
            resp = httpx.put(agent.url + "/v1/agent/token/default", json={"Token": token}, headers=HEADERS, timeout=10)
            assert resp.status_code == 200, resp.text

        def web_visible() -> bool:
            write(f"nudge-{next(counter)}", "nudge", "10.0.0.99")  # any change rebuilds the views
            return dig_short(dns_s, "web.service.consul") == "10.0.0.9" and dig_short(dns_c, "web.service.consul") == "10.0.0.9"

        wait_until(web_visible, 15, 0.3, "web visible through the default token")
        for port in (dns_s, dns_c):
            assert dig_short(port, "secret.service.consul") == ""
            assert dig_short(port, "nudge.service.consul") == ""
            assert dig_short(port, "ext-web.node.consul") == "10.0.0.9"  # node_prefix "" read
    finally:
        client.kill()
        server.kill()
