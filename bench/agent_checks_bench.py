"""Issue #3: cost of 5,000 HTTP + 5,000 TTL checks on one client agent, and how fast a check's state
change becomes visible on the server; baselines (idle agent, bare httpx prober) in the same run.

Usage:  .venv/bin/python bench/agent_checks_bench.py [--quick] [--window 40] [--flips 200] [--json OUT]

Processes (all 127.0.0.1, started here, killed by pid in `finally`):
  * target: a tiny uvloop asyncio.Protocol HTTP server answering 200 "ok"; it counts requests, and
    GET /__count returns the count (used for the achieved probe rate, i.e. timing drift);
  * one server agent (-bootstrap-expect 1) and one client agent joined to it;
  * baseline prober: `--probe` mode of this script, a bare asyncio + httpx loop issuing the same
    500 GET/s with the same client settings as the agent's HTTP checks (no keep-alive,
    Connection: close).
Steps: idle agent CPU (0 checks) -> baseline prober CPU at 500 req/s -> register 500 services x 10
HTTP checks (interval 10 s) and 500 services x 10 TTL checks (TTL 10 s, left alone) -> settle one
interval -> measure agent CPU and achieved probe rate over the window -> flip TTL checks to passing
one at a time and time until a blocking query on the SERVER's /v1/health/service/<name> shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuMeter, RawConn, exit_on_sigterm, install_uvloop, pct, print_machine  # noqa: E402
from procs import AgentProc, cluster_key, free_port, free_ports, wait_until  # noqa: E402

SERVICES = 500  # --services; --quick uses 100 (1,000 + 1,000 checks, 100 probes/s)
CHECKS_PER_SERVICE = 10
INTERVAL_S = 10
EXPECTED_RPS = SERVICES * CHECKS_PER_SERVICE / INTERVAL_S  # 500/s


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# child modes
# ------------------------------------------------------------------------------------------------


def serve_target(port: int) -> None:
    install_uvloop()
    count = [0]
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                head, _, self.buf = self.buf.partition(b"\r\n\r\n")
                close = b"connection: close" in head.lower()
                if head.startswith(b"GET /__count"):
                    body = str(count[0]).encode()
                    self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                count[0] += 1
                self.t.write(ok + (b"Connection: close\r\n\r\nok" if close else b"\r\nok"))
                if close:
                    self.t.close()
                    return

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def probe(url: str, rate: float, secs: float) -> None:
    """Bare httpx prober: `rate` GET/s spread evenly, same client settings as the agent's checks."""
    import httpx

    install_uvloop()

    async def main() -> None:
        client = httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
        ok = fail = 0
        kinds: dict[str, int] = {}
        pending: set[asyncio.Task] = set()

        async def one() -> None:
            nonlocal ok, fail
            try:
                r = await client.get(url, headers={"Connection": "close"}, timeout=10)
                ok += r.status_code == 200
            except Exception as exc:  # noqa: BLE001
                fail += 1
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = int(rate * secs)
        for i in range(n):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=15)
        await client.aclose()
        tm = os.times()
        print(json.dumps({"ok": ok, "fail": fail, "errors": kinds, "secs": loop.time() - t0, "cpu_s": tm.user + tm.system}), flush=True)

    asyncio.run(main())


# ------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------


async def count(port: int) -> int:
    c = RawConn("127.0.0.1", port)
    try:
        _, _, body = await c.request("GET", "/__count", timeout=5)
        return int(body)
    finally:
        c.close()


async def register_all(agent_port: int, target_port: int) -> float:
    url = f"http://127.0.0.1:{target_port}/health"
    bodies = []
    for i in range(SERVICES):
        bodies.append({"ID": f"hsvc-{i}", "Name": f"hsvc-{i}", "Port": target_port, "Checks": [
            {"CheckID": f"http-{i}-{j}", "Name": f"http {i}/{j}", "HTTP": url, "Interval": f"{INTERVAL_S}s", "Timeout": "5s"}
            for j in range(CHECKS_PER_SERVICE)]})
        bodies.append({"ID": f"tsvc-{i}", "Name": f"tsvc-{i}", "Port": 9000, "Checks": [
            {"CheckID": f"ttl-{i}-{j}", "Name": f"ttl {i}/{j}", "TTL": f"{INTERVAL_S}s"} for j in range(CHECKS_PER_SERVICE)]})
    t0 = time.perf_counter()
    errors: list[str] = []
    done = [0]

    async def stream(k: int) -> None:
        conn = RawConn("127.0.0.1", agent_port)
        try:
            for b in bodies[k::4]:
                st, _, data = await conn.request("PUT", "/v1/agent/service/register", json.dumps(b).encode(), timeout=60)
                if st != 200:
                    errors.append(f"{st} {data[:100]!r}")
                done[0] += 1
                if done[0] % 200 == 0:
                    log(f"  registered {done[0]}/{len(bodies)} services ({time.perf_counter() - t0:.1f} s)")
                if time.perf_counter() - t0 > 150:
                    raise RuntimeError(f"registration too slow: {done[0]}/{len(bodies)} after 150 s")
        finally:
            conn.close()

    await asyncio.gather(*(stream(k) for k in range(4)))
    if errors:
        raise RuntimeError(f"{len(errors)} registrations failed, e.g. {errors[:3]}")
    return time.perf_counter() - t0


