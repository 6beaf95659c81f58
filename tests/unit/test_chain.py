"""Discovery-chain compiler: routers -> splitters -> resolvers, over plain config-entry dicts."""

from __future__ import annotations

import pytest

from lictor.gateway.chain import (
    ChainError,
    HeaderMods,
    chain_protocol,
    compile_chain,
    discovery_chain_json,
    target_id,
)
from lictor.gateway.ingress import build_listeners, host_matches, strip_port

HTTP = {"service-defaults": {"web": {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}}}


def entries(**kinds: dict) -> dict:
    out = {k: dict(v) for k, v in HTTP.items()}
    for kind, by_name in kinds.items():
        out[kind.replace("_", "-")] = by_name
    return out


RESOLVER = {
    "Kind": "service-resolver", "Name": "web", "DefaultSubset": "v1", "ConnectTimeout": "2s",
    "RequestTimeout": "7s",
    "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True}},
}
SPLITTER = {"Kind": "service-splitter", "Name": "web", "Splits": [
    {"Weight": 90, "ServiceSubset": "v1"},
    {"Weight": 10, "ServiceSubset": "v2", "RequestHeaders": {"Set": {"x-canary": "1"}}},
]}


def test_no_entries_is_a_default_chain_to_the_service() -> None:
    chain = compile_chain("web", {})
    assert chain.protocol == "tcp"
    assert len(chain.routes) == 1 and chain.routes[0].default
    split = chain.routes[0].destination.splits[0]
    assert split.basis_points == 10000
    assert split.resolver.target.id == "web.default.default.dc1"
    assert split.resolver.default and split.resolver.connect_timeout == 5.0
    assert chain.start_node == "resolver:web.default.default.dc1"
    assert discovery_chain_json(chain)["Chain"]["Default"] is True


def test_protocol_from_service_defaults_then_proxy_defaults() -> None:
    assert chain_protocol("web", HTTP) == "http"
    pd = {"proxy-defaults": {"global": {"Config": {"protocol": "HTTP2"}}}}
    assert chain_protocol("api", pd) == "http2"
    assert chain_protocol("api", {}) == "tcp"
    assert compile_chain("api", {}, protocol="grpc").protocol == "grpc"


def test_target_ids_follow_consul() -> None:
    assert target_id("web") == "web.default.default.dc1"
    assert target_id("web", "v1", "dc2") == "v1.web.default.default.dc2"


def test_resolver_default_subset_filters_and_timeouts() -> None:
    chain = compile_chain("web", entries(service_resolver={"web": RESOLVER}))
    node = chain.default_route.destination.splits[0].resolver
    assert node.target.subset == "v1" and node.target.filter == "Service.Meta.version == v1"
    assert node.connect_timeout == 2.0 and node.request_timeout == 7.0
    assert not node.default
    assert node.target.accepts({"Service": {"Meta": {"version": "v1"}}})
    assert not node.target.accepts({"Service": {"Meta": {"version": "v2"}}})


def test_splitter_weights_in_basis_points_with_headers() -> None:
    chain = compile_chain("web", entries(service_resolver={"web": RESOLVER}, service_splitter={"web": SPLITTER}))
    dest = chain.default_route.destination
    assert dest.splitter == "web"
    assert [(s.basis_points, s.resolver.target.subset) for s in dest.splits] == [(9000, "v1"), (1000, "v2")]
    assert dest.splits[1].request_headers == HeaderMods(set=(("x-canary", "1"),))
    assert dest.splits[1].resolver.target.only_passing
    assert chain.start_node == "splitter:web.default.default"


def test_uneven_weights_round_to_exactly_10000() -> None:
    splitter = {"Splits": [{"Weight": 33.33, "ServiceSubset": "v1"}, {"Weight": 33.33, "ServiceSubset": "v2"},
                           {"Weight": 33.34, "Service": "other"}]}
    chain = compile_chain("web", entries(service_resolver={"web": RESOLVER}, service_splitter={"web": splitter}))
    points = [s.basis_points for s in chain.default_route.destination.splits]
    assert sum(points) == 10000 and points == [3333, 3333, 3334]


