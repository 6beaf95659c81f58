"""The replicated state machine, without sockets: determinism, indexes, tombstones, dedup."""

from __future__ import annotations

import copy
import pickle
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lictor.registry import views
from lictor.registry.state import LIVENESS_CHECK_ID, StateStore


def cmd(op: str, rid: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"op": op, "rid": rid, "ts": 1.0, **fields}


def service(name: str, sid: str | None = None, port: int = 80, tags: list[str] | None = None) -> dict[str, Any]:
    return {"ID": sid or name, "Service": name, "Tags": tags or [], "Address": "", "TaggedAddresses": {},
            "Meta": {}, "Port": port, "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False,
            "Kind": "", "Proxy": {}, "Connect": {}}


def check(cid: str, status: str = "passing", service_id: str = "") -> dict[str, Any]:
    return {"CheckID": cid, "Name": cid, "Status": status, "Notes": "", "Output": "", "ServiceID": service_id,
            "Type": "ttl", "Interval": "", "Timeout": "", "Definition": {}}


def register(store: StateStore, node: str, svc: dict | None = None, checks: list | None = None, rid: str | None = None):
    return store.apply(cmd("register", rid, Node=node, Address="10.0.0.1", Service=svc, Checks=checks or []))


def test_every_command_takes_the_next_index() -> None:
    store = StateStore()
    register(store, "n1", service("web"))
    assert store.index == 1
    store.apply(cmd("kv_set", Key="a", Value=None, Flags=0))
    store.apply(cmd("noop"))
    assert store.index == 3


def test_unknown_or_broken_commands_never_raise() -> None:
    store = StateStore()
    assert store.apply(cmd("nope"))["ok"] is False
    assert store.apply({"op": "register"})["ok"] is False
    assert store.apply({"op": "kv_set"})["ok"] is False  # missing Key: internal error result, not an exception
    assert store.apply({"op": 5})["ok"] is False
    assert store.nodes == {}


def test_duplicate_request_id_applies_once() -> None:
    store = StateStore()
    first = store.apply(cmd("kv_set", "r1", Key="k", Value="dg==", Flags=0, Cas=0))
    again = store.apply(cmd("kv_set", "r1", Key="k", Value="dg==", Flags=0, Cas=0))
    assert first == again == {"ok": True, "value": True}
    assert store.kv["k"]["ModifyIndex"] == 1


def test_register_validates_before_mutating() -> None:
    store = StateStore()
    result = register(store, "n1", service("web"), [check("c1", service_id="other")])
    assert result["ok"] is False and result["status"] == 404
    assert store.nodes == {} and store.services == {}


def test_service_index_moves_on_delete_too() -> None:
    store = StateStore()
    register(store, "n1", service("web"))
    index_before, _ = views.read(store, views.health_service_entries, "web")
    store.apply(cmd("deregister", Node="n1", ServiceID="web"))
    index_after, entries = views.read(store, views.health_service_entries, "web")
    assert entries == [] and index_after > index_before
    # An unrelated change does not move web's index.
    register(store, "n2", service("db"))
    assert views.read(store, views.health_service_entries, "web")[0] == index_after


def test_node_check_changes_move_every_service_on_the_node() -> None:
    store = StateStore()
    register(store, "n1", service("web"), [check("node-ok")])
    before = views.read(store, views.health_service_entries, "web")[0]
    store.apply(cmd("check_status", Node="n1", CheckID="node-ok", Status="critical", Output="disk"))
    after, entries = views.read(store, views.health_service_entries, "web", passing=True)
    assert after > before and entries == []


def test_passing_filter_excludes_warning() -> None:
    store = StateStore()
    register(store, "n1", service("web"), [check("c", "warning", "web")])
    assert views.read(store, views.health_service_entries, "web", passing=True)[1] == []
    assert len(views.read(store, views.health_service_entries, "web")[1]) == 1


def test_unchanged_reregistration_keeps_indexes() -> None:
    store = StateStore()
    register(store, "n1", service("web"), [check("c", service_id="web")])
    snapshot = copy.deepcopy((store.services, store.checks, store.service_index))
    register(store, "n1", service("web"), [check("c", service_id="web")])
    assert (store.services, store.checks, store.service_index) == snapshot


def test_kv_cas_and_tombstones() -> None:
    store = StateStore()
    assert store.apply(cmd("kv_set", Key="a/b", Value="MQ==", Flags=0, Cas=0))["value"] is True
    assert store.apply(cmd("kv_set", Key="a/b", Value="Mg==", Flags=0, Cas=0))["value"] is False
    modify = store.kv["a/b"]["ModifyIndex"]
    assert store.apply(cmd("kv_set", Key="a/b", Value="Mg==", Flags=0, Cas=modify + 7))["value"] is False
    assert store.apply(cmd("kv_set", Key="a/b", Value="Mg==", Flags=0, Cas=modify))["value"] is True
    live_index = views.read(store, views.kv_list, "a/")[0]
    store.apply(cmd("kv_delete", Key="a/b"))
    index, entries = views.read(store, views.kv_list, "a/")
    assert entries == [] and index > live_index
    assert views.read(store, views.kv_get, "a/b")[0] == index


def test_txn_is_all_or_nothing() -> None:
    store = StateStore()
    store.apply(cmd("kv_set", Key="x", Value=None, Flags=0))
    result = store.apply(cmd("txn", Ops=[
        {"KV": {"Verb": "set", "Key": "y", "Value": "eQ=="}},
        {"KV": {"Verb": "check-not-exists", "Key": "x"}},
    ]))
    assert result["value"]["Errors"] and "y" not in store.kv
    result = store.apply(cmd("txn", Ops=[{"KV": {"Verb": "set", "Key": "y", "Value": "eQ=="}},
                                         {"KV": {"Verb": "delete", "Key": "x"}}]))
    assert result["value"]["Errors"] is None and "y" in store.kv and "x" not in store.kv


