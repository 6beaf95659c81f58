"""Service and check definitions as Consul's agent API and config files accept them.

Pure: decoding, validation and defaults only, no I/O except `load_config_dir` reading files.
Everything here mirrors Consul's `structs.ServiceDefinition`, `structs.CheckType`,
`AgentRegisterService`/`AgentRegisterCheck` validation and `sidecarServiceFromNodeService`
(see shared/consul-api.md §2.1, §2.3, §3). One deliberate difference: a check definition that
names two check kinds (e.g. HTTP and TCP) is rejected instead of silently picking one.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lictor.decode import (
    AnyValue,
    Bool,
    Duration,
    Int,
    ListOf,
    MapOf,
    Spec,
    Str,
    Struct,
    check_name,
    parse_json_body,
)
from lictor.durations import DurationError, format_duration, parse_duration
from lictor.errors import BadRequest

__all__ = [
    "CHECK_SPEC",
    "SERVICE_SPEC",
    "CheckSpec",
    "ConfigItem",
    "ServiceRegistration",
    "decode_check_registration",
    "decode_check_registration_with_warnings",
    "ConfigError",
    "decode_service_registration",
    "load_config_dir",
    "PASSING",
    "WARNING",
    "CRITICAL",
    "VALID_STATUSES",
    "MIN_INTERVAL",
    "DEFAULT_OUTPUT_MAX_SIZE",
    "SIDECAR_MIN_PORT",
    "SIDECAR_MAX_PORT",
]

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
VALID_STATUSES = (PASSING, WARNING, CRITICAL)
MIN_INTERVAL = 1.0  # checks.MinInterval
DEFAULT_OUTPUT_MAX_SIZE = 4096  # checks.DefaultBufSize
SIDECAR_MIN_PORT, SIDECAR_MAX_PORT = 21000, 21255  # sidecar_min_port / sidecar_max_port
SERVICE_KINDS = ("", "connect-proxy", "mesh-gateway", "terminating-gateway", "ingress-gateway", "api-gateway")
_PROXY_KINDS = SERVICE_KINDS[1:]
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def _snake(name: str) -> str:
    s = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", s).lower()


def _struct(name: str, fields: dict[str, Spec], extra_aliases: dict[str, str] | None = None) -> Struct:
    """A Struct that also accepts the snake_case spelling of every field (Consul config-file style)."""
    aliases = {}
    for f in fields:
        snake = _snake(f)
        if snake != f.lower():
            aliases[snake] = f
    aliases.update(extra_aliases or {})
    return Struct(name, fields, aliases)


# --- specs -------------------------------------------------------------------------------------

CHECK_SPEC = _struct(
    "CheckType",
    {
        "CheckID": Str(),
        "ID": Str(),
        "Name": Str(),
        "Status": Str(),
        "Notes": Str(),
        "ServiceID": Str(),
        "Token": Str(),
        "ScriptArgs": ListOf(Str()),
        "Args": ListOf(Str()),
        "HTTP": Str(),
        "Method": Str(),
        "Header": MapOf(ListOf(Str())),
        "Body": Str(),
        "DisableRedirects": Bool(),
        "TCP": Str(),
        "TCPUseTLS": Bool(),
        "UDP": Str(),
        "GRPC": Str(),
        "GRPCUseTLS": Bool(),
        "H2PING": Str(),
        "H2PingUseTLS": Bool(),
        "OSService": Str(),
        "TTL": Duration(),
        "AliasNode": Str(),
        "AliasService": Str(),
        "DockerContainerID": Str(),
        "Shell": Str(),
        "Interval": Duration(),
        "Timeout": Duration(),
        "TLSServerName": Str(),
        "TLSSkipVerify": Bool(),
        "OutputMaxSize": Int(),
        "SuccessBeforePassing": Int(),
        "FailuresBeforeWarning": Int(),
        "FailuresBeforeCritical": Int(),
        "DeregisterCriticalServiceAfter": Duration(),
    },
    {"h2ping_use_tls": "H2PingUseTLS"},
)

_SERVICE_ADDRESS = _struct("ServiceAddress", {"Address": Str(), "Port": Int()})
_WEIGHTS = _struct("Weights", {"Passing": Int(), "Warning": Int()})
_LOCALITY = _struct("Locality", {"Region": Str(), "Zone": Str()})
_MESH_GATEWAY = _struct("MeshGatewayConfig", {"Mode": Str()})
_UPSTREAM = _struct(
    "Upstream",
    {
        "DestinationType": Str(),
        "DestinationNamespace": Str(),
        "DestinationPartition": Str(),
        "DestinationPeer": Str(),
        "DestinationName": Str(),
        "Datacenter": Str(),
        "LocalBindAddress": Str(),
        "LocalBindPort": Int(),
        "LocalBindSocketPath": Str(),
        "LocalBindSocketMode": Str(),
        "Config": MapOf(AnyValue()),
        "MeshGateway": _MESH_GATEWAY,
        "CentralConfig": AnyValue(),
    },
)
_EXPOSE_PATH = _struct(
    "ExposePath",
    {
        "ListenerPort": Int(),
        "Path": Str(),
        "LocalPathPort": Int(),
        "Protocol": Str(),
        "ParsedFromCheck": Bool(),
    },
)
_EXPOSE = _struct("ExposeConfig", {"Checks": Bool(), "Paths": ListOf(_EXPOSE_PATH)})
_TPROXY = _struct("TransparentProxyConfig", {"OutboundListenerPort": Int(), "DialedDirectly": Bool()})
_PROXY = _struct(
    "ConnectProxyConfig",
    {
        "DestinationServiceName": Str(),
        "DestinationServiceID": Str(),
        "LocalServiceAddress": Str(),
        "LocalServicePort": Int(),
        "LocalServiceSocketPath": Str(),
        "Mode": Str(),
        "TransparentProxy": _TPROXY,
        "Config": MapOf(AnyValue()),
        "Upstreams": ListOf(_UPSTREAM),
        "MeshGateway": _MESH_GATEWAY,
        "Expose": _EXPOSE,
        "AccessLogs": AnyValue(),
    },
)

_SERVICE_FIELDS: dict[str, Spec] = {
    "ID": Str(),
    "Name": Str(),
    "Tags": ListOf(Str()),
    "Address": Str(),
    "TaggedAddresses": MapOf(_SERVICE_ADDRESS),
    "Meta": MapOf(Str()),
    "Port": Int(),
    "SocketPath": Str(),
    "Kind": Str(),
    "Proxy": _PROXY,
    "Connect": AnyValue(),  # replaced below: Connect.SidecarService is a recursive ServiceDefinition
    "Check": CHECK_SPEC,
    "Checks": ListOf(CHECK_SPEC),
    "Weights": _WEIGHTS,
    "EnableTagOverride": Bool(),
    "Token": Str(),
    "Locality": _LOCALITY,
    "Namespace": Str(),
    "Partition": Str(),
}
SERVICE_SPEC = _struct("ServiceDefinition", _SERVICE_FIELDS)
_CONNECT = _struct("ServiceConnect", {"Native": Bool(), "SidecarService": SERVICE_SPEC})
SERVICE_SPEC.fields["Connect"] = _CONNECT


# --- check specs -------------------------------------------------------------------------------


@dataclass
class CheckSpec:
    """One normalized check, ready for the runner and for the agent's local state.

    Durations are seconds (0 = not set); `definition` keeps the canonical decoded fields.
    """

    check_id: str
    name: str
    kind: str
    service_id: str = ""
    notes: str = ""
    status: str = CRITICAL
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    deregister_after: float = 0.0
    success_before_passing: int = 0
    failures_before_warning: int = 0
    failures_before_critical: int = 0
    output_max_size: int = DEFAULT_OUTPUT_MAX_SIZE
    token: str = ""
    definition: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.definition.get(key)
        return default if value in (None, "", [], {}) else value

    @property
    def args(self) -> list[str]:
        return list(self.get("ScriptArgs") or self.get("Args") or [])

    def to_health_check(
        self,
        node: str,
        service_name: str = "",
        service_tags: Iterable[str] | None = None,
        status: str | None = None,
        output: str = "",
    ) -> dict[str, Any]:
        """Consul's HealthCheck JSON for /v1/agent/checks (agent-local: indexes are 0)."""
        d = self.definition
        definition: dict[str, Any] = {}
        for key in (
            "HTTP", "Header", "Method", "Body", "TLSServerName", "TLSSkipVerify", "TCP", "TCPUseTLS",
            "UDP", "GRPC", "GRPCUseTLS", "OSService",
        ):  # fmt: skip
            if d.get(key):
                definition[key] = d[key]
        definition["Interval"] = format_duration(self.interval)
        definition["Timeout"] = format_duration(self.timeout)
        definition["DeregisterCriticalServiceAfter"] = format_duration(self.deregister_after)
        return {
            "Node": node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": status or self.status,
            "Notes": self.notes,
            "Output": output,
            "ServiceID": self.service_id,
            "ServiceName": service_name if self.service_id else "",
            "ServiceTags": list(service_tags or []) if self.service_id else [],
            "Type": self.kind,
            "Interval": format_duration(self.interval) if self.interval else "",
            "Timeout": format_duration(self.timeout) if self.timeout else "",
            "ExposedPort": 0,
            "Definition": definition,
            "CreateIndex": 0,
            "ModifyIndex": 0,
        }


