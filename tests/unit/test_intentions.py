"""Intentions: validation, precedence, ordering, L4 / L7 decisions, SPIFFE parsing, config entries."""

from __future__ import annotations

import pytest

from lictor.errors import BadRequest
from lictor.registry.intentions import (
    DEFAULT_REASON,
    check_l4,
    check_request,
    config_entry_from_intentions,
    intentions_from_config_entry,
    match,
    remove_from_entry,
    sort_intentions,
    spiffe_service,
    upsert_into_entry,
    validate_config_entry,
    validate_intention,
)


def ixn(src: str, dst: str, action: str = "allow", **extra: object) -> dict:
    body: dict = {"Action": action, **extra}
    if "Permissions" in extra:
        body.pop("Action")
    return validate_intention(src, dst, body)


# --------------------------------------------------------------------------------- validation

def test_normalizes_defaults() -> None:
    got = validate_intention("web", "db", {"action": "allow", "description": "d"})
    assert got == {
        "Description": "d", "SourceNS": "default", "SourceName": "web", "DestinationNS": "default",
        "DestinationName": "db", "SourceType": "consul", "Action": "allow", "Meta": {}, "Precedence": 9,
    }


def test_legacy_body_carries_names_and_query_wins() -> None:
    body = {"SourceName": "a", "DestinationName": "b", "SourceType": "consul", "Action": "deny", "Meta": {"k": "v"}}
    got = validate_intention(None, None, body)
    assert (got["SourceName"], got["DestinationName"], got["Action"], got["Meta"]) == ("a", "b", "deny", {"k": "v"})
    assert validate_intention("x", "y", body)["SourceName"] == "x"
    assert validate_intention("ns1/x", "y", body)["SourceNS"] == "ns1"


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [("web", "db", 9), ("*", "db", 8), ("web", "*", 6), ("*", "*", 5),
     ("*/*", "db", 7), ("*/*", "*", 4), ("*/*", "*/*", 1), ("web", "*/*", 3), ("*", "*/*", 2)],
)
def test_precedence_table(src: str, dst: str, expected: int) -> None:
    assert ixn(src, dst)["Precedence"] == expected


