"""The shared-read cache (views.read_shared_entry), without sockets: after any sequence of commands a
cached answer equals a fresh build, and a view's cheap index is exactly the index the view returns."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lictor.registry import views
from lictor.registry.state import StateStore


def cmd(op: str, **fields: Any) -> dict[str, Any]:
    return {"op": op, "rid": None, "ts": 1.0, **fields}


def service(name: str, sid: str, tags: list[str]) -> dict[str, Any]:
    return {"ID": sid, "Service": name, "Tags": tags, "Address": "", "TaggedAddresses": {}, "Meta": {}, "Port": 80,
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False, "Kind": "", "Proxy": {},
            "Connect": {}}


def check(cid: str, status: str, service_id: str = "") -> dict[str, Any]:
    return {"CheckID": cid, "Name": cid, "Status": status, "Notes": "", "Output": "", "ServiceID": service_id,
            "Type": "ttl", "Interval": "", "Timeout": "", "Definition": {}}


READS: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
    (views.catalog_nodes, (), {}),
    (views.catalog_nodes, ([("rack", "a")],), {}),
    (views.catalog_services, (), {}),
    (views.catalog_services, ([("rack", "b")],), {}),
    (views.catalog_service, ("web",), {}),
    (views.catalog_service, ("web", ["v2"]), {}),
    (views.catalog_service, ("db",), {}),
    (views.catalog_node, ("n0",), {}),
    (views.catalog_node, ("n2",), {}),
    (views.health_service_entries, ("web",), {}),
    (views.health_service_entries, ("web",), {"passing": True}),
    (views.health_service_entries, ("db",), {"passing": True, "tags": ["v1"]}),
    (views.health_service_entries, ("web",), {"connect": True}),
    (views.health_checks, ("web",), {}),
    (views.health_state, ("critical",), {}),
    (views.health_state, ("any",), {}),
    (views.catalog_snapshot, (), {}),
    (views.health_node, ("n1",), {}),
    (views.kv_get, ("k1",), {}),
    (views.kv_get, ("k3",), {}),
    (views.kv_list, ("k",), {}),
]

step = st.tuples(
    st.sampled_from(["register", "register_node", "deregister", "delete_node", "status", "node_status", "kv_set",
                     "kv_delete", "rename"]),
    st.integers(0, 3),
    st.sampled_from(["passing", "warning", "critical"]),
    st.sampled_from(["web", "db"]),
    st.sampled_from(["a", "b"]),
)


def command_for(op: str, n: int, status: str, name: str, rack: str) -> dict[str, Any]:
    node = f"n{n}"
    if op == "register":
        return cmd("register", Node=node, Address=f"10.0.0.{n}", NodeMeta={"rack": rack},
                   Service=service(name, f"s{n}", [f"v{n % 2 + 1}"]), Checks=[check(f"c{n}", status, f"s{n}")])
    if op == "register_node":  # a node-level fact changes: address / meta / node check
        return cmd("register", Node=node, Address=f"10.1.0.{n}", NodeMeta={"rack": rack},
                   Checks=[check("nodecheck", status)])
    if op == "deregister":
        return cmd("deregister", Node=node, ServiceID=f"s{n}")
    if op == "delete_node":
        return cmd("deregister", Node=node)
    if op == "status":
        return cmd("check_status", Node=node, CheckID=f"c{n}", Status=status, Output="")
    if op == "node_status":
        return cmd("check_status", Node=node, CheckID="nodecheck", Status=status, Output="")
    if op == "kv_set":
        return cmd("kv_set", Key=f"k{n}", Value="dg==", Flags=n)
    if op == "kv_delete":
        return cmd("kv_delete", Key=f"k{n}")
    # the same service ID moves to another name: both names' views must change
    return cmd("register", Node=node, Address=f"10.0.0.{n}", NodeMeta={"rack": rack},
               Service=service("db" if name == "web" else "web", f"s{n}", ["v1"]), Checks=[])


@settings(max_examples=80, deadline=None)
@given(st.lists(step, max_size=40))
def test_a_cached_read_always_equals_a_fresh_one(steps: list[tuple[str, int, str, str, str]]) -> None:
    store = StateStore()
    for i, args in enumerate(steps):
        store.apply(command_for(*args))
        # Read only some views after some commands, so entries age across unrelated writes.
        for j, (view, vargs, vkwargs) in enumerate(READS):
            if (i + j) % 3:
                continue
            entry = views.read_shared_entry(store, view, *vargs, **vkwargs)
            reply = views.read_shared_entry(store, view, *vargs, as_body=True, **vkwargs)
            fresh_index, fresh = views.read(store, view, *vargs, **vkwargs)
            assert entry.index == reply.index == fresh_index, (view.__name__, vargs, vkwargs)
            assert entry.data == fresh, (view.__name__, vargs, vkwargs)
            assert json.loads(entry.body()) == json.loads(reply.body()) == json.loads(json.dumps(fresh))
            assert reply.data == json.loads(json.dumps(fresh))


@settings(max_examples=40, deadline=None)
@given(st.lists(step, max_size=30))
def test_cheap_index_equals_the_views_index(steps: list[tuple[str, int, str, str, str]]) -> None:
    store = StateStore()
    for args in steps:
        store.apply(command_for(*args))
        for view, vargs, vkwargs in READS:
            index_of = views._INDEX_OF.get(view)
            cheap = index_of(store, *vargs, **vkwargs) if index_of else None
            if cheap is not None:
                assert cheap == view(store, *vargs, **vkwargs)[0], (view.__name__, vargs, vkwargs)
        assert views.catalog_snapshot_index(store) == views.catalog_snapshot(store)[0]


def test_unrelated_writes_keep_the_cached_entry() -> None:
    store = StateStore()
    store.apply(command_for("register", 0, "passing", "web", "a"))
    first = views.read_shared_entry(store, views.health_service_entries, "web", as_body=True)
    body = first.body()
    for n in range(20):
        store.apply(cmd("kv_set", Key=f"other/{n}", Value="dg==", Flags=0))
    again = views.read_shared_entry(store, views.health_service_entries, "web", as_body=True)
    assert again is first and again.body() is body  # neither rebuilt nor re-encoded
    store.apply(command_for("status", 0, "critical", "web", "a"))
    assert views.read_shared_entry(store, views.health_service_entries, "web", as_body=True) is not first


def test_callers_get_copies_not_the_store() -> None:
    store = StateStore()
    store.apply(command_for("register", 0, "passing", "web", "a"))
    _, data = views.read(store, views.health_service_entries, "web")
    data[0]["Service"]["Port"] = 1
    assert store.services["n0"]["s0"]["Port"] == 80
    entry = views.read_shared_entry(store, views.catalog_node, "n0")
    reply = views.read_shared_entry(store, views.catalog_node, "n0", as_body=True)
    snapshot, body = copy.deepcopy(entry.data), reply.body()
    store.apply(command_for("register", 0, "passing", "web", "b"))  # mutates the store in place
    assert entry.data == snapshot and reply.body() == body and reply.data == json.loads(body)


def test_restore_clears_the_cache() -> None:
    store = StateStore()
    store.apply(command_for("register", 0, "passing", "web", "a"))
    views.read_shared_entry(store, views.catalog_service, "web")
    other = StateStore()
    store.replace_with(other)
    assert views.read_shared_entry(store, views.catalog_service, "web").data == []


def test_a_restore_with_the_same_modify_index_still_changes_the_key() -> None:
    store = StateStore()
    store.apply(cmd("kv_set", Key="k", Value="QQ==", Flags=0))  # ModifyIndex 1, value "A"
    before = views.read_shared_entry(store, views.kv_get, "k")
    export = {"nodes": {}, "kv": {"k": dict(store.kv["k"], Value="Qg==")}}  # same ModifyIndex, value "B"
    assert store.apply(cmd("restore", State=export))["ok"]
    after = views.read_shared_entry(store, views.kv_get, "k")
    assert after.data["Value"] == "Qg==" and after.index > before.index