def _seconds(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key, "")
    if value in ("", None):
        return 0.0
    try:
        return parse_duration(value)
    except DurationError as exc:
        if "negative" in str(exc):
            raise BadRequest(f"Invalid check: {key} must not be negative ({value!r})") from exc
        raise BadRequest(f'Request decode failed: time: invalid duration "{value}"') from exc


# Consul's precedence when several kinds are set (CheckType.Type()), kept for naming the clash.
_KIND_FIELDS: list[tuple[str, str]] = [
    ("grpc", "GRPC"),
    ("http", "HTTP"),
    ("ttl", "TTL"),
    ("tcp", "TCP"),
    ("udp", "UDP"),
    ("alias", "AliasService"),
    ("docker", "DockerContainerID"),
    ("script", "Args"),
    ("h2ping", "H2PING"),
    ("os_service", "OSService"),
]
_INTERVAL_KINDS = {"script", "docker", "http", "tcp", "udp", "grpc", "h2ping", "os_service"}


def _kinds(raw: dict[str, Any], ttl: float) -> list[tuple[str, str]]:
    present = []
    for kind, key in _KIND_FIELDS:
        if kind == "ttl":
            on = ttl > 0
        elif kind == "alias":
            on = bool(raw.get("AliasService") or raw.get("AliasNode"))
        elif kind == "script":
            # Args together with DockerContainerID is a docker check, not a second kind.
            on = bool(raw.get("ScriptArgs") or raw.get("Args")) and not raw.get("DockerContainerID")
        else:
            on = bool(raw.get(key))
        if on:
            present.append((kind, "Args" if kind == "script" else key))
    return present


