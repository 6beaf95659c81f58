"""Ingress gateway vs an nginx reverse proxy, same upstream, same run (wrk, closed loop).

Topology (everything on 127.0.0.1; the upstream plays a Connect sidecar):

    wrk -c50 ──► lictor gateway (1 process, uvloop) ══mTLS══╗
    wrk -c50 ──► nginx proxy (1 worker, keepalive 128)  ══mTLS══╬══► nginx upstream (1 worker, mTLS,
                                                                ║    client cert required, "hello world")
Both proxies present a leaf of `ingress-gw` issued by a dev agent's CA and verify the upstream's leaf
(service `web`) against the CA roots; both keep upstream connections alive. The gateway does its full
per-request work: Host -> chain -> route -> split -> target -> instance.

    python bench/gateway_bench.py [--runs 3] [--duration 10] [--connections 50]

Prints a markdown table (median of N runs per target, round-robin) and the ratios. Installs wrk and
nginx with apt-get when missing.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "tests"))

from procs import AgentProc, free_ports, wait_until  # noqa: E402

HOST = "web.ingress.consul"


def ensure_tools() -> None:
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        print(f"# installing {missing} with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True)


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def nginx_conf(kind: str, root: Path, port: int, upstream_port: int, san: str) -> str:
    user = "user root;" if os.geteuid() == 0 else ""
    common = f"""{user}
worker_processes 1;
daemon off;
pid {root}/{kind}.pid;
error_log {root}/{kind}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path {root}/tmp-{kind};
  proxy_temp_path {root}/tmp-{kind};
