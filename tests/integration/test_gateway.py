"""The ingress gateway with real processes: a dev agent, mTLS app instances, `python -m lictor.gateway`.

Apps are Connect-native HTTPS servers (leaf + roots from the agent, client certificate required) that
answer with their name and version; the gateway reaches them over mTLS with its own leaf, exactly as
it reaches a sidecar.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from procs import AgentProc, free_ports, wait_until

APP = r'''
import asyncio, json, os, random, ssl, sys, tempfile
import httptools, httpx

agent, service, name, version, port, mode = sys.argv[1:7]
delay = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
leaf = httpx.get(f"{agent}/v1/agent/connect/ca/leaf/{service}", timeout=30).json()
roots = httpx.get(f"{agent}/v1/agent/connect/ca/roots", timeout=30).json()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
d = tempfile.mkdtemp()
open(f"{d}/c.pem", "w").write(leaf["CertPEM"]); open(f"{d}/k.pem", "w").write(leaf["PrivateKeyPEM"])
ctx.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(cadata="\n".join(r["RootCert"] for r in roots["Roots"]))
count = 0

class App(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t; self.p = httptools.HttpRequestParser(self); self.url = b""; self.h = {}
        cert = t.get_extra_info("peercert") or {}
        self.peer = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
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
        status = 200
        if mode == "alternate" and count % 2 == 1: status = 500
        if mode == "random" and random.random() < 0.5: status = 500
        body = json.dumps({"name": name, "version": version, "path": url, "headers": self.h,
                           "peer": self.peer}).encode()
        out = (b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\nserver: app\r\n\r\n"
               % (status, len(body)) + body)
        if url.startswith("/slow") and delay:
            asyncio.get_running_loop().call_later(delay, self.t.write, out)
        else:
            self.t.write(out)

async def main():
    server = await asyncio.get_running_loop().create_server(App, "127.0.0.1", int(port), ssl=ctx)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        http_port, self.gw_port, self.metrics_port = free_ports(3)
        self.agent = AgentProc("dev", http_port, ["-dev", "-node", "dev", "-http-port", str(http_port),
                                                  "-dns-port", "-1"], root / "agent.log")
        (root / "app.py").write_text(APP)

    def put_config(self, entry: dict) -> None:
        resp = self.agent.put("/v1/config", json=entry)
        assert resp.status_code == 200 and resp.json() is True, resp.text

    def app(self, name: str, service: str, version: str, mode: str = "ok", delay: float = 0.0) -> None:
        port = free_ports(1)[0]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen([sys.executable, str(self.root / "app.py"), self.agent.url, service, name, version,
                                 str(port), mode, str(delay)], stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        wait_until(lambda: b"ready" in (self.root / f"{name}.log").read_bytes(), 30, what=f"app {name}")
        reg = {"ID": name, "Name": service, "Port": port, "Address": "127.0.0.1", "Meta": {"version": version},
               "Connect": {"Native": True},
               "Check": {"Name": "tcp", "TCP": f"127.0.0.1:{port}", "Interval": "500ms", "Timeout": "500ms"}}
        assert self.agent.put("/v1/agent/service/register", json=reg).status_code == 200

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def start_gateway(self) -> None:
        log = open(self.root / "gateway.log", "wb")  # noqa: SIM115
        self.procs["gateway"] = subprocess.Popen(
            [sys.executable, "-m", "lictor.gateway", "-service", "ingress-gw", "-http-addr", self.agent.http_addr,
             "-metrics-port", str(self.metrics_port)], stdout=log, stderr=subprocess.STDOUT)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.agent.kill()


ROUTER = {"Kind": "service-router", "Name": "web", "Routes": [
    {"Match": {"HTTP": {"Header": [{"Name": "x-beta", "Exact": "1"}]}},
     "Destination": {"ServiceSubset": "v2", "RequestHeaders": {"Set": {"x-route": "beta"}, "Remove": ["x-drop"]},
                     "ResponseHeaders": {"Add": {"x-gw-route": "beta"}, "Remove": ["server"]}}},
    {"Match": {"HTTP": {"PathPrefix": "/flaky"}},
     "Destination": {"Service": "flaky", "NumRetries": 3, "RetryOnStatusCodes": [500]}},
    {"Match": {"HTTP": {"PathPrefix": "/coin"}},
     "Destination": {"Service": "coin", "NumRetries": 3, "RetryOnStatusCodes": [500]}},
    {"Match": {"HTTP": {"PathPrefix": "/slow"}},
     "Destination": {"ServiceSubset": "v2", "RequestTimeout": "500ms"}},
    {"Match": {"HTTP": {"PathPrefix": "/api/"}}, "Destination": {"ServiceSubset": "v1", "PrefixRewrite": "/"}},
]}


def splitter(v1: float) -> dict:
    return {"Kind": "service-splitter", "Name": "web",
            "Splits": [{"Weight": v1, "ServiceSubset": "v1"}, {"Weight": 100 - v1, "ServiceSubset": "v2"}]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("gw"))
    try:
        e.agent.start()
        e.agent.wait_ready()
        for svc in ("web", "flaky", "coin"):
            e.put_config({"Kind": "service-defaults", "Name": svc, "Protocol": "http"})
        e.put_config({"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v1",
                      "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                                  "v2": {"Filter": "Service.Meta.version == v2"}},
                      "Failover": {"v1": {"Targets": [{"ServiceSubset": "v2"}]}}})
        e.put_config(splitter(90))
        e.put_config(ROUTER)
        e.put_config({"Kind": "ingress-gateway", "Name": "ingress-gw", "Listeners": [
            {"Port": e.gw_port, "Protocol": "http", "Services": [
                {"Name": "web", "Hosts": ["web.example.com"], "ResponseHeaders": {"Set": {"x-ingress": "1"}}}]}]})
        e.app("web-v1-a", "web", "v1")
        e.app("web-v1-b", "web", "v1")
        e.app("web-v2-a", "web", "v2", delay=2.0)
        e.app("flaky-1", "flaky", "v1", mode="alternate")
        e.app("coin-1", "coin", "v1", mode="random")
        gw = {"ID": "ingress-gw", "Name": "ingress-gw", "Kind": "ingress-gateway", "Port": e.gw_port,
              "Address": "127.0.0.1"}
        assert e.agent.put("/v1/agent/service/register", json=gw).status_code == 200
        e.start_gateway()

        def serving() -> bool:
            assert e.procs["gateway"].poll() is None, (e.root / "gateway.log").read_text()
            r = httpx.get(f"http://127.0.0.1:{e.gw_port}/", headers={"host": "web.example.com", "x-beta": "1"},
                          timeout=2)
            return r.status_code == 200
        wait_until(serving, 30, 0.2, "the gateway serving web")
        yield e
    finally:
        e.close()


def _client(env: Env) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{env.gw_port}", headers={"host": "web.example.com"}, timeout=10)


def _blast(env: Env, n: int, threads: int = 8, path: str = "/", **headers: str) -> list[tuple[int, str]]:
    """n requests over `threads` keep-alive clients: [(status, version or body)]."""
    def worker(count: int) -> list[tuple[int, str]]:
        out = []
        with _client(env) as c:
            for _ in range(count):
                r = c.get(path, headers=headers)
                out.append((r.status_code, r.json()["version"] if r.status_code == 200 else r.text))
        return out

    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [x for chunk in pool.map(worker, per) for x in chunk]


def test_split_90_10_over_10000_requests(env: Env) -> None:
    results = _blast(env, 10_000)
    statuses = Counter(s for s, _ in results)
    assert statuses == {200: 10_000}, statuses
    versions = Counter(v for _, v in results)
    share = versions["v2"] / 10_000
    print(f"\n90/10 split over 10,000 requests: {dict(versions)} -> v2 {share:.2%}")
    assert abs(share - 0.10) <= 0.02
    assert abs(versions["v1"] / 10_000 - 0.90) <= 0.02


def test_header_route_to_v2_with_header_changes(env: Env) -> None:
    with _client(env) as c:
        for _ in range(50):
            r = c.get("/", headers={"x-beta": "1", "x-drop": "yes"})
            assert r.status_code == 200 and r.json()["version"] == "v2"
        body = r.json()
        assert body["headers"]["x-route"] == "beta" and "x-drop" not in body["headers"]
        assert body["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert r.headers["x-gw-route"] == "beta" and r.headers["x-ingress"] == "1" and "server" not in r.headers
        # the app saw the gateway's own identity over mTLS
        assert body["peer"][0].endswith("/svc/ingress-gw")
        assert c.get("/", headers={"x-beta": "0"}).status_code == 200


def test_unknown_host_404_and_prefix_rewrite(env: Env) -> None:
    with _client(env) as c:
        assert c.get("/", headers={"host": "nope.example.com"}).status_code == 404
        r = c.get("/api/users?x=1")
        assert r.status_code == 200 and r.json()["path"] == "/users?x=1" and r.json()["version"] == "v1"


def test_retries_make_a_failing_app_succeed(env: Env) -> None:
    # flaky answers 500 to every other request it receives (exactly 50 %): 3 retries always suffice.
    with _client(env) as c:
        statuses = Counter(c.get("/flaky/x").status_code for _ in range(1000))
    print(f"\nflaky (alternating 50 % 500s) through 3 retries: {dict(statuses)}")
    assert statuses[200] / 1000 >= 0.99
    # coin fails at random with p = 0.5: 4 tries succeed with 1 - 0.5**4 = 93.75 %, not 99 % (math, not code)
    with _client(env) as c:
        coin = Counter(c.get("/coin/x").status_code for _ in range(1000))
    print(f"coin (i.i.d. 50 % 500s) through 3 retries: {dict(coin)} (expected ~93.75 % 200)")
    assert coin[200] / 1000 >= 0.90
    metrics = httpx.get(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=5).text
    assert "lictor_gateway_retries_total" in metrics


def test_request_timeout_is_504(env: Env) -> None:
    with _client(env) as c:
        started = time.monotonic()
        r = c.get("/slow")
        took = time.monotonic() - started
    assert r.status_code == 504 and r.text.strip() == "upstream request timeout"
    assert 0.4 <= took < 1.5


def test_discovery_chain_debug_endpoint(env: Env) -> None:
    body = httpx.get(f"http://127.0.0.1:{env.metrics_port}/v1/discovery-chain/web", timeout=5).json()["Chain"]
    assert body["ServiceName"] == "web" and body["Protocol"] == "http"
    assert body["StartNode"] == "router:web.default.default"
    assert "v1.web.default.default.dc1" in body["Targets"]


def test_weights_move_under_load_without_failures(env: Env) -> None:
    stop = threading.Event()
    results: list[tuple[float, int, str]] = []

    def load() -> None:
        with _client(env) as c:
            while not stop.is_set():
                try:
                    r = c.get("/")
                    results.append((time.monotonic(), r.status_code, r.json()["version"] if r.status_code == 200
                                    else r.text))
                except httpx.HTTPError as exc:
                    results.append((time.monotonic(), 0, repr(exc)))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        marks = []
        for v1 in (90, 50, 0):
            time.sleep(2.0)
            env.put_config(splitter(v1))
            marks.append(time.monotonic())
        time.sleep(2.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        env.put_config(splitter(90))
    failures = [r for r in results if r[1] != 200]
    assert not failures, failures[:5]
    # after the last change (+1 s for the recompile) every request lands on v2
    tail = [v for ts, _, v in results if ts > marks[-1] + 1.0]
    mid = [v for ts, _, v in results if marks[-2] + 1.0 < ts < marks[-1]]
    print(f"\nweights 10 -> 50 -> 100 under load: {len(results)} requests, 0 failed; "
          f"50 % phase v2 share {Counter(mid)['v2'] / max(len(mid), 1):.1%}")
    assert tail and set(tail) == {"v2"}
    assert 0.35 < Counter(mid)["v2"] / len(mid) < 0.65


def test_failover_when_every_v1_instance_stops(env: Env) -> None:
    env.stop("web-v1-a")
    env.stop("web-v1-b")
    with _client(env) as c:
        results = [(r.status_code, r.json()["version"] if r.status_code == 200 else r.text)
                   for r in (c.get("/") for _ in range(600))]
    first_ok = next(i for i, (s, _) in enumerate(results) if s == 200)
    after = results[first_ok:]
    print(f"\nfailover: {Counter(s for s, _ in results)}; first success at request {first_ok}")
    assert all(s == 200 and v == "v2" for s, v in after), [x for x in after if x[0] != 200][:5]

    def health_says_critical() -> bool:
        r = env.agent.get("/v1/health/connect/web?passing")
        return len(r.json()) == 1
    wait_until(health_says_critical, 15, what="v1 instances critical")
    with _client(env) as c:
        assert {c.get("/").json()["version"] for _ in range(200)} == {"v2"}