@pytest.mark.parametrize(
    ("src", "dst", "body", "fragment"),
    [
        ("web", "db", {"Action": "permit"}, "Action must be set to 'allow' or 'deny'"),
        ("web", "db", {}, "Action must be set"),
        ("web*", "db", {"Action": "allow"}, "SourceName: wildcard character '*' cannot be used with partial values"),
        ("web", "*db", {"Action": "allow"}, "DestinationName: wildcard"),
        ("", "db", {"Action": "allow"}, "SourceName must be set"),
        ("web", "", {"Action": "allow"}, "DestinationName must be set"),
        (None, None, {"Action": "allow", "DestinationName": "db"}, "SourceName must be set"),
        ("we\nb", "db", {"Action": "allow"}, "SourceName must not contain control characters"),
        ("web", "d\x7fb", {"Action": "allow"}, "control characters"),
        ("*/web", "db", {"Action": "allow"}, "exact value cannot follow wildcard namespace"),
        ("a/b/c", "db", {"Action": "allow"}, "source must be"),
        ("web", "db", {"Action": "allow", "SourceType": "external"}, "SourceType must be set to 'consul'"),
        ("web", "db", {"Action": "allow", "Bogus": 1}, 'unknown field "Bogus"'),
        ("web", "db", {"Action": "allow", "Meta": {"k": 1}}, "Meta value for key 'k' must be a string"),
        ("web", "db", {"Action": "allow", "Meta": {f"k{i}": "v" for i in range(65)}}, "Meta exceeds"),
        ("web", "db", {"Action": "allow", "Description": 5}, "Description must be a string"),
        ("web", "db", {"Action": "allow", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]},
         "mutually exclusive"),
        ("web", "db", {"Permissions": [{"Action": "maybe", "HTTP": {"PathPrefix": "/"}}]},
         "Permissions[0].Action must be set to 'allow' or 'deny'"),
        ("web", "db", {"Permissions": [{"Action": "allow"}]}, "Permissions[0].HTTP is required"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {}}]}, "Permissions[0].HTTP should not be empty"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/a", "PathPrefix": "/b"}}]},
         "at most one of PathExact, PathPrefix, or PathRegex"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/", "PathRegex": "/.*"}}]},
         "at most one of"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"PathExact": "a"}}]},
         "Permissions[0].HTTP.PathExact doesn't start with '/'"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "api"}}]},
         "HTTP.PathPrefix doesn't start with '/'"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "(unclosed"}}]},
         "HTTP.PathRegex is not a valid regular expression"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Name": "x", "Exact": "a", "Prefix": "b"}]}}]},
         "Permissions[0].HTTP.Header[0] should only contain one of Present, Exact, Prefix, Suffix, or Regex"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Name": "x", "Present": True, "Suffix": "b"}]}}]},
         "should only contain one of"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Name": "x"}]}}]},
         "should only contain one of"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Exact": "x"}]}}]},
         "Header[0] missing required Name field"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Name": "x", "Regex": "("}]}}]},
         "Header[0].Regex is not a valid regular expression"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"Methods": ["GET", "FETCH"]}}]},
         "Permissions[0].HTTP.Methods contains an invalid method 'FETCH'"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"Methods": ["GET", "get"]}}]},
         "more than once"),
        ("web", "db", {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                                       {"Action": "deny", "HTTP": {"Nope": 1}}]},
         'Permissions[1].HTTP has unknown field "Nope"'),
        ("web", "db", {"Permissions": "all"}, "Permissions must be a list"),
        ("web", "db", {"Permissions": [{"Action": "allow", "JWT": {"Providers": []}, "HTTP": {"PathPrefix": "/"}}]},
         "JWT is not supported"),
    ],
)
def test_validation_errors(src: str | None, dst: str | None, body: dict, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_intention(src, dst, body)
    assert info.value.status == 400
    assert fragment in info.value.message


def test_l7_intention_normalized() -> None:
    got = validate_intention("web", "api", {"Permissions": [
        {"action": "allow", "http": {"pathPrefix": "/v1", "methods": ["get", "HEAD"],
                                     "header": [{"name": "X-Env", "exact": "prod", "invert": False}]}},
    ]})
    assert got["Action"] == ""
    assert got["Permissions"] == [{"Action": "allow", "HTTP": {
        "PathPrefix": "/v1", "Methods": ["GET", "HEAD"], "Header": [{"Name": "X-Env", "Exact": "prod"}]}}]
    assert got["Precedence"] == 9


# ------------------------------------------------------------------------------------- ordering

def test_sort_order_precedence_then_names() -> None:
    items = [ixn("*", "*"), ixn("web", "*"), ixn("b", "db"), ixn("*", "db"), ixn("a", "db"), ixn("a", "cache")]
    order = [(i["SourceName"], i["DestinationName"]) for i in sort_intentions(items)]
    assert order == [("a", "cache"), ("a", "db"), ("b", "db"), ("*", "db"), ("web", "*"), ("*", "*")]


def test_match_by_destination_and_source() -> None:
    items = [ixn("web", "db"), ixn("*", "db", "deny"), ixn("web", "*"), ixn("api", "cache"), ixn("*", "*", "deny")]
    by_dst = [(i["SourceName"], i["DestinationName"]) for i in match(items, "destination", "db")]
    assert by_dst == [("web", "db"), ("*", "db"), ("web", "*"), ("*", "*")]
    by_src = [(i["SourceName"], i["DestinationName"]) for i in match(items, "source", "web")]
    assert by_src == [("web", "db"), ("*", "db"), ("web", "*"), ("*", "*")]
    assert match(items, "destination", "nothing") == [items[2], items[4]]
    with pytest.raises(BadRequest):
        match(items, "sideways", "db")


# ---------------------------------------------------------------------------------- L4 decisions

def test_l4_exact_allow_reason() -> None:
    allow = {**ixn("web", "db"), "ID": "8f246b77-f3e1-ff88-5b48-8ec93abf3e05"}
    d = check_l4([allow], "web", "db", default_allow=False)
    assert d.allowed is True
    assert d.reason == ("Matched L4 intention: ALLOW default/web => default/db "
                        "(ID: 8f246b77-f3e1-ff88-5b48-8ec93abf3e05, Precedence: 9)")
    assert d.intention is not None and d.intention["SourceName"] == "web"


def test_l4_most_specific_wins_and_default() -> None:
    items = [ixn("*", "db", "deny"), ixn("web", "db", "allow"), ixn("*", "*", "allow")]
    assert check_l4(items, "web", "db", False).allowed is True
    d = check_l4(items, "other", "db", True)
    assert (d.allowed, d.reason) == (False, "Matched L4 intention: DENY default/* => default/db (Precedence: 8)")
    assert check_l4(items, "other", "cache", False).allowed is True  # */* allow
    d = check_l4([], "web", "db", True)
    assert (d.allowed, d.reason, d.intention) == (True, DEFAULT_REASON, None)
    assert check_l4([], "web", "db", False).allowed is False


def test_l4_treats_l7_intention_as_deny() -> None:
    l7 = ixn("web", "api", Permissions=[{"Action": "allow", "HTTP": {"PathPrefix": "/"}}])
    d = check_l4([l7, ixn("*", "api", "allow")], "web", "api", default_allow=True)
    assert d.allowed is False
    assert d.reason.startswith("Matched L7 intention: default/web => default/api (Precedence: 9")


# ---------------------------------------------------------------------------------- L7 decisions

L7 = ixn("web", "api", Permissions=[
    {"Action": "deny", "HTTP": {"PathExact": "/admin"}},
    {"Action": "allow", "HTTP": {"PathPrefix": "/v1/", "Methods": ["GET", "HEAD"]}},
    {"Action": "allow", "HTTP": {"PathRegex": "/items/[0-9]+", "Header": [{"Name": "X-Team", "Exact": "blue"}]}},
    {"Action": "deny", "HTTP": {"Header": [{"Name": "X-Debug", "Present": True}]}},
    {"Action": "allow", "HTTP": {"Header": [{"Name": "X-Env", "Prefix": "prod", "Invert": True},
                                            {"Name": "Authorization", "Regex": "Bearer .+"}]}},
    {"Action": "allow", "HTTP": {"Header": [{"Name": "X-Canary", "Present": True, "Invert": True},
                                            {"Name": "X-Id", "Suffix": "-ok"}]}},
])


@pytest.mark.parametrize(
    ("method", "path", "headers", "default_allow", "allowed", "perm"),
    [
        ("GET", "/admin", {}, True, False, 0),
        ("GET", "/admin?x=1", {}, True, False, 0),  # query string is not part of the path match
        ("GET", "/admin/x", {}, False, False, None),  # exact means exact -> falls through to default
        ("GET", "/v1/users", {}, False, True, 1),
        ("head", "/v1/users", {}, False, True, 1),
        ("POST", "/v1/users", {}, False, False, None),
        ("POST", "/v1/users", {}, True, True, None),
        ("PUT", "/items/42", {"x-team": "blue"}, False, True, 2),
        ("PUT", "/items/42x", {"X-Team": "blue"}, False, False, None),  # regex must match the whole path
        ("PUT", "/items/42", {"X-Team": "red"}, False, False, None),
        ("GET", "/other", {"X-Debug": ""}, True, False, 3),
        ("GET", "/other", {"X-Env": "staging", "Authorization": "Bearer t"}, False, True, 4),
        ("GET", "/other", {"X-Env": "production", "Authorization": "Bearer t"}, False, False, None),
        ("GET", "/other", {"Authorization": "Bearer t"}, False, False, None),  # absent header fails inverted Prefix
        ("GET", "/other", {"X-Id": "a-ok"}, False, True, 5),  # absent header satisfies inverted Present
        ("GET", "/other", {"X-Id": "a-ok", "X-Canary": "1"}, False, False, None),
    ],
)
def test_l7_request_decisions(method: str, path: str, headers: dict, default_allow: bool, allowed: bool,
                              perm: int | None) -> None:
    d = check_request([L7, ixn("*", "api", "deny")], "web", "api", method, path, headers, default_allow)
    assert d.allowed is allowed
    assert d.intention is not None and d.intention["SourceName"] == "web"
    if perm is None:
        assert d.reason.startswith(DEFAULT_REASON)
    else:
        assert d.reason.startswith("Matched L7 intention: ") and d.reason.endswith(f"permission {perm}: "
                                                                                  f"{'ALLOW' if allowed else 'DENY'}")


def test_check_request_l4_and_no_intention() -> None:
    items = [ixn("web", "api", "deny"), ixn("*", "api", "allow")]
    assert check_request(items, "web", "api", "GET", "/", {}, True).allowed is False
    assert check_request(items, "other", "api", "GET", "/", {}, False).allowed is True
    d = check_request(items, "other", "db", "GET", "/", None, False)
    assert (d.allowed, d.reason) == (False, DEFAULT_REASON)


# ------------------------------------------------------------------------------------------ SPIFFE

def test_spiffe_service_parses() -> None:
    td = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
    assert spiffe_service(f"spiffe://{td}/ns/default/dc/dc1/svc/web") == (td, "default", "dc1", "web")
    assert spiffe_service(f"spiffe://{td}/ap/default/ns/ns1/dc/dc1/svc/web") == (td, "ns1", "dc1", "web")
    assert spiffe_service("spiffe://other.example/ns/default/dc/dc9/svc/a%20b")[3] == "a b"


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "not a valid Connect identifier"),
        ("http://td/ns/default/dc/dc1/svc/web", "not a valid Connect identifier"),
        ("spiffe:///ns/default/dc/dc1/svc/web", "not a valid Connect identifier"),
        ("spiffe://td", "not a valid Service identifier"),
        ("spiffe://td/agent/client/dc/dc1/id/abc", "not a valid Service identifier"),
        ("spiffe://td/ns/default/dc/dc1/svc/", "not a valid Service identifier"),
        ("spiffe://td/ns/default/dc/dc1/svc/web/extra", "not a valid Service identifier"),
        ("spiffe://td/ap/team/ns/default/dc/dc1/svc/web", "not a valid Service identifier"),
    ],
)
def test_spiffe_service_rejects(uri: str, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        spiffe_service(uri)


# ------------------------------------------------------------------------------ config entries

def test_config_entry_round_trip() -> None:
    entry = {
        "Kind": "service-intentions", "Name": "db",
        "Sources": [
            {"Name": "*", "Action": "deny"},
            {"Name": "web", "Action": "allow", "Description": "web may", "LegacyID": "id-1", "LegacyMeta": {"a": "b"}},
            {"Name": "api", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]},
        ],
    }
    ixns = intentions_from_config_entry(entry)
    assert [(i["SourceName"], i["Precedence"]) for i in ixns] == [("api", 9), ("web", 9), ("*", 8)]
    web = ixns[1]
    assert (web["ID"], web["Meta"], web["Description"], web["DestinationName"]) == ("id-1", {"a": "b"}, "web may", "db")
    back = config_entry_from_intentions("db", ixns)
    assert back["Kind"] == "service-intentions" and back["Name"] == "db"
    assert [s["Name"] for s in back["Sources"]] == ["api", "web", "*"]
    assert back["Sources"][1] == {"Name": "web", "Action": "allow", "Precedence": 9, "Type": "consul",
                                  "Description": "web may", "LegacyID": "id-1", "LegacyMeta": {"a": "b"}}
    assert "Action" not in back["Sources"][0] and back["Sources"][0]["Permissions"]
    assert intentions_from_config_entry(back) == ixns