"""
    if kind == "upstream":
        return common + f"""
  server {{
    listen 127.0.0.1:{port} ssl reuseport backlog=4096;
    ssl_certificate {root}/web.pem; ssl_certificate_key {root}/web.key;
    ssl_client_certificate {root}/roots.pem; ssl_verify_client on; ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ default_type text/plain; return 200 "hello world\\n"; }}
  }}
}}
"""
    return common + f"""
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass https://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_certificate {root}/gw.pem; proxy_ssl_certificate_key {root}/gw.key;
      proxy_ssl_trusted_certificate {root}/roots.pem; proxy_ssl_verify on; proxy_ssl_name {san};
      proxy_ssl_protocols TLSv1.2 TLSv1.3; proxy_ssl_session_reuse on;
    }}
  }}
}}
"""


def start_nginx(kind: str, root: Path, port: int, upstream_port: int, san: str) -> subprocess.Popen:
    (root / f"tmp-{kind}").mkdir(exist_ok=True)
    conf = write(root / f"{kind}.conf", nginx_conf(kind, root, port, upstream_port, san))
    proc = subprocess.Popen([nginx_bin(), "-p", str(root), "-e", str(root / f"{kind}.err"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port, proc, kind)
    return proc


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    def up() -> bool:
        assert proc.poll() is None, f"{what} exited"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, timeout, 0.1, f"{what} on :{port}")


def wrk(url: str, connections: int, duration: int, host: str | None) -> dict[str, float]:
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--latency"]
    if host:
        cmd += ["-H", f"Host: {host}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def lat(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": lat("50"), "p99": lat("99"), "non2xx": float(errors.group(1)) if errors else 0.0,
            "sockerr": sock.group(1) if sock else ""}  # type: ignore[dict-item]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args()
    ensure_tools()
    root = Path(tempfile.mkdtemp(prefix="lictor-gw-bench-"))
    os.chmod(root, 0o700)
    agent_port, up_port, proxy_port, gw_port, metrics_port = free_ports(5)
    agent = AgentProc("dev", agent_port, ["-dev", "-node", "dev", "-http-port", str(agent_port), "-dns-port", "-1"],
                      root / "agent.log")
    procs: list[subprocess.Popen] = []
    try:
        agent.start()
        agent.wait_ready()
        roots = agent.get("/v1/agent/connect/ca/roots").json()
        web = agent.get("/v1/agent/connect/ca/leaf/web").json()
        gw = agent.get("/v1/agent/connect/ca/leaf/ingress-gw").json()
        write(root / "roots.pem", "\n".join(r["RootCert"] for r in roots["Roots"]))
        write(root / "web.pem", web["CertPEM"])
        write(root / "web.key", web["PrivateKeyPEM"])
        write(root / "gw.pem", gw["CertPEM"])
        write(root / "gw.key", gw["PrivateKeyPEM"])
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(web["CertPEM"].encode())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_san = san.get_values_for_type(x509.DNSName)[0]

        procs.append(start_nginx("upstream", root, up_port, 0, dns_san))
        procs.append(start_nginx("proxy", root, proxy_port, up_port, dns_san))
        for entry in ({"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
                      {"Kind": "ingress-gateway", "Name": "ingress-gw", "Listeners": [
                          {"Port": gw_port, "Protocol": "http", "Services": [{"Name": "web"}]}]}):
            assert agent.put("/v1/config", json=entry).json() is True
        for reg in ({"ID": "web-1", "Name": "web", "Port": up_port, "Address": "127.0.0.1",
                     "Connect": {"Native": True}},
                    {"ID": "ingress-gw", "Name": "ingress-gw", "Kind": "ingress-gateway", "Port": gw_port}):
            assert agent.put("/v1/agent/service/register", json=reg).status_code == 200
        gw_log = open(root / "gateway.log", "wb")  # noqa: SIM115 - the child owns it
        # LICTOR_GW_PROFILE=<file> runs the gateway under cProfile (written when it exits on SIGTERM)
        profile = ["-m", "cProfile", "-o", os.environ["LICTOR_GW_PROFILE"]] if os.environ.get("LICTOR_GW_PROFILE") else []
        gateway = subprocess.Popen([sys.executable, *profile, "-m", "lictor.gateway", "-service", "ingress-gw", "-http-addr",
                                    agent.http_addr, "-metrics-port", str(metrics_port), "-log-level", "warning"],
                                   stdout=gw_log, stderr=subprocess.STDOUT)
        procs.append(gateway)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{gw_port}/", headers={"host": HOST}, timeout=2)
                   .status_code == 200, 30, 0.2, "gateway serving")
        assert httpx.get(f"http://127.0.0.1:{proxy_port}/", timeout=2).text == "hello world\n"

        targets = {"nginx-proxy (mTLS upstream)": (f"http://127.0.0.1:{proxy_port}/", None),
                   "lictor-gateway (mTLS upstream)": (f"http://127.0.0.1:{gw_port}/", HOST)}
        results: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
        for url, host in targets.values():  # warm-up: pools, TLS sessions
            wrk(url, args.connections, 1, host)
        for run in range(args.runs):
            for name, (url, host) in targets.items():
                r = wrk(url, args.connections, args.duration, host)
                results[name].append(r)
                print(f"# run {run + 1} {name}: {r['rps']:.0f} req/s p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms "
                      f"non2xx {r['non2xx']:.0f} {r['sockerr']}", flush=True)
        c1 = {name: wrk(url, 1, 5, host) for name, (url, host) in targets.items()}

        print(f"\n## gateway vs nginx proxy, wrk -t2 -c{args.connections} -d{args.duration}s, "
              f"median of {args.runs} (nproc={os.cpu_count()})\n")
        print("| target | req/s (median) | runs | p50 ms | p99 ms | req/s vs nginx | c=1 p50 ms |")
        print("|---|---|---|---|---|---|---|")
        base = statistics.median(r["rps"] for r in results["nginx-proxy (mTLS upstream)"])
        for name, runs in results.items():
            rps = statistics.median(r["rps"] for r in runs)
            med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
            all_runs = " / ".join(f"{r['rps']:,.0f}" for r in runs)
            print(f"| {name} | {rps:,.0f} | {all_runs} | {med['p50']:.2f} | "
                  f"{med['p99']:.2f} | {rps / base:.1%} | {c1[name]['p50']:.2f} |")
        gw_rps = statistics.median(r["rps"] for r in results["lictor-gateway (mTLS upstream)"])
        gw_p99 = statistics.median(r["p99"] for r in results["lictor-gateway (mTLS upstream)"])
        print(f"\ngoal: gateway >= 25 % of nginx req/s -> {gw_rps / base:.1%} "
              f"({'met' if gw_rps / base >= 0.25 else 'MISSED'}); p99 <= 25 ms -> {gw_p99:.2f} ms "
              f"({'met' if gw_p99 <= 25 else 'MISSED'})")
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        agent.kill()
        if os.environ.get("KEEP_BENCH_DIR") is None:
            shutil.rmtree(root, ignore_errors=True)
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
