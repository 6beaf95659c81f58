"""One mesh hop, three ways, in one run: direct vs a Lictor sidecar pair vs an nginx `stream` mTLS pair.

    .venv/bin/python bench/mesh_bench.py [--runs 3] [--duration 10] [--write-docs]

Topology (all loopback; perf-anchors.md B1b): wrk → (client sidecar: plain in, mTLS out) →
(server sidecar: mTLS in, plain out) → nginx upstream returning a 12-byte body.
- direct: wrk → upstream.
- nginx-stream-pair: the appendix's nginx-stream-mesh.conf (2 workers), certs from its gen script.
- lictor-pair: `lictor agent -dev` + two `python -m lictor.agent.proxy` processes (uvloop), the
  client's upstream declared in its registration, certificates from the built-in CA.

Measures, per target, medians over --runs round-robin passes: req/s and p50/p99 at c=50
(`wrk -t2 -c50`) and c=1 (`wrk -t1 -c1`), added p50/p99 over direct, and new mTLS connections per
second (`wrk -H "Connection: close"`: every request is a new connection, so a new handshake between
the two sidecars). Installs wrk and nginx with apt-get when missing. Kills only the pids it started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

CERT_SCRIPT = r"""
set -e
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days 30 -subj "/CN=perf-test-ca" -out ca.pem
for who in server client; do
  openssl ecparam -name prime256v1 -genkey -noout -out $who.key
  openssl req -new -key $who.key -subj "/CN=$who.mesh.test" -out $who.csr
  if [ $who = server ]; then ext="subjectAltName=IP:127.0.0.1,DNS:localhost"; eku=serverAuth; else ext="subjectAltName=URI:spiffe://mesh.test/ns/default/svc/client"; eku=clientAuth; fi
  printf "%s\nextendedKeyUsage=%s\nkeyUsage=digitalSignature\n" "$ext" "$eku" > $who.ext
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -sha256 -extfile $who.ext -out $who.pem
done
"""

UPSTREAM_CONF = """worker_processes 1;
daemon off;
pid {d}/up.pid;
error_log {d}/up.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{ default_type text/plain; return 200 "hello world\\n"; }}
  }}
}}
"""

STREAM_CONF = """load_module {module};
worker_processes 2;
daemon off;
pid {d}/stream.pid;
error_log {d}/stream.err warn;
events {{ worker_connections 4096; }}
stream {{
  server {{
    listen 127.0.0.1:{inp} ssl reuseport backlog=4096;
    ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key;
    ssl_client_certificate {d}/ca.pem; ssl_verify_client on; ssl_protocols TLSv1.3;
    proxy_pass 127.0.0.1:{up};
  }}
  server {{
    listen 127.0.0.1:{out} reuseport backlog=4096;
    proxy_pass 127.0.0.1:{inp};
    proxy_ssl on; proxy_ssl_certificate {d}/client.pem; proxy_ssl_certificate_key {d}/client.key;
    proxy_ssl_trusted_certificate {d}/ca.pem; proxy_ssl_verify on; proxy_ssl_name localhost;
    proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;
  }}
}}
"""


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ensure_tools() -> None:
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    if missing or not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        print(f"# installing {missing or 'nginx stream module'} with apt-get", flush=True)
        subprocess.run(["apt-get", "install", "-y", "wrk", "nginx-light", "libnginx-mod-stream"], check=True,
                       stdout=subprocess.DEVNULL)


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


_LAT = re.compile(r"^\s*(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, conns: int, threads: int, duration: int, close: bool = False) -> dict[str, float]:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=duration + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = {p: _ms(v, u) for p, v, u in _LAT.findall(out)}
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": lat.get("50", float("nan")),
            "p99": lat.get("99", float("nan")), "errors": (errors.group(1) if errors else ""),
            "non2xx": int(non2xx.group(1)) if non2xx else 0}  # type: ignore[dict-item]


def busy_fraction(seconds: float) -> float:
    def sample() -> tuple[int, int]:
        parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = parts[3] + parts[4]
        return sum(parts) - idle, sum(parts)

    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / max(1, t1 - t0)


class Procs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def setup(root: Path, procs: Procs) -> dict[str, str]:
    up, s_in, s_out, agent_port, app_sidecar, client_sidecar, upstream_port = free_ports(7)
    (root / "up.conf").write_text(UPSTREAM_CONF.format(d=root, port=up))
    procs.spawn("nginx-up", ["nginx", "-p", str(root), "-c", str(root / "up.conf")])
    subprocess.run(["bash", "-c", CERT_SCRIPT], cwd=root, check=True, capture_output=True)
    (root / "stream.conf").write_text(STREAM_CONF.format(module="/usr/lib/nginx/modules/ngx_stream_module.so",
                                                         d=root, inp=s_in, out=s_out, up=up))
    procs.spawn("nginx-stream", ["nginx", "-p", str(root), "-c", str(root / "stream.conf")])

    procs.spawn("agent", [PY, "-m", "lictor.cli", "agent", "-dev", "-node", "bench", "-http-port", str(agent_port),
                          "-dns-port", "-1"])
    base = f"http://127.0.0.1:{agent_port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/v1/agent/self", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("agent did not start")
        time.sleep(0.1)

    def register(sid: str, port: int, sidecar_port: int, upstreams: list[dict[str, object]] | None = None) -> None:
        sidecar: dict[str, object] = {"Port": sidecar_port, "Checks": [
            {"Name": "listening", "TCP": f"127.0.0.1:{sidecar_port}", "Interval": "1s"}]}
        if upstreams:
            sidecar["Proxy"] = {"Upstreams": upstreams}
        r = httpx.put(base + "/v1/agent/service/register", timeout=10,
                      json={"ID": sid, "Name": sid, "Port": port, "Connect": {"SidecarService": sidecar}})
        r.raise_for_status()

    register("app", up, app_sidecar)
    register("client", 1, client_sidecar, [{"DestinationName": "app", "LocalBindPort": upstream_port}])
    for sid in ("app", "client"):
        procs.spawn(f"proxy-{sid}", [PY, "-m", "lictor.agent.proxy", "-sidecar-for", sid,
                                     "-http-addr", f"127.0.0.1:{agent_port}", "-log-level", "warning"])
    for port in (up, s_out, app_sidecar, upstream_port):
        wait_port(port)
    deadline = time.monotonic() + 30
    while True:  # the client sidecar needs a passing server sidecar before it can route
        try:
            if httpx.get(f"http://127.0.0.1:{upstream_port}/", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("lictor pair never answered")
        time.sleep(0.2)
    return {"direct": f"http://127.0.0.1:{up}/", "nginx-stream-pair": f"http://127.0.0.1:{s_out}/",
            "lictor-pair": f"http://127.0.0.1:{upstream_port}/"}


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    root = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    procs = Procs(root)
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        targets = setup(root, procs)
        for url in targets.values():  # warm-up: connections, caches, JIT-free but page cache etc.
            wrk(url, 10, 1, 1)
        for rnd in range(args.runs):
            for name, url in targets.items():
                quiet = busy_fraction(0.5)
                r50 = wrk(url, 50, 2, args.duration)
                r1 = wrk(url, 1, 1, max(3, args.duration // 2))
                rnew = wrk(url, 10, 2, max(3, args.duration // 2), close=True)
                bucket = results.setdefault(name, {"c50": [], "c1": [], "new": []})
                bucket["c50"].append(r50)
                bucket["c1"].append(r1)
                bucket["new"].append(rnew)
                print(f"run {rnd + 1} {name:18s} c50 {r50['rps']:9.0f} req/s p50 {r50['p50']:.2f} p99 {r50['p99']:.2f} | "
                      f"c1 {r1['rps']:7.0f} p50 {r1['p50']:.3f} p99 {r1['p99']:.2f} | new conns {rnew['rps']:6.0f}/s "
                      f"{('errors ' + str(rnew['errors'])) if rnew['errors'] else ''} (box busy before: {quiet:.0%})",
                      flush=True)
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    summary: dict[str, dict[str, float]] = {}
    for name, b in results.items():
        summary[name] = {
            "c50_rps": med(b["c50"], "rps"), "c50_p50": med(b["c50"], "p50"), "c50_p99": med(b["c50"], "p99"),
            "c1_rps": med(b["c1"], "rps"), "c1_p50": med(b["c1"], "p50"), "c1_p99": med(b["c1"], "p99"),
            "new_cps": med(b["new"], "rps"),
            "c50_runs": [r["rps"] for r in b["c50"]],  # type: ignore[dict-item]
        }
    return {"summary": summary}  # type: ignore[dict-item]


def report(summary: dict[str, dict[str, float]], runs: int, duration: int) -> str:
    d, n, lx = summary["direct"], summary["nginx-stream-pair"], summary["lictor-pair"]
    lines = [
        "| path | c=50 req/s (median) | runs | c=50 p50 / p99 ms | c=1 req/s | c=1 p50 / p99 ms "
        "| added p50 c=1 | added p99 c=50 | new mTLS conn/s | req/s vs nginx pair |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in (("direct (nginx upstream)", d), ("nginx stream mTLS pair", n), ("lictor sidecar pair", lx)):
        runs_txt = " / ".join(f"{r:,.0f}" for r in s["c50_runs"])  # type: ignore[attr-defined]
        lines.append(
            f"| {name} | {s['c50_rps']:,.0f} | {runs_txt} | {s['c50_p50']:.2f} / {s['c50_p99']:.2f} | "
            f"{s['c1_rps']:,.0f} | {s['c1_p50']:.3f} / {s['c1_p99']:.2f} | +{s['c1_p50'] - d['c1_p50']:.3f} ms | "
            f"+{s['c50_p99'] - d['c50_p99']:.2f} ms | {s['new_cps']:,.0f} | {s['c50_rps'] / n['c50_rps']:.0%} |")
    ratio = lx["c50_rps"] / n["c50_rps"]
    added_p50 = lx["c1_p50"] - d["c1_p50"]
    checks = [
        f"req/s ≥ 50 % of the nginx pair: {ratio:.0%} → {'PASS' if ratio >= 0.5 else 'FAIL'}",
        f"added p50 at c=1 ≤ 0.3 ms: +{added_p50:.3f} ms → {'PASS' if added_p50 <= 0.3 else 'FAIL'}",
        f"p99 at c=50 ≤ 20 ms: {lx['c50_p99']:.2f} ms → {'PASS' if lx['c50_p99'] <= 20 else 'FAIL'}",
        f"new mTLS connections/s vs nginx pair: {lx['new_cps'] / max(1.0, n['new_cps']):.0%}",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {c}" for c in checks) + (
        f"\n\nMedians of {runs} round-robin passes; wrk -t2 -c50 -d{duration}s, -t1 -c1, and -t2 -c10 with "
        "`Connection: close` for new connections (each one a new TLS 1.3 ECDSA P-256 mutual handshake "
        "between the two sidecars).\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--json", help="write the summary here as JSON")
    args = parser.parse_args()
    ensure_tools()
    print(f"# nproc={os.cpu_count()} python={sys.version.split()[0]}", flush=True)
    out = run(args)
    text = report(out["summary"], args.runs, args.duration)  # type: ignore[arg-type]
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
