"""Config-entry validation: single-entry rules, cross-entry graph checks, normalization."""

from __future__ import annotations

from typing import Any

import pytest

from lictor.errors import BadRequest
from lictor.registry.config_entries import check_change, graph_errors, service_protocol, validate_entry

RESOLVER_WEB = {"Kind": "service-resolver", "Name": "web",
                "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}}
HTTP_WEB = {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}


def graph(*raw: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for body in raw:
        entry = validate_entry(body)
        out.setdefault(entry["Kind"], {})[entry["Name"]] = entry
    return out


# -- single-entry errors ------------------------------------------------------------------------------

BAD_ENTRIES = [
    ({"Name": "web"}, "does not contain a Kind"),
    ({"Kind": "service-bogus", "Name": "web"}, "invalid config entry kind: service-bogus"),
    ({"Kind": "service-defaults"}, "Name is required"),
    ({"Kind": "service-defaults", "Name": "web", "Nope": 1}, 'unknown field "Nope"'),
    ({"Kind": "service-defaults", "Name": "web", "Protocol": "udp"}, "Protocol: invalid protocol 'udp'"),
    ({"Kind": "service-defaults", "Name": "web", "Mode": "sideways"}, "Mode: invalid value 'sideways'"),
    ({"Kind": "service-defaults", "Name": "web", "MeshGateway": {"Mode": "far"}}, "MeshGateway.Mode"),
    ({"Kind": "service-defaults", "Name": "web", "Namespace": "team-a"}, "Namespace must be 'default'"),
    ({"Kind": "service-defaults", "Name": "web", "UpstreamConfig": {"Overrides": [{"Protocol": "http"}]}},
     "Overrides[0]: Name is required"),
    ({"Kind": "service-defaults", "Name": "web",
      "UpstreamConfig": {"Defaults": {"PassiveHealthCheck": {"Interval": "ten seconds"}}}},
     "UpstreamConfig.Defaults.PassiveHealthCheck.Interval: invalid duration"),
    ({"Kind": "service-defaults", "Name": "web", "Expose": {"Paths": [{"Path": "health", "ListenerPort": 1,
                                                                     "LocalPathPort": 2}]}},
     "Expose.Paths[0].Path must start with '/'"),
    ({"Kind": "proxy-defaults", "Name": "web"}, 'only "global" is supported'),
    ({"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "smtp"}}, "Config.protocol: invalid protocol"),
    ({"Kind": "mesh", "Name": "other"}, 'only "mesh" is supported'),
    ({"Kind": "mesh", "Name": "mesh", "TLS": {"Incoming": {"TLSMinVersion": "SSLv3"}}}, "TLSMinVersion"),
    ({"Kind": "service-splitter", "Name": "web", "Splits": []}, "at least one split"),
    ({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 50}, {"Weight": 40, "Service": "b"}]},
     "must be 100, not 90.00"),
    ({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 150}, {"Weight": -50, "Service": "b"}]},
     "Splits[0].Weight must be between 0 and 100"),
    ({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 50}, {"Weight": 50}]},
     "occurs more than once"),
    ({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": "50"}]}, "cannot unmarshal string"),
    ({"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v9", "Subsets": {"v1": {}}},
     'DefaultSubset "v9" is not a valid subset'),
    ({"Kind": "service-resolver", "Name": "web", "Subsets": {"V_1": {}}}, "Subset 'V_1' is invalid"),
    ({"Kind": "service-resolver", "Name": "web", "Subsets": {"v1": {"Filter": "Service.Meta.version =="}}},
     'Bad Subsets["v1"].Filter'),
    ({"Kind": "service-resolver", "Name": "web", "Redirect": {"Service": "a"}, "Subsets": {"v1": {}}},
     "Redirect and Subsets cannot both be set"),
    ({"Kind": "service-resolver", "Name": "web", "Redirect": {"Service": "web"}}, "points at itself"),
    ({"Kind": "service-resolver", "Name": "web", "Failover": {"v3": {"Service": "b"}}},
     'Bad Failover["v3"]: not a valid subset'),
    ({"Kind": "service-resolver", "Name": "web", "Failover": {"*": {}}}, "one of Service, ServiceSubset"),
    ({"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "5 seconds"}, "ConnectTimeout: invalid duration"),
    ({"Kind": "service-resolver", "Name": "web", "LoadBalancer": {"Policy": "fastest"}},
     "LoadBalancer.Policy: invalid value 'fastest'"),
    ({"Kind": "service-resolver", "Name": "web", "LoadBalancer": {"Policy": "random",
                                                                  "HashPolicies": [{"SourceIP": True}]}},
     "HashPolicies require Policy"),
    ({"Kind": "service-resolver", "Name": "web",
      "LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [{"Field": "header"}]}}, "FieldValue is required"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Match": {"HTTP": {"PathExact": "/a", "PathPrefix": "/b"}}}]},
     "at most one of PathExact, PathPrefix, or PathRegex"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Match": {"HTTP": {"PathPrefix": "api"}}}]},
     "PathPrefix doesn't start with '/'"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Match": {"HTTP": {"PathRegex": "(["}}}]},
     "PathRegex is not a valid regular expression"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Match": {"HTTP": {"Header": [{"Exact": "x"}]}}}]},
     "Header[0] missing required Name"),
    ({"Kind": "service-router", "Name": "web",
      "Routes": [{"Match": {"HTTP": {"Header": [{"Name": "x", "Exact": "a", "Prefix": "b"}]}}}]},
     "should only contain one of Present, Exact"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Match": {"HTTP": {"Methods": ["FETCH"]}}}]},
     "invalid method 'FETCH'"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Destination": {"PrefixRewrite": "/v2"}}]},
     "PrefixRewrite without configuring either PathExact or PathPrefix"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Destination": {"RetryOn": ["sometimes"]}}]},
     "invalid retry condition 'sometimes'"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Destination": {"RetryOnStatusCodes": [700]}}]},
     "invalid status code 700"),
    ({"Kind": "service-router", "Name": "web", "Routes": [{"Destination": {"RequestTimeout": "soon"}}]},
     "Routes[0].Destination.RequestTimeout: invalid duration"),
    ({"Kind": "ingress-gateway", "Name": "gw", "Listeners": [{"Port": 8080, "Protocol": "tcp",
                                                              "Services": [{"Name": "a"}, {"Name": "b"}]}]},
     "multiple services per listener"),
    ({"Kind": "ingress-gateway", "Name": "gw", "Listeners": [{"Port": 8080, "Services": []}]},
     "no service declared"),
    ({"Kind": "ingress-gateway", "Name": "gw", "Listeners": [{"Port": 8080, "Services": [{"Name": "*"}]}]},
     "Wildcard service name is only valid for L7"),
    ({"Kind": "ingress-gateway", "Name": "gw",
      "Listeners": [{"Port": 8080, "Services": [{"Name": "a", "Hosts": ["a.example"]}]}]},
     "not supported for the tcp protocol"),
    ({"Kind": "ingress-gateway", "Name": "gw", "Listeners": [{"Port": 8080, "Protocol": "ftp",
                                                              "Services": [{"Name": "a"}]}]},
     "Listeners[0].Protocol: invalid protocol 'ftp'"),
    ({"Kind": "ingress-gateway", "Name": "gw", "Listeners": [
        {"Port": 80, "Services": [{"Name": "a"}]}, {"Port": 80, "Services": [{"Name": "b"}]}]},
     "port 80 declared on two listeners"),
    ({"Kind": "ingress-gateway", "Name": "gw", "Listeners": [
        {"Port": 80, "Protocol": "http", "Services": [{"Name": "a", "Hosts": ["bad host!"]}]}]},
     "Host 'bad host!' is not valid"),
    ({"Kind": "service-intentions", "Name": "db", "Sources": [{"Name": "web", "Action": "maybe"}]},
     "Action must be set to 'allow' or 'deny'"),
    ({"Kind": "service-intentions", "Name": "db",
      "Sources": [{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "nope"}}]}]},
     "PathPrefix doesn't start with '/'"),
    ({"Kind": "service-intentions", "Name": "db",
      "Sources": [{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}]}, "more than once"),
    ({"Kind": "service-intentions", "Name": "db", "Sources": [{"Name": "web", "Action": "allow", "Extra": 1}]},
     'unknown field "Extra"'),
]


