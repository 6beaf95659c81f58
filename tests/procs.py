"""Starting and stopping real `lictor agent` processes on loopback for tests and benchmarks.

Every process is started by us, tracked by pid, and killed only by that pid.
"""

from __future__ import annotations

import base64
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LICTOR = [sys.executable, "-m", "lictor.cli"]


# Ports for the processes we start come from OUTSIDE the kernel's ephemeral range. A port picked
# by binding port 0 is an ephemeral one, and between our check and the child's bind the kernel may
# hand it to any outgoing connection (the tests make thousands), so the child's bind fails or a
# client owns the port. Below the ephemeral range only explicit binds take ports; each process walks
# the window from a random start with its own counter, and bind-checks each candidate (TCP and UDP,
# DNS ports are both) to skip ones in use.
_EPHEMERAL_DEFAULT = (32768, 60999)
_WINDOW_FLOOR = 20000
_SIDECAR_PORTS = range(21000, 21256)  # the agent assigns sidecar ports from here (agent/definitions.py)


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's ip_local_port_range (inclusive), or Linux's default if unreadable."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return low, high


def _reserved_ports() -> set[int]:
    """ip_local_reserved_ports: ports someone has set aside ("8080,9000-9100")."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text().strip()
    except OSError:
        return set()
    reserved: set[int] = set()
    for part in filter(None, text.split(",")):
        try:
            low, _, high = part.partition("-")
            reserved.update(range(int(low), int(high or low) + 1))
        except ValueError:
            continue
    return reserved


def _port_window() -> list[int]:
    low, high = ephemeral_port_range()
    below, above = range(_WINDOW_FLOOR, low), range(high + 1, 65536)
    skip = _reserved_ports()
    return [p for p in max(below, above, key=len) if p not in skip and p not in _SIDECAR_PORTS]


_WINDOW = _port_window()
_NEXT = itertools.count(int.from_bytes(os.urandom(4), "big"))  # per process, from a random start


def port_is_free(port: int) -> bool:
    """Can 127.0.0.1:port be bound for TCP and for UDP? SO_REUSEADDR stays off, so listeners,
    connected sockets and TIME_WAIT leftovers all count as in use."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port() -> int:
    """A port no one holds now, outside the ephemeral range, not handed out before by this process
    (until the window wraps)."""
    for _ in range(len(_WINDOW)):
        port = _WINDOW[next(_NEXT) % len(_WINDOW)]
        if port_is_free(port):
            return port
    if _WINDOW:
        raise RuntimeError(f"no free port in {_WINDOW[0]}..{_WINDOW[-1]}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room outside the ephemeral range
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def cluster_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll `predicate` until it returns a truthy value; bounded in time."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling through transient errors
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


@dataclass
class AgentProc:
    name: str
    http_port: int
    args: list[str]
    log_path: Path
    raft_port: int = 0
    dns_port: int = 0
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def raft_addr(self) -> str:
        return f"127.0.0.1:{self.raft_port}"

    def start(self) -> AgentProc:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        env = dict(os.environ) | self.env
        self.proc = subprocess.Popen(LICTOR + ["agent", *self.args], stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str, **kwargs) -> httpx.Response:  # noqa: ANN003
        return httpx.get(self.url + path, timeout=kwargs.pop("timeout", 10.0), **kwargs)

    def put(self, path: str, **kwargs) -> httpx.Response:  # noqa: ANN003
        return httpx.put(self.url + path, timeout=kwargs.pop("timeout", 10.0), **kwargs)

    def leader(self) -> str:
        try:
            resp = self.get("/v1/status/leader", timeout=2.0)
        except httpx.HTTPError:
            return ""
        return resp.json() if resp.status_code == 200 else ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            return self.get("/v1/agent/self", timeout=1.0).status_code == 200

        wait_until(ready, timeout, 0.1, f"{self.name} ready")

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


class Cluster:
    """N server agents forming one Raft cluster, each with its own ports and data dir."""

    def __init__(self, root: Path, size: int = 3, extra_args: list[str] | None = None) -> None:
        self.root = root
        self.key = cluster_key()
        self.extra_args = list(extra_args or [])
        self.servers: list[AgentProc] = []
        ports = free_ports(size * 2)
        for i in range(size):
            self.servers.append(self._make(f"s{i + 1}", ports[2 * i], ports[2 * i + 1], size))
        join = [a for s in self.servers for a in ("-retry-join", s.http_addr)]
        for server in self.servers:
            server.args += join

    def _make(self, name: str, http_port: int, raft_port: int, expect: int) -> AgentProc:
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "-server", "-bootstrap-expect", str(expect), "-node", name, "-data-dir", str(data_dir),
            "-bind", "127.0.0.1", "-http-port", str(http_port), "-raft-port", str(raft_port),
            "-encrypt", self.key, "-dns-port", "-1", *self.extra_args,
        ]
        return AgentProc(name, http_port, args, self.root / f"{name}.log", raft_port=raft_port)

    def add_server(self, name: str) -> AgentProc:
        http_port, raft_port = free_ports(2)
        server = self._make(name, http_port, raft_port, 0)
        server.args = [a for a in server.args if a not in ("-bootstrap-expect", "0")]
        server.args += ["-retry-join", self.servers[0].http_addr]
        self.servers.append(server)
        return server

    def start(self, timeout: float = 40.0) -> Cluster:
        for server in self.servers:
            server.start()
        self.wait_leader(timeout)
        return self

    def running(self) -> list[AgentProc]:
        return [s for s in self.servers if s.alive()]

    def wait_leader(self, timeout: float = 30.0) -> str:
        def agreed() -> str:
            leaders = {s.leader() for s in self.running()}
            if len(leaders) == 1 and "" not in leaders:
                leader = leaders.pop()
                # The leader has announced itself (its catalog entry) once writes work there.
                return leader
            return ""

        return wait_until(agreed, timeout, 0.1, "one agreed leader")

    def leader_proc(self) -> AgentProc:
        leader = self.wait_leader()
        return next(s for s in self.servers if s.raft_addr == leader)

    def stop(self) -> None:
        for server in self.servers:
            server.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.tail()}" for s in self.servers)


@contextmanager
def running_dev_agent(root: Path, name: str, *extra: str, node: str = "dev") -> Iterator[AgentProc]:
    """A `lictor agent -dev` on free HTTP and DNS ports, ready; killed by pid on the way out."""
    http_port, dns_port = free_ports(2)
    agent = AgentProc(name, http_port, ["-dev", "-node", node, "-http-port", str(http_port), "-dns-port",
                                        str(dns_port), *extra], root / f"{name}.log", dns_port=dns_port)
    agent.start()
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.kill()
