"""ACL state ops: deterministic, hash-only, bootstrap once, tolerant of pre-ACL snapshots."""

from __future__ import annotations

import hashlib
import pickle

from lictor.acl import ANONYMOUS_ACCESSOR_ID, MANAGEMENT_POLICY_ID
from lictor.registry.state import StateStore


def h(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bootstrap_cmd(rid: str = "b1", secret: str = "s3cret") -> dict:
    return {
        "op": "acl_bootstrap", "rid": rid, "ts": 1.0,
        "Token": {"AccessorID": "acc-1", "SecretHash": h(secret), "Policies": [{"ID": MANAGEMENT_POLICY_ID}]},
        "ManagementPolicy": {"ID": MANAGEMENT_POLICY_ID, "Name": "global-management", "Rules": "", "Builtin": True},
        "Anonymous": {"AccessorID": ANONYMOUS_ACCESSOR_ID, "SecretHash": h("anonymous"), "Policies": []},
    }


def test_bootstrap_once_and_hash_only() -> None:
    store = StateStore()
    result = store.apply(bootstrap_cmd())
    assert result["ok"], result
    assert store.acl_secrets[h("s3cret")] == "acc-1"
    assert "s3cret" not in pickle.dumps(store.export()).decode("latin-1")
    again = store.apply(bootstrap_cmd(rid="b2", secret="other"))
    assert not again["ok"] and again["status"] == 403 and "no longer allowed" in again["error"]
    assert h("other") not in store.acl_secrets


def test_token_links_validated_before_any_change() -> None:
    store = StateStore()
    store.apply(bootstrap_cmd())
    before = (dict(store.acl_tokens), store.table_index.get("acl"))
    bad = store.apply({"op": "acl_token_set", "rid": "t1", "ts": 2.0, "Create": True,
                       "Token": {"AccessorID": "acc-2", "SecretHash": h("x"), "Policies": [{"Name": "nope"}]}})
    assert not bad["ok"] and "cannot find policy" in bad["error"]
    assert (dict(store.acl_tokens), store.table_index.get("acl")) == before
    ok = store.apply({"op": "acl_policy_set", "rid": "p1", "ts": 3.0, "Create": True,
                      "Policy": {"ID": "pol-1", "Name": "web", "Rules": 'service "web" { policy = "write" }'}})
    assert ok["ok"]
    token = store.apply({"op": "acl_token_set", "rid": "t2", "ts": 4.0, "Create": True,
                         "Token": {"AccessorID": "acc-2", "SecretHash": h("x"), "Policies": [{"Name": "web"}]}})
    assert token["value"]["Policies"] == [{"ID": "pol-1", "Name": "web"}]
    duplicate = store.apply({"op": "acl_token_set", "rid": "t3", "ts": 5.0, "Create": True,
                             "Token": {"AccessorID": "acc-3", "SecretHash": h("x"), "Policies": []}})
    assert not duplicate["ok"]
    # An update can never change the secret.
    store.apply({"op": "acl_token_set", "rid": "t4", "ts": 6.0, "Create": False,
                 "Token": {"AccessorID": "acc-2", "SecretHash": h("changed"), "Description": "d", "Policies": []}})
    assert store.acl_tokens["acc-2"]["SecretHash"] == h("x") and store.acl_tokens["acc-2"]["Description"] == "d"
    store.apply({"op": "acl_token_delete", "rid": "t5", "ts": 7.0, "AccessorID": "acc-2", "Anonymous": ANONYMOUS_ACCESSOR_ID})
    assert "acc-2" not in store.acl_tokens and h("x") not in store.acl_secrets


def test_builtins_are_protected() -> None:
    store = StateStore()
    store.apply(bootstrap_cmd())
    anon = store.apply({"op": "acl_token_delete", "rid": "d1", "ts": 1.0, "AccessorID": ANONYMOUS_ACCESSOR_ID,
                        "Anonymous": ANONYMOUS_ACCESSOR_ID})
    assert not anon["ok"]
    mgmt = store.apply({"op": "acl_policy_delete", "rid": "d2", "ts": 1.0, "ID": MANAGEMENT_POLICY_ID})
    assert not mgmt["ok"]
    edit = store.apply({"op": "acl_policy_set", "rid": "d3", "ts": 1.0, "Create": False,
                        "Policy": {"ID": MANAGEMENT_POLICY_ID, "Name": "global-management", "Rules": 'acl = "read"'}})
    assert not edit["ok"]


def test_snapshot_from_before_acls_still_applies() -> None:
    store = StateStore()
    for name in ("acl_tokens", "acl_secrets", "acl_policies", "acl_roles", "acl_bootstrapped"):
        del store.__dict__[name]
    restored = pickle.loads(pickle.dumps(store))
    assert restored.apply(bootstrap_cmd())["ok"]
    assert restored.acl_secrets[h("s3cret")] == "acc-1"


def test_replicas_agree() -> None:
    commands = [bootstrap_cmd(),
                {"op": "acl_policy_set", "rid": "p", "ts": 2.0, "Create": True, "Policy": {"ID": "p1", "Name": "a", "Rules": ""}},
                {"op": "acl_role_set", "rid": "r", "ts": 3.0, "Create": True,
                 "Role": {"ID": "r1", "Name": "role", "Policies": [{"ID": "p1"}]}}]
    a, b = StateStore(), StateStore()
    for cmd in commands:
        a.apply(dict(cmd))
        b.apply(dict(cmd))
    assert a.export() == b.export()
    assert a.acl_roles["r1"]["Policies"] == [{"ID": "p1", "Name": "a"}]
