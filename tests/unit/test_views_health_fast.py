"""health_service_entries groups each node's checks once; it must answer exactly as the per-instance
scan it replaced (kept here as the reference), on stores shaped like real ones."""

from __future__ import annotations

import random
from typing import Any

import pytest

from lictor.registry import views
from lictor.registry.state import StateStore


def reference(store: StateStore, name: str, passing: bool = False, tags: list[str] = (),
              node_meta: list[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """The previous implementation: sort every node's service IDs and checks per instance."""
    found = []
    for node in sorted(store.services):
        for service_id in sorted(store.services[node]):
            service = store.services[node][service_id]
            if service["Service"] == name:
                found.append((node, service))
    entries = []
    for node_name, service in found:
        node = store.nodes.get(node_name)
        if node is None or not all(t in service.get("Tags", []) for t in tags) or not all(
                node.get("Meta", {}).get(k) == v for k, v in node_meta):
            continue
        node_checks = store.checks.get(node_name, {})
        checks = [node_checks[c] for c in sorted(node_checks) if node_checks[c].get("ServiceID", "") in ("", service["ID"])]
        if passing and any(c["Status"] != "passing" for c in checks):
            continue
        entries.append({"Node": node, "Service": service, "Checks": checks})
    return entries


def random_store(rng: random.Random) -> StateStore:
    store = StateStore()
    for _ in range(rng.randint(0, 6)):
        node = f"node-{rng.randint(0, 9)}"
        store.nodes[node] = {"Node": node, "Address": "10.0.0.1", "Meta": {"zone": rng.choice("ab")}}
        services = store.services.setdefault(node, {})
        checks = store.checks.setdefault(node, {})
        for _ in range(rng.randint(0, 30)):
            sid = f"s{rng.randint(0, 60)}"
            services[sid] = {"ID": sid, "Service": rng.choice(["web", "db", "api"]), "Tags": rng.sample("xyz", rng.randint(0, 2))}
        for _ in range(rng.randint(0, 12)):
            cid = rng.choice(["serfHealth", "maint", "zz", "aa"]) + str(rng.randint(0, 40))
            owner = rng.choice(["", *services]) if services else ""
            checks[cid] = {"CheckID": cid, "ServiceID": owner, "Status": rng.choice(["passing", "warning", "critical"])}
    if rng.random() < 0.2 and store.nodes:
        store.nodes.pop(rng.choice(sorted(store.nodes)))  # services of a node that is gone are skipped
    return store


@pytest.mark.parametrize("seed", range(300))
def test_same_answer_as_the_per_instance_scan(seed: int) -> None:
    rng = random.Random(seed)
    store = random_store(rng)
    for name in ("web", "db", "nope"):
        for passing in (False, True):
            for tags, meta in (([], []), (["x"], []), ([], [("zone", "a")]), (["x", "y"], [("zone", "b")])):
                _index, got = views.health_service_entries(store, name, passing=passing, tags=tags, node_meta=meta)
                assert got == reference(store, name, passing, tags, meta)
                # Same objects in the same order: the cached reply encodes straight from these.
                assert [[id(c) for c in e["Checks"]] for e in got] == [
                    [id(c) for c in e["Checks"]] for e in reference(store, name, passing, tags, meta)]
