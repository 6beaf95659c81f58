"""Sidecars route http upstreams by the discovery chain: real processes, no mocks.

One dev agent hosts `inventory` (v1 and v2 instances, each an app + its own sidecar, Meta version),
`flaky` (an app that answers 503 to every other request, behind its sidecar) and `web`, whose
sidecar has an upstream to `inventory` on a local port. Requests go to that port with httpx: the
web sidecar applies inventory's router, splitter and resolver (subsets by Meta.version), retries and
timeouts, and dials the chosen target's sidecar over mTLS, which still enforces intentions.
Every process is started here and killed by its pid.
"""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from procs import AgentProc, free_ports, wait_until

pytestmark = pytest.mark.timeout(300)

APP = textwrap.dedent('''
    import asyncio, json, sys
    import httptools

    NAME, VERSION, PORT, MODE = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    count = 0

    class App(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t; self.p = httptools.HttpRequestParser(self); self.url = b""; self.h = {}
        def data_received(self, data):
            try:
                self.p.feed_data(data)
            except Exception:
                self.t.close()
        def on_message_begin(self):
            self.url = b""; self.h = {}
        def on_url(self, u): self.url += u
        def on_header(self, k, v): self.h[k.decode().lower()] = v.decode()
        def on_message_complete(self):
            global count
            count += 1
            url = self.url.decode()
            status = 503 if MODE == "alternate" and count % 2 == 1 else 200
            body = json.dumps({"name": NAME, "version": VERSION, "path": url, "headers": self.h}).encode()
            out = (b"HTTP/1.1 %d X\\r\\ncontent-type: application/json\\r\\ncontent-length: %d\\r\\n\\r\\n"
                   % (status, len(body)) + body)
            if url.startswith("/slow"):
                asyncio.get_running_loop().call_later(2.0, self.t.write, out)
            else:
                self.t.write(out)

    async def main():
        await asyncio.get_running_loop().create_server(App, "127.0.0.1", PORT)
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
''')


@dataclass
class Mesh:
    agent: AgentProc
    root: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stats(self, proxy: str) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.ports[proxy + '-metrics']}/stats", timeout=5).json()

    def put(self, path: str, body: object) -> httpx.Response:
        resp = self.agent.put(path, json=body)
        assert resp.status_code == 200, resp.text
        return resp

    def config(self, entry: dict) -> None:
        resp = self.agent.put("/v1/config", json=entry)
        assert resp.status_code == 200 and resp.json() is True, resp.text

    def delete(self, path: str) -> None:
        httpx.delete(self.agent.url + path, timeout=10)

    def instance(self, sid: str, name: str, version: str = "v1", mode: str = "ok",
                 upstreams: list[dict] | None = None) -> None:
        app_port, sidecar_port, metrics_port = free_ports(3)
        self.ports[sid + "-metrics"] = metrics_port
        self.spawn(sid + "-app", [sys.executable, str(self.root / "app.py"), sid, version, str(app_port), mode])
        wait_until(lambda: "ready" in self.log(sid + "-app"), 30, what=f"app {sid}")
        sidecar: dict = {"Port": sidecar_port, "Checks": [
            {"Name": "Connect Sidecar Listening", "TCP": f"127.0.0.1:{sidecar_port}", "Interval": "1s"}]}
        if upstreams:
            sidecar["Proxy"] = {"Upstreams": upstreams}
        self.put("/v1/agent/service/register", {"ID": sid, "Name": name, "Port": app_port,
                                                 "Meta": {"version": version}, "Connect": {"SidecarService": sidecar}})
        self.spawn(sid + "-proxy", [sys.executable, "-m", "lictor.agent.proxy", "-sidecar-for", sid,
                                    "-http-addr", self.agent.http_addr, "-metrics-port", str(metrics_port),
                                    "-log-level", "info"])


def splitter(v2: float) -> dict:
    return {"Kind": "service-splitter", "Name": "inventory",
            "Splits": [{"Weight": 100 - v2, "ServiceSubset": "v1"}, {"Weight": v2, "ServiceSubset": "v2"}]}


