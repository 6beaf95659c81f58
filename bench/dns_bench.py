"""DNS benchmark: Lictor's DnsServer vs unbound serving the same static records.

Three targets in one run: a real `lictor agent -dev` (records registered over its HTTP API), the
bare DnsServer in its own process (what the agent's DNS costs without the rest of the agent), and
unbound. Usage (installs dnsperf and unbound with apt when run as root and they are missing):
    .venv/bin/python bench/dns_bench.py [--seconds 10] [--uvloop] [--rate 3000] [--dns-rate-limit 1e9]

For each server it runs dnsperf twice: unthrottled (max QPS) and at a fixed
rate with per-query latencies (-v) to compute p50/p99. Prints a table and the
Lictor/unbound QPS ratio. `--serve PORT` is the internal mode used to run our
server in its own process so that it does not share a core with the driver.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

N_NODES = 5
SERVICES = {"api": 3, "web": 5}


def snapshot() -> dict[str, Any]:
    nodes = [{"Node": f"n{i}", "Address": f"10.0.0.{i}", "Datacenter": "dc1"} for i in range(1, N_NODES + 1)]
    services = [
        {"Node": f"n{i}", "ID": name, "Service": name, "Tags": ["v1"], "Port": 8000 + i}
        for name, count in SERVICES.items()
        for i in range(1, count + 1)
    ]
    return {"Nodes": nodes, "Services": services, "Checks": []}


QUERIES = [
    "api.service.consul A",
    "api.service.consul SRV",
    "web.service.consul A",
    "web.service.consul SRV",
    "n1.node.consul A",
    "n3.node.dc1.consul A",
    "missing.service.consul A",
]


def unbound_conf(port: int, workdir: str, threads: int) -> str:
    lines = [
        "server:",
        "  interface: 127.0.0.1",
        f"  port: {port}",
        "  do-daemonize: no",
        '  chroot: ""',
        '  username: ""',
        f'  directory: "{workdir}"',
        '  pidfile: ""',
        "  use-syslog: no",
        "  verbosity: 0",
        f"  num-threads: {threads}",
        '  module-config: "iterator"',
        "  access-control: 127.0.0.0/8 allow",
        '  local-zone: "consul." static',
        '  local-data: "consul. 0 IN SOA ns.consul. hostmaster.consul. 1 3600 600 86400 0"',
    ]
    for i in range(1, N_NODES + 1):
        lines.append(f'  local-data: "n{i}.node.consul. 0 IN A 10.0.0.{i}"')
        lines.append(f'  local-data: "n{i}.node.dc1.consul. 0 IN A 10.0.0.{i}"')
    for name, count in SERVICES.items():
        for i in range(1, count + 1):
            lines.append(f'  local-data: "{name}.service.consul. 0 IN A 10.0.0.{i}"')
            lines.append(f'  local-data: "{name}.service.consul. 0 IN SRV 1 1 {8000 + i} n{i}.node.dc1.consul."')
    lines.append("remote-control:\n  control-enable: no")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1", "+short", "n1.node.consul"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if "10.0.0.1" in r.stdout:
            return
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} not ready")


def dnsperf(port: int, qfile: str, seconds: int, rate: int | None, clients: int, outstanding: int = 100) -> dict[str, float]:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", qfile, "-l", str(seconds), "-c", str(clients)]
    cmd += ["-q", str(outstanding)]
    if rate:
        cmd += ["-Q", str(rate), "-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    res: dict[str, float] = {}
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    res["qps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Queries lost:\s+(\d+)", out)
    res["lost"] = float(m.group(1)) if m else -1.0
    lats = sorted(float(line.split()[-1]) for line in out.splitlines() if line.startswith(">"))
    if lats:
        res["p50_ms"] = lats[len(lats) // 2] * 1000
        res["p99_ms"] = lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1000
    return res


def serve(port: int, use_uvloop: bool, rate_limit: float = 0.0) -> None:
    from lictor.dns.ratelimit import QueryRateLimiter
    from lictor.dns.resolver import DnsConfig
    from lictor.dns.server import DnsServer
    from lictor.dns.view import CatalogView

    view = CatalogView.from_snapshot(snapshot(), "dc1")

    async def main() -> None:
        limiter = QueryRateLimiter(rate_limit) if rate_limit > 0 else None
        server = DnsServer(lambda: view, DnsConfig(), port=port, rate_limiter=limiter)
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop()
        print(f"lictor stats: {server.stats}", file=sys.stderr)

    if use_uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main())


def ensure_tools() -> bool:
    missing = [t for t in ("dnsperf", "unbound", "dig") if shutil.which(t) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {missing} with apt-get", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "dnsperf", "unbound", "bind9-dnsutils"], check=False,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        missing = [t for t in ("dnsperf", "unbound", "dig") if shutil.which(t) is None]
    if missing:
        print(f"missing {missing}: apt-get install -y dnsperf unbound bind9-dnsutils", file=sys.stderr)
        return False
    return True


def start_agent(dns_port: int, rate_limit: float = 0.0) -> tuple[subprocess.Popen, int]:
    """A real `lictor agent -dev` holding the same records, registered through its HTTP API."""
    import httpx

    http_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lictor.cli", "agent", "-dev", "-node", "bench",
                             "-http-port", str(http_port), "-dns-port", str(dns_port),
                             *(["-dns-rate-limit", str(rate_limit)] if rate_limit > 0 else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/v1/status/leader", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    snap = snapshot()
    addresses = {n["Node"]: n["Address"] for n in snap["Nodes"]}
    for svc in snap["Services"]:
        body = {"Node": svc["Node"], "Address": addresses[svc["Node"]],
                "Service": {"ID": svc["ID"], "Service": svc["Service"], "Tags": svc["Tags"], "Port": svc["Port"]}}
        httpx.put(base + "/v1/catalog/register", json=body, timeout=5).raise_for_status()
    return proc, http_port


def run_bench(args: argparse.Namespace) -> int:
    if not ensure_tools():
        return 2
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        qfile = os.path.join(tmp, "queries.txt")
        Path(qfile).write_text("\n".join(QUERIES) + "\n")
        servers: dict[str, list[str]] = {}
        lport = free_port()
        servers["lictor"] = [sys.executable, __file__, "--serve", str(lport)] + (["--uvloop"] if args.uvloop else [])
        if args.dns_rate_limit > 0:
            servers["lictor"] += ["--dns-rate-limit", str(args.dns_rate_limit)]
        uport = free_port()
        conf = os.path.join(tmp, "unbound.conf")
        Path(conf).write_text(unbound_conf(uport, tmp, args.unbound_threads))
        servers["unbound"] = ["unbound", "-d", "-c", conf]
        ports = {"lictor": lport, "unbound": uport}
        aport = free_port()
        servers = {"agent": [], **servers}  # a whole `lictor agent -dev` first, then the bare DNS server
        ports["agent"] = aport
        for name, cmd in servers.items():
            if name == "agent":
                proc, _ = start_agent(aport, args.dns_rate_limit)
                time.sleep(0.5)  # let the agent's view pick up the registrations
            else:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=None)
            try:
                wait_ready(ports[name])
                maxq = dnsperf(ports[name], qfile, args.seconds, None, args.clients, args.outstanding)
                lat = dnsperf(ports[name], qfile, args.seconds, args.rate, args.clients)
                results[name] = {"qps": maxq["qps"], "lost": maxq["lost"], **{k: v for k, v in lat.items() if "ms" in k}}
                results[name]["rate_lost"] = lat["lost"]
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(f"{'server':10} {'max QPS':>10} {'lost':>6} {'p50@' + str(args.rate):>10} {'p99@' + str(args.rate):>10}")
    for name, r in results.items():
        print(
            f"{name:10} {r['qps']:10.0f} {r['lost']:6.0f} {r.get('p50_ms', float('nan')):9.2f}ms {r.get('p99_ms', float('nan')):9.2f}ms"
        )
    if results.get("unbound", {}).get("qps"):
        for name in ("agent", "lictor"):
            if name in results:
                print(f"ratio {name}/unbound QPS: {results[name]['qps'] / results['unbound']['qps']:.1%}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--uvloop", action="store_true", help="run our server on uvloop")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rate", type=int, default=3000, help="QPS for the latency run")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--unbound-threads", type=int, default=1)
    p.add_argument("--outstanding", type=int, default=200, help="dnsperf -q for the max-QPS run")
    p.add_argument("--dns-rate-limit", type=float, default=0.0,
                   help="per-client query limit for our servers (dnsperf is one client; 1e9 = on but never biting)")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.uvloop, args.dns_rate_limit)
        return 0
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
