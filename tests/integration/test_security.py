"""Strangers on the Raft port: garbage, a malicious pickle, replayed cluster traffic and a pysyncobj
node with the wrong key (even one claiming a member's address) change nothing, and the cluster
keeps working. Plus the HTTP limits: slow clients, big heads and bodies, request rate, blocking queries."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from procs import AgentProc, Cluster, free_ports, wait_until

MARKER = Path("/tmp/lictor-raft-pwned-marker")


class _Pwn:
    """Unpickling this would create MARKER: proof that a server unpickled a stranger's bytes."""

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(MARKER), "w"))


def _frame(payload: bytes) -> bytes:
    return struct.pack("i", len(payload)) + payload


def _send_and_drain(addr: tuple[str, int], data: bytes, wait: float = 0.5) -> bytes:
    """Send bytes to a Raft port; return whatever comes back before the server hangs up."""
    got = b""
    try:
        with socket.create_connection(addr, timeout=2) as sock:
            sock.sendall(data)
            sock.settimeout(wait)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                got += chunk
    except OSError:
        pass
    return got


def _kv_state(proc: AgentProc) -> tuple[str, list[tuple[str, str | None]]]:
    resp = proc.get("/v1/kv/?recurse&consistent", timeout=5)
    return resp.headers.get("X-Consul-Index", ""), [(e["Key"], e["Value"]) for e in resp.json()]


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 3).start()
    try:
        yield c
    finally:
        c.stop()


