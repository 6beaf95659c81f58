"""Service and check definition decoding: Consul's defaults, aliases and 400 messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lictor.agent.definitions import (
    CheckSpec,
    ConfigError,
    decode_check_registration,
    decode_check_registration_with_warnings,
    decode_service_registration,
    load_config_dir,
)
from lictor.errors import BadRequest


def bad(body: object, **kw: object) -> str:
    with pytest.raises(BadRequest) as info:
        decode_service_registration(body, **kw)  # type: ignore[arg-type]
    assert info.value.status == 400
    return info.value.message


def bad_check(body: object) -> str:
    with pytest.raises(BadRequest) as info:
        decode_check_registration(body)  # type: ignore[arg-type]
    return info.value.message


# --- services: defaults --------------------------------------------------------------------------


def test_minimal_service_defaults() -> None:
    reg = decode_service_registration(b'{"name": "web"}')
    assert reg.service == {
        "ID": "web",
        "Service": "web",
        "Tags": [],
        "Meta": {},
        "Port": 0,
        "Address": "",
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
    }
    assert reg.checks == [] and reg.sidecar is None and reg.warnings == []


def test_py_consul_lowercase_body() -> None:
    body = {
        "name": "foo",
        "id": "foo1",
        "address": "10.1.2.3",
        "port": 8080,
        "tags": ["a", "b"],
        "meta": {"version": "1"},
        "enabletagoverride": True,
        "weights": {"passing": 10, "warning": 2},
        "checks": [{"http": "http://127.0.0.1:8080/health", "interval": "10s", "timeout": "1s"}],
    }
    reg = decode_service_registration(json.dumps(body).encode())
    s = reg.service
    assert s["ID"] == "foo1" and s["Service"] == "foo" and s["Port"] == 8080
    assert s["Tags"] == ["a", "b"] and s["Meta"] == {"version": "1"}
    assert s["EnableTagOverride"] is True
    assert s["Weights"] == {"Passing": 10, "Warning": 2}
    assert s["TaggedAddresses"] == {
        "lan_ipv4": {"Address": "10.1.2.3", "Port": 8080},
        "wan_ipv4": {"Address": "10.1.2.3", "Port": 8080},
    }
    [chk] = reg.checks
    assert chk.check_id == "service:foo1" and chk.name == "Service 'foo' check"
    assert chk.kind == "http" and chk.interval == 10.0 and chk.timeout == 1.0
    assert chk.status == "critical" and chk.service_id == "foo1"


def test_ipv6_address_tagged_and_user_tags_kept() -> None:
    reg = decode_service_registration(
        {
            "Name": "w",
            "Address": "::1",
            "Port": 5,
            "tagged_addresses": {"lan": {"address": "1.2.3.4", "port": 7}},
        }
    )
    assert reg.service["TaggedAddresses"] == {
        "lan": {"Address": "1.2.3.4", "Port": 7},
        "lan_ipv6": {"Address": "::1", "Port": 5},
        "wan_ipv6": {"Address": "::1", "Port": 5},
    }
    host = decode_service_registration({"Name": "w", "Address": "db.example", "Port": 5})
    assert "TaggedAddresses" not in host.service


def test_snake_case_aliases() -> None:
    reg = decode_service_registration(
        {
            "name": "web",
            "enable_tag_override": True,
            "socket_path": "/tmp/s",
            "check": {
                "check_id": "c1",
                "script_args": ["/bin/true"],
                "interval": "5s",
                "deregister_critical_service_after": "90s",
                "tls_skip_verify": True,
                "tls_server_name": "x",
                "success_before_passing": 2,
                "failures_before_critical": 3,
                "output_max_size": 10,
            },
        }
    )
    assert reg.service["EnableTagOverride"] is True and reg.service["SocketPath"] == "/tmp/s"
    [c] = reg.checks
    assert c.check_id == "c1" and c.kind == "script" and c.args == ["/bin/true"]
    assert c.deregister_after == 90 and c.success_before_passing == 2
    assert c.failures_before_critical == 3 and c.failures_before_warning == 3  # defaults to FBC
    assert c.output_max_size == 10
    grpc = decode_check_registration(
        {"name": "g", "grpc": "127.0.0.1:1", "grpc_use_tls": True, "interval": "1s"}
    )
    assert grpc.kind == "grpc" and grpc.definition["GRPCUseTLS"] is True
    h2 = decode_check_registration(
        {"name": "h", "h2ping": "127.0.0.1:1", "h2ping_use_tls": False, "interval": "1s"}
    )
    assert h2.kind == "h2ping" and h2.definition["H2PingUseTLS"] is False
    d = decode_check_registration(
        {"name": "d", "docker_container_id": "abc", "args": ["x"], "shell": "/bin/sh", "interval": "1s"}
    )
    assert d.kind == "docker"


def test_multi_check_ids_and_names() -> None:
    reg = decode_service_registration(
        {
            "name": "foo",
            "id": "foo1",
            "check": {"ttl": "10s"},
            "checks": [{"ttl": "10s"}, {"tcp": "127.0.0.1:1", "interval": "10s", "name": "mine"}],
        }
    )
    assert [c.check_id for c in reg.checks] == ["service:foo1:1", "service:foo1:2", "service:foo1:3"]
    assert [c.name for c in reg.checks] == ["Service 'foo' check", "Service 'foo' check", "mine"]


def test_empty_check_object_is_ignored_and_single_check_id() -> None:
    reg = decode_service_registration({"name": "foobar", "check": {}, "checks": [{"ttl": "1s"}]})
    assert [c.check_id for c in reg.checks] == ["service:foobar"]


def test_service_id_inside_service_check_is_ignored() -> None:
    reg = decode_service_registration({"name": "a", "check": {"ttl": "1s", "service_id": "zzz"}})
    assert reg.checks[0].service_id == "a"


def test_interval_clamped_with_warning_and_nanosecond_numbers() -> None:
    # py-consul Check.script(args, 10) sends "interval": 10 = 10 ns.
    reg = decode_service_registration({"name": "a", "check": {"args": ["true"], "interval": 10}})
    assert reg.checks[0].interval == 1.0
    assert len(reg.warnings) == 1 and "below the minimum of 1s" in reg.warnings[0]
    assert reg.checks[0].definition["Interval"] == "1s"


def test_initial_status_given() -> None:
    reg = decode_service_registration({"name": "a", "check": {"ttl": "1s", "status": "passing"}})
    assert reg.checks[0].status == "passing"


def test_connect_proxy_kind_and_upstreams() -> None:
    reg = decode_service_registration(
        {
            "Kind": "connect-proxy",
            "Name": "web-proxy",
            "Port": 21001,
            "Proxy": {
                "destination_service_name": "web",
                "upstreams": [{"destination_name": "db", "local_bind_port": 9191}],
            },
        }
    )
    proxy = reg.service["Proxy"]
    assert reg.service["Kind"] == "connect-proxy"
    assert proxy["DestinationServiceName"] == "web"
    assert proxy["Upstreams"][0]["DestinationType"] == "service"
    assert proxy["Upstreams"][0]["LocalBindPort"] == 9191
    assert "Proxy" not in decode_service_registration({"Name": "x"}).service
    native = decode_service_registration({"Name": "x", "Connect": {"Native": True}})
    assert native.service["Connect"] == {"Native": True}


# --- sidecar -------------------------------------------------------------------------------------


def test_sidecar_registration_shape() -> None:
    reg = decode_service_registration(
        {"name": "web", "port": 8080, "tags": ["t"], "meta": {"m": "1"}, "connect": {"sidecar_service": {}}},
        used_ports={21000, 21002},
    )
    assert "Connect" not in reg.service  # SidecarService is not stored on the parent
    side = reg.sidecar
    assert side is not None
    assert side.service["ID"] == "web-sidecar-proxy" and side.service["Service"] == "web-sidecar-proxy"
    assert side.service["Kind"] == "connect-proxy"
    assert side.service["Port"] == 21001  # lowest free
    assert side.service["Tags"] == ["t"] and side.service["Meta"] == {"m": "1"}
    assert side.service["Proxy"]["DestinationServiceName"] == "web"
    assert side.service["Proxy"]["DestinationServiceID"] == "web"
    assert side.service["Proxy"]["LocalServiceAddress"] == "127.0.0.1"
    assert side.service["Proxy"]["LocalServicePort"] == 8080
    c1, c2 = side.checks
    assert (c1.check_id, c1.name, c1.kind) == (
        "service:web-sidecar-proxy:1",
        "Connect Sidecar Listening",
        "tcp",
    )
    assert c1.definition["TCP"] == "127.0.0.1:21001" and c1.interval == 10
    assert (c2.check_id, c2.name, c2.kind) == (
        "service:web-sidecar-proxy:2",
        "Connect Sidecar Aliasing web",
        "alias",
    )
    assert c2.definition["AliasService"] == "web"
    assert [r.service_id for r in reg.all()] == ["web", "web-sidecar-proxy"]


def test_sidecar_keeps_its_port_and_given_values() -> None:
    reg = decode_service_registration(
        {
            "Name": "web",
            "ID": "web1",
            "Connect": {"SidecarService": {"Port": 3000, "Checks": [{"TTL": "5s"}]}},
        }
    )
    assert reg.sidecar is not None
    assert reg.sidecar.service["Port"] == 3000 and reg.sidecar.service["ID"] == "web1-sidecar-proxy"
    assert [c.check_id for c in reg.sidecar.checks] == ["service:web1-sidecar-proxy"]
    again = decode_service_registration(
        {"Name": "web", "ID": "web1", "Connect": {"SidecarService": {}}},
        used_ports={21000},
        existing_ports={"web1-sidecar-proxy": 21007},
    )
    assert again.sidecar is not None and again.sidecar.service["Port"] == 21007


def test_sidecar_port_range_exhausted() -> None:
    msg = bad({"Name": "w", "Connect": {"SidecarService": {}}}, used_ports=set(range(21000, 21256)))
    assert msg.startswith("Invalid SidecarService: no port provided")


def test_sidecar_errors() -> None:
    assert bad({"Name": "w", "Connect": {"SidecarService": {"Connect": {"SidecarService": {}}}}}).startswith(
        "Invalid SidecarService: A SidecarService cannot have a nested"
    )
    assert bad({"Name": "w", "Connect": {"SidecarService": {"Checks": [{"HTTP": "http://x"}]}}}).startswith(
        "Invalid check in sidecar_service: Interval must be > 0"
    )


# --- services: errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "Missing service name"),
        ({"Name": ""}, "Missing service name"),
        ({"Name": "a", "Address": "0.0.0.0"}, "Invalid service address"),
        ({"Name": "a", "Address": "::"}, "Invalid service address"),
        (
            {"Name": "a", "Weights": {"Passing": 0, "Warning": 1}},
            "Invalid Weights: Passing must be greater than 0",
        ),
        ({"Name": "a", "Weights": {"Passing": 1, "Warning": -1}}, "Invalid Weights: Warning must be greater"),
        ({"Name": "a", "Meta": {"consul-x": "1"}}, "Invalid Service Meta: Key prefix 'consul-' is reserved"),
        ({"Name": "a", "Meta": {"a b": "1"}}, "Invalid Service Meta: Key contains invalid characters"),
        ({"Name": "a", "Port": 70000}, "Invalid service port 70000"),
        ({"Name": "a", "Port": -1}, "Invalid service port -1"),
        ({"Name": "a\nb"}, "Invalid service name"),
        ({"Name": "a", "ID": "x\x00"}, "Invalid service ID"),
        ({"Name": "a", "Kind": "bogus"}, 'Validation failed: unknown service kind "bogus"'),
        (
            {"Name": "p", "Kind": "connect-proxy", "Port": 1},
            "Validation failed: Proxy.DestinationServiceName",
        ),
        ({"Name": "a", "bogus": 1}, 'Request decode failed: json: unknown field "bogus"'),
        ({"Name": "a", "Check": {"script": "x"}}, 'Request decode failed: json: unknown field "script"'),
        ({"Name": "a", "Port": "80"}, "Request decode failed: json: cannot unmarshal string into field Port"),
        (
            {"Name": "a", "Check": {"TTL": "10s", "Interval": "10s"}},
            "Invalid check: Interval and TTL cannot both be specified",
        ),
        (
            {"Name": "a", "Check": {"HTTP": "http://x"}},
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        ),
        ({"Name": "a", "Checks": [{}]}, "Invalid check: TTL must be > 0 for TTL checks"),
        ({"Name": "a", "Check": {"Name": "only"}}, "Invalid check: TTL must be > 0 for TTL checks"),
        (
            {"Name": "a", "Check": {"HTTP": "http://x", "TCP": "h:1", "Interval": "1s"}},
            "Invalid check: more than one check type given (HTTP, TCP)",
        ),
        (
            {"Name": "a", "Check": {"GRPC": "h:1", "Args": ["x"], "Interval": "1s"}},
            "Invalid check: more than one check type given (GRPC, Args)",
        ),
        (
            {"Name": "a", "Check": {"AliasService": "b", "Interval": "1s"}},
            "Invalid check: Interval must not be set for Alias checks",
        ),
        (
            {"Name": "a", "Check": {"AliasService": "b", "TTL": "1s"}},
            "Invalid check: more than one check type given",
        ),
        (
            {"Name": "a", "Check": {"TTL": "1s", "FailuresBeforeWarning": 3, "FailuresBeforeCritical": 2}},
            "Invalid check: FailuresBeforeWarning must be less than or equal to FailuresBeforeCritical",
        ),
        ({"Name": "a", "Check": {"TTL": "-5s"}}, "Invalid check: TTL must not be negative"),
        ({"Name": "a", "Check": {"TTL": -5}}, "Invalid check: TTL must not be negative"),
        (
            {"Name": "a", "Check": {"TCP": "h:1", "Interval": "1s", "Timeout": "-1s"}},
            "Invalid check: Timeout must not be negative",
        ),
        ({"Name": "a", "Check": {"TTL": "soon"}}, 'Request decode failed: time: invalid duration "soon"'),
        ({"Name": "a", "Check": {"TTL": "1s", "Name": "bad\tname"}}, "Invalid check name"),
        (
            {"Name": "a", "Check": {"TTL": "1s", "Status": "ok"}},
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
        (
            {"Name": "a", "Check": {"TTL": "1s", "OutputMaxSize": -1}},
            "Invalid check: MaxOutputMaxSize must be positive",
        ),
    ],
)
def test_service_validation_errors(body: dict[str, object], message: str) -> None:
    assert bad(body).startswith(message)


def test_bad_json_and_non_object() -> None:
    assert bad(b"{nope").startswith("Request decode failed:")
    assert bad(b"[1]").startswith("Request decode failed: json: cannot unmarshal array")


# --- check registration --------------------------------------------------------------------------


def test_check_registration_defaults() -> None:
    spec = decode_check_registration(b'{"name": "mem", "ttl": "15s", "notes": "n", "serviceid": "web"}')
    assert isinstance(spec, CheckSpec)
    assert spec.check_id == "mem" and spec.name == "mem" and spec.kind == "ttl" and spec.ttl == 15
    assert spec.notes == "n" and spec.service_id == "web" and spec.status == "critical"
    spec = decode_check_registration({"Name": "mem", "ID": "mem-1", "TTL": "1s", "Status": "warning"})
    assert spec.check_id == "mem-1" and spec.status == "warning"
    spec = decode_check_registration({"Name": "mem", "CheckID": "c2", "TTL": "1s"})
    assert spec.check_id == "c2"


def test_check_registration_errors() -> None:
    assert bad_check({"ttl": "1s"}) == "Missing check name"
    assert bad_check({"name": "x", "ttl": "1s", "status": "up"}) == "Bad check status"
    assert bad_check({"name": "x"}) == "Invalid check: TTL must be > 0 for TTL checks"
    assert bad_check({"name": "x", "tcp": "h:1"}).startswith("Invalid check: Interval must be > 0")


def test_check_registration_header_map_of_lists() -> None:
    spec, warnings = decode_check_registration_with_warnings(
        {
            "name": "h",
            "http": "http://127.0.0.1/",
            "method": "POST",
            "header": {"X-A": ["1", "2"]},
            "body": "{}",
            "interval": "500ms",
        }
    )
    assert spec.definition["Header"] == {"X-A": ["1", "2"]} and spec.interval == 1.0 and warnings
    assert bad_check({"name": "h", "http": "u", "interval": "1s", "header": {"X": "1"}}).startswith(
        "Request decode failed: json: cannot unmarshal string into field Header.X"
    )


def test_to_health_check_json() -> None:
    spec = decode_check_registration(
        {"name": "web-http", "serviceid": "web", "http": "http://h/", "interval": "10s", "timeout": "2s"}
    )
    hc = spec.to_health_check("node1", "web", ["v1"], "passing", "HTTP GET http://h/: 200 OK Output: ok")
    assert hc["Node"] == "node1" and hc["CheckID"] == "web-http" and hc["Status"] == "passing"
    assert hc["ServiceName"] == "web" and hc["ServiceTags"] == ["v1"] and hc["Type"] == "http"
    assert hc["Interval"] == "10s" and hc["Timeout"] == "2s"
    assert hc["Definition"]["HTTP"] == "http://h/" and hc["Definition"]["Interval"] == "10s"
    assert hc["CreateIndex"] == 0 and hc["ModifyIndex"] == 0
    ttl = decode_check_registration({"name": "t", "ttl": "30s"}).to_health_check("n")
    assert (
        ttl["Status"] == "critical"
        and ttl["Interval"] == ""
        and ttl["ServiceTags"] == []
        and ttl["Type"] == "ttl"
    )


# --- config directory ----------------------------------------------------------------------------


def test_load_config_dir(tmp_path: Path) -> None:
    (tmp_path / "01-web.json").write_text(
        json.dumps({"service": {"name": "web", "port": 80, "connect": {"sidecar_service": {}}}})
    )
    (tmp_path / "02-more.json").write_text(
        json.dumps(
            {
                "services": [
                    {"name": "db", "connect": {"sidecar_service": {}}},
                    {"name": "cache", "check": {"id": "c", "ttl": "5s"}},
                ],
                "checks": [{"id": "mem", "name": "Memory", "args": ["true"], "interval": "30s"}],
                "datacenter": "dc1",
            }
        )
    )
    (tmp_path / "03-check.json").write_text(json.dumps({"check": {"name": "disk", "ttl": "1m"}}))
    (tmp_path / "notes.txt").write_text("ignored")
    items = load_config_dir(tmp_path)
    services = [i.service for i in items if i.service]
    checks = [i.check for i in items if i.check]
    assert [s.service_id for s in services] == ["web", "db", "cache"]
    # Sidecar ports are allocated across files without clashing.
    assert [s.sidecar.service["Port"] for s in services if s.sidecar] == [21000, 21001]
    assert [c.check_id for c in checks] == ["mem", "disk"]
    assert items[0].source.endswith("01-web.json")


def test_load_config_dir_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"service": {"port": 1}}))
    with pytest.raises(ConfigError, match=r"bad\.json: Missing service name"):
        load_config_dir(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: cannot read config"):
        load_config_dir(tmp_path)
