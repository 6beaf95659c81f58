"""catalog/services merges per-node summaries that are rebuilt only for nodes that changed; after any
sequence of registrations, re-registrations, deregistrations, node deletions and snapshot restores
it must answer exactly as the full scan it replaced (kept here as the reference). No sockets."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest

from lictor.registry import views
from lictor.registry.state import StateStore


def reference(store: StateStore, node_meta: list[tuple[str, str]] = ()) -> dict[str, list[str]]:
    result: dict[str, dict[str, None]] = {}
    for node, services in store.services.items():
        if node_meta and not all(store.nodes.get(node, {}).get("Meta", {}).get(k) == v for k, v in node_meta):
            continue
        for service in services.values():
            tags = result.setdefault(service["Service"], {})
            for tag in service.get("Tags") or ():
                tags[tag] = None
    return {name: list(result[name]) for name in sorted(result)}


def random_command(rng: random.Random) -> dict[str, Any]:
    node = f"node-{rng.randint(0, 5)}"
    roll = rng.random()
    if roll < 0.6:
        sid = f"s{rng.randint(0, 25)}"
        return {"op": "register", "Node": node, "Address": "10.0.0.1", "NodeMeta": {"zone": rng.choice("ab")},
                "Service": {"ID": sid, "Service": rng.choice(["web", "db", "api"]),
                            "Tags": rng.sample(["x", "y", "z", "v1", "v2"], rng.randint(0, 3)), "Port": 80}}
    if roll < 0.9:
        return {"op": "deregister", "Node": node, "ServiceID": f"s{rng.randint(0, 25)}"}
    return {"op": "deregister", "Node": node}  # the whole node


@pytest.mark.parametrize("seed", range(60))
def test_same_answer_as_the_full_scan_after_every_change(seed: int) -> None:
    rng = random.Random(seed)
    store = StateStore()
    for step in range(120):
        store.apply(random_command(rng))
        if step % 3 == 0:  # not after every change: summaries must survive several writes
            continue
        meta = [("zone", rng.choice("ab"))] if rng.random() < 0.2 else []
        with store.lock:
            _index, answer = views.catalog_services(store, meta)
        assert answer == reference(store, meta), step
        if rng.random() < 0.05:  # a snapshot restore replaces every table
            store.replace_with(pickle.loads(pickle.dumps(store)))
            with store.lock:
                assert views.catalog_services(store)[1] == reference(store)


def derived_names(store: StateStore) -> dict[str, dict[str, list[str]]]:
    """names_on_node as a scan of `services` gives it: per node, each name's IDs in services order."""
    out: dict[str, dict[str, list[str]]] = {}
    for node, services in store.services.items():
        names: dict[str, list[str]] = {}
        for service_id, service in services.items():
            names.setdefault(service["Service"], []).append(service_id)
        out[node] = names
    return out


@pytest.mark.parametrize("seed", range(30))
def test_the_per_name_index_follows_every_write_restore_and_snapshot(seed: int) -> None:
    rng = random.Random(seed)
    store = StateStore()
    for step in range(150):
        store.apply(random_command(rng))
        roll = rng.random()
        if roll < 0.04:  # a snapshot installed by pysyncobj (pickle)
            store = pickle.loads(pickle.dumps(store))
        elif roll < 0.08:  # PUT /v1/snapshot: the restore command
            store.apply({"op": "restore", "State": store.export()})
        indexed = {node: {name: list(ids) for name, ids in names.items()}
                   for node, names in store.names_on_node.items() if names}
        assert indexed == {node: names for node, names in derived_names(store).items() if names}, step
        assert set(store.names_on_node) <= set(store.services), step
