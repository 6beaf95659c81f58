"""Client agents against a real server: health checks, persistence, anti-entropy, node liveness.

Every process is real: one server (Raft on disk), client agents with their own data dirs, and
small HTTP apps behind the checks. py-consul is the client.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import consul
import httpx
import pytest
from procs import AgentProc, cluster_key, free_port, free_ports, wait_until

pytestmark = pytest.mark.slow


def client(agent: AgentProc) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.http_port, connections_timeout=10)


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = cluster_key()
        http_port, raft_port = free_ports(2)
        self.server = AgentProc(
            "server", http_port,
            ["-server", "-bootstrap-expect", "1", "-node", "srv", "-data-dir", str(root / "srv"),
             "-http-port", str(http_port), "-raft-port", str(raft_port), "-encrypt", self.key, "-dns-port", "-1",
             "-liveness-timeout", "3s", "-heartbeat-interval", "0.5s"],
            root / "server.log", raft_port=raft_port,
        )
        self.agents: list[AgentProc] = []

    def agent(self, name: str, *extra: str) -> AgentProc:
        port = free_port()
        agent = AgentProc(
            name, port,
            ["-node", name, "-data-dir", str(self.root / name), "-http-port", str(port), "-dns-port", "-1",
             "-retry-join", self.server.http_addr, "-heartbeat-interval", "0.5s", "-ae-interval", "5s", *extra],
            self.root / f"{name}.log",
        )
        self.agents.append(agent)
        return agent

    def stop(self) -> None:
        for proc in self.agents + [self.server]:
            proc.kill()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    s.server.start()
    s.server.wait_ready()
    wait_until(lambda: s.server.leader(), 20, what="leader")
    try:
        yield s
    finally:
        s.stop()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def start_app(status: int = 200) -> tuple[http.server.ThreadingHTTPServer, int]:
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), QuietHandler)
    server.status = status  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


def passing_ids(c: consul.Consul, name: str) -> list[str]:
    return sorted(e["Service"]["ID"] for e in c.health.service(name, passing=True)[1])


def test_http_check_follows_a_real_app(setup: Setup) -> None:
    agent = setup.agent("web-1").start()
    agent.wait_ready()
    app, port = start_app()
    c = client(agent)
    assert c.agent.service.register(
        "web", service_id="web-1", port=port, check=consul.Check.http(f"http://127.0.0.1:{port}/health", "1s")
    )
    server_view = client(setup.server)
    wait_until(lambda: passing_ids(server_view, "web") == ["web-1"], 10, what="web passing on the server")
    checks = c.agent.checks()
    assert checks["service:web-1"]["Status"] == "passing"
    assert "HTTP GET" in checks["service:web-1"]["Output"]
    app.shutdown()
    app.server_close()
    stopped = time.monotonic()
    wait_until(lambda: passing_ids(server_view, "web") == [], 10, what="web leaves ?passing")
    # Critical within two intervals of the app stopping (plus the push to the server).
    assert time.monotonic() - stopped < 2 * 1.0 + 1.5
    assert c.agent.checks()["service:web-1"]["Status"] == "critical"


def test_ttl_script_and_maintenance(setup: Setup) -> None:
    agent = setup.agent("box", "-enable-script-checks").start()
    agent.wait_ready()
    c = client(agent)
    assert c.agent.service.register("cache", service_id="cache", port=6379, check=consul.Check.ttl("2s"))
    assert c.agent.check.ttl_pass("service:cache", "warm")
    wait_until(lambda: passing_ids(client(setup.server), "cache") == ["cache"], 5, what="ttl passing")
    wait_until(lambda: c.agent.checks()["service:cache"]["Status"] == "critical", 5, what="ttl expiry")
    assert "TTL expired" in c.agent.checks()["service:cache"]["Output"]
    # Script checks: exit 0 passing, 1 warning, other critical.
    for code, status in ((0, "passing"), (1, "warning"), (3, "critical")):
        assert c.agent.check.register(f"script-{code}", consul.Check.script(["sh", "-c", f"echo out{code}; exit {code}"], "1s"))
        wait_until(lambda cid=f"script-{code}", st=status: c.agent.checks()[cid]["Status"] == st, 8, what=f"script {status}")
    # Maintenance mode takes the service out, and back.
    assert c.agent.check.ttl_pass("service:cache")
    assert c.agent.service.maintenance("cache", True, "upgrading")
    checks = c.agent.checks()
    assert checks["_service_maintenance:cache"]["Notes"] == "upgrading"
    assert checks["_service_maintenance:cache"]["Status"] == "critical"
    assert passing_ids(client(setup.server), "cache") == [] or wait_until(
        lambda: passing_ids(client(setup.server), "cache") == [], 5)
    assert c.agent.service.maintenance("cache", False)
    assert "_service_maintenance:cache" not in c.agent.checks()
    assert c.agent.maintenance(True)
    assert c.agent.checks()["_node_maintenance"]["Notes"].startswith("Maintenance mode is enabled for this node")
    assert c.agent.maintenance(False)


def test_killed_agent_goes_critical_and_restarts_without_reregistering(setup: Setup) -> None:
    agent = setup.agent("db-1").start()
    agent.wait_ready()
    c = client(agent)
    assert c.agent.service.register("db", service_id="db-1", port=5432)
    server_view = client(setup.server)
    wait_until(lambda: passing_ids(server_view, "db") == ["db-1"], 10, what="db registered")
    agent.kill()
    killed = time.monotonic()
    wait_until(lambda: passing_ids(server_view, "db") == [], 15, what="node marked critical")
    assert time.monotonic() - killed < 3 + 3  # liveness bound (3 s) plus one leader tick
    _, checks = server_view.health.node("db-1")
    assert next(ch for ch in checks if ch["CheckID"] == "serfHealth")["Status"] == "critical"
    agent.start()
    agent.wait_ready()
    # Nothing re-registered: the service comes back from the agent's own data dir.
    assert list(c.agent.services()) == ["db-1"]
    wait_until(lambda: passing_ids(server_view, "db") == ["db-1"], 15, what="node alive again")


def test_agent_keeps_working_without_servers_and_converges(setup: Setup) -> None:
    agent = setup.agent("app-1").start()
    agent.wait_ready()
    c = client(agent)
    assert c.agent.service.register("old", service_id="old", port=1)
    wait_until(lambda: "old" in client(setup.server).catalog.services()[1], 10, what="old registered")
    setup.server.stop()
    assert c.agent.service.register("new", service_id="new", port=2)
    assert c.agent.service.deregister("old")
    assert sorted(c.agent.services()) == ["new"]
    setup.server.start()
    setup.server.wait_ready()
    server_view = client(setup.server)

    def matches() -> bool:
        _, node = server_view.catalog.node("app-1")
        return node is not None and sorted(node["Services"]) == ["new"]

    wait_until(matches, 30, 0.2, "catalog matches the agent")


def test_bad_registrations_are_refused_and_nothing_is_stored(setup: Setup) -> None:
    agent = setup.agent("bad").start()
    agent.wait_ready()
    cases = [
        ({"Name": "x", "Bogus": 1}, 400, 'unknown field "Bogus"'),
        ({"Name": "x", "Check": {"TTL": "10s", "Interval": "10s"}}, 400, "Interval"),
        ({"Name": "x", "Check": {"HTTP": "http://127.0.0.1:1/"}}, 400, "Interval"),
        ({"Name": "x", "Check": {"HTTP": "http://127.0.0.1:1/", "TCP": "127.0.0.1:1", "Interval": "10s"}}, 400,
         "more than one check type"),
        ({"name": "x", "port": "80"}, 400, "Port"),
        ({"Name": "bad\nname"}, 400, "control"),
        ({"Port": 80}, 400, "Missing service name"),
    ]
    for body, status, needle in cases:
        resp = agent.put("/v1/agent/service/register", json=body)
        assert resp.status_code == status, (body, resp.status_code, resp.text)
        assert needle.lower() in resp.text.lower(), (body, resp.text)
    resp = agent.put("/v1/agent/service/register", content=b"{not json")
    assert resp.status_code == 400 and "decode" in resp.text.lower()
    resp = agent.put("/v1/agent/check/register", json={"Name": "c", "ServiceID": "missing", "TTL": "10s"})
    assert resp.status_code == 404 and "missing" in resp.text
    assert agent.get("/v1/agent/services").json() == {}
    assert agent.get("/v1/agent/checks").json() == {}
    # An Interval below 1 s is raised to 1 s, as Consul does.
    assert agent.put("/v1/agent/check/register", json={"Name": "fast", "TCP": "127.0.0.1:1", "Interval": "100ms"}).status_code == 200
    assert agent.get("/v1/agent/checks").json()["fast"]["Interval"] == "1s"
    # lowercase keys, as py-consul sends them, are accepted
    assert client(agent).agent.service.register("ok", service_id="ok", port=1, tags=["a"])


def test_config_dir_services_load_and_reload(setup: Setup, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "web.json").write_text('{"service": {"name": "cfgweb", "port": 8080, "check": {"ttl": "30s"}}}')
    agent = setup.agent("cfg", "-config-dir", str(conf)).start()
    agent.wait_ready()
    c = client(agent)
    assert "cfgweb" in c.agent.services()
    (conf / "web.json").unlink()
    (conf / "api.json").write_text('{"services": [{"name": "cfgapi", "port": 9090}]}')
    assert c.agent.reload()
    assert sorted(c.agent.services()) == ["cfgapi"]


def test_cli_members_lists_server_and_clients(setup: Setup) -> None:
    agent = setup.agent("member-1").start()
    agent.wait_ready()
    wait_until(lambda: len(client(setup.server).agent.members()) == 2, 10, what="two members")
    out = subprocess.run([sys.executable, "-m", "lictor.cli", "members", "-http-addr", agent.http_addr],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "srv" in out.stdout and "member-1" in out.stdout and "alive" in out.stdout
    down = subprocess.run([sys.executable, "-m", "lictor.cli", "members", "-http-addr", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "is `lictor agent` running" in down.stderr


def served(server: AgentProc, endpoint: str) -> float:
    """GET requests of `endpoint` the server has answered (its HTTP request counter)."""
    text = server.get("/v1/agent/metrics", params={"format": "prometheus"}).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("lictor_http_requests_total{") and f'endpoint="{endpoint}"' in line and 'method="GET"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_identical_blocking_queries_through_an_agent_share_one_upstream(setup: Setup) -> None:
    agent = setup.agent("c1")
    agent.start()
    agent.wait_ready()
    wait_until(lambda: any(n["Node"] == "c1" for n in setup.server.get("/v1/catalog/nodes").json()), 20,
               what="the agent's node in the catalog")
    time.sleep(1.0)  # its first anti-entropy writes done: the services index holds still
    index = int(agent.get("/v1/catalog/services").headers["X-Consul-Index"])
    results: list[tuple[int, int, list[str]]] = []

    def watch(token: str) -> None:
        resp = httpx.get(f"{agent.url}/v1/catalog/services", params={"index": index, "wait": "20s"},
                         headers={"X-Consul-Token": token}, timeout=30)
        results.append((resp.status_code, int(resp.headers["X-Consul-Index"]), sorted(resp.json())))

    threads = [threading.Thread(target=watch, args=(token,)) for token in ["a"] * 4 + ["b"]]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every watcher parked at the agent
    before = served(setup.server, "/v1/catalog/services")
    body = {"Node": "ext", "Address": "10.0.0.9", "Service": {"Service": "shared-watch", "ID": "sw1"}}
    assert setup.server.put("/v1/catalog/register", json=body).status_code == 200
    for t in threads:
        t.join(30)
    assert len(results) == 5
    for status, new_index, names in results:
        assert status == 200 and new_index > index and "shared-watch" in names
    # One upstream round for the four watchers with the same token, one for the other token.
    wait_until(lambda: served(setup.server, "/v1/catalog/services") - before >= 2, 5, what="upstream answers counted")
    assert served(setup.server, "/v1/catalog/services") - before == 2