def test_sync_node_replaces_the_agents_node_but_keeps_liveness() -> None:
    store = StateStore()
    base = {"Node": "n1", "Address": "10.0.0.1"}
    store.apply(cmd("sync_node", **base, Services=[service("a"), service("b")], Checks=[check("c", service_id="a")]))
    assert store.checks["n1"][LIVENESS_CHECK_ID]["Status"] == "passing"
    store.apply(cmd("check_status", Node="n1", CheckID=LIVENESS_CHECK_ID, Status="critical", Output="gone"))
    store.apply(cmd("sync_node", **base, Services=[service("b")], Checks=[]))
    assert sorted(store.services["n1"]) == ["b"]
    assert sorted(store.checks["n1"]) == [LIVENESS_CHECK_ID]
    assert store.checks["n1"][LIVENESS_CHECK_ID]["Status"] == "critical"


def test_snapshot_round_trip_keeps_everything() -> None:
    store = StateStore()
    register(store, "n1", service("web"), [check("c", service_id="web")])
    store.apply(cmd("kv_set", Key="k", Value="dg==", Flags=3))
    restored = pickle.loads(pickle.dumps(store))
    assert restored.__getstate__() == store.__getstate__()
    target = StateStore()
    seen: list[int] = []
    target.listeners.append(seen.append)
    target.replace_with(restored)
    assert target.kv == store.kv and seen  # watchers are woken by a restore


ops = st.sampled_from(["set", "delete", "register", "deregister", "status"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(ops, st.integers(0, 4), st.sampled_from(["passing", "warning", "critical"])), max_size=40))
def test_replicas_applying_the_same_log_are_identical(log: list[tuple[str, int, str]]) -> None:
    commands = []
    for i, (op, n, status) in enumerate(log):
        rid = f"r{i}"
        if op == "set":
            commands.append(cmd("kv_set", rid, Key=f"k{n}", Value="dg==", Flags=n))
        elif op == "delete":
            commands.append(cmd("kv_delete", rid, Key=f"k{n}"))
        elif op == "register":
            commands.append(cmd("register", rid, Node=f"n{n}", Address="1.2.3.4", Service=service("s", f"s{n}"),
                                Checks=[check(f"c{n}", status, f"s{n}")]))
        elif op == "deregister":
            commands.append(cmd("deregister", rid, Node=f"n{n}", ServiceID=f"s{n}"))
        else:
            commands.append(cmd("check_status", rid, Node=f"n{n}", CheckID=f"c{n}", Status=status, Output=""))
    a, b = StateStore(), StateStore()
    results_a = [a.apply(copy.deepcopy(c)) for c in commands]
    results_b = [b.apply(copy.deepcopy(c)) for c in commands]
    # Replaying the whole log again (a retried batch) changes nothing but the index.
    for c in commands:
        b.apply(copy.deepcopy(c))
    assert results_a == results_b
    state_a, state_b = a.__getstate__(), b.__getstate__()
    state_a.pop("index"), state_b.pop("index")
    assert state_a == state_b


def test_restore_replaces_state_and_moves_indexes_forward() -> None:
    store = StateStore()
    register(store, "n1", service("web"))
    store.apply(cmd("kv_set", Key="a", Value="MQ==", Flags=0))
    with store.lock:
        saved = store.export()
    store.apply(cmd("kv_set", Key="b", Value="Mg==", Flags=0))
    store.apply(cmd("deregister", Node="n1"))
    before = store.index
    assert store.apply(cmd("restore", State=saved))["ok"]
    assert sorted(store.kv) == ["a"] and "n1" in store.nodes
    index, entries = views.read(store, views.health_service_entries, "web")
    assert index > before and len(entries) == 1
    assert views.read(store, views.kv_get, "b")[0] > before
    assert store.apply(cmd("restore", State={"nodes": []}))["ok"] is False
    assert sorted(store.kv) == ["a"]


def test_sync_partial_touches_only_what_changed() -> None:
    store = StateStore()
    base = {"Node": "n1", "Address": "10.0.0.1"}
    store.apply(cmd("sync_node", **base, Services=[service("a"), service("b")],
                    Checks=[check("ca", service_id="a"), check("cb", service_id="b")]))
    b_index = store.services["n1"]["b"]["ModifyIndex"]
    result = store.apply(cmd("sync_partial", **base, Services=[service("c")], Checks=[check("cc", service_id="c")],
                             DeleteServices=["a"], DeleteChecks=["cb"]))
    assert result["ok"]
    assert sorted(store.services["n1"]) == ["b", "c"]
    assert sorted(store.checks["n1"]) == sorted([LIVENESS_CHECK_ID, "cc"])
    assert store.services["n1"]["b"]["ModifyIndex"] == b_index  # untouched
    bad = store.apply(cmd("sync_partial", **base, Services=[], Checks=[check("x", service_id="a")]))
    assert bad["ok"] is False and "x" not in store.checks["n1"]


def test_request_ids_are_unique_in_a_process_and_across_a_fork() -> None:
    import os

    from lictor.registry.raft import new_command, request_id

    ids = {request_id() for _ in range(10_000)} | {new_command("noop")["rid"] for _ in range(1000)}
    assert len(ids) == 11_000
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes its next id and leaves at once
        os.write(write_end, request_id().encode())
        os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 100).decode()
    os.waitpid(pid, 0)
    os.close(read_end)
    assert child_id and child_id not in ids and child_id[:16] != request_id()[:16]
