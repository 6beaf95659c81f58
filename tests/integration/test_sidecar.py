"""Sidecar proxies as real processes between real HTTP apps, driven by curl, openssl and http.client.

One dev agent (leaf TTL 20 s, so leaves rotate during the module) hosts `api` (three instances, each
app + sidecar process) and `web` (app + sidecar with an upstream to api on a local port).
Every process is started here and killed by its pid.
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from procs import AgentProc, free_ports, wait_until

pytestmark = pytest.mark.timeout(300)

APP = textwrap.dedent('''
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    NAME, PORT = sys.argv[1], int(sys.argv[2])

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def _reply(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            body = f"{NAME} {self.command} {self.path} xfcc={self.headers.get('X-Forwarded-Client-Cert', '')}\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = do_PUT = do_DELETE = _reply
        def log_message(self, *a):
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
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

    def delete(self, path: str) -> None:
        httpx.delete(self.agent.url + path, timeout=10)


def _register(mesh: Mesh, sid: str, name: str, app_port: int, sidecar_port: int,
              upstreams: list[dict] | None = None) -> None:
    sidecar: dict = {
        "Port": sidecar_port,
        # A 1 s listening check (the default is 10 s) so health follows the sidecar quickly.
        "Checks": [{"Name": "Connect Sidecar Listening", "TCP": f"127.0.0.1:{sidecar_port}", "Interval": "1s"}],
    }
    if upstreams:
        sidecar["Proxy"] = {"Upstreams": upstreams}
    mesh.put("/v1/agent/service/register",
             {"ID": sid, "Name": name, "Port": app_port, "Connect": {"SidecarService": sidecar}})


def _start_instance(mesh: Mesh, sid: str, name: str, upstreams: list[dict] | None = None) -> None:
    app_port, sidecar_port, metrics_port = free_ports(3)
    mesh.ports[sid] = app_port
    mesh.ports[sid + "-sidecar"] = sidecar_port
    mesh.ports[sid + "-metrics"] = metrics_port
    app = mesh.root / "app.py"
    mesh.spawn(sid + "-app", [sys.executable, str(app), sid, str(app_port)])
    _register(mesh, sid, name, app_port, sidecar_port, upstreams)
    mesh.spawn(sid + "-proxy", [sys.executable, "-m", "lictor.agent.proxy", "-sidecar-for", sid,
                                "-http-addr", mesh.agent.http_addr, "-metrics-port", str(metrics_port),
                                "-log-level", "info"])
    # The sidecar's health check only sees the sidecar listening, not the app behind it: wait for the
    # app's own listener too (bounded; its interpreter starts slowly on a busy box), or fail with its log.
    app_proc = mesh.procs[sid + "-app"]

    def app_listening() -> bool:
        if app_proc.poll() is not None:
            return True  # exited: reported below, without waiting out the timeout
        with socket.create_connection(("127.0.0.1", app_port), timeout=1.0):
            return True

    wait_until(app_listening, 30, 0.05, f"app {sid} listening on {app_port}")
    assert app_proc.poll() is None, f"app {sid} exited ({app_proc.returncode}):\n{mesh.log(sid + '-app')}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("mesh")
    (root / "app.py").write_text(APP)
    http_port, = free_ports(1)
    agent = AgentProc("dev", http_port, ["-dev", "-node", "dev", "-http-port", str(http_port), "-dns-port", "-1",
                                         "-leaf-cert-ttl", "20s"], root / "agent.log")
    agent.start()
    mesh = Mesh(agent, root)
    try:
        agent.wait_ready()
        for sid in ("api", "api-2", "api-3"):
            _start_instance(mesh, sid, "api")
        upstream_port, = free_ports(1)
        mesh.ports["upstream"] = upstream_port
        _start_instance(mesh, "web", "web", [{"DestinationName": "api", "LocalBindPort": upstream_port}])

        def exited() -> list[str]:
            return [name for name, proc in mesh.procs.items() if proc.poll() is not None]

        def healthy() -> bool:
            if exited():
                return True  # reported below, without waiting out the timeout
            resp = agent.get("/v1/health/connect/api?passing")
            return resp.status_code == 200 and len(resp.json()) == 3

        wait_until(healthy, 30, 0.2, "three passing api sidecars")
        assert not exited(), "\n".join(f"--- {name} exited:\n{mesh.log(name)}" for name in exited())
        wait_until(lambda: len(mesh.stats("web")["Upstreams"][0]["Endpoints"]) == 3, 15, 0.1, "web sees 3 endpoints")
        yield mesh
    finally:
        for name in list(mesh.procs):
            mesh.kill(name)
        agent.kill()


def get(port: int, path: str = "/", method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=b"x" if method == "POST" else None)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def curl(port: int, path: str = "/", *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "-m", "5", "-w", "\n%{http_code}", *extra, f"http://127.0.0.1:{port}{path}"],
                          capture_output=True, text=True, timeout=20)


class Load:
    """Steady request load through web's upstream port: one thread opening a connection per
    request, one reusing a keep-alive connection (reopened only after a failure)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._fresh, daemon=True),
                         threading.Thread(target=self._keepalive, daemon=True)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _record(self, status: int, body: str) -> None:
        if status == 200:
            self.ok += 1
            self.seen.add(body.split()[0])
        else:
            self.failures.append(f"{status} {body[:100]}")

    def _fresh(self) -> None:
        while not self._stop.is_set():
            try:
                self._record(*get(self.port))
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"fresh: {exc!r}")
            time.sleep(0.01)

    def _keepalive(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/ka")
                resp = conn.getresponse()
                self._record(resp.status, resp.read().decode())
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"keepalive: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            time.sleep(0.01)


# ------------------------------------------------------------------------------------------ tests

def test_curl_through_upstream_reaches_api(mesh: Mesh) -> None:
    seen = set()
    for _ in range(9):
        out = curl(mesh.ports["upstream"], "/hello")
        body, status = out.stdout.rsplit("\n", 1)
        assert status == "200", out.stderr
        seen.add(body.split()[0])
    assert seen == {"api", "api-2", "api-3"}  # round robin over the three instances


def test_deny_intention_blocks_within_a_second_and_closes_open_connections(mesh: Mesh) -> None:
    port = mesh.ports["upstream"]
    keep = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    keep.request("GET", "/before")
    assert keep.getresponse().read().startswith(b"api")
    try:
        t0 = time.monotonic()
        mesh.put("/v1/connect/intentions/exact?source=*&destination=api", {"Action": "deny"})

        def refused() -> bool:
            try:
                return get(port, timeout=2)[0] != 200
            except (OSError, http.client.HTTPException):
                return True

        wait_until(refused, 1.0, 0.02, "deny to take effect")
        assert time.monotonic() - t0 < 1.0
        with pytest.raises((OSError, http.client.HTTPException)):  # the open keep-alive one was closed
            keep.request("GET", "/after")
            keep.getresponse().read()
        out = curl(port)
        assert out.returncode != 0 or not out.stdout.endswith("200")
    finally:
        keep.close()
        mesh.delete("/v1/connect/intentions/exact?source=*&destination=api")
    wait_until(lambda: get(port)[0] == 200, 2.0, 0.05, "allowed again")


def test_l7_intentions_per_request(mesh: Mesh) -> None:
    port = mesh.ports["upstream"]
    mesh.put("/v1/config", {"Kind": "service-defaults", "Name": "api", "Protocol": "http"})
    mesh.put("/v1/connect/intentions/exact?source=web&destination=api", {"Permissions": [
        {"Action": "allow", "HTTP": {"PathPrefix": "/public", "Methods": ["GET"]}},
        {"Action": "deny", "HTTP": {"PathPrefix": "/admin", "Methods": ["POST"]}},
    ]})
    try:
        wait_until(lambda: all(mesh.stats(s)["Protocol"] == "http" and mesh.stats(s)["Intentions"] == 1
                               for s in ("api", "api-2", "api-3")), 5, 0.05, "api sidecars in L7 mode")
        for _ in range(3):
            status, body = get(port, "/public/x")
            assert status == 200 and " GET /public/x " in body
            assert "xfcc=By=spiffe://" in body and "URI=spiffe://" in body and body.rstrip().endswith("/svc/web")
            status, body = get(port, "/admin/users", "POST")
            assert status == 403 and "denied by intention" in body
        out = curl(port, "/admin/x", "-X", "POST", "-d", "a=1")
        assert out.stdout.endswith("403") and "denied by intention" in out.stdout
        out = curl(port, "/public/ok")
        assert out.stdout.endswith("200")
        # A keep-alive connection: allowed, then denied (403 and closed), never reaching the app.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/public/1")
        assert conn.getresponse().read().startswith(b"api")
        conn.request("POST", "/admin/1", body=b"z")
        resp = conn.getresponse()
        assert resp.status == 403 and b"denied by intention" in resp.read()
        conn.close()
    finally:
        mesh.delete("/v1/connect/intentions/exact?source=web&destination=api")
        mesh.delete("/v1/config/service-defaults/api")
    wait_until(lambda: all(mesh.stats(s)["Protocol"] == "tcp" for s in ("api", "api-2", "api-3")), 5, 0.05, "tcp")


def _openssl(args: list[str], stdin: str = "Q\n") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True, timeout=20)