def _build_check(
    raw: dict[str, Any],
    *,
    check_id: str,
    name: str,
    service_id: str,
    warnings: list[str],
    status_error: str,
    prefix: str = "Invalid check",
) -> CheckSpec:
    """Validate one decoded CheckType (Consul's CheckType.Validate plus our stricter checks)."""

    def bad(msg: str) -> BadRequest:
        return BadRequest(f"{prefix}: {msg}")

    status = raw.get("Status", "")
    if status and status not in VALID_STATUSES:
        raise BadRequest(status_error)
    check_name(name, "check name")
    check_name(check_id, "check ID")
    interval = _seconds(raw, "Interval")
    timeout = _seconds(raw, "Timeout")
    ttl = _seconds(raw, "TTL")
    deregister = _seconds(raw, "DeregisterCriticalServiceAfter")
    kinds = _kinds(raw, ttl)
    if interval > 0 and ttl > 0:
        raise bad("Interval and TTL cannot both be specified")
    if len(kinds) > 1:
        raise bad(f"more than one check type given ({', '.join(k for _, k in kinds)})")
    kind = kinds[0][0] if kinds else ""
    if kind in _INTERVAL_KINDS and interval <= 0:
        raise bad("Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks")
    if kind == "alias":
        if ttl > 0:
            raise bad("TTL must be not be set for Alias checks")
        if interval > 0:
            raise bad("Interval must not be set for Alias checks")
    if not kind:
        raise bad("TTL must be > 0 for TTL checks")
    if kind == "docker" and not (raw.get("ScriptArgs") or raw.get("Args")):
        raise bad("Docker checks need Args (a command to run in the container)")
    output_max = raw.get("OutputMaxSize", 0)
    if output_max < 0:
        raise bad("MaxOutputMaxSize must be positive")
    thresholds = {
        k: raw.get(k, 0) for k in ("SuccessBeforePassing", "FailuresBeforeWarning", "FailuresBeforeCritical")
    }
    for k, v in thresholds.items():
        if v < 0:
            raise bad(f"{k} must not be negative")
    fbw, fbc = thresholds["FailuresBeforeWarning"], thresholds["FailuresBeforeCritical"]
    if fbw > fbc:
        raise bad("FailuresBeforeWarning must be less than or equal to FailuresBeforeCritical")
    if kind == "http" and raw.get("Method", "") and not re.fullmatch(r"[A-Za-z]+", raw["Method"]):
        raise bad(f"invalid HTTP method {raw['Method']!r}")
    if kind in _INTERVAL_KINDS and interval < MIN_INTERVAL:
        warnings.append(
            f"check {check_id!r} has interval {format_duration(interval)} below the minimum of 1s; using 1s"
        )
        interval = MIN_INTERVAL
    definition = dict(raw)
    if interval:
        definition["Interval"] = format_duration(interval)
    return CheckSpec(
        check_id=check_id,
        name=name,
        kind=kind,
        service_id=service_id,
        notes=raw.get("Notes", ""),
        status=status or CRITICAL,
        interval=interval,
        timeout=timeout,
        ttl=ttl,
        deregister_after=deregister,
        success_before_passing=thresholds["SuccessBeforePassing"],
        # FailuresBeforeWarning defaults to FailuresBeforeCritical (Consul's StatusHandler).
        failures_before_warning=fbw or fbc,
        failures_before_critical=fbc,
        output_max_size=output_max or DEFAULT_OUTPUT_MAX_SIZE,
        token=raw.get("Token", ""),
        definition=definition,
    )