async def flip_visibility(agent_port: int, server_port: int, flips: int) -> dict:
    """Pass TTL check ttl-k-0 on the agent; time until a blocking query on the server shows it."""
    lat: list[float] = []
    misses = 0
    server = RawConn("127.0.0.1", server_port)
    agent = RawConn("127.0.0.1", agent_port)
    try:
        for k in range(flips):
            name, cid = f"tsvc-{k % SERVICES}", f"ttl-{k % SERVICES}-{(k // SERVICES) % CHECKS_PER_SERVICE}"
            st, headers, _ = await server.request("GET", f"/v1/health/service/{name}", timeout=10)
            index = int(headers.get("x-consul-index", "0"))
            t0 = time.perf_counter()
            st, _, _ = await agent.request("PUT", f"/v1/agent/check/pass/{cid}", timeout=10)
            assert st == 200, st
            seen = None
            for _ in range(100):  # bounded: each round is one blocking query
                st, headers, body = await server.request("GET", f"/v1/health/service/{name}?index={index}&wait=5s", timeout=15)
                index = int(headers.get("x-consul-index", index))
                entries = json.loads(body) if st == 200 else []
                checks = [c for e in entries for c in e.get("Checks", []) if c.get("CheckID") == cid]
                if checks and checks[0]["Status"] == "passing":
                    seen = time.perf_counter()
                    break
                if time.perf_counter() - t0 > 10:
                    break
            if seen is None:
                misses += 1
            else:
                lat.append((seen - t0) * 1000)
    finally:
        server.close()
        agent.close()
    return {"flips": flips, "seen": len(lat), "missed": misses, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "max_ms": max(lat, default=float("nan"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short windows, 40 flips (< 1 min)")
    ap.add_argument("--window", type=float, default=None, help="measurement window with checks running (default 40 s)")
    ap.add_argument("--flips", type=int, default=None)
    ap.add_argument("--services", type=int, default=None, help="services of each kind, 10 checks each (default 500)")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_target(args.serve)
        return 0
    if args.probe:
        probe(args.probe[0], float(args.probe[1]), float(args.probe[2]))
        return 0

    global SERVICES, EXPECTED_RPS
    SERVICES = args.services or (100 if args.quick else 500)
    EXPECTED_RPS = SERVICES * CHECKS_PER_SERVICE / INTERVAL_S
    window = args.window or (12.0 if args.quick else 40.0)
    idle_secs = 4.0 if args.quick else 10.0
    probe_secs = 5.0 if args.quick else 10.0
    settle = INTERVAL_S + 2.0
    flips = args.flips or (40 if args.quick else 200)
    install_uvloop()
    exit_on_sigterm()
    print_machine()
    root = Path(tempfile.mkdtemp(prefix="lictor-checks-bench-"))
    procs: list[subprocess.Popen] = []
    agents: list[AgentProc] = []
    out: dict = {}
    t_start = time.monotonic()
    try:
        target_port = free_port()
        target = subprocess.Popen([sys.executable, __file__, "--serve", str(target_port)])
        procs.append(target)
        http_port, raft_port = free_ports(2)
        key = cluster_key()
        server = AgentProc("server", http_port, [
            "-server", "-bootstrap-expect", "1", "-node", "srv", "-data-dir", str(root / "srv"), "-bind", "127.0.0.1",
            "-http-port", str(http_port), "-raft-port", str(raft_port), "-encrypt", key, "-dns-port", "-1"],
            root / "server.log", raft_port=raft_port)
        agents.append(server)
        server.start()
        server.wait_ready(40)
        wait_until(lambda: server.leader(), 30, what="leader")
        cport = free_port()
        client = AgentProc("client", cport, [
            "-node", "bench-client", "-data-dir", str(root / "client"), "-bind", "127.0.0.1", "-http-port", str(cport),
            "-dns-port", "-1", "-retry-join", server.http_addr], root / "client.log")
        agents.append(client)
        client.start()
        client.wait_ready(40)
        wait_until(lambda: any(n["Node"] == "bench-client" for n in server.get("/v1/catalog/nodes").json()), 30,
                   what="client in catalog")
        assert client.proc and server.proc
        pids = {"agent": client.proc.pid, "server": server.proc.pid, "target": target.pid}

        # 1. idle agent, 0 checks
        time.sleep(1.0)
        m = CpuMeter(pids).start()
        time.sleep(idle_secs)
        out["idle"] = m.stop()
        log(f"idle agent, 0 checks ({idle_secs:.0f} s): cpu% " + " ".join(f"{k}={v:.1f}" for k, v in out["idle"].items()))

        # 2. raw probe cost: bare httpx at the same rate
        url = f"http://127.0.0.1:{target_port}/health"
        c0 = asyncio.run(count(target_port))
        pr = subprocess.Popen([sys.executable, __file__, "--probe", url, str(EXPECTED_RPS), str(probe_secs)],
                              stdout=subprocess.PIPE, text=True)
        procs.append(pr)
        tm = CpuMeter({"target": target.pid}).start()
        res = json.loads(pr.communicate(timeout=probe_secs + 60)[0])
        tcpu = tm.stop()
        c1 = asyncio.run(count(target_port))
        res["cpu_pct"] = 100 * res["cpu_s"] / res["secs"]  # includes interpreter start-up: slight overestimate
        res["rate"] = (c1 - c0) / res["secs"]
        res["target_cpu"] = tcpu["target"]
        out["probe"] = res
        log(f"baseline bare httpx prober: {res['rate']:.0f} req/s achieved ({res['ok']} ok, {res['fail']} failed {res.get('errors') or ''}), "
            f"cpu {res['cpu_pct']:.1f}% of a core (target server {tcpu['target']:.1f}%)")

        # 3. register 5,000 HTTP + 5,000 TTL checks
        reg_s = asyncio.run(register_all(cport, target_port))
        out["register_s"] = reg_s
        log(f"registered {SERVICES} services x {CHECKS_PER_SERVICE} HTTP checks + {SERVICES} x {CHECKS_PER_SERVICE} TTL "
            f"checks in {reg_s:.1f} s; settling {settle:.0f} s")
        time.sleep(settle)

        # 4. steady state
        n_checks = SERVICES * CHECKS_PER_SERVICE
        c0 = asyncio.run(count(target_port))
        t0 = time.monotonic()
        m = CpuMeter(pids).start()
        time.sleep(window)
        cpu = m.stop()
        c1 = asyncio.run(count(target_port))
        rate = (c1 - c0) / (time.monotonic() - t0)
        out["steady"] = {"cpu": cpu, "rate": rate, "window_s": window}
        ratio = cpu["agent"] / res["cpu_pct"] if res["cpu_pct"] else float("nan")
        log(f"{n_checks} HTTP + {n_checks} TTL checks, {window:.0f} s window: agent cpu {cpu['agent']:.1f}% (server "
            f"{cpu['server']:.1f}%, target {cpu['target']:.1f}%); probes {rate:.0f}/s of expected {EXPECTED_RPS:.0f}/s "
            f"(drift {100 * (rate / EXPECTED_RPS - 1):+.1f}%); agent/bare-httpx CPU ratio {ratio:.2f}")

        # 5. visibility of a state change on the server
        fl = asyncio.run(flip_visibility(cport, http_port, flips))
        out["flips"] = fl
        log(f"TTL pass -> visible on server (blocking query): {fl['seen']}/{fl['flips']} seen, p50 {fl['p50_ms']:.0f} ms "
            f"p99 {fl['p99_ms']:.0f} ms max {fl['max_ms']:.0f} ms")

        log("\n## summary")
        log("| metric | measured | baseline | target | met |")
        log("|---|---|---|---|---|")
        log(f"| agent CPU, {n_checks} HTTP + {n_checks} TTL checks | {cpu['agent']:.1f} % of a core | idle agent {out['idle']['agent']:.1f} %; "
            f"bare httpx at {EXPECTED_RPS:.0f}/s {res['cpu_pct']:.1f} % (ratio {ratio:.2f}) | < 25 % | "
            f"{'yes' if cpu['agent'] < 25 else 'NO'} |")
        log(f"| probes/s achieved | {rate:.0f} ({100 * (rate / EXPECTED_RPS - 1):+.1f} %) | bare httpx {res['rate']:.0f} | "
            f"{EXPECTED_RPS:.0f} | - |")
        log(f"| check flip -> visible on server p50 / p99 | {fl['p50_ms']:.0f} / {fl['p99_ms']:.0f} ms ({fl['seen']}/{fl['flips']}) "
            f"| - | p99 <= 500 ms | {'yes' if fl['p99_ms'] <= 500 and not fl['missed'] else 'NO'} |")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        log(f"\n# total runtime {time.monotonic() - t_start:.0f} s")
        return 0
    except BaseException:
        for a in agents:
            print(f"--- {a.name}\n{a.tail(3000)}", file=sys.stderr)
        raise
    finally:
        for a in agents:
            a.kill()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
