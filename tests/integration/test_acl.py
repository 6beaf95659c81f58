"""ACLs on real agents, through py-consul and httpx: default deny, bootstrap, tokens, policies,
filtering, no existence leaks, and revocation on a server and a client agent within 1 s."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import consul
import httpx
import pytest
from procs import AgentProc, cluster_key, free_ports, wait_until


def start_dev(tmp_path: Path, *extra: str) -> AgentProc:
    http_port, dns_port = free_ports(2)
    agent = AgentProc(
        "dev", http_port,
        ["-dev", "-node", "dev", "-http-port", str(http_port), "-dns-port", str(dns_port), *extra],
        tmp_path / "dev.log", dns_port=dns_port,
    )
    agent.start()
    wait_until(lambda: agent.get("/v1/status/leader", timeout=1.0).status_code == 200, 30, 0.1, "dev agent up")
    return agent


@pytest.fixture
def acl_agent(tmp_path: Path) -> Iterator[AgentProc]:
    agent = start_dev(tmp_path, "-acl-enabled")
    try:
        yield agent
    finally:
        agent.kill()


def client(agent: AgentProc, token: str | None = None) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.http_port, token=token, connections_timeout=10)


def make_token(mgmt: consul.Consul, name: str, rules: str) -> str:
    resp = httpx.put(
        f"http://127.0.0.1:{mgmt.http.port}/v1/acl/policy",
        json={"Name": name, "Rules": rules}, headers={"X-Consul-Token": mgmt.token}, timeout=10,
    )
    assert resp.status_code == 200, resp.text
    token = mgmt.acl.token.create(policies_name=[name], description=name)
    return token["SecretID"]


def test_anonymous_is_denied_and_bootstrap_once(acl_agent: AgentProc) -> None:
    anon = client(acl_agent)
    # Anonymous: cannot write an intention, cannot read a service it has no policy for.
    with pytest.raises(consul.ACLPermissionDenied):
        anon.connect.intentions.upsert("web", "db", action="allow")
    resp = acl_agent.put("/v1/connect/intentions/exact?source=web&destination=db", json={"Action": "allow"})
    assert resp.status_code == 403 and resp.text == "Permission denied"
    with pytest.raises(consul.ACLPermissionDenied):
        anon.catalog.service("db")
    with pytest.raises(consul.ACLPermissionDenied):
        anon.kv.put("k", "v")
    assert anon.catalog.services()[1] == {}  # filtered, not refused
    # Bootstrap exactly once.
    boot = anon.acl.bootstrap()
    assert boot["SecretID"] and boot["Policies"][0]["Name"] == "global-management"
    with pytest.raises(consul.ACLPermissionDenied):
        anon.acl.bootstrap()
    mgmt = client(acl_agent, boot["SecretID"])
    assert "consul" in mgmt.catalog.services()[1]
    assert mgmt.acl.token.read_self()["AccessorID"] == boot["AccessorID"]
    # The secret is returned once; reads show it hidden (only its hash is stored).
    assert mgmt.acl.token.read(boot["AccessorID"])["SecretID"] == "<hidden>"
    snapshot = httpx.get(acl_agent.url + "/v1/snapshot", headers={"X-Consul-Token": boot["SecretID"]}, timeout=10).text
    assert boot["SecretID"] not in snapshot
    # An unknown token is refused as such.
    with pytest.raises(consul.ACLPermissionDenied):
        client(acl_agent, "00000000-0000-4000-8000-000000000000").catalog.services()


def test_service_write_policy_registers_web_not_db(acl_agent: AgentProc) -> None:
    boot = client(acl_agent).acl.bootstrap()
    mgmt = client(acl_agent, boot["SecretID"])
    web_secret = make_token(mgmt, "web-write", 'service "web" { policy = "write" }')
    web = client(acl_agent, web_secret)
    assert web.agent.service.register("web", service_id="web-1", port=80)
    with pytest.raises(consul.ACLPermissionDenied):
        web.agent.service.register("db", port=5432)
    assert mgmt.agent.service.register("db", port=5432)
    # Lists are filtered, and the filter is announced.
    assert list(web.agent.services()) == ["web-1"]
    resp = httpx.get(acl_agent.url + "/v1/agent/services", headers={"X-Consul-Token": web_secret}, timeout=10)
    assert resp.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true"
    assert set(web.catalog.services()[1]) == {"web"}
    assert set(mgmt.catalog.services()[1]) >= {"web", "db", "consul"}
    with pytest.raises(consul.ACLPermissionDenied):
        web.health.service("db")
    # A refusal does not tell whether the object exists: existing db and missing nope look alike.
    for sid in ("db", "nope"):
        resp = httpx.put(acl_agent.url + f"/v1/agent/service/deregister/{sid}", headers={"X-Consul-Token": web_secret}, timeout=10)
        assert (resp.status_code, resp.text) == (403, "Permission denied")
        resp = httpx.get(acl_agent.url + f"/v1/agent/service/{sid}", headers={"X-Consul-Token": web_secret}, timeout=10)
        assert (resp.status_code, resp.text) == (403, "Permission denied")
    assert web.agent.service.deregister("web-1")


def test_token_sources_and_precedence(acl_agent: AgentProc) -> None:
    boot = client(acl_agent).acl.bootstrap()
    secret = boot["SecretID"]
    url = acl_agent.url + "/v1/kv/a"
    assert httpx.put(url, content=b"1", headers={"X-Consul-Token": secret}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert httpx.get(url, params={"token": secret}).status_code == 200
    # ?token wins over the header, the header over Bearer.
    assert httpx.get(url, params={"token": "bogus"}, headers={"X-Consul-Token": secret}).status_code == 403
    assert httpx.get(url, headers={"X-Consul-Token": secret, "Authorization": "Bearer bogus"}).status_code == 200
    assert httpx.get(url, headers={"X-Consul-Token": "bogus", "Authorization": f"Bearer {secret}"}).status_code == 403


def test_kv_prefix_policy_and_filtering(acl_agent: AgentProc) -> None:
    boot = client(acl_agent).acl.bootstrap()
    mgmt = client(acl_agent, boot["SecretID"])
    for key in ("app/public/a", "app/public/b", "app/secret/x"):
        assert mgmt.kv.put(key, "v")
    reader = client(acl_agent, make_token(mgmt, "pub-read", 'key_prefix "app/public/" { policy = "read" }'))
    assert [e["Key"] for e in reader.kv.get("app/", recurse=True)[1]] == ["app/public/a", "app/public/b"]
    assert reader.kv.get("app/", keys=True)[1] == ["app/public/a", "app/public/b"]
    with pytest.raises(consul.ACLPermissionDenied):
        reader.kv.get("app/secret/x")
    with pytest.raises(consul.ACLPermissionDenied):
        reader.kv.put("app/public/a", "w")
    with pytest.raises(consul.ACLPermissionDenied):
        reader.kv.delete("app/", recurse=True)


def test_policy_validation_and_acl_crud(acl_agent: AgentProc) -> None:
    boot = client(acl_agent).acl.bootstrap()
    headers = {"X-Consul-Token": boot["SecretID"]}
    bad = httpx.put(acl_agent.url + "/v1/acl/policy", json={"Name": "bad", "Rules": 'service "x" { policy = "admin" }'},
                    headers=headers)
    assert bad.status_code == 400 and "invalid policy" in bad.text
    mgmt = client(acl_agent, boot["SecretID"])
    policy = mgmt.acl.policy.create("ops", rules={"operator": "read", "node_prefix": {"": {"policy": "read"}}})
    assert policy["Name"] == "ops" and "operator" in policy["Rules"]
    role = httpx.put(acl_agent.url + "/v1/acl/role", json={"Name": "ops-role", "Policies": [{"Name": "ops"}]},
                     headers=headers).json()
    token = httpx.put(acl_agent.url + "/v1/acl/token", json={"Roles": [{"ID": role["ID"]}]}, headers=headers).json()
    ops = {"X-Consul-Token": token["SecretID"]}
    assert httpx.get(acl_agent.url + "/v1/operator/raft/configuration", headers=ops).status_code == 200
    assert httpx.get(acl_agent.url + "/v1/acl/tokens", headers=ops).status_code == 403
    assert len(mgmt.acl.token.list()) >= 3  # bootstrap, anonymous, ours
    assert {p["Name"] for p in mgmt.acl.policy.list()} >= {"global-management", "ops"}
    assert httpx.delete(acl_agent.url + "/v1/acl/policy/00000000-0000-0000-0000-000000000001", headers=headers).status_code == 400
    assert httpx.delete(acl_agent.url + "/v1/acl/token/00000000-0000-0000-0000-000000000002", headers=headers).status_code == 400


def test_acl_endpoints_without_acls_say_disabled(dev_agent: AgentProc) -> None:
    resp = dev_agent.get("/v1/acl/tokens")
    assert (resp.status_code, resp.text) == (401, "ACL support disabled")
    with pytest.raises(consul.ACLDisabled):
        client(dev_agent).acl.bootstrap()


# -- revocation on every agent -----------------------------------------------------------------------


@pytest.fixture
def server_and_client(tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc, str]]:
    mgmt = "6c1a0c1e-0c4a-4b7e-9d57-1d1b8d0f5e11"
    http_port, raft_port, client_port = free_ports(3)
    acl = ["-acl-enabled", "-acl-agent-token", mgmt]
    server = AgentProc(
        "server", http_port,
        ["-server", "-bootstrap-expect", "1", "-node", "srv", "-data-dir", str(tmp_path / "srv"), "-http-port", str(http_port),
         "-raft-port", str(raft_port), "-encrypt", cluster_key(), "-dns-port", "-1", "-acl-initial-management", mgmt, *acl],
        tmp_path / "server.log", raft_port=raft_port,
    )
    agent = AgentProc(
        "client", client_port,
        ["-node", "cli", "-data-dir", str(tmp_path / "cli"), "-http-port", str(client_port), "-dns-port", "-1",
         "-retry-join", server.http_addr, "-heartbeat-interval", "0.5s", *acl],
        tmp_path / "client.log",
    )
    server.start()
    agent.start()
    try:
        headers = {"X-Consul-Token": mgmt}
        wait_until(lambda: httpx.get(server.url + "/v1/status/leader", timeout=1).json(), 30, 0.1, "server leader")
        wait_until(lambda: httpx.get(agent.url + "/v1/catalog/nodes", headers=headers, timeout=2).status_code == 200
                   and any(n["Node"] == "cli" for n in httpx.get(agent.url + "/v1/catalog/nodes", headers=headers).json()),
                   30, 0.2, "client agent synced with its agent token")
        yield server, agent, mgmt
    finally:
        agent.kill()
        server.kill()


def test_revocation_takes_effect_within_one_second_on_every_agent(server_and_client) -> None:  # noqa: ANN001
    server, agent, mgmt = server_and_client
    headers = {"X-Consul-Token": mgmt}
    policy = httpx.put(server.url + "/v1/acl/policy", headers=headers, timeout=10,
                       json={"Name": "reader", "Rules": 'key_prefix "" { policy = "read" }\nservice_prefix "" { policy = "read" }'})
    assert policy.status_code == 200, policy.text
    token = httpx.put(server.url + "/v1/acl/token", headers=headers, json={"Policies": [{"Name": "reader"}]}, timeout=10).json()
    secret = {"X-Consul-Token": token["SecretID"]}
    assert httpx.put(server.url + "/v1/kv/k", content=b"v", headers=headers).status_code == 200
    # The token works on the server, and on the client agent both for forwarded reads and local ones.
    probes = [(server, "/v1/kv/k"), (agent, "/v1/kv/k"), (agent, "/v1/agent/services")]
    for proc, path in probes:
        assert httpx.get(proc.url + path, headers=secret, timeout=5).status_code == 200, (proc.name, path)
    # Anonymous on the client agent is denied the same (the agent token must not leak into forwarding).
    assert httpx.get(agent.url + "/v1/kv/k", timeout=5).status_code == 403
    revoked = httpx.delete(server.url + f"/v1/acl/token/{token['AccessorID']}", headers=headers, timeout=10)
    assert revoked.status_code == 200
    start = time.monotonic()
    pending = set(range(len(probes)))
    while pending and time.monotonic() - start < 3.0:
        for i in list(pending):
            proc, path = probes[i]
            if httpx.get(proc.url + path, headers=secret, timeout=5).status_code == 403:
                pending.discard(i)
                print(f"{proc.name} {path}: revoked after {time.monotonic() - start:.3f}s")
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    assert not pending and elapsed < 1.0, f"revocation took {elapsed:.2f}s; still allowed: {[probes[i][1] for i in pending]}"
    # The client agent's anti-entropy (agent token) keeps working.
    assert httpx.put(agent.url + "/v1/agent/service/register", json={"Name": "web", "Port": 80}, headers=headers).status_code == 200
    wait_until(lambda: "web" in httpx.get(server.url + "/v1/catalog/services", headers=headers).json(), 10, 0.1, "web synced")