def test_zero_weight_splits_are_dropped() -> None:
    splitter = {"Splits": [{"Weight": 100, "ServiceSubset": "v1"}, {"Weight": 0, "ServiceSubset": "v2"}]}
    chain = compile_chain("web", entries(service_resolver={"web": RESOLVER}, service_splitter={"web": splitter}))
    assert [s.resolver.target.subset for s in chain.default_route.destination.splits] == ["v1"]


def test_nested_splitters_flatten_with_multiplied_weights() -> None:
    e = entries(
        service_splitter={
            "web": {"Splits": [{"Weight": 50, "Service": "web"}, {"Weight": 50, "Service": "api",
                                                                    "ResponseHeaders": {"Add": {"a": "1"}}}]},
            "api": {"Splits": [{"Weight": 20, "Service": "api-v1"}, {"Weight": 80, "Service": "api-v2"}]},
        },
    )
    e["service-defaults"]["api"] = {"Protocol": "http"}
    dest = compile_chain("web", e).default_route.destination
    got = [(s.resolver.target.service, s.weight, s.basis_points) for s in dest.splits]
    assert got == [("web", 50.0, 5000), ("api-v1", 10.0, 1000), ("api-v2", 40.0, 4000)]
    assert dest.splits[1].response_headers == HeaderMods(add=(("a", "1"),))


def test_splitter_loop_is_an_error() -> None:
    e = entries(service_splitter={"web": {"Splits": [{"Weight": 100, "Service": "a"}]},
                                  "a": {"Splits": [{"Weight": 100, "Service": "web2"}]},
                                  "web2": {"Splits": [{"Weight": 100, "Service": "a"}]}})
    with pytest.raises(ChainError):
        compile_chain("web", e)


def test_router_routes_in_order_then_catch_all() -> None:
    router = {"Routes": [
        {"Match": {"HTTP": {"Header": [{"Name": "X-Beta", "Exact": "1"}]}},
         "Destination": {"ServiceSubset": "v2", "NumRetries": 3, "RetryOnStatusCodes": [500, 503],
                         "RequestTimeout": "1500ms", "RequestHeaders": {"Add": {"x-route": "beta"}}}},
        {"Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["get", "POST"]}},
         "Destination": {"Service": "admin", "PrefixRewrite": "/", "RetryOnConnectFailure": True}},
        {"Match": {"HTTP": {"PathRegex": "/v[0-9]+/.*", "QueryParam": [{"Name": "debug", "Present": True}]}},
         "Destination": {}},
    ]}
    chain = compile_chain("web", entries(service_resolver={"web": RESOLVER}, service_splitter={"web": SPLITTER},
                                         service_router={"web": router}))
    assert chain.has_router and chain.start_node == "router:web.default.default"
    assert len(chain.routes) == 4 and chain.routes[-1].default
    beta = chain.routes[0]
    assert beta.match.headers[0].name == "x-beta"
    assert beta.destination.splitter == ""  # a subset destination skips the splitter
    assert beta.destination.splits[0].resolver.target.subset == "v2"
    assert beta.destination.retry.num_retries == 3 and beta.destination.retry.on_status_codes == {500, 503}
    assert beta.destination.retry.enabled
    assert beta.destination.request_timeout == 1.5
    admin = chain.routes[1]
    assert admin.match.methods == {"GET", "POST"}
    assert admin.destination.splits[0].resolver.target.id == "admin.default.default.dc1"
    assert admin.destination.retry.num_retries == 1 and admin.destination.retry.on_connect_failure
    assert chain.routes[2].match.path_regex is not None
    assert chain.routes[2].destination.splitter == "web"  # no subset: through the splitter
    assert chain.services() == {"web", "admin"}