def test_openssl_clients(mesh: Mesh, tmp_path: Path) -> None:
    target = f"127.0.0.1:{mesh.ports['api-sidecar']}"
    # No client certificate: TLS 1.3 sends the alert after the client's Finished, so s_client may
    # "connect"; the server must refuse and nothing may be served.
    # -ign_eof keeps s_client reading until the server closes, so the alert is always seen.
    res = _openssl(["s_client", "-connect", target, "-tls1_3", "-ign_eof"], stdin="GET / HTTP/1.0\r\n\r\n")
    assert "api GET" not in res.stdout
    assert "alert" in (res.stdout + res.stderr).lower() or res.returncode != 0

    # A certificate from another CA.
    for cmd in (["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "evil-ca.key"],
                ["req", "-x509", "-new", "-key", "evil-ca.key", "-subj", "/CN=evil", "-days", "1", "-out", "evil-ca.pem"],
                ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "evil.key"],
                ["req", "-new", "-key", "evil.key", "-subj", "/CN=web", "-out", "evil.csr"]):
        assert subprocess.run(["openssl", *cmd], cwd=tmp_path, capture_output=True, timeout=20).returncode == 0
    td = mesh.agent.get("/v1/agent/connect/ca/roots").json()["TrustDomain"]
    (tmp_path / "ext").write_text(f"subjectAltName=URI:spiffe://{td}/ns/default/dc/dc1/svc/web\n")
    assert subprocess.run(["openssl", "x509", "-req", "-in", "evil.csr", "-CA", "evil-ca.pem", "-CAkey", "evil-ca.key",
                           "-CAcreateserial", "-days", "1", "-extfile", "ext", "-out", "evil.pem"],
                          cwd=tmp_path, capture_output=True, timeout=20).returncode == 0
    res = _openssl(["s_client", "-connect", target, "-tls1_3", "-cert", str(tmp_path / "evil.pem"),
                    "-key", str(tmp_path / "evil.key"), "-ign_eof"], stdin="GET / HTTP/1.0\r\n\r\n")
    assert "api GET" not in res.stdout
    assert "alert" in (res.stdout + res.stderr).lower() or res.returncode != 0

    # A valid client certificate (web's leaf): the served cert carries api's SPIFFE ID.
    leaf = mesh.agent.get("/v1/agent/connect/ca/leaf/web").json()
    roots = mesh.agent.get("/v1/agent/connect/ca/roots").json()
    (tmp_path / "web.pem").write_text(leaf["CertPEM"])
    (tmp_path / "web.key").write_text(leaf["PrivateKeyPEM"])
    (tmp_path / "roots.pem").write_text("\n".join(r["RootCert"] for r in roots["Roots"]))
    res = _openssl(["s_client", "-connect", target, "-tls1_3", "-showcerts", "-cert", str(tmp_path / "web.pem"),
                    "-key", str(tmp_path / "web.key"), "-CAfile", str(tmp_path / "roots.pem"), "-ign_eof"],
                   stdin="GET / HTTP/1.0\r\n\r\n")
    assert "Verify return code: 0 (ok)" in res.stdout, res.stdout + res.stderr
    served = res.stdout[res.stdout.index("-----BEGIN CERTIFICATE-----"):]
    served = served[:served.index("-----END CERTIFICATE-----") + 25]
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=served, capture_output=True, text=True,
                          timeout=20).stdout
    assert f"URI:spiffe://{td}/ns/default/dc/dc1/svc/api" in text
    assert "api GET / " in res.stdout  # and it relays to the app