def _as_dict(body: bytes | str | Mapping[str, Any] | None, spec: Struct) -> dict[str, Any]:
    data: Any
    if isinstance(body, bytes | bytearray | str):
        data = parse_json_body(body.encode() if isinstance(body, str) else bytes(body))
    else:
        data = body
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise BadRequest(f"Request decode failed: json: cannot unmarshal array into {spec.name}")
    return spec.decode(dict(data))


def decode_check_registration(body: bytes | str | Mapping[str, Any] | None) -> CheckSpec:
    """PUT /v1/agent/check/register body → CheckSpec (ID defaults to Name)."""
    spec, _ = decode_check_registration_with_warnings(body)
    return spec


def decode_check_registration_with_warnings(
    body: bytes | str | Mapping[str, Any] | None,
) -> tuple[CheckSpec, list[str]]:
    raw = _as_dict(body, CHECK_SPEC)
    name = raw.get("Name", "")
    if not name:
        raise BadRequest("Missing check name")
    warnings: list[str] = []
    check_id = raw.get("ID") or raw.get("CheckID") or name
    spec = _build_check(
        raw,
        check_id=check_id,
        name=name,
        service_id=raw.get("ServiceID", ""),
        warnings=warnings,
        status_error="Bad check status",
    )
    return spec, warnings


# --- services ----------------------------------------------------------------------------------


@dataclass
class ServiceRegistration:
    """What one service registration asks the agent to store.

    `service` is AgentService-shaped (PascalCase, Consul's defaults applied); `checks` are its
    checks; `sidecar` is the Connect sidecar registration, if any; `warnings` are for the log.
    """

    service: dict[str, Any]
    checks: list[CheckSpec]
    token: str = ""
    sidecar: ServiceRegistration | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def service_id(self) -> str:
        return str(self.service["ID"])

    def all(self) -> list[ServiceRegistration]:
        """This registration followed by its sidecar's, in the order to store them."""
        return [self] + ([self.sidecar] if self.sidecar else [])


_STATUS_ERROR = "Status for checks must 'passing', 'warning', 'critical'"


def _validate_meta(meta: dict[str, str]) -> None:
    if len(meta) > 64:
        raise BadRequest("Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs")
    for key, value in meta.items():
        if key == "":
            reason = "Key cannot be blank"
        elif not _META_KEY.match(key):
            reason = f"Key contains invalid characters: {key!r}"
        elif len(key) > 128:
            reason = "Key is too long (limit: 128 characters)"
        elif key.startswith("consul-"):
            reason = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > 512:
            reason = "Value is too long (limit: 512 characters)"
        else:
            continue
        raise BadRequest(f"Invalid Service Meta: {reason}")


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _service_checks(
    raw: dict[str, Any], service_id: str, name: str, warnings: list[str], prefix: str
) -> list[CheckSpec]:
    """Check + Checks → CheckSpecs with Consul's default IDs and names."""
    defs: list[dict[str, Any]] = []
    if raw.get("Check"):  # an empty Check object is ignored (CheckType.Empty)
        defs.append(raw["Check"])
    defs.extend(raw.get("Checks", []))
    out: list[CheckSpec] = []
    for n, chk in enumerate(defs, start=1):
        chk = {k: v for k, v in chk.items() if k != "ServiceID"}  # ignored inside a service
        check_id = (
            chk.get("CheckID")
            or chk.get("ID")
            or (f"service:{service_id}" if len(defs) == 1 else f"service:{service_id}:{n}")
        )
        out.append(
            _build_check(
                chk,
                check_id=check_id,
                name=chk.get("Name") or f"Service '{name}' check",
                service_id=service_id,
                warnings=warnings,
                status_error=_STATUS_ERROR,
                prefix=prefix,
            )
        )
    return out