def test_retries_without_condition_are_off() -> None:
    router = {"Routes": [{"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"NumRetries": 5}}]}
    chain = compile_chain("web", entries(service_router={"web": router}))
    assert not chain.routes[0].destination.retry.enabled


def test_tcp_chain_ignores_router_and_splitter() -> None:
    e = {"service-router": {"db": {"Routes": [{"Destination": {"Service": "x"}}]}},
         "service-splitter": {"db": {"Splits": [{"Weight": 100, "Service": "y"}]}}}
    chain = compile_chain("db", e)
    assert chain.protocol == "tcp" and len(chain.routes) == 1
    assert chain.services() == {"db"}


def test_redirect_is_followed_and_loops_rejected() -> None:
    e = entries(service_resolver={"web": {"Redirect": {"Service": "web-new"}},
                                  "web-new": {"DefaultSubset": "blue", "Subsets": {"blue": {"Filter": ""}}}})
    node = compile_chain("web", e).default_route.destination.splits[0].resolver
    assert node.target.id == "blue.web-new.default.default.dc1"
    loop = entries(service_resolver={"web": {"Redirect": {"Service": "a"}}, "a": {"Redirect": {"Service": "web"}}})
    with pytest.raises(ChainError, match="circular"):
        compile_chain("web", loop)


def test_failover_per_subset_and_wildcard() -> None:
    resolver = dict(RESOLVER, Failover={
        "v1": {"Targets": [{"ServiceSubset": "v2"}, {"Service": "backup"},
                           {"Service": "far", "Datacenter": "dc9"}, {"Service": "p", "Peer": "other"}]},
        "*": {"Service": "backup"},
    })
    e = entries(service_resolver={"web": resolver}, service_router={"web": {"Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/b"}}, "Destination": {"ServiceSubset": "v2"}}]}})
    chain = compile_chain("web", e)
    v1 = chain.default_route.destination.splits[0].resolver
    assert [t.id for t in v1.targets] == ["v1.web.default.default.dc1", "v2.web.default.default.dc1",
                                          "backup.default.default.dc1"]
    v2 = chain.routes[0].destination.splits[0].resolver
    assert [t.id for t in v2.targets] == ["v2.web.default.default.dc1", "backup.default.default.dc1"]


def test_failover_to_a_service_applies_its_default_subset() -> None:
    e = entries(service_resolver={
        "web": {"Failover": {"*": {"Service": "backup"}}},
        "backup": {"DefaultSubset": "main", "Subsets": {"main": {"Filter": "Service.Meta.main == true"}}},
    })
    node = compile_chain("web", e).default_route.destination.splits[0].resolver
    assert node.targets[1].id == "main.backup.default.default.dc1"
    assert node.targets[1].filter == "Service.Meta.main == true"


def test_unknown_subset_and_bad_filter_are_errors() -> None:
    router = {"Routes": [{"Destination": {"ServiceSubset": "nope"}}]}
    with pytest.raises(ChainError, match="nope"):
        compile_chain("web", entries(service_router={"web": router}))
    bad = {"web": {"Subsets": {"x": {"Filter": "Service.Meta ==="}}, "DefaultSubset": "x"}}
    with pytest.raises(ChainError, match="Filter"):
        compile_chain("web", entries(service_resolver=bad))


def test_load_balancer_policies_compile() -> None:
    resolver = {"LoadBalancer": {"Policy": "ring_hash", "RingHashConfig": {"MinimumRingSize": 64},
                                 "HashPolicies": [{"Field": "cookie", "FieldValue": "sid",
                                                   "CookieConfig": {"TTL": "1h", "Path": "/"}},
                                                  {"SourceIP": True, "Terminal": True}]}}
    node = compile_chain("web", entries(service_resolver={"web": resolver})).default_route.destination.splits[0].resolver
    lb = node.load_balancer
    assert lb.policy == "ring_hash" and lb.min_ring_size == 64
    assert lb.hash_policies[0].cookie_ttl == 3600.0 and lb.hash_policies[1].source_ip
    least = {"LoadBalancer": {"Policy": "least_request", "LeastRequestConfig": {"ChoiceCount": 3}}}
    lb2 = compile_chain("web", entries(service_resolver={"web": least})).default_route.destination.splits[0]
    assert lb2.resolver.load_balancer.choice_count == 3


