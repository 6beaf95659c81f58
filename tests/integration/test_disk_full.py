"""A disk that fills up: nothing acknowledged is lost, the full process says why, and it recovers.

Each test puts one process's data dir on a small tmpfs of its own (mounting needs root, as on CI
and the dev boxes; elsewhere the tests skip and say so):
- a server whose disk fills stops with a message and exit status 74 instead of dying of SIGBUS or
  acknowledging entries it could not store; the other two keep the quorum, and once the disk has
  room again the server starts, catches up and has every acknowledged write;
- a client agent whose disk fills refuses registrations with a 507 that names the cause, applies
  nothing it could not store, takes registrations again as soon as there is room, and after a
  SIGKILL and restart has exactly what it acknowledged.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from procs import AgentProc, Cluster, free_ports, wait_until

from lictor.registry.raft import STORAGE_FAILED_EXIT


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small disk")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=10)


def test_a_server_whose_disk_fills_stops_with_a_message_and_loses_nothing(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 3)
    victim = cluster.servers[2]
    with small_disk(tmp_path / victim.name, "2m") as disk:
        try:
            cluster.start(60)
            others = [s for s in cluster.servers if s is not victim]
            acked: list[str] = []
            value = b"v" * 8000  # ~250 of these fill the victim's 2 MiB

            def put(i: int) -> None:
                key = f"fill/{i:04d}"
                try:
                    resp = others[i % 2].put(f"/v1/kv/{key}", content=value, timeout=10)
                except httpx.HTTPError:
                    return  # not acknowledged
                if resp.status_code == 200 and resp.json() is True:
                    acked.append(key)

            i = 0
            while victim.alive() and i < 1000:
                put(i)
                i += 1
            assert victim.proc is not None
            assert victim.proc.wait(10) == STORAGE_FAILED_EXIT, victim.tail()
            log = victim.tail(4000)
            assert "No space left on device" in log and "This server stops" in log, log
            assert "Traceback" not in log, log
            # The other two keep the quorum (electing a leader if the victim was it).
            cluster.wait_leader(30)
            before = len(acked)
            for j in range(i, i + 50):
                put(j)
            assert len(acked) - before == 50, cluster.logs()

            grow(disk, "64m")
            victim.start()
            victim.wait_ready(30)

            def has_all(server: AgentProc) -> bool:
                resp = server.get("/v1/kv/fill/?keys&stale", timeout=5)
                return resp.status_code == 200 and set(acked) <= set(resp.json())

            for server in cluster.servers:
                wait_until(lambda server=server: has_all(server), 60, 0.25, f"{server.name} has every acked key")
            assert cluster.servers[0].put("/v1/kv/after", content=b"1", timeout=10).json() is True
        finally:
            cluster.stop()


def test_an_agent_whose_disk_fills_refuses_changes_and_keeps_what_it_acked(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 1)
    port = free_ports(1)[0]
    with small_disk(tmp_path / "c1", "1m") as disk:
        agent = AgentProc("c1", port, ["-node", "c1", "-data-dir", str(disk), "-http-port", str(port), "-dns-port", "-1",
                                       "-retry-join", cluster.servers[0].http_addr], tmp_path / "c1.log")
        try:
            cluster.start(60)
            agent.start()
            agent.wait_ready(40)
            acked: list[str] = []
            refusals: list[httpx.Response] = []
            for i in range(400):  # ~4 KiB each: the 1 MiB disk fills after a few dozen
                body = {"Name": "big", "ID": f"big-{i}", "Port": 1000 + i, "Meta": {f"k{j}": "v" * 500 for j in range(8)}}
                resp = agent.put("/v1/agent/service/register", content=json.dumps(body))
                if resp.status_code == 200:
                    acked.append(f"big-{i}")
                else:
                    refusals.append(resp)
                    if len(refusals) >= 5:
                        break
            assert acked and refusals, "the disk never filled"
            for resp in refusals:
                assert resp.status_code == 507, resp.text
                assert "disk is full" in resp.text and str(disk) in resp.text, resp.text
            # Refused means not applied: neither the agent nor the catalog has a refused service.
            assert sorted(agent.get("/v1/agent/services").json()) == sorted(acked)
            # A deregistration may or may not find room (SQLite reuses its write-ahead log), but it is
            # applied exactly when it is acknowledged.
            resp = agent.put("/v1/agent/service/deregister/big-0")
            assert resp.status_code in (200, 507), resp.text
            if resp.status_code == 200:
                acked.remove("big-0")
            assert sorted(agent.get("/v1/agent/services").json()) == sorted(acked)

            grow(disk, "64m")  # room again: the same agent takes changes without a restart
            later = {"Name": "later", "ID": "later-1", "Port": 80}
            assert agent.put("/v1/agent/service/register", content=json.dumps(later)).status_code == 200
            acked.append("later-1")

            agent.kill()
            agent.start()
            agent.wait_ready(40)
            assert sorted(agent.get("/v1/agent/services").json()) == sorted(acked)
            wait_until(lambda: sorted(e["ServiceID"] for e in cluster.servers[0].get("/v1/catalog/service/big?stale").json())
                       == sorted(a for a in acked if a.startswith("big-")),
                       30, 0.25, "the catalog has the agent's acknowledged services")
        finally:
            agent.kill()
            cluster.stop()