def _agent_service(raw: dict[str, Any]) -> dict[str, Any]:
    """The AgentService JSON with Consul's defaults (buildAgentService/addServiceInternal)."""
    name = raw.get("Name", "")
    kind = raw.get("Kind", "")
    address = raw.get("Address", "")
    port = raw.get("Port", 0)
    tagged = {
        k: {"Address": v.get("Address", ""), "Port": v.get("Port", 0)}
        for k, v in raw.get("TaggedAddresses", {}).items()
    }
    ip = _ip(address)
    if ip is not None:
        family = "ipv4" if ip.version == 4 else "ipv6"
        for scope in ("lan", "wan"):
            tagged.setdefault(f"{scope}_{family}", {"Address": address, "Port": port})
    weights = raw.get("Weights")
    svc: dict[str, Any] = {}
    if kind:
        svc["Kind"] = kind
    svc.update(
        {
            "ID": raw.get("ID") or name,
            "Service": name,
            "Tags": list(raw.get("Tags", [])),
            "Meta": dict(raw.get("Meta", {})),
            "Port": port,
            "Address": address,
        }
    )
    if raw.get("SocketPath"):
        svc["SocketPath"] = raw["SocketPath"]
    if tagged:
        svc["TaggedAddresses"] = tagged
    svc["Weights"] = (
        {"Passing": weights.get("Passing", 0), "Warning": weights.get("Warning", 0)}
        if weights is not None and "Weights" in raw
        else {"Passing": 1, "Warning": 1}
    )
    svc["EnableTagOverride"] = bool(raw.get("EnableTagOverride", False))
    if kind in _PROXY_KINDS:
        svc["Proxy"] = _proxy_out(raw.get("Proxy", {}))
    if raw.get("Connect", {}).get("Native"):
        svc["Connect"] = {"Native": True}
    if raw.get("Locality") and any(raw["Locality"].values()):
        svc["Locality"] = {k: v for k, v in raw["Locality"].items() if v}
    for key in ("Namespace", "Partition"):
        if raw.get(key):
            svc[key] = raw[key]
    return svc


def _proxy_out(proxy: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "DestinationServiceName": proxy.get("DestinationServiceName", ""),
        "DestinationServiceID": proxy.get("DestinationServiceID", ""),
        "LocalServiceAddress": proxy.get("LocalServiceAddress", ""),
        "LocalServicePort": proxy.get("LocalServicePort", 0),
    }
    if proxy.get("LocalServiceSocketPath"):
        out["LocalServiceSocketPath"] = proxy["LocalServiceSocketPath"]
    out["Mode"] = proxy.get("Mode", "")
    if proxy.get("TransparentProxy"):
        out["TransparentProxy"] = proxy["TransparentProxy"]
    if proxy.get("Config"):
        out["Config"] = proxy["Config"]
    if proxy.get("Upstreams"):
        ups = []
        for u in proxy["Upstreams"]:
            item = dict(u)
            item["DestinationType"] = u.get("DestinationType") or "service"
            item.setdefault("DestinationName", "")
            item.setdefault("Datacenter", "")
            item.setdefault("LocalBindAddress", "")
            item.setdefault("LocalBindPort", 0)
            item["MeshGateway"] = u.get("MeshGateway", {})
            ups.append(item)
        out["Upstreams"] = ups
    out["MeshGateway"] = proxy.get("MeshGateway", {})
    out["Expose"] = proxy.get("Expose", {})
    return out


