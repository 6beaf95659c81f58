"""The pure ACL core: rule parsing (HCL subset and JSON), Consul's matching, endpoint plans, filters."""

from __future__ import annotations

import pytest

from lictor.acl import (
    INTENTION,
    READ,
    WRITE,
    ACLRuleError,
    AmbiguousBody,
    Authorizer,
    Need,
    Rules,
    body_needs,
    filter_response,
    merge,
    node_identity_rules,
    parse_rules,
    plan_request,
    service_identity_rules,
)


def authz(text: str, default: str = "deny") -> Authorizer:
    return Authorizer(parse_rules(text), default)


def test_hcl_subset_all_resources() -> None:
    rules = parse_rules(
        """
        # a comment
        service "web" { policy = "write" }
        service_prefix "" {
          policy = "read"   // trailing comment
          intentions = "write"
        }
        node "n1" { policy = "write" }
        node_prefix "" { policy = "read" }
        key "app/secret" { policy = "deny" }
        key_prefix "app/" { policy = "list" }
        agent_prefix "" { policy = "read" }
        /* block
           comment */
        operator = "read"
        acl = "write"
        """
    )
    assert rules.exact["service"] == {"web": WRITE}
    assert rules.prefix["service"] == {"": READ}
    assert rules.prefix[INTENTION] == {"": WRITE}
    assert rules.exact[INTENTION] == {"web": READ}  # Consul: service read/write implies intentions read
    assert rules.exact["node"] == {"n1": WRITE} and rules.prefix["node"] == {"": READ}
    assert rules.exact["key"] == {"app/secret": "deny"} and rules.prefix["key"] == {"app/": "list"}
    assert rules.prefix["agent"] == {"": READ}
    assert rules.single == {"operator": READ, "acl": WRITE}


def test_json_rules_same_as_hcl() -> None:
    hcl = parse_rules('service "web" { policy = "write" }\nkey_prefix "" { policy = "read" }\noperator = "read"')
    js = parse_rules('{"service": {"web": {"policy": "write"}}, "key_prefix": {"": {"policy": "read"}}, "operator": "read"}')
    assert hcl == js


@pytest.mark.parametrize(
    "text",
    [
        'service "web" { policy = "admin" }',
        'bogus "x" { policy = "read" }',
        'operator = "list"',
        'service "web" { policy = "read" color = "blue" }',
        'service "web" { policy = "read" ',
        'service "web" policy',
        'key "a" { policy = "read", intentions = "read" }',
        'service "web" { policy = "read" }\nservice "web" { policy = "write" }',
        'operator = "read"\noperator = "write"',
        "{not json",
        'service "web" { policy = "read" } @',
        "service_prefix = \"read\"",
    ],
)
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(ACLRuleError):
        parse_rules(text)


def test_empty_rules_allow_nothing_under_default_deny() -> None:
    a = authz("")
    assert not a.allowed("service", "web", READ)
    assert not a.allowed("operator", "", READ)
    allow = authz("", "allow")
    assert allow.allowed("service", "web", WRITE) and allow.allowed("acl", "", WRITE)


def test_exact_beats_prefix_and_longest_prefix_wins() -> None:
    a = authz(
        """
        key_prefix "" { policy = "read" }
        key_prefix "app/" { policy = "write" }
        key_prefix "app/secret/" { policy = "deny" }
        key "app/secret/ok" { policy = "read" }
        """
    )
    assert a.allowed("key", "other", READ) and not a.allowed("key", "other", WRITE)
    assert a.allowed("key", "app/x", WRITE)
    assert not a.allowed("key", "app/secret/x", READ)
    assert a.allowed("key", "app/secret/ok", READ) and not a.allowed("key", "app/secret/ok", WRITE)


def test_access_levels() -> None:
    a = authz('key_prefix "l/" { policy = "list" }\nkey_prefix "r/" { policy = "read" }\nkey_prefix "w/" { policy = "write" }')
    assert a.allowed("key", "l/a", READ) and a.allowed("key", "l/a", "list") and not a.allowed("key", "l/a", WRITE)
    assert a.allowed("key", "r/a", READ) and not a.allowed("key", "r/a", "list")
    assert all(a.allowed("key", "w/a", x) for x in (READ, "list", WRITE))


def test_explicit_rule_overrides_default_allow() -> None:
    a = authz('service "db" { policy = "read" }\nservice "secret" { policy = "deny" }', "allow")
    assert a.allowed("service", "anything", WRITE)
    assert a.allowed("service", "db", READ) and not a.allowed("service", "db", WRITE)
    assert not a.allowed("service", "secret", READ)


