"""Parsing a connect-proxy registration into ProxySpec / UpstreamSpec, and the intention checks."""

from __future__ import annotations

import pytest

from lictor.agent.proxy.authz import Authorizer, source_of
from lictor.agent.proxy.config import DEFAULT_MAX_CONNECTIONS, parse_registration
from lictor.registry.intentions import validate_intention

REG = {
    "Kind": "connect-proxy", "ID": "web-sidecar-proxy", "Service": "web-sidecar-proxy", "Port": 21001,
    "Address": "", "ContentHash": "abc",
    "Proxy": {
        "DestinationServiceName": "web", "DestinationServiceID": "web-1", "LocalServiceAddress": "127.0.0.1",
        "LocalServicePort": 8080,
        "Upstreams": [
            {"DestinationName": "api", "LocalBindPort": 9191, "DestinationType": "service", "LocalBindAddress": "",
             "Config": {"lb_policy": "least_request", "limits": {"max_connections": 10},
                        "passive_health_check": {"max_failures": 2, "base_ejection_time": "10s"},
                        "connect_timeout_ms": 250, "connect_retries": 1}},
            {"DestinationName": "db", "LocalBindPort": 9192, "LocalBindAddress": "127.0.0.2", "Config": {}},
            {"DestinationName": "dup", "LocalBindPort": 9192, "LocalBindAddress": "127.0.0.2"},
            {"DestinationName": "q", "LocalBindPort": 9300, "DestinationType": "prepared_query"},
            {"DestinationName": "", "LocalBindPort": 9301},
        ],
    },
}


def test_parse_registration() -> None:
    spec = parse_registration(REG)
    assert (spec.proxy_id, spec.destination_name, spec.destination_id) == ("web-sidecar-proxy", "web", "web-1")
    assert (spec.address, spec.port, spec.local_address, spec.local_port) == ("127.0.0.1", 21001, "127.0.0.1", 8080)
    api, db = spec.upstreams
    assert (api.destination, api.bind_address, api.bind_port, api.lb_policy) == ("api", "127.0.0.1", 9191, "least_request")
    assert (api.max_connections, api.max_failures, api.ejection_time) == (10, 2, 10.0)
    assert (api.connect_timeout, api.connect_retries) == (0.25, 1)
    assert (db.bind_address, db.lb_policy, db.max_connections) == ("127.0.0.2", "round_robin", DEFAULT_MAX_CONNECTIONS)


def test_not_a_proxy() -> None:
    with pytest.raises(ValueError, match="not a connect-proxy"):
        parse_registration({"ID": "web", "Kind": "", "Port": 1})
    with pytest.raises(ValueError, match="Port"):
        parse_registration({**REG, "Port": 0})


def test_source_of() -> None:
    assert source_of("spiffe://td.consul/ns/default/dc/dc1/svc/web") == "default/web"
    assert source_of("spiffe://td.consul/agent/client/dc/dc1/id/x") is None
    assert source_of("https://example.com") is None


def _ixn(src: str, dst: str, **body: object) -> dict:
    return validate_intention(src, dst, body)


def test_authorizer_l4_and_cache_invalidation() -> None:
    authz = Authorizer("api", default_allow=True)
    assert authz.l4("default/web").allowed
    authz.replace([_ixn("*", "api", Action="deny"), _ixn("web", "api", Action="allow")])
    assert authz.l4("default/web").allowed and not authz.l4("default/other").allowed
    authz.replace([_ixn("*", "api", Action="deny")])
    assert not authz.l4("default/web").allowed  # the memo was dropped
    authz.replace([], default_allow=False)
    assert not authz.l4("default/web").allowed


def test_authorizer_l7_requests_and_open_connections() -> None:
    perms = [{"Action": "allow", "HTTP": {"PathPrefix": "/public", "Methods": ["GET"]}},
             {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}}]
    authz = Authorizer("api", True, [_ixn("web", "api", Permissions=perms)])
    assert authz.request("default/web", "GET", "/public/a", {}).allowed
    assert not authz.request("default/web", "POST", "/admin", {}).allowed
    assert authz.request("default/web", "GET", "/other", {}).allowed  # no permission matched: default
    # An L4 listener treats an L7 intention as deny; an L7 listener keeps the connection.
    assert not authz.connection_allowed("default/web", l7=False).allowed
    assert authz.connection_allowed("default/web", l7=True).allowed
    authz.replace([_ixn("*", "api", Action="deny")])
    assert not authz.connection_allowed("default/web", l7=True).allowed
