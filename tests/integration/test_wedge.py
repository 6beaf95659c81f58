"""A server whose journal is damaged reports itself broken, and wipe-and-rejoin repairs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from procs import Cluster, wait_until

pytestmark = pytest.mark.slow


def raft_health(server) -> dict:  # noqa: ANN001
    checks = server.get("/v1/agent/checks").json()
    return checks.get("raft_health", {})


def test_damaged_journal_is_detected_and_wipe_and_rejoin_repairs(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 3).start()
    try:
        leader = cluster.leader_proc()
        victim = next(s for s in cluster.servers if s is not leader)
        with httpx.Client(timeout=10) as client:
            for i in range(200):
                assert client.put(f"{leader.url}/v1/kv/wedge/{i:03d}", content=b"value").json() is True
        wait_until(lambda: len(victim.get("/v1/kv/wedge/?keys&stale").json()) == 200, 10, what="replicated")
        wait_until(lambda: raft_health(victim).get("Status") == "passing", 15, what="raft_health passing")
        victim.kill()
        # Damage one committed command in the victim's journal, as a torn write or bad sector would.
        journal = tmp_path / victim.name / "raft" / "raft.journal"
        data = bytearray(journal.read_bytes())
        at = data.find(b'"Key":"wedge/100"')
        assert at > 0
        data[at] = ord("!")
        journal.write_bytes(bytes(data))
        victim.start()
        victim.wait_ready()
        # Right after the restart the check may say "no cluster leader" first; wait for the diagnosis.
        wait_until(lambda: raft_health(victim).get("Status") == "critical"
                   and "damaged log entries" in raft_health(victim).get("Output", ""), 20, 0.2, "damage reported")
        stats = victim.get("/v1/agent/self").json()["Stats"]["raft"]
        assert stats["healthy"] == "false" and "damaged" in stats["health_reason"]
        assert "damaged" in victim.get("/v1/operator/raft/configuration").json()["Raft"]["wedged"]
        # Wipe and rejoin, as docs/operations.md says.
        victim.kill()
        assert leader.get("/v1/status/leader").json()
        resp = httpx.delete(f"{leader.url}/v1/operator/raft/peer", params={"address": victim.raft_addr}, timeout=15)
        assert resp.status_code == 200, resp.text
        shutil.rmtree(tmp_path / victim.name)
        (tmp_path / victim.name).mkdir()
        victim.args = [a for a in victim.args if a not in ("-bootstrap-expect", "3")]
        victim.start()
        victim.wait_ready(40)
        wait_until(lambda: victim.raft_addr in leader.get("/v1/status/peers").json(), 20, what="rejoined")
        wait_until(lambda: len(victim.get("/v1/kv/wedge/?keys&stale").json()) == 200, 30, what="data back")
        wait_until(lambda: raft_health(victim).get("Status") == "passing", 20, 0.2, "healthy again")
    finally:
        cluster.stop()
