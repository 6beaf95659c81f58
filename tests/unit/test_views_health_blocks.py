"""health_service_body rebuilds only the nodes that changed; after any sequence of applied writes its
reply must be exactly the whole view encoded at once (no sockets)."""

from __future__ import annotations

import json
import random

import pytest

from lictor.httpapi import compact_json
from lictor.registry import views
from lictor.registry.state import StateStore

NODES = [f"node-{n}" for n in range(5)]
NAMES = ["web", "db", "api"]
FILTERS = [dict(passing=False, tags=[], node_meta=[]), dict(passing=True, tags=[], node_meta=[]),
           dict(passing=False, tags=["x"], node_meta=[]), dict(passing=True, tags=[], node_meta=[("zone", "a")])]


def random_write(rng: random.Random, store: StateStore) -> dict:
    """A command of every kind that changes what a health answer holds."""
    node = rng.choice(NODES)
    services = sorted(store.services.get(node, {}))
    checks = sorted(store.checks.get(node, {}))
    kind = rng.random()
    if kind < 0.35 or not services:
        sid = f"s{rng.randint(0, 25)}"
        command = {"op": "register", "Node": node, "Address": f"10.0.0.{rng.randint(1, 3)}",
                   "NodeMeta": {"zone": rng.choice("ab")},
                   "Service": {"ID": sid, "Service": rng.choice(NAMES), "Port": rng.randint(1, 3),
                               "Tags": rng.sample("xyz", rng.randint(0, 2))}}
        if rng.random() < 0.5:
            command["Checks"] = [{"CheckID": f"service:{sid}", "Name": "svc", "ServiceID": sid,
                                  "Status": rng.choice(["passing", "warning", "critical"])}]
        return command
    if kind < 0.5:
        return {"op": "register", "Node": node, "Address": "10.0.0.9",
                "Check": {"CheckID": rng.choice(["serfHealth", "maint"]), "Name": "node",
                          "Status": rng.choice(["passing", "critical"])}}
    if kind < 0.65 and checks:
        return {"op": "check_status", "Node": node, "CheckID": rng.choice(checks),
                "Status": rng.choice(["passing", "warning", "critical"]), "Output": str(rng.random())}
    if kind < 0.85:
        return {"op": "deregister", "Node": node, "ServiceID": rng.choice(services)}
    if kind < 0.92 and checks:
        return {"op": "deregister", "Node": node, "CheckID": rng.choice(checks)}
    if kind < 0.97:
        return {"op": "deregister", "Node": node}  # the whole node
    return {"op": "register", "Node": node, "Address": "10.0.0.7", "NodeMeta": {"zone": rng.choice("ab")}}


def whole(store: StateStore, name: str, **filters: object) -> bytes:
    with store.lock:
        return compact_json(views.health_service_entries(store, name, **filters)[1])


@pytest.mark.parametrize("seed", range(40))
def test_reply_equals_the_whole_view_after_every_write(seed: int) -> None:
    rng = random.Random(seed)
    store = StateStore()
    for step in range(120):
        result = store.apply(random_write(rng, store))
        assert result is not None
        for name in NAMES:
            for filters in FILTERS if step % 10 == 0 else FILTERS[:1]:
                with store.lock:
                    index, body = views.health_service_body(store, name, **filters)
                assert body == whole(store, name, **filters), (seed, step, name, filters)
                assert index == views.health_service_entries(store, name, **filters)[0]


def test_the_cached_reply_path_uses_it_and_a_snapshot_restore_drops_its_blocks() -> None:
    store = StateStore()
    store.apply({"op": "register", "Node": "n1", "Address": "10.0.0.1",
                 "Service": {"ID": "w1", "Service": "web", "Port": 1, "Tags": []}})
    entry = views.read_shared_entry(store, views.health_service_entries, "web", as_body=True)
    assert entry.body() == whole(store, "web")
    assert store.block_cache  # the per-node share was kept
    other = StateStore()
    other.apply({"op": "register", "Node": "n1", "Address": "10.0.0.2",
                 "Service": {"ID": "w2", "Service": "web", "Port": 2, "Tags": []}})
    store.replace_with(other)  # same node name and, here, the same node index: must not be reused
    assert not store.block_cache and not store.entry_cache
    entry = views.read_shared_entry(store, views.health_service_entries, "web", as_body=True)
    assert [e["Service"]["ID"] for e in json.loads(entry.body())] == ["w2"]


def test_a_changed_instance_is_the_only_one_encoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's share of a name is rebuilt when one of its instances changes; the others' encodings
    are reused (a client node in the soak holds ~50 instances of each name)."""
    store = StateStore()
    for i in range(20):
        store.apply({"op": "register", "Node": "c1", "Address": "10.0.0.1",
                     "Service": {"ID": f"w{i}", "Service": "web", "Port": i, "Tags": []},
                     "Checks": [{"CheckID": f"service:w{i}", "Name": "svc", "ServiceID": f"w{i}", "Status": "passing"}]})
    with store.lock:
        views.health_service_body(store, "web")
    encodes: list[object] = []
    real = views.compact_json

    def counting(data: object) -> bytes:
        encodes.append(data)
        return real(data)

    monkeypatch.setattr(views, "compact_json", counting)
    store.apply({"op": "check_status", "Node": "c1", "CheckID": "service:w7", "Status": "critical"})
    with store.lock:
        assert views.health_service_body(store, "web", passing=True)[1] == whole(store, "web", passing=True)
        assert views.health_service_body(store, "web")[1] == whole(store, "web")
    assert [e["Service"]["ID"] for e in encodes if isinstance(e, dict)] == ["w7"]  # once, for both filters
    encodes.clear()
    store.apply({"op": "register", "Node": "c1", "Address": "10.0.0.9"})  # the node record: every entry shows it
    with store.lock:
        assert views.health_service_body(store, "web")[1] == whole(store, "web")
    assert len([e for e in encodes if isinstance(e, dict)]) == 20


def test_a_restored_instance_of_the_same_id_is_not_served_from_before() -> None:
    """PUT /v1/snapshot: versions start again after a restore, so the encodings made before it go,
    even those made between two restores, when every version read 0."""
    store = StateStore()
    snapshots = []
    for port in (1, 2):
        store.apply({"op": "register", "Node": "n1", "Address": "10.0.0.1",
                     "Service": {"ID": "w1", "Service": "web", "Port": port, "Tags": []}})
        snapshots.append(store.export())
    for saved, port in ((snapshots[0], 1), (snapshots[1], 2), (snapshots[0], 1)):
        store.apply({"op": "restore", "State": saved})
        with store.lock:
            body = views.health_service_body(store, "web")[1]
        assert body == whole(store, "web")
        assert json.loads(body)[0]["Service"]["Port"] == port
