"""Shared helpers for the Lictor benchmarks: machine info, percentiles, per-pid CPU, and a tiny
keep-alive HTTP/1.1 client on raw asyncio streams.

Why not httpx for the load generator: on this box httpx.AsyncClient tops out far below what the
servers can take (see /work/shared/perf-anchors.md, headline 1), so it would measure itself. The
client below does one request at a time per connection, parses only the status line and
Content-Length / chunked framing, and is cheap enough that its CPU is reported next to every result.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # procs.py: AgentProc / Cluster (read-only use)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "kernel": platform.release(),
    }


def print_machine() -> None:
    m = machine()
    print(f"# machine: nproc={m['nproc']} cpu={m['cpu']!r} python={m['python']} kernel={m['kernel']} date={m['date']}")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_seconds(pid: int) -> float:
    """cutime+cstime: CPU of reaped children (unused by default, kept for completeness)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


class CpuMeter:
    """CPU % of one core for a set of pids between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = 0.0
        self.c0: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        out = _box()
        for name, pid in self.pids.items():
            try:
                out[name] = cpu_seconds(pid)
            except (OSError, IndexError):
                out[name] = float("nan")
        return out

    def start(self) -> CpuMeter:
        self.t0, self.c0 = time.monotonic(), self._read()
        return self

    def stop(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        c1 = self._read()
        res = {name: 100.0 * (c1[name] - self.c0[name]) / dt for name in self.pids}
        # Whole box, in % of one core: everything busy (ours + other users of this shared VM) and
        # hypervisor steal. `other` = box busy minus the processes measured here.
        res["box"] = 100.0 * (c1["_busy"] - self.c0["_busy"]) / dt
        res["steal"] = 100.0 * (c1["_steal"] - self.c0["_steal"]) / dt
        res["other"] = res["box"] - sum(v for k, v in res.items() if k in self.pids)
        return res


def _box() -> dict[str, float]:
    """Aggregate /proc/stat cpu line: busy (incl. steal) and steal, in core-seconds."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return {"_busy": (user + nice + system + irq + softirq + steal) / CLK_TCK, "_steal": steal / CLK_TCK}


class HTTPError(Exception):
    pass


class RawConn:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.reader = None

    async def request(self, method: str, path: str, body: bytes = b"", timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            await self.connect()
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, HTTPError):
            self.close()
            raise

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self.writer is not None and self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            data = b"".join(parts)
        else:
            raise HTTPError("response without length")
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, data


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks kill the processes we started."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def install_uvloop() -> str:
    try:
        import uvloop

        uvloop.install()
        return "uvloop"
    except ImportError:
        return "asyncio"


def free_ports_safe(count: int) -> list[int]:
    from procs import free_ports

    return free_ports(count)


# -- callgrind (this VM has no hardware counters: instructions come from valgrind) --------------------


def callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=300)


def callgrind_dump(root: Path, pid: int) -> tuple[int, int, list[Path]]:
    """Dump `pid`'s counters (callgrind then zeroes them): (Ir of all threads, Ir of the main thread, files).

    Threads are dumped apart (`--separate-threads=yes`): thread 1 is the event loop, the others the
    exporter (and any worker) threads."""
    before = set(root.glob(f"cg.{pid}.out.*"))
    callgrind_control(pid, "-d")
    files = sorted(set(root.glob(f"cg.{pid}.out.*")) - before)
    total = main = 0
    for f in files:
        m = re.search(r"^(?:totals|summary): (\d+)", f.read_text(errors="replace"), re.M)
        assert m is not None, f
        total += int(m.group(1))
        if f.name.endswith("-01"):
            main += int(m.group(1))
    return total, main, files
