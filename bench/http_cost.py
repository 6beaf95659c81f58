"""Instructions per cached HTTP read on a dev agent, against a bare uvicorn app in the same run.

    .venv/bin/python bench/http_cost.py                 # [--n 300] [--against OTHER_PYTHON] [--json out.json]

Wall-clock CPU per request moves ±30 % on a shared VM from one minute to the next; instruction
counts do not. Every process runs under `valgrind --tool=callgrind --instr-atstart=no`; counting is
switched on after start-up, each endpoint gets 50 warm-up requests, then `--n` sequential keep-alive
requests are counted (all threads: event loop, Raft tick, metrics). The baseline is the floor of the
same stack: uvicorn with httptools and uvloop serving a fixed 2 KiB JSON body from a bare ASGI
callable. `--against` also measures the lictor of another checkout (its venv's python) in the same
run, for an A/B of two versions. Every process is started here and killed by pid on exit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import callgrind_control, callgrind_dump, exit_on_sigterm, machine  # noqa: E402
from procs import free_ports  # noqa: E402

ENDPOINTS = ["/v1/kv/bench", "/v1/catalog/services", "/v1/health/service/web", "/v1/status/leader"]
BLOCKING = "blocking round of /v1/catalog/services"  # a watcher's answer plus its re-armed request
BARE_APP = """
import sys, uvicorn
BODY = b'{"bench":"' + b"x" * 2048 + b'"}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools", loop="uvloop",
            log_level="warning", access_log=False, lifespan="off")
"""


def wait_ready(port: int, path: str, timeout: float = 300.0) -> None:
    """Under valgrind a start takes a while: poll until `path` answers 200 with a non-empty body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status == 200 and body not in (b"", b'""'):
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"nothing answered on port {port} within {timeout:.0f}s")


def count(root: Path, pid: int, conn: http.client.HTTPConnection, path: str, n: int) -> float:
    """Ir of all threads per request for `n` GETs of `path`."""
    for _ in range(50):
        conn.request("GET", path)
        conn.getresponse().read()
    callgrind_control(pid, "-z")
    for _ in range(n):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, (path, resp.status)
    total, _main, _files = callgrind_dump(root, pid)
    return total / n


def valgrind(root: Path, argv: list[str]) -> subprocess.Popen:
    # cwd: `python -m lictor.cli` run from a checkout would import that checkout's package first
    return subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "-q", "--separate-threads=yes",
         f"--callgrind-out-file={root}/cg.%p.out", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
    )


def measure_lictor(python: str, n: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="lictor-httpcost-"))
    (port,) = free_ports(1)
    proc = valgrind(root, [python, "-m", "lictor.cli", "agent", "-dev", "-http-port", str(port), "-dns-port", "-1"])
    try:
        wait_ready(port, "/v1/status/leader")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("PUT", "/v1/kv/bench", body=b"v" * 64)
        conn.getresponse().read()
        for i in range(20):  # a health answer of 20 instances, a catalog of one name
            service = {"Name": "web", "ID": f"web{i}", "Port": 1000 + i, "Tags": [f"t{i % 4}"]}
            conn.request("PUT", "/v1/agent/service/register", body=json.dumps(service).encode())
            conn.getresponse().read()
        time.sleep(3)  # anti-entropy settles before anything is counted
        callgrind_control(proc.pid, "-i", "on")
        out = {path: count(root, proc.pid, conn, path, n) for path in ENDPOINTS}
        out[BLOCKING] = blocking_round(root, proc.pid, port, conn)
        return out
    finally:
        proc.kill()
        proc.wait(30)


def blocking_round(root: Path, pid: int, port: int, conn: http.client.HTTPConnection,
                   watchers: int = 4, writes: int = 40) -> float:
    """Ir per blocking-query round: `writes` catalog registrations counted with `watchers` parked
    blocking queries on /v1/catalog/services (each write answers every one of them, and each re-arms),
    minus the same writes counted with no watcher, divided by the rounds the watchers saw."""
    stop = threading.Event()
    rounds = [0] * watchers
    seen = [0] * watchers

    def watch(slot: int) -> None:
        wconn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        index = 0
        while not stop.is_set():
            wconn.request("GET", f"/v1/catalog/services?index={index}&wait=120s")
            resp = wconn.getresponse()
            resp.read()
            index = int(resp.headers.get("X-Consul-Index", "0"))
            seen[slot] = index
            rounds[slot] += 1
        wconn.close()

    def write(i: int) -> int:
        body = {"Node": "bench-blocking", "Address": "127.0.0.1", "Service": {"Service": f"blk{i}", "ID": f"blk{i}"}}
        conn.request("PUT", "/v1/catalog/register", body=json.dumps(body).encode())
        resp = conn.getresponse()
        resp.read()
        conn.request("GET", "/v1/catalog/services")
        resp = conn.getresponse()
        resp.read()
        return int(resp.headers["X-Consul-Index"])

    def settle(index: int) -> None:
        deadline = time.monotonic() + 120
        while min(seen) < index and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # under valgrind: let every watcher's next request park before the next write

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(watchers)]
    for t in threads:
        t.start()
    settle(write(0))
    callgrind_control(pid, "-z")
    start_rounds = sum(rounds)
    for i in range(1, writes + 1):
        settle(write(i))
    with_watchers, _main, _files = callgrind_dump(root, pid)
    counted = sum(rounds) - start_rounds
    stop.set()
    settle(write(writes + 1))
    for t in threads:
        t.join(60)
    for i in range(writes + 2, 2 * writes + 2):  # the same writes, nobody watching
        write(i)
        time.sleep(0.5)
    callgrind_control(pid, "-z")
    for i in range(2 * writes + 2, 3 * writes + 2):
        write(i)
        time.sleep(0.5)
    alone, _main, _files = callgrind_dump(root, pid)
    return (with_watchers - alone) / max(counted, 1)


def measure_bare(n: int) -> float:
    root = Path(tempfile.mkdtemp(prefix="lictor-httpcost-bare-"))
    (port,) = free_ports(1)
    proc = valgrind(root, [sys.executable, "-c", BARE_APP, str(port)])
    try:
        wait_ready(port, "/")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        callgrind_control(proc.pid, "-i", "on")
        return count(root, proc.pid, conn, "/", n)
    finally:
        proc.kill()
        proc.wait(30)


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="counted requests per endpoint")
    parser.add_argument("--against", default="", help="python of another checkout's venv, measured too")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    print(f"# http_cost: {machine()}; {args.n} requests per endpoint", flush=True)
    bare = measure_bare(args.n)
    print(f"bare uvicorn + httptools app, 2 KiB JSON            {bare / 1e3:8.0f} k instructions/request", flush=True)
    results: dict[str, dict[str, float]] = {"this": measure_lictor(sys.executable, args.n)}
    if args.against:
        results["against"] = measure_lictor(args.against, args.n)
    for path in [*ENDPOINTS, BLOCKING]:
        ours = results["this"][path]
        line = f"lictor GET {path:40s} {ours / 1e3:8.0f} k  ({ours / bare:.2f}x the bare app)"
        if args.against:
            other = results["against"][path]
            line += f"   against: {other / 1e3:.0f} k, this/against {ours / other:.3f}"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "n": args.n, "bare": bare, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