def test_strangers_cannot_touch_raft(cluster3: Cluster) -> None:
    MARKER.unlink(missing_ok=True)
    leader = cluster3.leader_proc()
    assert leader.put("/v1/kv/before", content=b"1").json() is True
    wait_until(lambda: all(s.get("/v1/kv/before?stale").status_code == 200 for s in cluster3.servers), 10, 0.1, "replicated")
    # pysyncobj nodes dial only peers whose address sorts lower than theirs: stop the lowest, so
    # both others dial its port.
    victim = min(cluster3.servers, key=lambda s: s.raft_addr)
    others = [s for s in cluster3.servers if s is not victim]
    index_before, kv_before = _kv_state(leader)

    # 1. Capture real cluster traffic: stop one server and listen on its Raft port; its peers
    #    reconnect to us and send their (encrypted) opening message.
    victim.kill()
    captured: list[bytes] = []
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", victim.raft_port))
    listener.listen(8)
    listener.settimeout(0.5)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and len(captured) < 2:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(1.0)
        data = b""
        try:
            while len(data) < 4 or len(data) < 4 + struct.unpack("i", data[:4])[0]:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        conn.close()
        if data:
            captured.append(data)
    listener.close()
    assert captured, "no server connected to the stopped peer's port"

    # 2. Replay what was captured, twice in a row and spliced, to every live server.
    for target in others:
        addr = ("127.0.0.1", target.raft_port)
        for blob in captured:
            _send_and_drain(addr, blob)
            _send_and_drain(addr, blob + blob)
            _send_and_drain(addr, blob + _frame(pickle.dumps(("x" * 32, ["appendEntries"]))))

    # 3. Garbage, a malicious pickle (plain and zlib-wrapped, as pysyncobj frames it), a lying length.
    evil = pickle.dumps(_Pwn())
    payloads = [
        os.urandom(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        _frame(evil),
        _frame(zlib.compress(evil)),
        _frame(zlib.compress(pickle.dumps(("readonly",)))),
        struct.pack("i", 2**31 - 1) + os.urandom(1024),
        struct.pack("i", -5) + os.urandom(16),
    ]
    for target in others:
        for payload in payloads:
            _send_and_drain(("127.0.0.1", target.raft_port), payload, wait=0.3)

    # 4. A real pysyncobj node with the wrong key, claiming to be the stopped member, tries to
    #    win elections and append entries for a few seconds.
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class Intruder(SyncObj):
        def __init__(self, self_addr: str, partners: list[str]) -> None:
            conf = SyncObjConf(password="not-the-cluster-key", raftMinTimeout=0.4, raftMaxTimeout=0.8,
                               connectionRetryTime=0.3, dynamicMembershipChange=True)
            super().__init__(self_addr, partners, conf=conf)
            self.value = 0

        @replicated
        def bump(self) -> int:
            self.value += 1
            return self.value

    intruder = Intruder(victim.raft_addr, [s.raft_addr for s in others])
    try:
        end = time.monotonic() + 4
        while time.monotonic() < end:
            intruder.bump()  # queued; it can only commit with a quorum that will never answer
            time.sleep(0.2)
        # No quorum ever answered it: it never led, never committed.
        assert intruder._getLeader() is None and intruder.value == 0  # noqa: SLF001
    finally:
        intruder.destroy()
    time.sleep(1.0)  # let the port go

    # Nothing was unpickled, the live servers still agree on a leader among themselves,
    # the data is exactly as before, and writes still commit.
    assert not MARKER.exists(), "a server unpickled a stranger's payload"
    leader_addr = wait_until(lambda: {s.leader() for s in others} == {others[0].leader()} and others[0].leader(),
                             15, 0.1, "live servers agree on a leader")
    assert leader_addr in {s.raft_addr for s in others}
    current = next(s for s in others if s.raft_addr == leader_addr)
    assert _kv_state(current) == (index_before, kv_before)
    assert current.put("/v1/kv/after", content=b"2").json() is True
    # The real member comes back and catches up: the cluster is whole.
    victim.start()
    wait_until(lambda: victim.get("/v1/kv/after?stale", timeout=1).status_code == 200, 30, 0.2, "victim caught up")
    wait_until(lambda: len({s.leader() for s in cluster3.servers}) == 1, 15, 0.1, "one leader")
    for proc in cluster3.servers:
        assert proc.alive(), proc.tail()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_a_stranger_declaring_a_huge_raft_frame_is_cut_off(cluster3: Cluster) -> None:
    """pysyncobj buffers whatever length a frame declares; before the key handshake we allow 4 KiB."""
    target = cluster3.servers[0]
    assert target.proc is not None
    rss_before = _rss_kib(target.proc.pid)
    sent_per_try = []
    for _ in range(5):
        sent = 0
        try:
            with socket.create_connection(("127.0.0.1", target.raft_port), timeout=2) as sock:
                sock.sendall(struct.pack("i", 1 << 30))  # "a 1 GiB frame follows"
                chunk = os.urandom(64 * 1024)
                deadline = time.monotonic() + 5
                while sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
                    sock.sendall(chunk)
                    sent += len(chunk)
        except OSError:
            pass  # reset by the server: what we want
        sent_per_try.append(sent)
    # The server hung up long before 64 MiB (what got through is what the socket buffers held).
    assert max(sent_per_try) < 16 * 1024 * 1024, sent_per_try
    assert _rss_kib(target.proc.pid) - rss_before < 16 * 1024, "the server buffered the stranger's frame"
    text = httpx.get(target.url + "/v1/agent/metrics?format=prometheus", timeout=5).text
    assert 'lictor_limit_refusals_total{kind="raft_frame"}' in text
    # The cluster is unharmed.
    leader = cluster3.leader_proc()
    assert leader.put("/v1/kv/still-fine", content=b"1").json() is True
    wait_until(lambda: all(s.get("/v1/kv/still-fine?stale").status_code == 200 for s in cluster3.servers), 10, 0.1,
               "replicated")


# -- HTTP limits ---------------------------------------------------------------------------------------------


@pytest.fixture
def limited_agent(tmp_path: Path) -> Iterator[AgentProc]:
    http_port, dns_port = free_ports(2)
    agent = AgentProc(
        "lim", http_port,
        ["-dev", "-node", "lim", "-http-port", str(http_port), "-dns-port", str(dns_port),
         "-http-header-timeout", "1s", "-http-max-header-bytes", "8192", "-http-max-body", "65536",
         "-http-rate-limit", "20", "-http-rate-burst", "40", "-http-max-blocking-per-client", "3",
         "-max-services", "3"],
        tmp_path / "lim.log", dns_port=dns_port,
    )
    agent.start()
    try:
        wait_until(lambda: agent.get("/v1/status/leader", timeout=1).status_code == 200, 30, 0.1, "agent up")
        time.sleep(2.5)  # refill the bucket the readiness polling used
        yield agent
    finally:
        agent.kill()


def test_slowloris_is_disconnected(limited_agent: AgentProc) -> None:
    head = b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n"
    with socket.create_connection(("127.0.0.1", limited_agent.http_port), timeout=5) as sock:
        start = time.monotonic()
        answer = b""
        for byte in head + b"X-Slow: " + b"a" * 20:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.25)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk or b"408" in answer:
                break
        elapsed = time.monotonic() - start
    assert b"408" in answer and elapsed < 3.0, (answer, elapsed)
    # An idle connection that never sends a byte is closed too.
    with socket.create_connection(("127.0.0.1", limited_agent.http_port), timeout=5) as sock:
        sock.settimeout(3)
        assert b"408" in sock.recv(4096)