def test_config_entry_errors_and_upsert_remove() -> None:
    with pytest.raises(BadRequest, match=r"Sources\[1\]: Action must be set"):
        intentions_from_config_entry({"Kind": "service-intentions", "Name": "db",
                                      "Sources": [{"Name": "a", "Action": "allow"}, {"Name": "b", "Action": "x"}]})
    with pytest.raises(BadRequest, match="more than once"):
        intentions_from_config_entry({"Kind": "service-intentions", "Name": "db",
                                      "Sources": [{"Name": "a", "Action": "allow"}, {"Name": "a", "Action": "deny"}]})
    with pytest.raises(BadRequest, match="wildcard"):
        validate_config_entry({"Kind": "service-intentions", "Name": "d*", "Sources": []})
    entry = upsert_into_entry(None, ixn("web", "db"))
    entry = upsert_into_entry(entry, ixn("api", "db", "deny"))
    entry = upsert_into_entry(entry, ixn("web", "db", "deny"))
    assert [(s["Name"], s["Action"]) for s in entry["Sources"]] == [("api", "deny"), ("web", "deny")]
    entry2 = remove_from_entry(entry, "api")
    assert entry2 is not None and [s["Name"] for s in entry2["Sources"]] == ["web"]
    assert remove_from_entry(entry2, "web") is None