def test_merge_precedence_deny_write_list_read() -> None:
    merged = merge([parse_rules('service "web" { policy = "read" }'), parse_rules('service "web" { policy = "write" }')])
    assert Authorizer(merged).allowed("service", "web", WRITE)
    merged = merge([parse_rules('service "web" { policy = "write" }'), parse_rules('service "web" { policy = "deny" }')])
    assert not Authorizer(merged).allowed("service", "web", READ)
    merged = merge([parse_rules('operator = "read"'), parse_rules('operator = "write"')])
    assert Authorizer(merged).allowed("operator", "", WRITE)


def test_intentions_field() -> None:
    a = authz('service "web" { policy = "write" }\nservice "db" { policy = "read" intentions = "write" }\nservice "x" { policy = "deny" }')
    assert a.allowed(INTENTION, "web", READ) and not a.allowed(INTENTION, "web", WRITE)
    assert a.allowed(INTENTION, "db", WRITE)
    assert not a.allowed(INTENTION, "x", READ)
    assert not a.allowed(INTENTION, "other", READ)


def test_operator_implies_mesh_and_management_allows_all() -> None:
    assert authz('operator = "write"').allowed("mesh", "", WRITE)
    mgmt = Authorizer(Rules(management=True), "deny")
    assert mgmt.allowed("acl", "", WRITE) and mgmt.allowed("key", "x", WRITE) and mgmt.allowed_prefix("key", "", WRITE)


def test_prefix_write_needs_everything_beneath() -> None:
    a = authz('key_prefix "app/" { policy = "write" }\nkey "app/locked" { policy = "read" }')
    assert a.allowed_prefix("key", "app/sub/", WRITE)
    assert not a.allowed_prefix("key", "app/", WRITE)  # app/locked beneath is only readable
    assert not a.allowed_prefix("key", "", WRITE)
    assert authz("", "allow").allowed_prefix("key", "", WRITE)
    assert not authz('key "x" { policy = "deny" }', "allow").allowed_prefix("key", "", WRITE)


def test_identities() -> None:
    s = Authorizer(service_identity_rules("web"))
    assert s.allowed("service", "web", WRITE) and s.allowed("service", "web-sidecar-proxy", WRITE)
    assert s.allowed("service", "db", READ) and not s.allowed("service", "db", WRITE)
    n = Authorizer(node_identity_rules("n1"))
    assert n.allowed("node", "n1", WRITE) and not n.allowed("node", "n2", WRITE)


# -- endpoint plans ------------------------------------------------------------------------------


def needs(method: str, path: str, query: dict | None = None, node: str = "agent1") -> list[Need]:
    return plan_request(method, path, query or {}, node).needs


def test_plans_for_reads_and_writes() -> None:
    assert needs("GET", "/v1/catalog/service/web") == [Need("service", "web", READ)]
    assert needs("GET", "/v1/health/service/a/b") == [Need("service", "a/b", READ)]
    assert needs("GET", "/v1/kv/app/x") == [Need("key", "app/x", READ)]
    assert needs("PUT", "/v1/kv/app/x") == [Need("key", "app/x", WRITE)]
    assert needs("DELETE", "/v1/kv/app/", {"recurse": ""}) == [Need("key", "app/", WRITE, whole=True)]
    assert plan_request("GET", "/v1/kv/app/", {"recurse": ""}, "n").filter == "kv_entries"
    assert plan_request("GET", "/v1/kv/app/", {"keys": ""}, "n").filter == "kv_keys"
    assert needs("GET", "/v1/agent/self") == [Need("agent", "agent1", READ)]
    assert needs("PUT", "/v1/agent/maintenance") == [Need("node", "agent1", WRITE)]
    assert needs("GET", "/v1/connect/intentions/exact", {"destination": ["db"]}) == [Need(INTENTION, "db", READ)]
    assert needs("DELETE", "/v1/connect/intentions/exact", {"destination": "db"}) == [Need(INTENTION, "db", WRITE)]
    assert needs("GET", "/v1/config/service-defaults/web") == [Need("service", "web", READ)]
    assert needs("GET", "/v1/config/proxy-defaults/global") == []
    assert needs("DELETE", "/v1/config/proxy-defaults/global") == [Need("operator", "", WRITE)]
    assert needs("DELETE", "/v1/config/service-intentions/db") == [Need(INTENTION, "db", WRITE)]
    assert needs("GET", "/v1/acl/tokens") == [Need("acl", "", READ)]
    assert needs("PUT", "/v1/acl/policy") == [Need("acl", "", WRITE)]
    assert needs("GET", "/v1/snapshot") == [Need("acl", "", WRITE)]
    assert plan_request("PUT", "/v1/acl/bootstrap", {}, "n").public
    assert plan_request("GET", "/v1/status/leader", {}, "n").public
    assert plan_request("GET", "/ui/", {}, "n").public