def test_override_connect_timeout() -> None:
    chain = compile_chain("web", entries(service_resolver={"web": RESOLVER}), override_connect_timeout=0.25)
    assert chain.default_route.destination.splits[0].resolver.connect_timeout == 0.25


def test_discovery_chain_json_shape() -> None:
    router = {"Routes": [{"Match": {"HTTP": {"PathPrefix": "/x"}}, "Destination": {"ServiceSubset": "v2"}}]}
    resolver = dict(RESOLVER, Failover={"v1": {"ServiceSubset": "v2"}})
    chain = compile_chain("web", entries(service_resolver={"web": resolver}, service_splitter={"web": SPLITTER},
                                         service_router={"web": router}))
    body = discovery_chain_json(chain, "abc.consul")["Chain"]
    assert body["ServiceName"] == "web" and body["Protocol"] == "http" and body["Default"] is False
    assert body["StartNode"] == "router:web.default.default"
    router_node = body["Nodes"]["router:web.default.default"]
    assert [r["NextNode"] for r in router_node["Routes"]] == [
        "resolver:v2.web.default.default.dc1", "splitter:web.default.default"]
    splitter = body["Nodes"]["splitter:web.default.default"]
    assert [s["Weight"] for s in splitter["Splits"]] == [90.0, 10.0]
    v1 = body["Nodes"]["resolver:v1.web.default.default.dc1"]["Resolver"]
    assert v1["Failover"]["Targets"] == ["v2.web.default.default.dc1"] and v1["ConnectTimeout"] == "2s"
    target = body["Targets"]["v1.web.default.default.dc1"]
    assert target["SNI"] == "v1.web.default.dc1.internal.abc.consul"
    assert target["Subset"]["Filter"] == "Service.Meta.version == v1"


# -- ingress listener table -------------------------------------------------------------------------

INGRESS = {"Kind": "ingress-gateway", "Name": "ingress-gw", "Listeners": [
    {"Port": 8080, "Protocol": "http", "Services": [
        {"Name": "web"}, {"Name": "api", "Hosts": ["api.example.com", "*.api.example.com"],
                          "RequestHeaders": {"Set": {"x-gw": "1"}}},
        {"Name": "*"}]},
    {"Port": 9000, "Protocol": "tcp", "Services": [{"Name": "db"}]},
]}


def test_ingress_listeners_and_virtual_hosts() -> None:
    http, tcp = build_listeners(INGRESS)
    assert http.port == 8080 and tcp.protocol == "tcp"
    assert http.service_for_host("web.ingress.example.com")[1] == "web"
    assert http.service_for_host("web.ingress.consul:8080")[1] == "web"
    assert http.service_for_host("API.example.com")[1] == "api"
    svc, name = http.service_for_host("x.api.example.com:443")
    assert name == "api" and svc.request_headers == HeaderMods(set=(("x-gw", "1"),))
    assert http.service_for_host("other.ingress.lan", known={"other"})[1] == "other"
    assert http.service_for_host("other.ingress.lan") is None
    assert http.service_for_host("nothing.example.org") is None
    assert tcp.service_for_host("")[1] == "db"


def test_host_helpers() -> None:
    assert strip_port("a.b:80") == "a.b" and strip_port("[::1]:80") == "[::1]" and strip_port("a") == "a"
    assert host_matches("*", "x", "x") == 1
    assert host_matches("*.a.com", "b.a.com", "b.a.com") == 2
    assert host_matches("*.a.com", "a.com", "a.com") == 0
    assert host_matches("web.ingress.*", "web.ingress.x", "web.ingress.x") == 2