ROUTER = {"Kind": "service-router", "Name": "inventory", "Routes": [
    {"Match": {"HTTP": {"PathPrefix": "/flaky"}},
     "Destination": {"Service": "flaky", "NumRetries": 3, "RetryOnStatusCodes": [503]}},
    {"Match": {"HTTP": {"PathPrefix": "/noretry"}}, "Destination": {"Service": "flaky", "PrefixRewrite": "/"}},
    {"Match": {"HTTP": {"PathPrefix": "/slow"}},
     "Destination": {"ServiceSubset": "v1", "RequestTimeout": "300ms"}},
    {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
     "Destination": {"ServiceSubset": "v2", "RequestHeaders": {"Set": {"x-routed": "canary"}},
                     "ResponseHeaders": {"Add": {"x-mesh-route": "canary"}}}},
]}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("l7mesh")
    (root / "app.py").write_text(APP)
    http_port, = free_ports(1)
    agent = AgentProc("dev", http_port, ["-dev", "-node", "dev", "-http-port", str(http_port), "-dns-port", "-1"],
                      root / "agent.log")
    agent.start()
    mesh = Mesh(agent, root)
    try:
        agent.wait_ready()
        for svc in ("inventory", "flaky"):
            mesh.config({"Kind": "service-defaults", "Name": svc, "Protocol": "http"})
        mesh.config({"Kind": "service-resolver", "Name": "inventory", "DefaultSubset": "v1",
                     "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                                 "v2": {"Filter": "Service.Meta.version == v2"}}})
        mesh.config(splitter(10))
        mesh.config(ROUTER)
        mesh.instance("inventory-v1", "inventory", "v1")
        mesh.instance("inventory-v2", "inventory", "v2")
        mesh.instance("flaky-1", "flaky", "v1", mode="alternate")
        upstream, = free_ports(1)
        mesh.ports["upstream"] = upstream
        mesh.instance("web", "web", upstreams=[{"DestinationName": "inventory", "LocalBindPort": upstream}])

        def healthy() -> bool:
            inv = agent.get("/v1/health/connect/inventory?passing").json()
            flaky = agent.get("/v1/health/connect/flaky?passing").json()
            return len(inv) == 2 and len(flaky) == 1

        wait_until(healthy, 30, 0.2, "passing inventory and flaky sidecars")

        def routed() -> bool:
            for name, proc in mesh.procs.items():
                assert proc.poll() is None, f"{name} exited:\n{mesh.log(name)}"
            up = mesh.stats("web")["Upstreams"]
            chain = up[0]["Chain"] if up else None
            return bool(chain) and all(n == 1 for n in chain["Targets"].values()) and len(chain["Targets"]) == 3

        wait_until(routed, 30, 0.2, "web's inventory upstream routing at L7 with every target healthy")
        yield mesh
    finally:
        for name in list(mesh.procs):
            mesh.kill(name)
        agent.kill()


def _client(mesh: Mesh) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{mesh.ports['upstream']}", timeout=10)


def _blast(mesh: Mesh, n: int, threads: int = 8, path: str = "/") -> list[tuple[int, str]]:
    def worker(count: int) -> list[tuple[int, str]]:
        out = []
        with _client(mesh) as c:
            for _ in range(count):
                r = c.get(path)
                out.append((r.status_code, r.json()["version"] if r.status_code == 200 else r.text))
        return out

    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [x for chunk in pool.map(worker, per) for x in chunk]


def test_upstream_reports_the_compiled_chain(mesh: Mesh) -> None:
    up = mesh.stats("web")["Upstreams"][0]
    assert up["Protocol"] == "http"
    assert [(s["Weight"], s["Target"]) for s in up["Chain"]["Splits"]] == [
        (90.0, "v1.inventory.default.default.dc1"), (10.0, "v2.inventory.default.default.dc1")]


def test_split_90_10_over_2000_requests(mesh: Mesh) -> None:
    results = _blast(mesh, 2000)
    statuses = Counter(s for s, _ in results)
    assert statuses == {200: 2000}, (statuses, [r for r in results if r[0] != 200][:5])
    v2 = sum(1 for _, v in results if v == "v2") / len(results)
    assert 0.07 <= v2 <= 0.13, v2


def test_route_header_match_and_header_mutations(mesh: Mesh) -> None:
    with _client(mesh) as c:
        for _ in range(10):
            r = c.get("/x", headers={"x-canary": "1"})
            assert r.status_code == 200
            body = r.json()
            assert body["version"] == "v2" and body["headers"]["x-routed"] == "canary"
            assert r.headers["x-mesh-route"] == "canary"
            # The target's sidecar saw web's identity.
            assert "spiffe://" in body["headers"]["x-forwarded-client-cert"]
            assert body["headers"]["x-forwarded-client-cert"].endswith("/svc/web")


def test_retry_on_status_codes_makes_a_flaky_service_succeed(mesh: Mesh) -> None:
    with _client(mesh) as c:
        results = [c.get("/flaky/item") for _ in range(40)]
    assert [r.status_code for r in results] == [200] * 40
    assert {r.json()["name"] for r in results} == {"flaky-1"}  # another service: another SPIFFE id, verified
    # Without the retry policy the same app fails every other request.
    with _client(mesh) as c:
        plain = Counter(c.get("/noretry").status_code for _ in range(20))
    assert plain[503] >= 9 and plain[200] >= 9, plain
    counters = mesh.stats("web")["Counters"]
    assert counters.get("upstream_rq_retry{upstream=inventory}", 0) >= 19, counters


def test_request_timeout_answers_504(mesh: Mesh) -> None:
    with _client(mesh) as c:
        started = time.monotonic()
        r = c.get("/slow")
        took = time.monotonic() - started
        assert r.status_code == 504 and "timeout" in r.text
        assert took < 1.5, took
        assert c.get("/").status_code == 200  # the connection and the upstream keep working


def test_live_split_change_without_failed_requests_within_a_second(mesh: Mesh) -> None:
    records: list[tuple[float, int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def loop() -> None:
        with _client(mesh) as c:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    r = c.get("/")
                    item = (t, r.status_code, r.json()["version"] if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:
                    item = (t, 0, repr(exc))
                with lock:
                    records.append(item)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        mesh.config(splitter(50))
        changed = time.monotonic()
        time.sleep(3.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        mesh.config(splitter(10))
    failed = [r for r in records if r[1] != 200]
    assert not failed, failed[:5]
    before = [v for t, _, v in records if t < changed]
    after = [v for t, _, v in records if t >= changed + 1.0]
    assert len(before) > 100 and len(after) > 200, (len(before), len(after))
    assert sum(v == "v2" for v in before) / len(before) < 0.2
    frac = sum(v == "v2" for v in after) / len(after)
    assert 0.4 <= frac <= 0.6, frac


def test_intentions_are_enforced_by_the_receiving_sidecar(mesh: Mesh) -> None:
    mesh.put("/v1/connect/intentions/exact?source=web&destination=inventory", {"Action": "deny"})
    try:
        def denied() -> bool:
            with _client(mesh) as c:
                return all(c.get("/").status_code in (403, 503) for _ in range(5))

        wait_until(denied, 5, 0.1, "web -> inventory denied")
        with _client(mesh) as c:
            statuses = Counter(c.get("/").status_code for _ in range(50))
        assert set(statuses) <= {403, 503}, statuses
        with _client(mesh) as c:
            assert c.get("/flaky/x").status_code == 200  # flaky is another destination: still allowed
    finally:
        mesh.delete("/v1/connect/intentions/exact?source=web&destination=inventory")
    wait_until(lambda: _client(mesh).get("/").status_code == 200, 5, 0.1, "web -> inventory allowed again")