def test_unknown_endpoints_fail_closed() -> None:
    assert needs("GET", "/v1/something/new") == [Need("acl", "", WRITE)]
    assert needs("POST", "/v1/kv/x") == [Need("acl", "", WRITE)]  # wrong method: not a KV write


def test_lookups_for_id_endpoints() -> None:
    assert plan_request("PUT", "/v1/agent/service/deregister/web-1", {}, "n").lookup == ("agent_service", "web-1", WRITE)
    assert plan_request("PUT", "/v1/agent/check/pass/c1", {}, "n").lookup == ("agent_check", "c1", WRITE)
    assert plan_request("DELETE", "/v1/connect/intentions/abc", {}, "n").lookup == ("intention", "abc", WRITE)


def no_lookup(kind: str, ident: str) -> None:
    return None


def test_body_needs() -> None:
    assert body_needs("agent_service", {"name": "web", "port": 80}, no_lookup) == [Need("service", "web", WRITE)]
    sidecar = {"Name": "web", "Connect": {"SidecarService": {"Name": "web-proxy"}}}
    assert Need("service", "web-proxy", WRITE) in body_needs("agent_service", sidecar, no_lookup)
    reg = {"Node": "n1", "Address": "1.2.3.4", "Service": {"Service": "db"}, "Check": {"Name": "c", "ServiceID": "db"}}
    assert body_needs("catalog_register", reg, no_lookup) == [Need("node", "n1", WRITE), Need("service", "db", WRITE)]
    assert body_needs("intention", {"SourceName": "web", "DestinationName": "db"}, no_lookup) == [Need(INTENTION, "db", WRITE)]
    assert body_needs("config", {"Kind": "service-defaults", "Name": "web"}, no_lookup) == [Need("service", "web", WRITE)]
    txn = [{"KV": {"Verb": "set", "Key": "a"}}, {"KV": {"Verb": "get", "Key": "b"}}, {"KV": {"Verb": "delete-tree", "Key": "c/"}}]
    assert body_needs("txn", txn, no_lookup) == [
        Need("key", "a", WRITE), Need("key", "b", READ), Need("key", "c/", WRITE, whole=True)
    ]
    assert body_needs("node_write", {"Node": "n1"}, no_lookup) == [Need("node", "n1", WRITE)]
    with pytest.raises(AmbiguousBody):
        body_needs("agent_service", {"Name": "web", "name": "db"}, no_lookup)
    looked = body_needs("agent_check", {"ServiceID": "web-1"}, lambda k, i: ("service", "web"))
    assert looked == [Need("service", "web", WRITE)]


def test_filters() -> None:
    a = authz('service "web" { policy = "read" }\nnode_prefix "" { policy = "read" }\nkey_prefix "pub/" { policy = "read" }')
    data, dropped = filter_response("services_map", {"web": [], "db": []}, a)
    assert data == {"web": []} and dropped
    data, dropped = filter_response("services_map", {"web": []}, a)
    assert not dropped
    entries = [{"Key": "pub/a"}, {"Key": "priv/b"}]
    assert filter_response("kv_entries", entries, a) == ([{"Key": "pub/a"}], True)
    assert filter_response("kv_keys", ["pub/a", "priv/"], a) == (["pub/a"], True)
    agent = {"web-1": {"Service": "web"}, "db-1": {"Service": "db"}}
    assert list(filter_response("agent_services", agent, a)[0]) == ["web-1"]
    checks = [{"Node": "n", "ServiceName": "db"}, {"Node": "n", "ServiceName": ""}, {"Node": "n", "ServiceName": "web"}]
    assert len(filter_response("checks", checks, a)[0]) == 2
    ixns = [{"DestinationName": "web"}, {"DestinationName": "db"}]
    assert filter_response("intentions", ixns, a)[0] == [{"DestinationName": "web"}]
    nodeless = authz('service "web" { policy = "read" }')
    entries = [{"Node": {"Node": "n1"}, "Service": {"Service": "web"}}]
    assert filter_response("health_entries", entries, nodeless) == ([], True)
    assert filter_response("nodes", [{"Node": "a"}], Authorizer(Rules(management=True))) == ([{"Node": "a"}], False)
