"""Issue #2: write throughput/latency, leader failover and blocking-query fan-out on 3 loopback
server processes, against raw pysyncobj (3 bare SyncObj+ReplDict processes) in the same run.

Usage:  .venv/bin/python bench/cluster_bench.py [--quick] [--secs 5] [--watchers 1000] [--json OUT]

Phases (all on 127.0.0.1, every process started here and killed by pid in `finally`):
  1. BASELINE raw pysyncobj: writers threads doing d.set(k, v, sync=True) inside the leader
     process (raft-engine.md section 2) at 1/8/64 writers.
  2. Lictor: 3 `lictor agent -server` processes.
     a. 1,000 blocking queries on /v1/health/service/web spread round-robin over the 3 servers,
        one change, time until all returned (catalog nearly empty).
     b. PUT /v1/catalog/register (distinct node + service per request) at 1/8/64 keep-alive
        connections to the leader, and 8 to a follower; p50/p99, term changes, CPU per process.
     c. (before b) the same 1,000 watchers again with --fill-nodes (1,000) nodes in the catalog.
     d. SIGKILL the leader (3 trials, the killed server restarted on its data dir in between):
        time to a new leader and to the first committed write issued after the kill.
The load generator runs in this process (uvloop + raw keep-alive HTTP/1.1, bench/common.py); its
CPU is printed with every phase so you can see it is not the bottleneck.
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
from common import (  # noqa: E402
    REPO,
    CpuMeter,
    RawConn,
    exit_on_sigterm,
    free_ports_safe,
    install_uvloop,
    pct,
    print_machine,
)
from procs import Cluster, cluster_key, wait_until  # noqa: E402

TARGETS = {"ratio64": 0.60, "p99_8_ms": 15.0, "failover_s": 3.0, "watch_max_ms": 250.0}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# baseline: raw pysyncobj
# ------------------------------------------------------------------------------------------------


class RawNode:
    def __init__(self, addr: str, peers: list[str], data_dir: Path, password: str, log_path: Path) -> None:
        self.addr = addr
        self.log_f = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "raw_pysyncobj_node.py"), addr, ",".join(peers), str(data_dir), password],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_f, text=True, bufsize=1,
        )

    def ask(self, line: str) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"raw node {self.addr} died")
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.log_f.close()


def run_baseline(root: Path, concurrencies: list[int], secs: float) -> dict[int, dict]:
    ports = free_ports_safe(3)
    addrs = [f"127.0.0.1:{p}" for p in ports]
    password = cluster_key()
    nodes: list[RawNode] = []
    results: dict[int, dict] = {}
    try:
        for i, addr in enumerate(addrs):
            nodes.append(RawNode(addr, addrs, root / f"raw{i}", password, root / f"raw{i}.log"))

        def leader() -> RawNode | None:
            st = [n.ask("status") for n in nodes]
            leaders = [n for n, s in zip(nodes, st, strict=True) if s["leader"] and s["has_quorum"]]
            return leaders[0] if len(leaders) == 1 and all(s["leader_addr"] == leaders[0].addr for s in st) else None

        lead = wait_until(leader, 30, 0.1, "raw pysyncobj leader")
        lead.ask("bench 4 0.5")  # warm-up: connections, journal files
        for c in concurrencies:
            meter = CpuMeter({f"raw{i}" + ("*" if n is lead else ""): n.proc.pid for i, n in enumerate(nodes)}).start()
            r = lead.ask(f"bench {c} {secs}")
            r["cpu"] = meter.stop()
            results[c] = r
            log(f"raw pysyncobj  writers={c:3d}  {r['wps']:8.0f} writes/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms"
                f"  errors {r['errors']}  term {r['term_before']}->{r['term_after']}  cpu% "
                + " ".join(f"{k}={v:.0f}" for k, v in r["cpu"].items()))
            lead = wait_until(leader, 30, 0.1, "raw pysyncobj leader")
        for n in nodes:
            try:
                n.ask("quit")
            except Exception:  # noqa: BLE001
                pass
    finally:
        for n in nodes:
            n.kill()
    return results


# ------------------------------------------------------------------------------------------------
# Lictor
# ------------------------------------------------------------------------------------------------


def reg_body(node: str, service: str = "bench", sid: str | None = None) -> bytes:
    return json.dumps({"Node": node, "Address": "10.1.0.1",
                       "Service": {"ID": sid or service, "Service": service, "Port": 8080, "Tags": ["b"]}}).encode()


async def get_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], object]:
    conn = RawConn("127.0.0.1", port)
    try:
        status, headers, body = await conn.request("GET", path, timeout=timeout)
        return status, headers, (json.loads(body) if body and status == 200 else body)
    finally:
        conn.close()


async def terms(cluster: Cluster) -> dict[str, int]:
    out = {}
    for s in cluster.running():
        try:
            status, _, body = await get_json(s.http_port, "/v1/operator/raft/configuration")
            out[s.name] = int(body["Raft"]["term"]) if status == 200 else -1  # type: ignore[index]
        except Exception:  # noqa: BLE001
            out[s.name] = -1
    return out


async def load_phase(cluster: Cluster, target_port: int, clients: int, secs: float, tag: str) -> dict:
    pids = {s.name: s.proc.pid for s in cluster.running()}  # type: ignore[union-attr]
    pids["loadgen"] = os.getpid()
    term0 = await terms(cluster)
    lat: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + secs

    async def client(c: int) -> None:
        conn = RawConn("127.0.0.1", target_port)
        i = 0
        try:
            while time.monotonic() < stop_at and i < 1_000_000:
                body = reg_body(f"{tag}-{c}-{i}", sid=f"svc-{c}-{i}")
                t0 = time.perf_counter()
                try:
                    status, _, data = await conn.request("PUT", "/v1/catalog/register", body, timeout=10.0)
                except Exception as exc:  # noqa: BLE001
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await asyncio.sleep(0.05)
                    i += 1
                    continue
                if status == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    key = f"{status} {data[:60].decode(errors='replace')}"
                    errors[key] = errors.get(key, 0) + 1
                i += 1
        finally:
            conn.close()

    meter = CpuMeter(pids).start()
    t0 = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    dt = time.monotonic() - t0
    cpu = meter.stop()
    term1 = await terms(cluster)
    return {"clients": clients, "n": len(lat), "secs": dt, "wps": len(lat) / dt, "p50_ms": pct(lat, 50) * 1000,
            "p99_ms": pct(lat, 99) * 1000, "max_ms": max(lat, default=0) * 1000, "errors": errors, "cpu": cpu,
            "term_before": max(term0.values()), "term_after": max(term1.values())}


async def watch_phase(cluster: Cluster, leader_port: int, n: int, tag: str) -> dict:
    """n blocking queries spread round-robin over all servers, then one change via the leader."""
    servers = cluster.running()
    idx = {}
    for s in servers:
        status, headers, _ = await get_json(s.http_port, "/v1/health/service/web")
        assert status == 200, status
        idx[s.http_port] = int(headers["x-consul-index"])
    returned: list[float | None] = [None] * n
    saw_change: list[bool] = [False] * n
    errors: list[str] = []
    conns = [RawConn("127.0.0.1", servers[i % len(servers)].http_port) for i in range(n)]
    node = f"web-{tag}"
    # Open connections first (bounded concurrency) so the measurement is only the wake-up.
    sem = asyncio.Semaphore(100)

    async def opened(c: RawConn) -> None:
        async with sem:
            await c.connect()

    await asyncio.gather(*(opened(c) for c in conns))

    change_sent = [0.0]
    reparked = [0]

    async def watcher(i: int) -> None:
        c = conns[i]
        index = idx[c.port]
        try:
            for _ in range(20):  # bounded; re-park when a return was not caused by our change
                status, headers, body = await c.request("GET", f"/v1/health/service/web?index={index}&wait=60s", timeout=90)
                if change_sent[0] or node.encode() in body:
                    break
                reparked[0] += 1
                index = int(headers.get("x-consul-index", index))
            returned[i] = time.perf_counter()
            saw_change[i] = status == 200 and node.encode() in body
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
        finally:
            c.close()

    tasks = [asyncio.create_task(watcher(i)) for i in range(n)]
    await asyncio.sleep(3.0)  # let every request reach its server and park
    early = reparked[0]
    pids = {s.name: s.proc.pid for s in servers}  # type: ignore[union-attr]
    pids["loadgen"] = os.getpid()
    meter = CpuMeter(pids).start()
    writer = RawConn("127.0.0.1", leader_port)
    await writer.connect()
    t0 = time.perf_counter()
    change_sent[0] = t0
    status, _, _ = await writer.request("PUT", "/v1/catalog/register", reg_body(node, "web", f"web-{tag}"), timeout=60)
    t_ack = time.perf_counter()
    writer.close()
    await asyncio.wait(tasks, timeout=75)
    cpu = meter.stop()
    wake = [(r - t0) * 1000 for r in returned if r is not None]
    return {"watchers": n, "servers": len(servers), "early_returns": early, "reparked_before_change": early, "write_status": status,
            "write_ms": (t_ack - t0) * 1000, "returned": len(wake), "saw_change": sum(saw_change),
            "p50_ms": pct(wake, 50), "p99_ms": pct(wake, 99), "max_ms": max(wake, default=float("nan")),
            "errors": len(errors), "error_sample": errors[:3], "cpu": cpu}


async def failover_trial(cluster: Cluster, trial: int) -> dict:
    leader = cluster.leader_proc()
    survivors = [s for s in cluster.servers if s is not leader and s.alive()]
    killed_raft = leader.raft_addr
    results: list[tuple[float, float, int]] = []  # (start, end, status)
    t_kill = [0.0]
    new_leader_at: list[float] = []
    done = asyncio.Event()

    async def one(port: int, k: int) -> None:
        conn = RawConn("127.0.0.1", port)
        start = time.perf_counter()
        try:
            status, _, _ = await conn.request("PUT", "/v1/catalog/register", reg_body(f"fo-{trial}-{k}", sid="fo"), timeout=10)
        except Exception:  # noqa: BLE001
            status = 0
        finally:
            conn.close()
        end = time.perf_counter()
        results.append((start, end, status))
        if status == 200 and t_kill[0] and start >= t_kill[0]:
            done.set()

    async def spawner() -> None:
        tasks = []
        k = 0
        while not done.is_set() and k < 1000:
            tasks.append(asyncio.create_task(one(survivors[k % 2].http_port, k)))
            k += 1
            await asyncio.sleep(0.02)
        await asyncio.wait(tasks, timeout=12)

    async def leader_poll() -> None:
        conns = [RawConn("127.0.0.1", s.http_port) for s in survivors]
        try:
            for _ in range(1000):
                if t_kill[0]:
                    for c in conns:
                        try:
                            st, _, body = await c.request("GET", "/v1/status/leader", timeout=1)
                            ldr = json.loads(body) if st == 200 else ""
                        except Exception:  # noqa: BLE001
                            ldr = ""
                        if ldr and ldr != killed_raft:
                            new_leader_at.append(time.perf_counter())
                            return
                await asyncio.sleep(0.02)
        finally:
            for c in conns:
                c.close()

    spawn = asyncio.create_task(spawner())
    poll = asyncio.create_task(leader_poll())
    await asyncio.sleep(0.5)  # steady writes before the kill
    assert leader.proc is not None
    t_kill[0] = time.perf_counter()
    os.kill(leader.proc.pid, signal.SIGKILL)
    try:
        await asyncio.wait_for(done.wait(), 15)
    except TimeoutError:
        pass
    await asyncio.wait([poll], timeout=5)
    await spawn
    leader.proc.wait(10)
    ok_after = [e for s, e, st in results if st == 200 and s >= t_kill[0]]
    ok_before = sum(1 for s, e, st in results if st == 200 and s < t_kill[0])
    return {"trial": trial, "killed": leader.name,
            "new_leader_s": (new_leader_at[0] - t_kill[0]) if new_leader_at else float("nan"),
            "first_write_s": (min(ok_after) - t_kill[0]) if ok_after else float("nan"),
            "writes_ok_before_kill": ok_before, "failed_requests": sum(1 for _, _, st in results if st != 200),
            "killed_proc": leader}


async def fill(port: int, count: int, streams: int = 16) -> None:
    async def stream(c: int) -> None:
        conn = RawConn("127.0.0.1", port)
        try:
            for i in range(c, count, streams):
                await conn.request("PUT", "/v1/catalog/register", reg_body(f"fill-{i}", sid=f"fill-{i}"), timeout=30)
        finally:
            conn.close()

    await asyncio.gather(*(stream(c) for c in range(streams)))


def wait_writable(cluster: Cluster, timeout: float = 40.0) -> None:
    ldr = cluster.leader_proc()

    def ok() -> bool:
        return ldr.put("/v1/catalog/register", content=reg_body("warmup"), timeout=3).status_code == 200

    wait_until(ok, timeout, 0.2, "a committed write")


def restart(cluster: Cluster, proc) -> None:  # noqa: ANN001
    proc.start()
    proc.wait_ready(40)

    def settled() -> bool:
        ldr = cluster.wait_leader(30)
        lp = next(s for s in cluster.servers if s.raft_addr == ldr)
        raft = lp.get("/v1/operator/raft/configuration", timeout=2).json()["Raft"]
        return all(raft.get("partners", {}).values()) and len(raft.get("partners", {})) == 2

    wait_until(settled, 40, 0.2, "restarted server reconnected")
    wait_writable(cluster)


# ------------------------------------------------------------------------------------------------


def fmt_cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.0f}" for k, v in cpu.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s phases, 1 failover trial (< 1 min)")
    ap.add_argument("--secs", type=float, default=None)
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--fill-nodes", type=int, default=1000, help="catalog size for the second watcher phase")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--json", type=str, default=None, help="also write all results here")
    args = ap.parse_args()
    secs = args.secs or (2.0 if args.quick else 5.0)
    trials = args.trials or (1 if args.quick else 3)
    conc = [1, 8, 64]
    loop_kind = install_uvloop()
    exit_on_sigterm()
    print_machine()
    log(f"# load generator: this process, {loop_kind}, raw keep-alive HTTP/1.1; phase {secs:.0f} s")
    root = Path(tempfile.mkdtemp(prefix="lictor-cluster-bench-"))
    out: dict = {"secs": secs}
    cluster: Cluster | None = None
    t_start = time.monotonic()
    try:
        log("\n## baseline: raw pysyncobj (3 processes, writers in the leader process)")
        out["raw"] = run_baseline(root, conc, secs)

        log("\n## lictor: 3 server agents")
        cluster = Cluster(root / "lictor", 3)
        cluster.start(60)
        wait_writable(cluster)
        leader = cluster.leader_proc()
        follower = next(s for s in cluster.servers if s is not leader)
        log(f"leader {leader.name} ({leader.raft_addr}); follower used for the follower phase: {follower.name}")

        asyncio.run(fill(leader.http_port, 1, 1))  # one registered node, then let start-up writes settle
        cluster.servers[0].put("/v1/catalog/register", content=reg_body("web-0", "web", "web-0"))
        time.sleep(2.0)
        r = asyncio.run(watch_phase(cluster, leader.http_port, args.watchers, "empty"))
        out["watch_empty"] = r
        log(f"watchers (catalog ~empty)   {r['returned']}/{r['watchers']} returned over {r['servers']} servers, saw change "
            f"{r['saw_change']}, re-parked {r['early_returns']}: p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms "
            f"max {r['max_ms']:.0f} ms (write ack {r['write_ms']:.1f} ms) cpu% {fmt_cpu(r['cpu'])}")

        # Same 1,000 watchers once the catalog holds --fill-nodes registered nodes (the view scan
        # is O(catalog) per watcher per wake-up, see docs/benchmarks.md).
        asyncio.run(fill(leader.http_port, args.fill_nodes))
        _, _, nodes = asyncio.run(get_json(leader.http_port, "/v1/catalog/nodes?stale"))
        out["catalog_nodes"] = len(nodes) if isinstance(nodes, list) else -1
        r = asyncio.run(watch_phase(cluster, leader.http_port, args.watchers, "full"))
        out["watch_full"] = r
        log(f"watchers (catalog {out['catalog_nodes']} nodes) {r['returned']}/{r['watchers']} returned, saw change "
            f"{r['saw_change']}, re-parked {r['early_returns']}: p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms "
            f"max {r['max_ms']:.0f} ms (write ack {r['write_ms']:.1f} ms) cpu% {fmt_cpu(r['cpu'])}")

        out["ours"] = {}
        for c in conc:
            r = asyncio.run(load_phase(cluster, leader.http_port, c, secs, f"L{c}"))
            out["ours"][c] = r
            log(f"lictor -> leader   clients={c:3d}  {r['wps']:8.0f} writes/s  p50 {r['p50_ms']:6.2f} ms  p99 "
                f"{r['p99_ms']:6.2f} ms  max {r['max_ms']:6.0f} ms  errors {r['errors'] or 0}  term "
                f"{r['term_before']}->{r['term_after']}  cpu% {fmt_cpu(r['cpu'])}")
            leader = cluster.leader_proc()
            follower = next(s for s in cluster.servers if s is not leader)
        r = asyncio.run(load_phase(cluster, follower.http_port, 8, secs, "F8"))
        out["follower8"] = r
        log(f"lictor -> follower clients=  8  {r['wps']:8.0f} writes/s  p50 {r['p50_ms']:6.2f} ms  p99 "
            f"{r['p99_ms']:6.2f} ms  max {r['max_ms']:6.0f} ms  errors {r['errors'] or 0}  term "
            f"{r['term_before']}->{r['term_after']}  cpu% {fmt_cpu(r['cpu'])}")

        out["failover"] = []
        for t in range(trials):
            r = asyncio.run(failover_trial(cluster, t))
            proc = r.pop("killed_proc")
            out["failover"].append(r)
            log(f"failover trial {t + 1}: killed {r['killed']}  new leader after {r['new_leader_s']:.2f} s  first committed "
                f"write after {r['first_write_s']:.2f} s  ({r['writes_ok_before_kill']} ok before kill, "
                f"{r['failed_requests']} requests failed)")
            if t < trials - 1:
                restart(cluster, proc)

        summarize(out)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        log(f"\n# total runtime {time.monotonic() - t_start:.0f} s")
        return 0
    except BaseException:
        if cluster is not None:
            print(cluster.logs()[-4000:], file=sys.stderr)
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def summarize(out: dict) -> None:
    log("\n## summary")
    log("| clients | lictor writes/s | raw writes/s | ratio | lictor p50 / p99 ms | raw p50 / p99 ms | terms (lictor) |")
    log("|---|---|---|---|---|---|---|")
    for c, r in out["ours"].items():
        raw = out["raw"][c]
        log(f"| {c} | {r['wps']:.0f} | {raw['wps']:.0f} | {r['wps'] / raw['wps']:.2f} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | "
            f"{raw['p50_ms']:.2f} / {raw['p99_ms']:.2f} | {r['term_before']}->{r['term_after']} |")
    f8 = out["follower8"]
    log(f"| 8 via follower | {f8['wps']:.0f} | - | {f8['wps'] / out['raw'][8]['wps']:.2f} | {f8['p50_ms']:.2f} / {f8['p99_ms']:.2f} | - | "
        f"{f8['term_before']}->{f8['term_after']} |")
    fo = [t["first_write_s"] for t in out["failover"]]
    wf = out["watch_full"]
    we = out["watch_empty"]
    ratio64 = out["ours"][64]["wps"] / out["raw"][64]["wps"]
    p99_8 = out["ours"][8]["p99_ms"]
    log("\n| target | measured | met |")
    log("|---|---|---|")
    log(f"| writes/s at 64 clients >= 60 % of raw | {100 * ratio64:.0f} % | {'yes' if ratio64 >= 0.6 else 'NO'} |")
    log(f"| p99 write latency at 8 clients <= 15 ms | {p99_8:.1f} ms | {'yes' if p99_8 <= 15 else 'NO'} |")
    log(f"| failover (kill -> first committed write) <= 3 s | {', '.join(f'{x:.2f}' for x in fo)} s | "
        f"{'yes' if all(x <= 3 for x in fo) else 'NO'} |")
    for label, w in (("empty catalog", we), (f"{out['catalog_nodes']}-node catalog", wf)):
        ok = w["returned"] == w["watchers"] and w["max_ms"] <= 250
        log(f"| {w['watchers']} watchers all woken <= 250 ms ({label}) | max {w['max_ms']:.0f} ms "
            f"({w['returned']} returned) | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    raise SystemExit(main())
