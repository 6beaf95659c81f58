"""CPU per API operation across the whole cluster (issue #9's soak: where its CPU goes).

    .venv/bin/python bench/op_cost.py            # [--n 1000] [--concurrency 1,8,32]

Starts 3 servers and 2 client agents on loopback, fills the catalog the soak reads (540 services
of 5 names from 180 "clients"), then runs each operation `--n` times from one sequential keep-alive
client and reports the wall time per operation and the CPU (utime+stime of every process) it cost
each process. The baseline beside each write is the read it is compared with: a KV GET at the
same server. `--concurrency` adds KV PUT rows at the leader and at a follower from that many
concurrent keep-alive clients: a Raft entry's fixed cost is shared only by writes that meet, so the
CPU per write depends on how many arrive together. Every process is started here and killed by pid
on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RawConn, cpu_seconds, exit_on_sigterm, machine  # noqa: E402
from procs import AgentProc, Cluster  # noqa: E402
from soak import SERVICE_NAMES, start_client_agents  # noqa: E402


class Client:
    """One keep-alive connection per agent, requests one at a time."""

    def __init__(self, procs: dict[str, AgentProc]) -> None:
        self.procs = procs
        self.conns: dict[str, http.client.HTTPConnection] = {}

    def request(self, name: str, method: str, path: str, body: bytes | None = None) -> int:
        conn = self.conns.get(name)
        if conn is None:
            conn = self.conns[name] = http.client.HTTPConnection("127.0.0.1", self.procs[name].http_port, timeout=30)
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        resp.read()
        return resp.status


def cpu_by_process(procs: dict[str, AgentProc]) -> dict[str, float]:
    return {name: cpu_seconds(p.proc.pid) for name, p in procs.items() if p.proc is not None}


def cpu_per_op(procs: dict[str, AgentProc], n: int, work: Callable[[], None]) -> tuple[float, dict[str, float], str]:
    """Run `work` (n operations) between two CPU samples of every process: (wall seconds, ms of CPU
    per operation by process, the non-trivial shares as text)."""
    time.sleep(1.0)  # let the previous operation's replication and anti-entropy settle
    before = cpu_by_process(procs)
    start = time.monotonic()
    work()
    wall = time.monotonic() - start
    time.sleep(0.5)  # followers apply and answer after the client got its reply
    after = cpu_by_process(procs)
    per_process = {name: (after[name] - before[name]) / n * 1e3 for name in before}
    parts = ", ".join(f"{name} {ms:.2f}" for name, ms in per_process.items() if ms >= 0.02)
    return wall, per_process, parts


def measure(procs: dict[str, AgentProc], label: str, n: int, op: Callable[[int], None]) -> dict[str, float]:
    def work() -> None:
        for i in range(n):
            op(i)

    wall, per_process, parts = cpu_per_op(procs, n, work)
    total = sum(per_process.values())
    print(f"{label:48s} {wall / n * 1e3:6.2f} ms wall   CPU {total:5.2f} ms/op  ({parts})", flush=True)
    return {"wall_ms": wall / n * 1e3, "cpu_ms": total, **{f"cpu_ms_{k}": v for k, v in per_process.items()}}


def concurrent_puts(procs: dict[str, AgentProc], target: str, clients: int, n: int, prefix: str
                    ) -> dict[str, float]:
    """`n` KV PUTs at `target` from `clients` concurrent keep-alive connections, n / clients each."""
    per = max(1, n // clients)

    async def run() -> None:
        conns = [RawConn("127.0.0.1", procs[target].http_port) for _ in range(clients)]

        async def one(k: int) -> None:
            for i in range(per):
                status, _, _ = await conns[k].request("PUT", f"/v1/kv/{prefix}/{k}/{i}", b"v")
                assert status == 200, status

        try:
            await asyncio.gather(*(one(k) for k in range(clients)))
        finally:
            for conn in conns:
                conn.close()

    total_ops = per * clients
    wall, per_process, parts = cpu_per_op(procs, total_ops, lambda: asyncio.run(run()))
    label = f"PUT /v1/kv/<key> at {target}, {clients} concurrent"
    print(f"{label:48s} {total_ops / wall:6.0f} /s     CPU {sum(per_process.values()):5.2f} ms/op  ({parts})", flush=True)
    return {"ops_per_s": total_ops / wall, "cpu_ms": sum(per_process.values()),
            **{f"cpu_ms_{k}": v for k, v in per_process.items()}}


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="operations per row")
    parser.add_argument("--concurrency", default="", help="comma-separated client counts for concurrent PUT rows")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lictor-opcost-"))
    cluster = Cluster(root, 3)
    agents: list[AgentProc] = []
    try:
        cluster.start(60)
        agents = start_client_agents(root, cluster, 2)
        procs = {p.name: p for p in cluster.servers + agents}
        client = Client(procs)
        leader = cluster.leader_proc().name
        follower = next(s.name for s in cluster.servers if s.name != leader)
        print(f"# op_cost: {machine()}; leader {leader}, reads at follower {follower}", flush=True)
        number = 0
        for owner in range(180):  # the soak's catalog: 3 services per client, tag w<client>
            for _ in range(3):
                number += 1
                service = {"Name": random.choice(SERVICE_NAMES), "ID": f"cost-w{owner}-{number}", "Port": 1000 + number,
                           "Tags": [f"w{owner}"], "Meta": {"client": str(owner)}}
                client.request(random.choice([a.name for a in agents]), "PUT", "/v1/agent/service/register",
                               json.dumps(service).encode())
        name = SERVICE_NAMES[0]
        n = args.n
        results: dict[str, dict[str, float]] = {}

        def row(label: str, count: int, op: Callable[[int], None]) -> None:
            results[label] = measure(procs, label, count, op)

        row(f"GET /v1/kv/<key> at {follower}", n, lambda i: client.request(follower, "GET", "/v1/kv/cost/x"))
        row(f"GET /v1/catalog/services at {follower}", n,
            lambda i: client.request(follower, "GET", "/v1/catalog/services"))
        row(f"GET /v1/health/service/{name} at {follower}", n,
            lambda i: client.request(follower, "GET", f"/v1/health/service/{name}"))
        row(f"GET /v1/health/service/{name} via c1", n, lambda i: client.request("c1", "GET", f"/v1/health/service/{name}"))
        row(f"PUT /v1/kv/<key> at the leader {leader}", n,
            lambda i: client.request(leader, "PUT", f"/v1/kv/cost/l{i}", b"v"))
        row(f"PUT /v1/kv/<key> at {follower}", n, lambda i: client.request(follower, "PUT", f"/v1/kv/cost/f{i}", b"v"))
        row("PUT /v1/kv/<key> via c1", n // 2, lambda i: client.request("c1", "PUT", f"/v1/kv/cost/c{i}", b"v"))

        def replace(i: int) -> None:
            if i:
                client.request("c1", "PUT", f"/v1/agent/service/deregister/cost-x-{i - 1}")
            service = {"Name": name, "ID": f"cost-x-{i}", "Port": 1, "Tags": ["w1"], "Meta": {"client": "1"}}
            client.request("c1", "PUT", "/v1/agent/service/register", json.dumps(service).encode())

        row("deregister + register via c1 (one pair)", n // 2, replace)
        for clients in [int(c) for c in args.concurrency.split(",") if c.strip()]:
            for target in (leader, follower):
                results[f"PUT at {target}, {clients} concurrent"] = concurrent_puts(
                    procs, target, clients, 2 * n, f"cost/c{clients}-{target}")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "leader": leader, "rows": results}, indent=1))
    finally:
        for proc in cluster.servers + agents:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