def test_leaf_and_root_rotation_under_load(mesh: Mesh) -> None:
    proxies = ("web", "api", "api-2", "api-3")
    before = {p: mesh.stats(p)["LeafSerial"] for p in proxies}
    root_before = mesh.stats("web")["ActiveRootID"]
    with Load(mesh.ports["upstream"]) as load:
        # Leaf TTL is 20 s: every proxy picks up a renewed leaf within ~18 s.
        wait_until(lambda: all(mesh.stats(p)["LeafSerial"] != before[p] for p in proxies), 40, 0.2, "leaf rotation")
        time.sleep(1.0)
        mid = {p: mesh.stats(p)["LeafSerial"] for p in proxies}
        # Root rotation: a new key type makes the CA generate (and cross-sign) a new root.
        mesh.put("/v1/connect/ca/configuration", {"Provider": "consul", "Config": {
            "LeafCertTTL": "1h", "PrivateKeyType": "ec", "PrivateKeyBits": 384}})
        wait_until(lambda: all(mesh.stats(p)["ActiveRootID"] != root_before and mesh.stats(p)["LeafSerial"] != mid[p]
                               for p in proxies), 20, 0.1, "root rotation reaching every proxy")
        time.sleep(2.0)
    assert load.ok > 100
    assert load.failures == [], load.failures[:5]
    reloads = [mesh.stats(p)["Counters"].get("tls_reloads", 0) for p in proxies]
    assert all(r >= 3 for r in reloads), reloads


