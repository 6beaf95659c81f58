"""Three real server processes on loopback, driven by py-consul and httpx.

Covers what the cluster promises: nothing acknowledged is lost through SIGKILL of the leader or
of every server, or while the leader is cut off and comes back, a lagging follower catches up by snapshot, membership changes at run time, and
no quorum answers 500 "No cluster leader" instead of hanging.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import consul
import httpx
import pytest
from procs import Cluster, wait_until

pytestmark = pytest.mark.slow


def kv_client(server) -> consul.Consul:  # noqa: ANN001
    return consul.Consul(host="127.0.0.1", port=server.http_port, connections_timeout=10)


def write_stream(urls: list[str], prefix: str, stop: threading.Event, acked: list[str], errors: list[str],
                 timeout: float = 5.0, shun_for: float = 0.0) -> None:
    """Write keys one after another, each retried on another server until acknowledged. With
    `shun_for`, a server that failed to answer is avoided for that long, as a client would."""
    shunned: dict[str, float] = {}  # url -> until when it is avoided
    i = 0
    with httpx.Client(timeout=timeout) as client:
        while not stop.is_set() and i < 5000:
            key = f"{prefix}/{i:05d}"
            for attempt in range(60):
                fresh = [u for u in urls if shunned.get(u, 0) < time.monotonic()] or urls
                url = fresh[(i + attempt) % len(fresh)]
                try:
                    resp = client.put(f"{url}/v1/kv/{key}", content=key.encode())
                except httpx.HTTPError as exc:
                    if shun_for:
                        shunned[url] = time.monotonic() + shun_for
                    errors.append(repr(exc))
                    continue
                if resp.status_code == 200 and resp.json() is True:
                    acked.append(key)
                    break
                errors.append(f"{resp.status_code} {resp.text[:80]}")
                time.sleep(0.1)
            i += 1


def all_keys(server, prefix: str) -> set[str]:  # noqa: ANN001
    resp = server.get(f"/v1/kv/{prefix}?keys&stale", timeout=10.0)
    if resp.status_code == 404:
        return set()
    assert resp.status_code == 200, resp.text
    return set(resp.json())


def test_cluster_forms_and_replicates(cluster: Cluster) -> None:
    c = kv_client(cluster.servers[1])
    assert c.kv.put("hello", "world")
    for server in cluster.servers:
        wait_until(lambda s=server: kv_client(s).kv.get("hello", consistency="stale")[1], 5, what="replicated key")
    assert kv_client(cluster.servers[2]).kv.get("hello", consistency="consistent")[1]["Value"] == b"world"
    peers = kv_client(cluster.servers[0]).status.peers()
    assert sorted(peers) == sorted(s.raft_addr for s in cluster.servers)
    config = cluster.servers[0].get("/v1/operator/raft/configuration").json()
    assert sum(1 for s in config["Servers"] if s["Leader"]) == 1
    wait_until(lambda: {s["Node"] for s in cluster.servers[0].get("/v1/operator/raft/configuration").json()["Servers"]}
               == {"s1", "s2", "s3"}, 10, what="server names")
    index, services = kv_client(cluster.servers[0]).catalog.services()
    assert "consul" in services


def test_followers_do_not_repeat_unchanged_acks_and_the_cluster_stays_sound(cluster: Cluster) -> None:
    """Each committed entry reaches a follower twice (the entry, then its commit index); the second
    acknowledgement said nothing new and is no longer sent. Writes at the leader and forwarded from a
    follower still complete, every server has every key, and the leadership never moves."""
    leader = cluster.leader_proc()
    follower = next(s for s in cluster.servers if s is not leader)
    term = leader.get("/v1/operator/raft/configuration").json()["Raft"]["term"]
    with httpx.Client(timeout=10.0) as client:
        for i in range(200):
            target = leader if i % 2 == 0 else follower
            resp = client.put(f"{target.url}/v1/kv/acks/{i:03d}", content=b"x")
            assert resp.status_code == 200 and resp.json() is True, resp.text
    for server in cluster.servers:
        wait_until(lambda s=server: len(all_keys(s, "acks/")) == 200, 10, what=f"200 keys on {server.name}")
    statuses = {s.name: s.get("/v1/operator/raft/configuration").json()["Raft"] for s in cluster.servers}
    assert {st["term"] for st in statuses.values()} == {term}
    assert statuses[leader.name]["state"] == "leader"
    for name, st in statuses.items():
        if name != leader.name:
            # ~one skipped per entry (the commit-index round), heartbeats and the first write aside
            assert st["acks_skipped"] >= 150, (name, st)
    assert statuses[leader.name]["acks_skipped"] == 0  # the leader never acknowledges
    metrics = follower.get("/v1/agent/metrics?format=prometheus").text
    assert "lictor_raft_acks_skipped_total" in metrics


def test_leader_killed_during_writes_loses_nothing(cluster: Cluster) -> None:
    urls = [s.url for s in cluster.servers]
    stop, acked, errors = threading.Event(), [], []
    writers = [threading.Thread(target=write_stream, args=(urls, f"w{n}", stop, acked, errors)) for n in range(4)]
    for w in writers:
        w.start()
    wait_until(lambda: len(acked) >= 400, 30, what="400 acknowledged writes")
    leader = cluster.leader_proc()
    killed_at = time.monotonic()
    leader.kill()
    count_at_kill = len(acked)
    wait_until(lambda: len(acked) >= count_at_kill + 200, 30, what="writes resuming on a new leader")
    resumed_after = time.monotonic() - killed_at
    stop.set()
    for w in writers:
        w.join(30)
    survivors = cluster.running()
    new_leader = cluster.wait_leader()
    assert new_leader != leader.raft_addr
    expected = set(acked)
    for server in survivors:
        wait_until(lambda s=server: expected <= all_keys(s, "w"), 15, what=f"all acked writes on {server.name}")
    # The killed leader comes back from its data dir and catches up too.
    leader.start()
    leader.wait_ready()
    wait_until(lambda: expected <= all_keys(leader, "w"), 30, what="old leader caught up")
    assert resumed_after < 15, f"writes took {resumed_after:.1f}s to resume"


def test_a_leader_cut_off_and_back_acknowledges_only_what_the_majority_kept(cluster: Cluster) -> None:
    """The leader is cut off (SIGSTOP: it stops answering its peers and clients alike, as behind a
    partition or a long VM pause) while writes go on. The other two elect a leader and keep
    acknowledging; a write sent to the cut-off leader waits in its socket. Back (SIGCONT), the old
    leader still thinks it leads until it hears the new term: whatever it acknowledges then must be
    what the majority committed, and every acknowledged write and intention is on every server."""
    urls = [s.url for s in cluster.servers]
    stop, acked, errors = threading.Event(), [], []
    writers = [threading.Thread(target=write_stream, args=(urls, f"cut{n}", stop, acked, errors),
                                kwargs={"timeout": 2.0, "shun_for": 3.0}) for n in range(3)]
    for w in writers:
        w.start()
    try:
        wait_until(lambda: len(acked) >= 150, 30, what="150 acknowledged writes")
        leader = cluster.leader_proc()
        others = [s for s in cluster.servers if s is not leader]
        assert leader.proc is not None
        leader.proc.send_signal(signal.SIGSTOP)
        try:
            stale: dict[str, httpx.Response | Exception] = {}

            def write_to_the_cut_off_leader() -> None:
                try:
                    stale["resp"] = httpx.put(f"{leader.url}/v1/kv/stale/at-old-leader", content=b"1", timeout=60)
                except httpx.HTTPError as exc:
                    stale["resp"] = exc

            stale_writer = threading.Thread(target=write_to_the_cut_off_leader)
            stale_writer.start()

            def elected() -> str:
                seen = {o.leader() for o in others}
                return seen.pop() if len(seen) == 1 and not seen & {"", leader.raft_addr} else ""

            new_leader = wait_until(elected, 30, 0.1, "the other two elect a leader")
            count = len(acked)
            wait_until(lambda: len(acked) >= count + 150, 30, what="writes acknowledged by the majority")
            intention = others[0].put("/v1/connect/intentions/exact?source=cut&destination=off", json={"Action": "deny"})
            assert intention.status_code == 200, intention.text
        finally:
            leader.proc.send_signal(signal.SIGCONT)
        stale_writer.join(70)
        wait_until(lambda: {s.leader() for s in cluster.servers} == {new_leader}, 30, 0.1,
                   "the old leader follows the new one")
        count = len(acked)
        wait_until(lambda: len(acked) >= count + 50, 30, what="writes after the cut healed")
    finally:
        stop.set()
        for w in writers:
            w.join(60)
    expected = set(acked)
    resp = stale["resp"]
    print("cut off:", len(acked), "acked,", len(errors), "errors; the write held at the old leader got",
          resp if isinstance(resp, Exception) else f"{resp.status_code} {resp.text[:80]}")
    if isinstance(resp, httpx.Response) and resp.status_code == 200 and resp.json() is True:
        expected.add("stale/at-old-leader")  # acknowledged late: then it was committed, and must be kept
    for server in cluster.servers:
        wait_until(lambda s=server: expected - {"stale/at-old-leader"} <= all_keys(s, "cut"), 30,
                   what=f"every acked write on {server.name}")
        if "stale/at-old-leader" in expected:
            assert server.get("/v1/kv/stale/at-old-leader?stale").status_code == 200, server.name
        got = server.get("/v1/connect/intentions/exact?source=cut&destination=off&stale")
        assert got.status_code == 200 and got.json()["Action"] == "deny", (server.name, got.text)


def test_all_servers_killed_and_restarted_keep_catalog(cluster: Cluster) -> None:
    c = kv_client(cluster.servers[0])
    for i in range(50):
        assert c.catalog.register(f"node{i}", f"10.0.0.{i}", service={"service": "web", "port": 80 + i, "tags": ["v1"]})
    assert c.kv.put("config/a", "1")
    _, before = c.health.service("web")
    assert len(before) == 50
    for server in cluster.servers:
        server.kill()
    for server in cluster.servers:
        server.start()
    cluster.wait_leader(40)
    for server in cluster.servers:
        server.wait_ready()
        client = kv_client(server)
        wait_until(lambda cl=client: len(cl.health.service("web")[1]) == 50, 20, what="catalog restored")
        assert client.kv.get("config/a", consistency="stale")[1]["Value"] == b"1"
    _, after = kv_client(cluster.servers[1]).health.service("web")
    assert sorted(e["Service"]["Port"] for e in after) == sorted(e["Service"]["Port"] for e in before)


def test_lagging_follower_catches_up_by_snapshot(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, 3, extra_args=["-raft-snapshot-threshold", "1000"]).start()
    try:
        leader = cluster.leader_proc()
        follower = next(s for s in cluster.servers if s is not leader)
        follower.kill()
        others = [s.url for s in cluster.servers if s is not follower]
        acked: list[str] = []
        stop, errors = threading.Event(), []
        writers = [threading.Thread(target=write_stream, args=(others, f"lag{n}", stop, acked, errors)) for n in range(8)]
        for w in writers:
            w.start()
        wait_until(lambda: len(acked) >= 10_000, 120, 0.2, "10,000 acknowledged writes")
        stop.set()
        for w in writers:
            w.join(30)
        status = cluster.leader_proc().get("/v1/operator/raft/configuration").json()["Raft"]
        # The leader compacted its log, so the missing writes can only arrive as a snapshot.
        assert status["log_len"] < 10_000, status
        follower.start()
        follower.wait_ready()
        expected = set(acked)
        wait_until(lambda: expected <= all_keys(follower, "lag"), 60, 0.5, "follower caught up")
    finally:
        cluster.stop()


def test_membership_join_leave_and_remove_peer(cluster: Cluster) -> None:
    c = kv_client(cluster.servers[0])
    assert c.kv.put("before-join", "1")
    fourth = cluster.add_server("s4").start()
    fourth.wait_ready(40)
    wait_until(lambda: fourth.raft_addr in kv_client(cluster.servers[0]).status.peers(), 20, what="s4 in peers")
    wait_until(lambda: kv_client(fourth).kv.get("before-join", consistency="stale")[1], 20, what="s4 has data")
    # A graceful leave takes the server out of the peer set.
    leaving = next(s for s in cluster.servers[:3] if s.raft_addr != cluster.wait_leader())
    assert leaving.put("/v1/agent/leave").status_code == 200
    wait_until(lambda: leaving.raft_addr not in kv_client(fourth).status.peers(), 20, what="left server removed")
    wait_until(lambda: not leaving.alive(), 15, what="left server exited")
    # A dead server is removed with the CLI.
    dead = next(s for s in cluster.running() if s.raft_addr != cluster.wait_leader())
    dead.kill()
    alive = cluster.running()[0]
    out = subprocess.run(
        [sys.executable, "-m", "lictor.cli", "operator", "raft", "remove-peer", "-address", dead.raft_addr,
         "-http-addr", alive.http_addr],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    wait_until(lambda: dead.raft_addr not in kv_client(alive).status.peers(), 10, what="dead server removed")
    listing = subprocess.run(
        [sys.executable, "-m", "lictor.cli", "operator", "raft", "list-peers", "-http-addr", alive.http_addr],
        capture_output=True, text=True, timeout=30,
    )
    assert listing.returncode == 0 and "leader" in listing.stdout and dead.raft_addr not in listing.stdout
    # Two servers remain of the new configuration; they still commit.
    assert kv_client(alive).kv.put("after-changes", "1")


def test_no_quorum_answers_no_cluster_leader(cluster: Cluster) -> None:
    survivor = cluster.servers[0]
    for server in cluster.servers[1:]:
        server.kill()
    time.sleep(3.5)  # past the leader fallback: the survivor steps down
    started = time.monotonic()
    resp = survivor.put("/v1/kv/x", content=b"1", timeout=30)
    elapsed = time.monotonic() - started
    assert resp.status_code == 500
    assert "No cluster leader" in resp.text or "may still apply" in resp.text
    assert elapsed < 12
    # Stale reads still work without a leader.
    assert survivor.get("/v1/catalog/services?stale").status_code == 200


def test_joining_needs_the_cluster_key(cluster: Cluster) -> None:
    server = cluster.servers[0]
    stranger = {"RaftAddr": "127.0.0.1:1", "Node": "evil", "HTTPAddr": "127.0.0.1:2"}
    resp = httpx.post(f"{server.url}/v1/internal/cluster/join", json=stranger, timeout=10)
    assert resp.status_code == 403 and "cluster key" in resp.text
    forged = stranger | {"Time": time.time(), "Proof": "00" * 32}
    assert httpx.post(f"{server.url}/v1/internal/cluster/join", json=forged, timeout=10).status_code == 403
    assert "127.0.0.1:1" not in kv_client(server).status.peers()