def test_head_deadline_on_a_kept_alive_connection(limited_agent: AgentProc) -> None:
    """The 1 s head deadline restarts with each request: quick requests for longer than it and an idle
    pause longer than it keep the connection, and a later slow head still gets its 408."""
    request = b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\n"

    def answer(sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b'"'):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        return data

    with socket.create_connection(("127.0.0.1", limited_agent.http_port), timeout=5) as sock:
        deadline = time.monotonic() + 2.5
        count = 0
        while time.monotonic() < deadline:
            sock.sendall(request)
            assert answer(sock).startswith(b"HTTP/1.1 200"), count
            count += 1
            time.sleep(0.05)
        time.sleep(1.5)  # idle between requests: the keep-alive timeout's business, not the head's
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        sock.sendall(b"GET /v1/status/leader HTTP/1.1\r\n")  # a head that never ends
        sock.settimeout(4)
        late = sock.recv(4096)
        assert b"408" in late and time.monotonic() - start < 2.5, late


def test_big_heads_and_bodies_are_refused(limited_agent: AgentProc) -> None:
    resp = httpx.get(limited_agent.url + "/v1/status/leader", headers={"X-Big": "a" * 20000})
    assert resp.status_code == 431
    resp = httpx.put(limited_agent.url + "/v1/kv/big", content=b"x" * 100_000)
    assert resp.status_code == 413 and "too large" in resp.text

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 8192

    resp = httpx.put(limited_agent.url + "/v1/kv/big", content=chunks())  # chunked: no Content-Length
    assert resp.status_code == 413
    assert limited_agent.get("/v1/kv/big").status_code == 404


def test_services_per_agent_cap(limited_agent: AgentProc) -> None:
    for i in range(3):
        assert limited_agent.put("/v1/agent/service/register", json={"Name": f"s{i}"}).status_code == 200
    resp = limited_agent.put("/v1/agent/service/register", json={"Name": "s3"})
    assert resp.status_code == 429 and "Too many services" in resp.text
    assert limited_agent.put("/v1/agent/service/register", json={"Name": "s1", "Port": 9}).status_code == 200


def test_blocking_query_cap_per_client(limited_agent: AgentProc) -> None:
    index = limited_agent.get("/v1/catalog/services").headers["X-Consul-Index"]
    results: list[int] = []

    def block() -> None:
        r = httpx.get(limited_agent.url + f"/v1/catalog/services?index={index}&wait=3s", timeout=10)
        results.append(r.status_code)

    threads = [threading.Thread(target=block) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    resp = httpx.get(limited_agent.url + f"/v1/catalog/services?index={index}&wait=3s", timeout=10)
    assert resp.status_code == 429 and "blocking" in resp.text
    for t in threads:
        t.join()
    assert results == [200, 200, 200]


def test_rate_limit_per_client(limited_agent: AgentProc) -> None:
    codes = []
    with httpx.Client() as http:
        for _ in range(120):
            codes.append(http.get(limited_agent.url + "/v1/status/leader").status_code)
    assert 429 in codes and codes[0] == 200
    refused = next(c for c in codes if c == 429)
    assert refused == 429
    time.sleep(1.5)
    assert httpx.get(limited_agent.url + "/v1/status/leader").status_code == 200
    text = httpx.get(limited_agent.url + "/v1/agent/metrics?format=prometheus").text
    assert 'lictor_limit_refusals_total{kind="rate"}' in text