def test_killing_one_of_three_instances_under_load(mesh: Mesh) -> None:
    with Load(mesh.ports["upstream"]) as load:
        time.sleep(1.0)
        assert load.seen == {"api", "api-2", "api-3"}
        ok_before = load.ok
        mesh.kill("api-3-proxy")
        mesh.kill("api-3")
        t_kill = time.monotonic()
        wait_until(lambda: mesh.stats("web")["Counters"].get("upstream_ejections{upstream=api}", 0) >= 1
                   or len(mesh.stats("web")["Upstreams"][0]["Endpoints"]) == 2, 10, 0.1, "dead instance dropped")
        time.sleep(2.0)
        load.seen.clear()
        time.sleep(1.0)
    assert load.seen == {"api", "api-2"}
    assert load.ok - ok_before > 100
    # Only a request in flight on the killed instance at the kill may fail (at most one per thread).
    assert len(load.failures) <= 2, load.failures
    counters = mesh.stats("web")["Counters"]
    endpoints = len(mesh.stats("web")["Upstreams"][0]["Endpoints"])
    # The dead instance leaves by whichever comes first: outlier ejection (5 consecutive connect
    # failures) or its sidecar's 1 s health check. With keep-alive load few new connections are
    # made after the kill, so either can win; ejection itself is unit-tested in test_proxy_balancer.
    assert counters.get("upstream_ejections{upstream=api}", 0) >= 1 or endpoints == 2, (counters, endpoints)
    print("kill: dropped after", round(time.monotonic() - t_kill, 2), "s; counters", counters)
