"""Per-request decisions: route matching, split draws, header changes, targets, balancing, retries."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lictor.gateway.chain import HeaderMods, LoadBalancer, RetryPolicy, compile_chain
from lictor.gateway.router import (
    BalancerState,
    Instance,
    RequestHead,
    apply_header_mods,
    choose_split,
    decide,
    entry_healthy,
    hash_key,
    instances_by_target,
    pick_instance,
    route_matches,
    select_target,
    should_retry,
)

RESOLVER = {
    "DefaultSubset": "v1", "RequestTimeout": "9s",
    "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"},
                "beta": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True}},
    "Failover": {"v1": {"Targets": [{"Service": "backup"}]}},
}
ROUTER = {"Routes": [
    {"Match": {"HTTP": {"Header": [{"Name": "x-beta", "Exact": "1"}]}},
     "Destination": {"ServiceSubset": "v2", "RequestHeaders": {"Set": {"x-route": "beta"}},
                     "ResponseHeaders": {"Remove": ["server"]}}},
    {"Match": {"HTTP": {"PathPrefix": "/old/", "Methods": ["GET"]}},
     "Destination": {"PrefixRewrite": "/new/", "RequestTimeout": "2s", "NumRetries": 3,
                     "RetryOnStatusCodes": [500]}},
    {"Match": {"HTTP": {"PathExact": "/exact"}}, "Destination": {"PrefixRewrite": "/replaced"}},
    {"Match": {"HTTP": {"QueryParam": [{"Name": "canary", "Exact": "yes"}]}}, "Destination": {"ServiceSubset": "v2"}},
]}
SPLITTER = {"Splits": [{"Weight": 90, "ServiceSubset": "v1"},
                       {"Weight": 10, "ServiceSubset": "v2", "RequestHeaders": {"Add": {"x-split": "v2"}}}]}
ENTRIES = {
    "service-defaults": {"web": {"Protocol": "http"}},
    "service-resolver": {"web": RESOLVER},
    "service-router": {"web": ROUTER},
    "service-splitter": {"web": SPLITTER},
}
CHAIN = compile_chain("web", ENTRIES)


def head(path: str = "/", method: str = "GET", query: str = "", **headers: str) -> RequestHead:
    return RequestHead(method, path, query, {k.replace("_", "-"): v for k, v in headers.items()})


def entry(sid: str, version: str, *statuses: str, service: str = "web-sidecar-proxy", port: int = 21000) -> dict:
    return {"Node": {"Node": "n1", "Address": "127.0.0.1"},
            "Service": {"ID": sid, "Service": service, "Port": port, "Address": "", "Meta": {"version": version}},
            "Checks": [{"Status": s} for s in statuses]}


def test_header_route_goes_to_v2_with_route_headers() -> None:
    d = decide(CHAIN, head(x_beta="1"), draw=0.0)
    assert d.resolver.target.subset == "v2" and d.route is CHAIN.routes[0]
    assert d.request_headers == HeaderMods(set=(("x-route", "beta"),))
    assert d.response_headers.remove == ("server",)
    assert d.timeout == 9.0  # falls back to the resolver's RequestTimeout
    assert decide(CHAIN, head(x_beta="2"), 0.0).route.default


def test_prefix_rewrite_methods_timeout_retries() -> None:
    d = decide(CHAIN, head("/old/a/b?x"), 0.0)
    assert d.path == "/new/a/b?x" and d.timeout == 2.0 and d.retry.num_retries == 3
    assert decide(CHAIN, head("/old/a", method="POST"), 0.0).route.default
    assert decide(CHAIN, head("/exact"), 0.0).path == "/replaced"
    assert decide(CHAIN, head("/exact/no"), 0.0).path == "/exact/no"


def test_query_param_route() -> None:
    assert decide(CHAIN, head("/", query="a=1&canary=yes"), 50.0).resolver.target.subset == "v2"
    assert decide(CHAIN, head("/", query="canary=no"), 50.0).route.default


def test_split_draw_is_exact_in_distribution() -> None:
    splits = CHAIN.default_route.destination.splits
    assert choose_split(splits, 0.0).resolver.target.subset == "v1"
    assert choose_split(splits, 89.999).resolver.target.subset == "v1"
    assert choose_split(splits, 90.0).resolver.target.subset == "v2"
    assert choose_split(splits, 99.9999).resolver.target.subset == "v2"
    # every basis point of the draw space lands in exactly one split: 9000 / 1000
    counts = Counter(choose_split(splits, bp / 100).resolver.target.subset for bp in range(10000))
    assert counts == {"v1": 9000, "v2": 1000}
    rng = random.Random(7)
    seen = Counter(decide(CHAIN, head(), rng.random() * 100).resolver.target.subset for _ in range(20000))
    assert abs(seen["v2"] / 20000 - 0.10) < 0.01
    d = decide(CHAIN, head(), 95.0)
    assert d.request_headers == HeaderMods(add=(("x-split", "v2"),))


@pytest.mark.parametrize(("match", "headers", "expected"), [
    ({"Name": "h", "Present": True}, {"h": ""}, True),
    ({"Name": "h", "Present": True}, {}, False),
    ({"Name": "h", "Present": True, "Invert": True}, {}, True),
    ({"Name": "h", "Prefix": "ab"}, {"h": "abc"}, True),
    ({"Name": "h", "Suffix": "bc"}, {"h": "abc"}, True),
    ({"Name": "h", "Suffix": "bc"}, {"h": "abd"}, False),
    ({"Name": "h", "Regex": "a.c"}, {"h": "abc"}, True),
    ({"Name": "h", "Regex": "a"}, {"h": "abc"}, False),  # whole-value match
    ({"Name": "h", "Exact": "x", "Invert": True}, {"h": "y"}, True),
    ({"Name": "h", "Exact": "x", "Invert": True}, {"h": "x"}, False),
    ({"Name": "H", "Exact": "x"}, {"h": "x"}, True),  # header names are case-insensitive
])
def test_header_matchers(match: dict, headers: dict, expected: bool) -> None:
    router = {"Routes": [{"Match": {"HTTP": {"Header": [match]}}, "Destination": {}}]}
    chain = compile_chain("s", {"service-router": {"s": router}}, protocol="http")
    assert route_matches(chain.routes[0].match, RequestHead("GET", "/", "", headers)) is expected


def test_query_and_regex_matchers() -> None:
    router = {"Routes": [{"Match": {"HTTP": {"PathRegex": "/api/v[0-9]+", "QueryParam": [
        {"Name": "a", "Regex": "[0-9]+"}, {"Name": "b", "Present": True}]}}, "Destination": {}}]}
    m = compile_chain("s", {"service-router": {"s": router}}, protocol="http").routes[0].match
    assert route_matches(m, RequestHead("GET", "/api/v2", "a=12&b="))
    assert not route_matches(m, RequestHead("GET", "/api/v2", "a=x&b="))
    assert not route_matches(m, RequestHead("GET", "/api/v2", "a=1"))
    assert not route_matches(m, RequestHead("GET", "/api/v2/x", "a=1&b=1"))


def test_apply_header_mods_order() -> None:
    headers = [("Host", "a"), ("X-A", "1"), ("x-a", "2"), ("Server", "s")]
    mods = HeaderMods(add=(("x-new", "n"),), set=(("X-A", "9"),), remove=("server",))
    assert apply_header_mods(headers, mods) == [("Host", "a"), ("X-A", "9"), ("x-new", "n")]
    assert apply_header_mods(headers, HeaderMods()) is headers


def test_health_rules() -> None:
    assert entry_healthy(entry("a", "v1", "passing", "warning"), only_passing=False)
    assert not entry_healthy(entry("a", "v1", "passing", "warning"), only_passing=True)
    assert not entry_healthy(entry("a", "v1", "critical"), only_passing=False)
    assert entry_healthy(entry("a", "v1"), only_passing=True)


def test_select_target_filters_subsets_and_fails_over() -> None:
    node = CHAIN.default_route.destination.splits[0].resolver
    entries = {"web": [entry("a", "v1", "passing"), entry("b", "v2", "passing"), entry("c", "v1", "critical"),
                       entry("d", "v1", "warning")],
               "backup": [entry("z", "v9", "passing", service="backup", port=9)]}
    pick = select_target(node, instances_by_target(CHAIN.targets.values(), entries))
    assert pick is not None and not pick.failover
    assert [i.id for i in pick.instances] == ["n1/a", "n1/d"]
    pick = select_target(node, instances_by_target(CHAIN.targets.values(), entries), excluded={"n1/a"})
    assert pick is not None and [i.id for i in pick.instances] == ["n1/d"]
    pick = select_target(node, instances_by_target(CHAIN.targets.values(), entries), excluded={"n1/a", "n1/d"})
    assert pick is not None and pick.failover and pick.target.service == "backup"
    entries["web"] = [entry("b", "v2", "passing"), entry("c", "v1", "critical")]
    pick = select_target(node, instances_by_target(CHAIN.targets.values(), entries))
    assert pick is not None and pick.failover and pick.target.service == "backup"
    assert pick.instances[0] == Instance("n1/z", "127.0.0.1", 9, "backup")
    entries["backup"] = []
    assert select_target(node, instances_by_target(CHAIN.targets.values(), entries)) is None


def test_only_passing_subset_drops_warning() -> None:
    chain = compile_chain("web", dict(ENTRIES, **{"service-router": {"web": {"Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/b"}}, "Destination": {"ServiceSubset": "beta"}}]}}}))
    warn = {"web": [entry("w", "v2", "warning")]}
    node = decide(chain, head("/b"), 0.0).resolver
    assert select_target(node, instances_by_target(chain.targets.values(), warn)) is None
    v2 = decide(CHAIN, head(x_beta="1"), 0.0).resolver
    assert select_target(v2, instances_by_target(CHAIN.targets.values(), warn)) is not None


INSTANCES = tuple(Instance(f"n/{i}", "127.0.0.1", 1000 + i, "web") for i in range(5))


def test_round_robin_and_random_and_least_request() -> None:
    state, rng = BalancerState(), random.Random(1)
    rr = [pick_instance(INSTANCES, LoadBalancer(), state, rng, target_id="t").port for _ in range(10)]
    assert rr == [1000, 1001, 1002, 1003, 1004] * 2
    seen = Counter(pick_instance(INSTANCES, LoadBalancer(policy="random"), state, rng).id for _ in range(5000))
    assert len(seen) == 5 and min(seen.values()) > 800
    state.inflight = {i.id: 10 for i in INSTANCES[1:]}
    lr = LoadBalancer(policy="least_request", choice_count=5)
    hits = Counter(pick_instance(INSTANCES, lr, state, rng).id for _ in range(200))
    assert hits.most_common(1)[0][0] == "n/0"


@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_hash_policies_are_sticky_and_spread(policy: str) -> None:
    lb = LoadBalancer(policy=policy)
    state, rng = BalancerState(), random.Random(3)
    picks = {}
    for user in range(300):
        key = hash_key((_hp("header", "x-user"),), head(x_user=str(user)))[0]
        first = pick_instance(INSTANCES, lb, state, rng, key)
        assert all(pick_instance(INSTANCES, lb, state, rng, key) == first for _ in range(3))
        assert pick_instance(tuple(reversed(INSTANCES)), lb, state, rng, key) == first  # order-independent
        picks[user] = first
    spread = Counter(p.id for p in picks.values())
    assert len(spread) == 5 and min(spread.values()) > 25
    # removing one instance moves only the users that were on it (consistent hashing)
    smaller = INSTANCES[:4]
    moved = sum(1 for u, p in picks.items() if p in smaller and pick_instance(
        smaller, lb, state, rng, hash_key((_hp("header", "x-user"),), head(x_user=str(u)))[0]) != p)
    assert moved <= 0.1 * len(picks)


def _hp(field: str, value: str, **kw: object):  # noqa: ANN202
    from lictor.gateway.chain import HashPolicy

    return HashPolicy(field=field, field_value=value, **kw)  # type: ignore[arg-type]


def test_hash_key_sources() -> None:
    from lictor.gateway.chain import HashPolicy

    assert hash_key((_hp("header", "x-u"),), head()) == (None, None)
    a = hash_key((_hp("cookie", "sid"),), head(cookie="a=1; sid=abc"))[0]
    assert a is not None and a == hash_key((_hp("cookie", "sid"),), head(cookie="sid=abc"))[0]
    q = hash_key((_hp("query_parameter", "u"),), head(query="u=7"))[0]
    assert q is not None and q != hash_key((_hp("query_parameter", "u"),), head(query="u=8"))[0]
    ip = (HashPolicy(source_ip=True, terminal=True), _hp("header", "x-u"))
    k1 = hash_key(ip, RequestHead("GET", "/", "", {"x-u": "1"}, "10.0.0.1"))[0]
    k2 = hash_key(ip, RequestHead("GET", "/", "", {"x-u": "2"}, "10.0.0.1"))[0]
    assert k1 == k2  # terminal: the header is never folded in
    minted, cookie = hash_key((_hp("cookie", "sid", cookie_ttl=60.0),), head(), random.Random(1))
    assert minted is not None and cookie is not None and cookie.startswith("sid=") and "Max-Age=60" in cookie
    value = cookie.split(";")[0].split("=")[1]
    assert hash_key((_hp("cookie", "sid", cookie_ttl=60.0),), head(cookie=f"sid={value}"))[0] == minted


def test_should_retry() -> None:
    p = RetryPolicy(num_retries=3, on_status_codes=frozenset({500}))
    assert should_retry(p, 0, status=500) and should_retry(p, 2, status=500)
    assert not should_retry(p, 3, status=500)
    assert not should_retry(p, 0, status=502)
    assert not should_retry(p, 0, connect_failure=True)
    c = RetryPolicy(num_retries=1, on_connect_failure=True)
    assert should_retry(c, 0, connect_failure=True) and not should_retry(c, 0, status=500)
    assert not should_retry(RetryPolicy(num_retries=5), 0, status=500)  # no condition, no retry
    five = RetryPolicy(num_retries=2, on=frozenset({"5xx"}))
    assert should_retry(five, 0, status=503) and should_retry(five, 0, reset=True)
    assert not should_retry(five, 0, status=404)
    gw = RetryPolicy(num_retries=2, on=frozenset({"gateway-error"}))
    assert should_retry(gw, 0, status=504) and not should_retry(gw, 0, status=500)
