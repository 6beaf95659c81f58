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
import socket
import struct
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


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of a response head (status line to the blank line)."""
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


def request_bytes(method: str, path: str, host: str, port: int, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + body


class _KeepAliveConn:
    """What both connections share: connected on first use, and closed when a request fails or
    times out (the stream is out of step after that)."""

    failures: tuple[type[BaseException], ...] = (TimeoutError, OSError, HTTPError)

    def is_open(self) -> bool:
        raise NotImplementedError

    async def connect(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    async def request(self, method: str, path: str, body: bytes = b"", timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        if not self.is_open():
            await self.connect()
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout)
        except self.failures:
            self.close()
            raise


class RawConn(_KeepAliveConn):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    failures = (TimeoutError, OSError, asyncio.IncompleteReadError, HTTPError)

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def is_open(self) -> bool:
        return self.writer is not None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.reader = None

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self.writer is not None and self.reader is not None
        self.writer.write(request_bytes(method, path, self.host, self.port, body))
        status, headers = parse_head(await self.reader.readuntil(b"\r\n\r\n"))
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


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; the cmsg carries a struct timespec


class StampedConn(_KeepAliveConn):
    """RawConn's interface on a bare socket whose arriving data the kernel timestamps (SO_TIMESTAMPNS).

    After each request, `wire_seconds` runs from the moment the request was handed to the kernel to
    the moment the last segment of its answer reached this socket: the servers' time, without the
    delay before this process's event loop got round to reading it. On a 2-core box the load
    generator shares the cores with the five agents, and its own loop lag (p99 ~1.4 ms in a loaded
    soak, ~0 unloaded) was in every latency it measured; a client on another host would not see it.
    `client_seconds` is the latency as the caller saw it (parse done), for the report beside it.
    """

    failures = (TimeoutError, OSError, HTTPError, ValueError, IndexError)

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.wire_seconds = 0.0
        self.client_seconds = 0.0
        self._arrived_ns = 0
        self._anc_size = socket.CMSG_SPACE(16)

    def is_open(self) -> bool:
        return self.sock is not None

    async def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buffer.clear()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self.sock is not None
        data = request_bytes(method, path, self.host, self.port, body)
        sent_ns, started = time.time_ns(), time.monotonic()
        sent = self.sock.send(data)
        if sent < len(data):
            await asyncio.get_running_loop().sock_sendall(self.sock, data[sent:])
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        status, headers = parse_head(bytes(self.buffer[: end + 4]))
        del self.buffer[: end + 4]
        if "content-length" in headers:
            size = int(headers["content-length"])
            while len(self.buffer) < size:
                await self._fill()
            payload = bytes(self.buffer[:size])
            del self.buffer[:size]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            payload = await self._chunked()
        else:
            raise HTTPError("response without length")
        # The newest segment read completed the answer (TCP reports the last one's stamp).
        self.wire_seconds = (self._arrived_ns - sent_ns) / 1e9
        self.client_seconds = time.monotonic() - started
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, payload

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            while (eol := self.buffer.find(b"\r\n")) < 0:
                await self._fill()
            size = int(bytes(self.buffer[:eol]).strip().split(b";")[0], 16)
            while len(self.buffer) < eol + 2 + size + 2:
                await self._fill()
            parts.append(bytes(self.buffer[eol + 2: eol + 2 + size]))
            del self.buffer[: eol + 2 + size + 2]
            if size == 0:
                return b"".join(parts)

    async def _fill(self) -> None:
        """One recvmsg into the buffer, waiting for the socket to be readable if it is not yet."""
        sock = self.sock
        assert sock is not None
        while True:
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(262144, self._anc_size)
                break
            except BlockingIOError:
                await self._readable(sock)
        if not data:
            raise ConnectionResetError("connection closed by the server")
        self._arrived_ns = time.time_ns()  # replaced by the kernel's stamp, which Linux always sends
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", cdata[:16])
                self._arrived_ns = sec * 1_000_000_000 + nsec
        self.buffer += data

    @staticmethod
    async def _readable(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(fd)


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
