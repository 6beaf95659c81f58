"""An HTTPS-only server cluster (issue #9): plain HTTP off (`-http-port -1`), client certificates
required (`-verify-incoming`), and every call between agents over verified HTTPS (`-verify-outgoing`,
`-verify-server-hostname`): hellos, joins, heartbeats forwarded to the leader, client agents'
anti-entropy and forwarding. Raft keeps its own encrypted TCP (`-encrypt`).

Certificates come from tests/tlsutil.py (openssl): the servers' cert names 127.0.0.1 and
server.dc1.consul and is usable as a client cert too.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import consul
import httpx
import pytest
from procs import LICTOR, AgentProc, cluster_key, free_ports, wait_until
from tlsutil import Certs, HttpsAgentProc, client_context, curl, make_certs

LIVENESS = ["-heartbeat-interval", "0.5s", "-liveness-timeout", "3s"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls(certs: Certs, https_port: int, cert: tuple[Path, Path] | None = None) -> list[str]:
    cert = cert or certs.server
    return ["-http-port", "-1", "-https-port", str(https_port), "-cert-file", str(cert[0]), "-key-file", str(cert[1]),
            "-ca-file", str(certs.ca), "-verify-incoming", "-verify-outgoing", "-verify-server-hostname"]


class TLSCluster:
    def __init__(self, root: Path, certs: Certs, size: int = 3) -> None:
        self.root, self.certs, self.key = root, certs, cluster_key()
        ports = free_ports(size * 2)
        self.servers = [self._server(f"s{i + 1}", ports[2 * i], ports[2 * i + 1], ["-bootstrap-expect", str(size)])
                        for i in range(size)]
        # Bare host:port: under -verify-outgoing that means https://.
        join = [a for s in self.servers for a in ("-retry-join", s.http_addr)]
        for server in self.servers:
            server.args += join

    def _server(self, name: str, https_port: int, raft_port: int, extra: list[str]) -> HttpsAgentProc:
        args = ["-server", *extra, "-node", name, "-data-dir", str(self.root / name), "-bind", "127.0.0.1",
                "-raft-port", str(raft_port), "-encrypt", self.key, "-dns-port", "-1", *LIVENESS,
                *_tls(self.certs, https_port)]
        return HttpsAgentProc(name, https_port, args, self.root / f"{name}.log", raft_port=raft_port, certs=self.certs)

    def add_server(self, name: str) -> HttpsAgentProc:
        https_port, raft_port = free_ports(2)
        server = self._server(name, https_port, raft_port, ["-retry-join", f"https://{self.servers[0].http_addr}"])
        self.servers.append(server)
        return server.start()

    def wait_leader(self, timeout: float = 40.0) -> str:
        def agreed() -> str:
            for s in self.servers:
                if not s.alive():
                    raise AssertionError(f"{s.name} exited: {s.tail()}")
            leaders = {s.leader() for s in self.servers}
            return leaders.pop() if len(leaders) == 1 and "" not in leaders else ""

        return wait_until(agreed, timeout, 0.2, "one agreed leader over HTTPS")

    def follower(self) -> HttpsAgentProc:
        leader = self.wait_leader()
        return next(s for s in self.servers if s.raft_addr != leader)

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.tail()}" for s in self.servers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[TLSCluster]:
    c = TLSCluster(tmp_path_factory.mktemp("tls-cluster"), certs)
    for server in c.servers:
        server.start()
    try:
        c.wait_leader()
        yield c
    finally:
        for server in c.servers:
            server.kill()


def _consul(server: AgentProc, certs: Certs) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=server.http_port, scheme="https", verify=str(certs.ca),
                         cert=(str(certs.client[0]), str(certs.client[1])))


def _liveness(server: AgentProc, node: str) -> str:
    checks = server.get(f"/v1/health/node/{node}").json()
    return next((c["Status"] for c in checks if c["CheckID"] == "serfHealth"), "")


def test_cluster_forms_over_https_only(cluster: TLSCluster) -> None:
    leader = cluster.wait_leader()
    for server in cluster.servers:
        assert sorted(server.get("/v1/status/peers").json()) == sorted(s.raft_addr for s in cluster.servers)
        out = server.tail(20000)
        assert "HTTPS API: https://127.0.0.1:" in out and "HTTP API: http://" not in out, out
    members = cluster.servers[0].get("/v1/agent/members").json()
    assert {m["Tags"]["https"] for m in members} == {s.http_addr for s in cluster.servers}
    assert all(m["Tags"]["http"] == "" and m["Status"] == 1 for m in members), members
    # Heartbeats from the followers' own agents reach the leader only through HTTPS (follower -> leader):
    # past -liveness-timeout every server node is still passing.
    time.sleep(4)
    assert cluster.wait_leader() == leader
    for server in cluster.servers:
        assert _liveness(cluster.servers[0], server.name) == "passing", cluster.logs()


def test_write_on_follower_reaches_all(cluster: TLSCluster, certs: Certs) -> None:
    follower = cluster.follower()
    c = _consul(follower, certs)
    assert c.kv.put("tls-cluster/key", "v1") is True
    assert c.catalog.register("ext-node", "10.0.0.9", service={"Service": "ext", "Port": 80}) is True
    for server in cluster.servers:
        other = _consul(server, certs)
        wait_until(lambda other=other: (other.kv.get("tls-cluster/key")[1] or {}).get("Value") == b"v1", 10, 0.1,
                   f"key on {server.name}")
        wait_until(lambda other=other: other.catalog.service("ext")[1], 10, 0.1, f"ext on {server.name}")
    # A consistent read on a follower goes through the leader.
    _index, entry = c.kv.get("tls-cluster/key", consistency="consistent")
    assert entry is not None and entry["Value"] == b"v1"


def test_client_agent_over_https(cluster: TLSCluster, certs: Certs, tmp_path: Path) -> None:
    follower = cluster.follower()
    port = free_ports(1)[0]
    client = AgentProc(
        "client", port,
        ["-node", "cli1", "-data-dir", str(tmp_path / "cli1"), "-http-port", str(port), "-dns-port", "-1",
         "-retry-join", f"https://{follower.http_addr}", "-ca-file", str(certs.ca),
         "-client-cert", str(certs.client[0]), "-client-key", str(certs.client[1]),
         "-verify-outgoing", "-verify-server-hostname", "-heartbeat-interval", "0.5s"],
        tmp_path / "client.log",
    )
    client.start()
    try:
        client.wait_ready()
        resp = client.put("/v1/agent/service/register", json={"Name": "api", "ID": "api-1", "Port": 9000})
        assert resp.status_code == 200, resp.text
        for server in cluster.servers:
            wait_until(lambda server=server: server.get("/v1/catalog/service/api").json(), 15, 0.1,
                       f"api in {server.name}'s catalog")
        # Forwarded reads and writes from the client agent go over HTTPS.
        assert client.put("/v1/kv/via-client", content=b"x").json() is True
        assert cluster.servers[0].get("/v1/kv/via-client?raw&consistent").content == b"x"
        assert "cli1" in [n["Node"] for n in client.get("/v1/catalog/nodes").json()]
        # Its heartbeats go to a follower, which passes them to the leader over HTTPS.
        time.sleep(4)
        assert _liveness(cluster.servers[0], "cli1") == "passing", client.tail() + cluster.logs()
    finally:
        client.kill()


def test_peers_without_a_good_client_cert_are_refused(cluster: TLSCluster, certs: Certs, tmp_path: Path) -> None:
    server = cluster.servers[0]
    hello = f"{server.url}/v1/internal/cluster/hello"
    post = ["-X", "POST", "--data", "{}", "--cacert", str(certs.ca)]
    ok = curl(hello, *post, "--cert", str(certs.server[0]), "--key", str(certs.server[1]))
    assert ok.stdout == "200", ok
    no_cert = curl(hello, *post)
    assert no_cert.returncode != 0 and no_cert.stdout in ("", "000"), no_cert
    rogue = curl(hello, *post, "--cert", str(certs.rogue_client[0]), "--key", str(certs.rogue_client[1]))
    assert rogue.returncode != 0 and rogue.stdout in ("", "000"), rogue
    with pytest.raises(httpx.HTTPError):
        httpx.post(hello, json={}, verify=ssl.create_default_context(cafile=str(certs.ca)), timeout=5)
    # A server holding the cluster key but presenting a client cert from another CA never gets in.
    https_port, raft_port = free_ports(2)
    intruder = AgentProc(
        "intruder", https_port,
        ["-server", "-bootstrap-expect", "2", "-node", "intruder", "-data-dir", str(tmp_path / "intruder"),
         "-raft-port", str(raft_port), "-encrypt", cluster.key, "-dns-port", "-1", *_tls(certs, https_port),
         "-client-cert", str(certs.rogue_client[0]), "-client-key", str(certs.rogue_client[1]),
         "-retry-join", server.http_addr, "-retry-interval", "0.3s"],
        tmp_path / "intruder.log",
    )
    intruder.start()
    try:
        wait_until(lambda: "hello to https://" in intruder.tail(), 20, 0.2, "the intruder's refused hello")
        assert "check both sides' TLS settings" in intruder.tail() and intruder.alive(), intruder.tail()
        assert len(server.get("/v1/status/peers").json()) == len(cluster.servers)
        assert "intruder" not in [m["Name"] for m in server.get("/v1/agent/members").json()]
    finally:
        intruder.kill()


def test_server_hostname_is_checked(certs: Certs, tmp_path: Path) -> None:
    """A server whose cert (same CA) lacks server.dc1.consul is refused under -verify-server-hostname."""
    https_port, client_port = free_ports(2)
    impostor = HttpsAgentProc(
        "impostor", https_port,
        ["-dev", "-node", "impostor", "-dns-port", "-1", "-http-port", "-1", "-https-port", str(https_port),
         "-cert-file", str(certs.unnamed_server[0]), "-key-file", str(certs.unnamed_server[1]),
         "-ca-file", str(certs.ca), "-verify-incoming"],
        tmp_path / "impostor.log", certs=certs,
    )
    client = AgentProc(
        "client", client_port,
        ["-node", "cli2", "-data-dir", str(tmp_path / "cli2"), "-http-port", str(client_port), "-dns-port", "-1",
         "-retry-join", impostor.http_addr, "-ca-file", str(certs.ca), "-client-cert", str(certs.client[0]),
         "-client-key", str(certs.client[1]), "-verify-outgoing", "-verify-server-hostname"],
        tmp_path / "client.log",
    )
    impostor.start()
    try:
        impostor.wait_ready()
        # Its chain is fine: without the hostname check a client trusts it.
        assert httpx.get(impostor.url + "/v1/status/leader", verify=client_context(certs), timeout=5).status_code == 200
        client.start()
        client.wait_ready()
        resp = client.get("/v1/catalog/nodes")
        assert resp.status_code == 500 and "No known Consul servers reachable" in resp.text, resp.text
    finally:
        client.kill()
        impostor.kill()


def test_startup_errors_are_one_line(certs: Certs, tmp_path: Path) -> None:
    base = LICTOR + ["agent", "-server", "-data-dir", str(tmp_path / "d"), "-encrypt", cluster_key(), "-dns-port", "-1"]
    tls = ["-https-port", "18501", "-cert-file", str(certs.server[0]), "-key-file", str(certs.server[1])]
    cases = [
        (tls + ["-verify-outgoing"], "-verify-outgoing needs -ca-file"),
        (tls + ["-ca-file", str(certs.ca), "-verify-server-hostname"], "-verify-server-hostname needs -verify-outgoing"),
        (tls + ["-ca-file", str(certs.ca), "-verify-outgoing", "-retry-join", "http://127.0.0.1:8500"],
         "-verify-outgoing forbids plain HTTP"),
        (["-ca-file", str(certs.ca), "-verify-outgoing"], "needs -https-port"),
        (tls + ["-ca-file", str(tmp_path / "missing.pem"), "-verify-outgoing"], "cannot load the TLS files"),
    ]
    for extra, message in cases:
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_server_joins_and_leaves_over_https(cluster: TLSCluster) -> None:
    """Runs last: a fourth server joins the running cluster (signed join to the leader), then leaves
    gracefully (it asks the leader to drop it), both over HTTPS."""
    new = cluster.add_server("s4")
    first = cluster.servers[0]
    wait_until(lambda: new.raft_addr in first.get("/v1/status/peers").json(), 40, 0.2, "s4 among the peers")
    cluster.wait_leader()
    wait_until(lambda: new.get("/v1/catalog/service/ext").json(), 20, 0.2, "the state replicated to s4")
    assert new.put("/v1/agent/leave", timeout=30).status_code == 200
    wait_until(lambda: new.raft_addr not in first.get("/v1/status/peers").json(), 30, 0.2, "s4 out of the peers")
    cluster.servers.remove(new)
    new.kill()
    cluster.wait_leader()