@pytest.mark.parametrize(("body", "message"), BAD_ENTRIES, ids=[m[:40] for _, m in BAD_ENTRIES])
def test_invalid_entries_are_rejected_naming_the_problem(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_entry(body)
    assert info.value.status == 400
    assert message in info.value.message


def test_valid_entries_are_normalized() -> None:
    sd = validate_entry({"kind": "service-defaults", "name": "web", "protocol": "HTTP",
                         "upstream_config": {"overrides": [{"name": "db", "connect_timeout_ms": 100}]}})
    assert sd["Kind"] == "service-defaults" and sd["Name"] == "web" and sd["Protocol"] == "http"
    assert sd["UpstreamConfig"]["Overrides"][0] == {"Name": "db", "ConnectTimeoutMs": 100}
    assert sd["TransparentProxy"] == {} and sd["MeshGateway"] == {} and sd["Expose"] == {}

    split = validate_entry({"Kind": "service-splitter", "Name": "web",
                            "Splits": [{"Weight": 33.33}, {"Weight": 33.33, "Service": "b"},
                                       {"Weight": 33.34, "Service": "c"}]})
    assert [s["Weight"] for s in split["Splits"]] == [33.33, 33.33, 33.34]

    router = validate_entry({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/api", "Methods": ["get", "post"]}},
         "Destination": {"Service": "api", "PrefixRewrite": "/", "RequestTimeout": 2_000_000_000}}]})
    route = router["Routes"][0]
    assert route["Match"]["HTTP"]["Methods"] == ["GET", "POST"]
    assert route["Destination"]["RequestTimeout"] == "2s"  # nanoseconds become a duration string

    ingress = validate_entry({"Kind": "ingress-gateway", "Name": "gw",
                              "Listeners": [{"Port": 8080, "Services": [{"Name": "web"}]}]})
    assert ingress["Listeners"][0]["Protocol"] == "tcp"

    intentions = validate_entry({"Kind": "service-intentions", "Name": "db", "Sources": [
        {"Name": "*", "Action": "deny"}, {"Name": "web", "Action": "allow"}]})
    assert [(s["Name"], s["Precedence"]) for s in intentions["Sources"]] == [("web", 9), ("*", 8)]

    assert validate_entry({"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}})
    assert validate_entry({"Kind": "mesh", "Name": "mesh", "TransparentProxy": {"MeshDestinationsOnly": True}})
    assert validate_entry({"Kind": "service-resolver", "Name": "web", "Redirect": {"Service": "web",
                                                                                   "Datacenter": "dc2"}})


# -- cross-entry checks --------------------------------------------------------------------------------


def test_protocol_resolution_order() -> None:
    assert service_protocol({}, "web") == "tcp"
    g = graph({"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "grpc"}})
    assert service_protocol(g, "web") == "grpc"
    g = graph({"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "grpc"}}, HTTP_WEB)
    assert service_protocol(g, "web") == "http"


def test_splitter_and_router_need_an_l7_protocol() -> None:
    splitter = validate_entry({"Kind": "service-splitter", "Name": "web",
                               "Splits": [{"Weight": 50}, {"Weight": 50, "Service": "web-v2"}]})
    with pytest.raises(BadRequest, match='"web" uses a protocol "tcp" that does not permit advanced routing'):
        check_change({}, "service-splitter", "web", splitter)
    router = validate_entry({"Kind": "service-router", "Name": "web",
                             "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}}}]})
    with pytest.raises(BadRequest, match="service-router"):
        check_change({}, "service-router", "web", router)
    check_change(graph(HTTP_WEB), "service-splitter", "web", splitter)
    check_change(graph({"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http2"}}),
                 "service-router", "web", router)


def test_changing_protocol_under_a_router_is_rejected() -> None:
    g = graph(HTTP_WEB, {"Kind": "service-router", "Name": "web",
                         "Routes": [{"Match": {"HTTP": {"PathPrefix": "/a"}}}]})
    with pytest.raises(BadRequest, match="does not permit advanced routing"):
        check_change(g, "service-defaults", "web", validate_entry({**HTTP_WEB, "Protocol": "tcp"}))
    with pytest.raises(BadRequest, match="does not permit advanced routing"):
        check_change(g, "service-defaults", "web", None)
    check_change(g, "service-router", "web", None)  # removing the router itself is fine


def test_referenced_subsets_must_exist() -> None:
    g = graph(HTTP_WEB, RESOLVER_WEB)
    good = validate_entry({"Kind": "service-splitter", "Name": "web",
                           "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]})
    check_change(g, "service-splitter", "web", good)
    bad = validate_entry({"Kind": "service-splitter", "Name": "web",
                          "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v3"}]})
    with pytest.raises(BadRequest, match='does not have a subset named "v3"'):
        check_change(g, "service-splitter", "web", bad)
    router = validate_entry({"Kind": "service-router", "Name": "web", "Routes": [
        {"Destination": {"Service": "api", "ServiceSubset": "canary"}}]})
    with pytest.raises(BadRequest, match='subset "canary" of service "api"'):
        check_change(g, "service-router", "web", router)
    failover = validate_entry({"Kind": "service-resolver", "Name": "db", "Failover": {
        "*": {"Targets": [{"Service": "web", "ServiceSubset": "v7"}]}}})
    with pytest.raises(BadRequest, match='Failover\\["\\*"\\] of service-resolver "db"'):
        check_change(g, "service-resolver", "db", failover)
    redirect = validate_entry({"Kind": "service-resolver", "Name": "db", "Redirect": {"Service": "web",
                                                                                      "ServiceSubset": "v9"}})
    with pytest.raises(BadRequest, match="Redirect of service-resolver"):
        check_change(g, "service-resolver", "db", redirect)


def test_deleting_a_resolver_whose_subsets_are_used_is_rejected() -> None:
    g = graph(HTTP_WEB, RESOLVER_WEB, {"Kind": "service-splitter", "Name": "web", "Splits": [
        {"Weight": 50, "ServiceSubset": "v1"}, {"Weight": 50, "ServiceSubset": "v2"}]})
    with pytest.raises(BadRequest, match='subset named "v1"'):
        check_change(g, "service-resolver", "web", None)
    shrunk = validate_entry({**RESOLVER_WEB, "Subsets": {"v1": {}}})
    with pytest.raises(BadRequest, match='subset named "v2"'):
        check_change(g, "service-resolver", "web", shrunk)


def test_redirect_loops_are_rejected() -> None:
    g = graph({"Kind": "service-resolver", "Name": "a", "Redirect": {"Service": "b"}},
              {"Kind": "service-resolver", "Name": "b", "Redirect": {"Service": "c"}})
    loop = validate_entry({"Kind": "service-resolver", "Name": "c", "Redirect": {"Service": "a"}})
    with pytest.raises(BadRequest, match="circular resolver redirect: a -> b -> c -> a"):
        check_change(g, "service-resolver", "c", loop)
    check_change(g, "service-resolver", "c", validate_entry({"Kind": "service-resolver", "Name": "c",
                                                             "Redirect": {"Service": "d"}}))
    two = graph({"Kind": "service-resolver", "Name": "a", "Redirect": {"Service": "b"}})
    with pytest.raises(BadRequest, match="a -> b -> a"):
        check_change(two, "service-resolver", "b", validate_entry({"Kind": "service-resolver", "Name": "b",
                                                                   "Redirect": {"Service": "a"}}))


def test_ingress_listener_protocol_must_match_services() -> None:
    http_gw = validate_entry({"Kind": "ingress-gateway", "Name": "gw", "Listeners": [
        {"Port": 8080, "Protocol": "http", "Services": [{"Name": "web", "Hosts": ["web.example.com"]}]}]})
    with pytest.raises(BadRequest, match='does not match defined listener protocol "http"'):
        check_change({}, "ingress-gateway", "gw", http_gw)
    g = graph(HTTP_WEB)
    check_change(g, "ingress-gateway", "gw", http_gw)
    g["ingress-gateway"] = {"gw": http_gw}
    with pytest.raises(BadRequest, match="listener protocol"):
        check_change(g, "service-defaults", "web", None)


def test_only_new_problems_are_reported() -> None:
    # A graph that is already inconsistent (written before a rule existed) must not block an
    # unrelated write.
    broken = {"service-router": {"web": validate_entry({"Kind": "service-router", "Name": "web", "Routes": []})}}
    assert graph_errors(broken)
    check_change(broken, "service-defaults", "db", validate_entry({"Kind": "service-defaults", "Name": "db"}))