def _validate_service(raw: dict[str, Any], svc: dict[str, Any], what: str = "") -> None:
    def fail(msg: str) -> BadRequest:
        return BadRequest(f"{what}{msg}" if what else msg)

    if not raw.get("Name"):
        raise fail("Missing service name")
    check_name(raw["Name"], "service name")
    check_name(svc["ID"], "service ID")
    address = raw.get("Address", "")
    ip = _ip(address)
    if ip is not None and ip.is_unspecified:
        raise fail("Invalid service address")
    port = raw.get("Port", 0)
    if not 0 <= port <= 65535:
        raise fail(f"Invalid service port {port}: must be between 0 and 65535")
    for tag, addr in raw.get("TaggedAddresses", {}).items():
        if not 0 <= addr.get("Port", 0) <= 65535:
            raise fail(f"Invalid tagged address {tag!r}: port {addr.get('Port')} must be between 0 and 65535")
    if "Weights" in raw:
        w = svc["Weights"]
        if w["Passing"] < 1:
            raise fail("Invalid Weights: Passing must be greater than 0")
        if w["Warning"] < 0:
            raise fail("Invalid Weights: Warning must be greater or equal than 0")
    _validate_meta(svc["Meta"])
    kind = raw.get("Kind", "")
    if kind not in SERVICE_KINDS:
        raise fail(f'Validation failed: unknown service kind "{kind}"')
    if kind == "connect-proxy":
        proxy = svc["Proxy"]
        if not proxy["DestinationServiceName"]:
            raise fail(
                "Validation failed: Proxy.DestinationServiceName must be non-empty for Connect proxy services"
            )
        if port == 0 and not raw.get("SocketPath"):
            raise fail("Validation failed: Port or SocketPath must be set for a Connect proxy")
        if raw.get("Connect", {}).get("Native"):
            raise fail("Validation failed: Connect.Native must not be set for a Connect proxy")
    for u in svc.get("Proxy", {}).get("Upstreams", []):
        if u["DestinationType"] not in ("service", "prepared_query"):
            raise fail(f'Validation failed: unknown upstream destination type "{u["DestinationType"]}"')
        if not u["DestinationName"]:
            raise fail("Validation failed: upstream destination name must be set")
        if not 0 <= u["LocalBindPort"] <= 65535:
            raise fail("Validation failed: upstream LocalBindPort must be between 0 and 65535")


def _allocate_port(used: Iterable[int]) -> int:
    taken = set(used)
    for port in range(SIDECAR_MIN_PORT, SIDECAR_MAX_PORT + 1):
        if port not in taken:
            return port
    raise BadRequest(
        "Invalid SidecarService: no port provided for sidecar_service and none left in the configured "
        f"range [{SIDECAR_MIN_PORT}, {SIDECAR_MAX_PORT}]"
    )


def _sidecar(
    parent_raw: dict[str, Any],
    parent: dict[str, Any],
    token: str,
    used_ports: Iterable[int],
    existing_ports: Mapping[str, int],
    warnings: list[str],
) -> ServiceRegistration:
    """Consul's sidecarServiceFromNodeService: defaults inherited from the parent."""
    raw = dict(parent_raw["Connect"]["SidecarService"])
    if "SidecarService" in raw.get("Connect", {}):
        raise BadRequest("Invalid SidecarService: A SidecarService cannot have a nested SidecarService")
    kind = raw.get("Kind", "") or "connect-proxy"
    if kind != "connect-proxy":
        raise BadRequest("Invalid SidecarService: SidecarService must have an empty kind or connect-proxy")
    raw["Kind"] = kind
    raw["ID"] = raw.get("ID") or f"{parent['ID']}-sidecar-proxy"
    raw["Name"] = raw.get("Name") or f"{parent['Service']}-sidecar-proxy"
    if not raw.get("Tags"):
        raw["Tags"] = list(parent["Tags"])
    if not raw.get("Meta"):
        raw["Meta"] = dict(parent["Meta"])
    if not raw.get("Address"):
        raw["Address"] = parent["Address"]
    if not raw.get("Locality") and parent.get("Locality"):
        raw["Locality"] = dict(parent["Locality"])
    proxy = dict(raw.get("Proxy", {}))
    proxy["DestinationServiceName"] = proxy.get("DestinationServiceName") or parent["Service"]
    proxy["DestinationServiceID"] = proxy.get("DestinationServiceID") or parent["ID"]
    if (
        not proxy.get("LocalServiceAddress")
        and not proxy.get("LocalServicePort")
        and not proxy.get("LocalServiceSocketPath")
    ):
        if parent.get("SocketPath"):
            proxy["LocalServiceSocketPath"] = parent["SocketPath"]
        else:
            proxy["LocalServiceAddress"] = "127.0.0.1"
            proxy["LocalServicePort"] = parent["Port"]
    raw["Proxy"] = proxy
    if not raw.get("Port"):
        raw["Port"] = existing_ports.get(raw["ID"]) or _allocate_port(used_ports)
    if not raw.get("Check") and not raw.get("Checks"):
        check_addr = raw["Address"] or proxy.get("LocalServiceAddress") or "127.0.0.1"
        host = f"[{check_addr}]" if ":" in check_addr else check_addr
        raw["Checks"] = [
            {"Name": "Connect Sidecar Listening", "TCP": f"{host}:{raw['Port']}", "Interval": "10s"},
            {"Name": f"Connect Sidecar Aliasing {parent['ID']}", "AliasService": parent["ID"]},
        ]
    svc = _agent_service(raw)
    _validate_service(raw, svc, what="Invalid SidecarService: ")
    checks = _service_checks(
        raw, svc["ID"], svc["Service"], warnings, prefix="Invalid check in sidecar_service"
    )
    return ServiceRegistration(service=svc, checks=checks, token=raw.get("Token") or token, warnings=warnings)


