"""One bare pysyncobj node (SyncObj + ReplDict), the baseline of bench/cluster_bench.py.

Same SyncObjConf as registry/raft.py where it matters: appendEntriesUseBatch=False, password,
journal + full-dump files, raftMin/MaxTimeout 0.8/2.0, connectionRetryTime 1.0,
leaderFallbackTimeout 2.5, dynamicMembershipChange=True, logCompactionSplit=False.

Driven through stdin, one JSON reply line per command on stdout:
  status                  -> {"leader": bool, "term": int, "leader_addr": str|null, ...}
  bench <writers> <secs>  -> writes with <writers> threads calling d.set(key, value, sync=True)
                             for <secs> seconds (as raft-engine.md section 2): n, wps, p50/p99 ms
  quit
Usage: python raw_pysyncobj_node.py SELF_ADDR PEER1,PEER2 DATA_DIR PASSWORD
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.batteries import ReplDict


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))]


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    self_addr, peers, data_dir, password = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
    os.makedirs(data_dir, exist_ok=True)
    conf = SyncObjConf(
        appendEntriesUseBatch=False,
        journalFile=os.path.join(data_dir, "raft.journal"),
        fullDumpFile=os.path.join(data_dir, "raft.dump"),
        raftMinTimeout=0.8,
        raftMaxTimeout=2.0,
        connectionRetryTime=1.0,
        leaderFallbackTimeout=2.5,
        dynamicMembershipChange=True,
        password=password,
        logCompactionMinEntries=5000,
        logCompactionMinTime=300,
        logCompactionSplit=False,
        commandsWaitLeader=True,
    )
    d = ReplDict()
    node = SyncObj(self_addr, [p for p in peers if p and p != self_addr], conf=conf, consumers=[d])
    value = json.dumps({"Node": "n", "Address": "10.0.0.1", "Service": {"ID": "web", "Service": "bench", "Port": 80}})

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        if parts[0] == "status":
            st = node.getStatus()
            leader = st.get("leader")
            reply({"leader": st["state"] == 2, "term": st["raft_term"], "leader_addr": str(leader) if leader else None,
                   "commit_idx": st["commit_idx"], "has_quorum": st["has_quorum"]})
        elif parts[0] == "bench":
            writers, secs = int(parts[1]), float(parts[2])
            lat: list[list[float]] = [[] for _ in range(writers)]
            errors = [0] * writers
            stop_at = time.monotonic() + secs
            term0 = node.getStatus()["raft_term"]

            def work(w: int, stop_at: float = stop_at, writers: int = writers,
                     lat: list[list[float]] = lat, errors: list[int] = errors) -> None:
                i = 0
                while time.monotonic() < stop_at and i < 1_000_000:
                    t0 = time.perf_counter()
                    try:
                        d.set(f"k-{writers}-{w}-{i}", value, sync=True, timeout=5)
                        lat[w].append(time.perf_counter() - t0)
                    except Exception:  # noqa: BLE001 - count and continue
                        errors[w] += 1
                    i += 1

            c0, t0 = cpu(), time.monotonic()
            threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(secs + 30)
            dt = time.monotonic() - t0
            all_lat = [x for ls in lat for x in ls]
            reply({"writers": writers, "n": len(all_lat), "secs": dt, "wps": len(all_lat) / dt,
                   "p50_ms": pct(all_lat, 50) * 1000, "p99_ms": pct(all_lat, 99) * 1000, "errors": sum(errors),
                   "cpu_pct": 100 * (cpu() - c0) / dt, "term_before": term0, "term_after": node.getStatus()["raft_term"]})
        else:
            reply({"error": f"unknown command {parts[0]}"})
    node.destroy()


if __name__ == "__main__":
    main()