def decode_service_registration(
    body: bytes | str | Mapping[str, Any] | None,
    used_ports: Iterable[int] = (),
    *,
    existing_ports: Mapping[str, int] | None = None,
) -> ServiceRegistration:
    """PUT /v1/agent/service/register body → what to store, with Consul's defaults and errors.

    `used_ports` are sidecar ports already taken on this agent; `existing_ports` maps service IDs
    of sidecars already registered to their port so a re-registration keeps its port.
    """
    raw = _as_dict(body, SERVICE_SPEC)
    name = raw.get("Name", "")
    if not name:
        raise BadRequest("Missing service name")
    svc = _agent_service(raw)
    _validate_service(raw, svc)
    warnings: list[str] = []
    checks = _service_checks(raw, svc["ID"], name, warnings, prefix="Invalid check")
    reg = ServiceRegistration(service=svc, checks=checks, token=raw.get("Token", ""), warnings=warnings)
    sidecar_raw = raw.get("Connect", {}).get("SidecarService")
    if sidecar_raw is not None and "SidecarService" in raw.get("Connect", {}):
        reg.sidecar = _sidecar(raw, svc, reg.token, used_ports, existing_ports or {}, warnings)
    return reg


# --- config directory --------------------------------------------------------------------------


@dataclass
class ConfigItem:
    """One service or check found in a config file; `source` names the file for messages."""

    source: str
    service: ServiceRegistration | None = None
    check: CheckSpec | None = None
    warnings: list[str] = field(default_factory=list)


class ConfigError(BadRequest):
    pass


def load_config_dir(path: str | Path, used_ports: Iterable[int] = ()) -> list[ConfigItem]:
    """Read `*.json` files (sorted by name) holding Consul-style `service(s)` / `check(s)` blocks.

    Other top-level keys are agent settings, not ours, and are left alone. Errors name the file.
    """
    items: list[ConfigItem] = []
    ports = set(used_ports)
    base = Path(path)
    files = (
        sorted(p for p in base.iterdir() if p.suffix == ".json" and p.is_file()) if base.is_dir() else [base]
    )
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read config: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: top level must be a JSON object")
        try:
            for key, value in data.items():
                lk = key.lower()
                if lk in ("service", "services"):
                    entries = [value] if lk == "service" else value
                    if not isinstance(entries, list):
                        raise BadRequest(f'"{key}" must be a list of service definitions')
                    for entry in entries:
                        reg = decode_service_registration(entry, ports)
                        for r in reg.all():
                            ports.add(int(r.service["Port"]))
                        items.append(ConfigItem(source=str(file), service=reg, warnings=reg.warnings))
                elif lk in ("check", "checks"):
                    entries = [value] if lk == "check" else value
                    if not isinstance(entries, list):
                        raise BadRequest(f'"{key}" must be a list of check definitions')
                    for entry in entries:
                        spec, warns = decode_check_registration_with_warnings(entry)
                        items.append(ConfigItem(source=str(file), check=spec, warnings=warns))
        except BadRequest as exc:
            raise ConfigError(f"{file}: {exc.message}") from exc
    return items
