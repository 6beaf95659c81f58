"""Config entries (`/v1/config`): pure validation, normalization and cross-entry checks.

`validate_entry(body)` decodes one entry with Consul's field names (keys match case-insensitively,
snake_case spellings are accepted, an unknown field is a 400 naming it) and checks everything that
can be checked on the entry alone. `check_change(entries, kind, name, new_or_None)` checks what only
the whole graph can tell: routers and splitters need an L7 protocol, referenced subsets must exist,
resolver redirects must not loop, ingress listeners must match their services' protocols. It
reports only problems the change introduces, so an unrelated write never fails on old state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from lictor.decode import AnyValue, Bool, Float, Int, ListOf, MapOf, Spec, Str, Struct
from lictor.durations import DurationError, format_duration, parse_duration
from lictor.errors import BadRequest

PROTOCOLS = ("tcp", "http", "http2", "grpc")
L7_PROTOCOLS = ("http", "http2", "grpc")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure", "envoy-ratelimited", "retriable-4xx",
                      "refused-stream", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
                      "unavailable"})
TLS_VERSIONS = ("", "TLS_AUTO", "TLSv1_0", "TLSv1_1", "TLSv1_2", "TLSv1_3")
LB_POLICIES = ("", "round_robin", "least_request", "ring_hash", "maglev", "random")
_SUBSET_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_HOST = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(:\d+)?$")
WEIGHT_EPSILON = 0.01


# -- field specs -----------------------------------------------------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def S(name: str, fields: dict[str, Spec], lenient: frozenset[str] = frozenset()) -> Struct:  # noqa: N802
    """A Struct that also accepts the snake_case spelling of every field (HCL-style keys)."""
    aliases = {_snake(k): k for k in fields if _snake(k) != k.lower()}
    return Struct(name, fields, aliases=aliases, lenient=lenient)


class Dur(Spec):
    """A Go duration string or nanoseconds; validated here so the error names the field."""

    go_type = "time.Duration"

    def decode(self, value: Any, path: str) -> Any:
        if value is None or value == "":
            return ""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise BadRequest(f"{path}: invalid duration {value!r}")
        try:
            seconds = parse_duration(value)
        except DurationError:
            raise BadRequest(f"{path}: invalid duration {value!r}") from None
        return value if isinstance(value, str) else format_duration(seconds)


class Proto(Spec):
    go_type = "string"

    def decode(self, value: Any, path: str) -> Any:
        if value is None or value == "":
            return ""
        if not isinstance(value, str) or value.lower() not in PROTOCOLS:
            raise BadRequest(f"{path}: invalid protocol {value!r}, must be one of {', '.join(PROTOCOLS)}")
        return value.lower()


def _oneof(choices: tuple[str, ...]) -> Spec:
    class OneOf(Spec):
        go_type = "string"

        def decode(self, value: Any, path: str) -> Any:
            if value is None:
                return ""
            if value not in choices:
                shown = ", ".join(repr(c) for c in choices if c)
                raise BadRequest(f"{path}: invalid value {value!r}, must be one of {shown}")
            return value

    return OneOf()


_COMMON: dict[str, Spec] = {"Kind": Str(), "Name": Str(), "Namespace": Str(), "Partition": Str(), "Meta": MapOf(Str())}
_READ_ONLY = frozenset({"CreateIndex", "ModifyIndex", "Hash"})

MESH_GATEWAY = S("MeshGatewayConfig", {"Mode": _oneof(("", "none", "local", "remote"))})
TPROXY = S("TransparentProxyConfig", {"OutboundListenerPort": Int(), "DialedDirectly": Bool()})
EXPOSE_PATH = S("ExposePath", {"ListenerPort": Int(), "Path": Str(), "LocalPathPort": Int(), "Protocol": Str(),
                               "ParsedFromCheck": Bool()})
EXPOSE = S("ExposeConfig", {"Checks": Bool(), "Paths": ListOf(EXPOSE_PATH)})
LIMITS = S("UpstreamLimits", {"MaxConnections": Int(), "MaxPendingRequests": Int(), "MaxConcurrentRequests": Int()})
PASSIVE = S("PassiveHealthCheck", {"Interval": Dur(), "MaxFailures": Int(), "EnforcingConsecutive5xx": Int(),
                                   "MaxEjectionPercent": Int(), "BaseEjectionTime": Dur()})
UPSTREAM = S("UpstreamConfig", {
    "Name": Str(), "Namespace": Str(), "Partition": Str(), "Peer": Str(), "EnvoyListenerJSON": Str(),
    "EnvoyClusterJSON": Str(), "Protocol": Proto(), "ConnectTimeoutMs": Int(), "Limits": LIMITS,
    "PassiveHealthCheck": PASSIVE, "MeshGateway": MESH_GATEWAY, "BalanceOutboundConnections": Str(),
})
UPSTREAMS = S("UpstreamConfiguration", {"Overrides": ListOf(UPSTREAM), "Defaults": UPSTREAM})
MODE = _oneof(("", "direct", "transparent"))
MTLS_MODE = _oneof(("", "strict", "permissive"))
HEADER_MOD = S("HTTPHeaderModifiers", {"Add": MapOf(Str()), "Set": MapOf(Str()), "Remove": ListOf(Str())})

SERVICE_DEFAULTS = S("ServiceConfigEntry", _COMMON | {
    "Protocol": Proto(), "Mode": MODE, "TransparentProxy": TPROXY, "MutualTLSMode": MTLS_MODE,
    "MeshGateway": MESH_GATEWAY, "Expose": EXPOSE, "ExternalSNI": Str(), "UpstreamConfig": UPSTREAMS,
    "Destination": S("DestinationConfig", {"Addresses": ListOf(Str()), "Port": Int()}),
    "MaxInboundConnections": Int(), "LocalConnectTimeoutMs": Int(), "LocalRequestTimeoutMs": Int(),
    "BalanceInboundConnections": Str(), "RateLimits": AnyValue(), "EnvoyExtensions": AnyValue(),
}, _READ_ONLY)
PROXY_DEFAULTS = S("ProxyConfigEntry", _COMMON | {
    "Config": MapOf(AnyValue()), "Mode": MODE, "TransparentProxy": TPROXY, "MutualTLSMode": MTLS_MODE,
    "MeshGateway": MESH_GATEWAY, "Expose": EXPOSE, "AccessLogs": AnyValue(), "EnvoyExtensions": AnyValue(),
    "FailoverPolicy": AnyValue(), "PrioritizeByLocality": AnyValue(),
}, _READ_ONLY)

TARGET = S("ServiceResolverFailoverTarget", {"Service": Str(), "ServiceSubset": Str(), "Partition": Str(),
                                             "Namespace": Str(), "Datacenter": Str(), "Peer": Str()})
FAILOVER = S("ServiceResolverFailover", {
    "Service": Str(), "ServiceSubset": Str(), "Namespace": Str(), "Datacenters": ListOf(Str()),
    "Targets": ListOf(TARGET), "SamenessGroup": Str(),
    "Policy": S("ServiceResolverFailoverPolicy", {"Mode": _oneof(("", "default", "sequential", "order-by-locality")),
                                                  "Regions": ListOf(Str())}),
})
HASH_POLICY = S("HashPolicy", {
    "Field": _oneof(("", "header", "cookie", "query_parameter")), "FieldValue": Str(),
    "CookieConfig": S("CookieConfig", {"Session": Bool(), "TTL": Dur(), "Path": Str()}),
    "SourceIP": Bool(), "Terminal": Bool(),
})
SERVICE_RESOLVER = S("ServiceResolverConfigEntry", _COMMON | {
    "DefaultSubset": Str(),
    "Subsets": MapOf(S("ServiceResolverSubset", {"Filter": Str(), "OnlyPassing": Bool()})),
    "Redirect": S("ServiceResolverRedirect", {"Service": Str(), "ServiceSubset": Str(), "Namespace": Str(),
                                              "Partition": Str(), "Datacenter": Str(), "Peer": Str(),
                                              "SamenessGroup": Str()}),
    "Failover": MapOf(FAILOVER),
    "ConnectTimeout": Dur(), "RequestTimeout": Dur(),
    "LoadBalancer": S("LoadBalancer", {
        "Policy": _oneof(LB_POLICIES),
        "RingHashConfig": S("RingHashConfig", {"MinimumRingSize": Int(), "MaximumRingSize": Int()}),
        "LeastRequestConfig": S("LeastRequestConfig", {"ChoiceCount": Int()}),
        "HashPolicies": ListOf(HASH_POLICY),
    }),
    "PrioritizeByLocality": S("ServiceResolverPrioritizeByLocality", {"Mode": Str()}),
}, _READ_ONLY)
SERVICE_SPLITTER = S("ServiceSplitterConfigEntry", _COMMON | {
    "Splits": ListOf(S("ServiceSplit", {
        "Weight": Float(), "Service": Str(), "ServiceSubset": Str(), "Namespace": Str(), "Partition": Str(),
        "RequestHeaders": HEADER_MOD, "ResponseHeaders": HEADER_MOD,
    })),
}, _READ_ONLY)
HEADER_MATCH = S("ServiceRouteHTTPMatchHeader", {"Name": Str(), "Present": Bool(), "Exact": Str(), "Prefix": Str(),
                                                 "Suffix": Str(), "Regex": Str(), "Invert": Bool()})
QUERY_MATCH = S("ServiceRouteHTTPMatchQueryParam", {"Name": Str(), "Present": Bool(), "Exact": Str(), "Regex": Str()})
SERVICE_ROUTER = S("ServiceRouterConfigEntry", _COMMON | {
    "Routes": ListOf(S("ServiceRoute", {
        "Match": S("ServiceRouteMatch", {"HTTP": S("ServiceRouteHTTPMatch", {
            "PathExact": Str(), "PathPrefix": Str(), "PathRegex": Str(), "Header": ListOf(HEADER_MATCH),
            "QueryParam": ListOf(QUERY_MATCH), "Methods": ListOf(Str()),
        })}),
        "Destination": S("ServiceRouteDestination", {
            "Service": Str(), "ServiceSubset": Str(), "Namespace": Str(), "Partition": Str(), "PrefixRewrite": Str(),
            "RequestTimeout": Dur(), "IdleTimeout": Dur(), "NumRetries": Int(), "RetryOnConnectFailure": Bool(),
            "RetryOnStatusCodes": ListOf(Int()), "RetryOn": ListOf(Str()), "RequestHeaders": HEADER_MOD,
            "ResponseHeaders": HEADER_MOD,
        }),
    })),
}, _READ_ONLY)
TLS_DIRECTION = S("MeshDirectionalTLSConfig", {"TLSMinVersion": _oneof(TLS_VERSIONS),
                                               "TLSMaxVersion": _oneof(TLS_VERSIONS), "CipherSuites": ListOf(Str())})
SDS = S("GatewayTLSSDSConfig", {"ClusterName": Str(), "CertResource": Str()})
GATEWAY_TLS = S("GatewayTLSConfig", {"Enabled": Bool(), "SDS": SDS, "TLSMinVersion": _oneof(TLS_VERSIONS),
                                     "TLSMaxVersion": _oneof(TLS_VERSIONS), "CipherSuites": ListOf(Str())})
INGRESS_LIMITS: dict[str, Spec] = {"MaxConnections": Int(), "MaxPendingRequests": Int(),
                                   "MaxConcurrentRequests": Int(), "PassiveHealthCheck": PASSIVE}
INGRESS_GATEWAY = S("IngressGatewayConfigEntry", _COMMON | {
    "TLS": GATEWAY_TLS,
    "Listeners": ListOf(S("IngressListener", {
        "Port": Int(), "Protocol": Proto(), "TLS": GATEWAY_TLS,
        "Services": ListOf(S("IngressService", {
            "Name": Str(), "Hosts": ListOf(Str()), "Namespace": Str(), "Partition": Str(),
            "TLS": S("GatewayServiceTLSConfig", {"SDS": SDS}), "RequestHeaders": HEADER_MOD,
            "ResponseHeaders": HEADER_MOD,
        } | INGRESS_LIMITS)),
    })),
    "Defaults": S("IngressServiceConfig", INGRESS_LIMITS),
}, _READ_ONLY)
TERMINATING_GATEWAY = S("TerminatingGatewayConfigEntry", _COMMON | {
    "Services": ListOf(S("LinkedService", {"Name": Str(), "Namespace": Str(), "Partition": Str(), "CAFile": Str(),
                                           "CertFile": Str(), "KeyFile": Str(), "SNI": Str(),
                                           "DisableAutoHostRewrite": Bool()})),
}, _READ_ONLY)
MESH = S("MeshConfigEntry", _COMMON | {
    "TransparentProxy": S("TransparentProxyMeshConfig", {"MeshDestinationsOnly": Bool()}),
    "AllowEnablingPermissiveMutualTLS": Bool(),
    "TLS": S("MeshTLSConfig", {"Incoming": TLS_DIRECTION, "Outgoing": TLS_DIRECTION}),
    "HTTP": S("MeshHTTPConfig", {"SanitizeXForwardedClientCert": Bool(), "Incoming": AnyValue()}),
    "Peering": S("PeeringMeshConfig", {"PeerThroughMeshGateways": Bool()}),
    "ValidateClusters": Bool(),
}, _READ_ONLY)
SERVICE_INTENTIONS = S("ServiceIntentionsConfigEntry", _COMMON | {
    "Sources": ListOf(S("SourceIntention", {
        "Name": Str(), "Peer": Str(), "Partition": Str(), "Namespace": Str(), "SamenessGroup": Str(),
        "Action": Str(), "Permissions": AnyValue(), "Precedence": Int(), "Type": Str(), "Description": Str(),
        "LegacyID": Str(), "LegacyMeta": MapOf(Str()), "LegacyCreateTime": AnyValue(), "LegacyUpdateTime": AnyValue(),
    })),
    "JWT": AnyValue(),
}, _READ_ONLY)

KINDS: dict[str, Struct] = {
    "service-defaults": SERVICE_DEFAULTS,
    "proxy-defaults": PROXY_DEFAULTS,
    "service-router": SERVICE_ROUTER,
    "service-splitter": SERVICE_SPLITTER,
    "service-resolver": SERVICE_RESOLVER,
    "ingress-gateway": INGRESS_GATEWAY,
    "terminating-gateway": TERMINATING_GATEWAY,
    "service-intentions": SERVICE_INTENTIONS,
    "mesh": MESH,
}


# -- single-entry validation -----------------------------------------------------------------------


def validate_entry(body: Any) -> dict[str, Any]:
    """Decode and validate one config entry; returns it normalized (canonical keys, Kind/Name set)."""
    if not isinstance(body, Mapping):
        raise BadRequest("Request decode failed: the body must be a JSON object with Kind and Name")
    kind_key = next((k for k in body if str(k).lower() == "kind"), None)
    kind = body.get(kind_key) if kind_key is not None else None
    if not kind or not isinstance(kind, str):
        raise BadRequest("Request decode failed: Payload does not contain a Kind key at the top level")
    kind = kind.lower()
    spec = KINDS.get(kind)
    if spec is None:
        raise BadRequest(f"invalid config entry kind: {kind}")
    entry = spec.decode(dict(body))
    entry["Kind"] = kind
    name = entry.get("Name", "")
    if not name:
        raise BadRequest("Name is required")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name) or len(name) > 512:
        raise BadRequest(f"invalid Name {name!r}: control characters or longer than 512 characters")
    for key in ("Namespace", "Partition"):
        if entry.get(key) not in (None, "", "default"):
            raise BadRequest(f"{key} must be 'default' (namespaces and admin partitions are not supported)")
        entry.pop(key, None)
    if kind not in ("proxy-defaults", "mesh") and "/" in name:
        raise BadRequest(f"invalid Name {name!r}: must not contain '/'")
    _VALIDATORS[kind](entry)
    return entry


def _service_defaults(entry: dict[str, Any]) -> None:
    _proxy_common(entry)
    for i, up in enumerate((entry.get("UpstreamConfig") or {}).get("Overrides") or []):
        if not up.get("Name"):
            raise BadRequest(f"UpstreamConfig.Overrides[{i}]: Name is required")
        _upstream(up, f"UpstreamConfig.Overrides[{i}]")
    defaults = (entry.get("UpstreamConfig") or {}).get("Defaults")
    if defaults:
        if defaults.get("Name"):
            raise BadRequest("UpstreamConfig.Defaults: Name must not be set")
        _upstream(defaults, "UpstreamConfig.Defaults")
    for key in ("MaxInboundConnections", "LocalConnectTimeoutMs", "LocalRequestTimeoutMs"):
        if entry.get(key, 0) < 0:
            raise BadRequest(f"{key} must be >= 0")


def _upstream(up: dict[str, Any], where: str) -> None:
    if up.get("ConnectTimeoutMs", 0) < 0:
        raise BadRequest(f"{where}.ConnectTimeoutMs must be >= 0")
    for key, value in (up.get("Limits") or {}).items():
        if value < 0:
            raise BadRequest(f"{where}.Limits.{key} must be >= 0")


def _proxy_common(entry: dict[str, Any]) -> None:
    port = (entry.get("TransparentProxy") or {}).get("OutboundListenerPort", 0)
    if not 0 <= port <= 65535:
        raise BadRequest("TransparentProxy.OutboundListenerPort must be between 0 and 65535")
    for i, path in enumerate((entry.get("Expose") or {}).get("Paths") or []):
        where = f"Expose.Paths[{i}]"
        if not str(path.get("Path", "")).startswith("/"):
            raise BadRequest(f"{where}.Path must start with '/'")
        if path.get("Protocol", "") not in ("", "http", "http2"):
            raise BadRequest(f"{where}.Protocol must be http or http2")
        for key in ("ListenerPort", "LocalPathPort"):
            if not 0 < path.get(key, 0) <= 65535:
                raise BadRequest(f"{where}.{key} must be between 1 and 65535")
    for key in ("TransparentProxy", "MeshGateway", "Expose"):
        entry.setdefault(key, {})


def _proxy_defaults(entry: dict[str, Any]) -> None:
    if entry["Name"] != "global":
        raise BadRequest(f'invalid name ("{entry["Name"]}"), only "global" is supported')
    _proxy_common(entry)
    config = entry.get("Config") or {}
    for key, value in config.items():
        if key.lower() == "protocol":
            if not isinstance(value, str) or value.lower() not in PROTOCOLS:
                raise BadRequest(f"Config.protocol: invalid protocol {value!r}, must be one of {', '.join(PROTOCOLS)}")


def _mesh(entry: dict[str, Any]) -> None:
    if entry["Name"] != "mesh":
        raise BadRequest(f'invalid name ("{entry["Name"]}"), only "mesh" is supported')


def _check_regex(where: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise BadRequest(f"{where} is not a valid regular expression: {exc}") from None


def _service_resolver(entry: dict[str, Any]) -> None:
    name = entry["Name"]
    subsets = entry.get("Subsets") or {}
    for subset, body in subsets.items():
        if not _SUBSET_NAME.match(subset) or len(subset) > 63:
            raise BadRequest(f'Subset {subset!r} is invalid: names must be lowercase alphanumerics or "-", '
                             "starting and ending with an alphanumeric, at most 63 characters")
        if body.get("Filter"):
            from lictor.bexpr import compile_filter

            try:
                compile_filter(body["Filter"])
            except BadRequest as exc:
                raise BadRequest(f'Bad Subsets["{subset}"].Filter: {exc.message}') from None
    default = entry.get("DefaultSubset", "")
    if default and default not in subsets:
        raise BadRequest(f'DefaultSubset "{default}" is not a valid subset (define it in Subsets)')
    redirect = entry.get("Redirect") or {}
    if redirect:
        if not any(redirect.values()):
            raise BadRequest("Redirect is empty")
        if subsets:
            raise BadRequest("Redirect and Subsets cannot both be set")
        if entry.get("Failover"):
            raise BadRequest("Redirect and Failover cannot both be set")
        if default:
            raise BadRequest("Redirect and DefaultSubset cannot both be set")
        local = not (redirect.get("Datacenter") or redirect.get("Peer") or redirect.get("SamenessGroup"))
        if local and redirect.get("Service", name) in ("", name) and not redirect.get("ServiceSubset"):
            raise BadRequest(f'Redirect of service "{name}" points at itself (set Service, ServiceSubset, '
                             "Datacenter or Peer)")
    else:
        entry.pop("Redirect", None)
    for key, failover in (entry.get("Failover") or {}).items():
        where = f'Failover["{key}"]'
        if key != "*" and key not in subsets:
            raise BadRequest(f"Bad {where}: not a valid subset")
        targets = failover.get("Targets") or []
        if not any(failover.get(k) for k in ("Service", "ServiceSubset", "Namespace", "Datacenters", "Targets",
                                             "SamenessGroup")):
            raise BadRequest(f"Bad {where}: one of Service, ServiceSubset, Namespace, Targets, SamenessGroup, "
                             "or Datacenters is required")
        if targets and any(failover.get(k) for k in ("Service", "ServiceSubset", "Datacenters")):
            raise BadRequest(f"Bad {where}: Targets cannot be set with Service, ServiceSubset or Datacenters")
        for i, target in enumerate(targets):
            if target.get("Peer") and target.get("Datacenter"):
                raise BadRequest(f"Bad {where}.Targets[{i}]: Peer and Datacenter cannot both be set")
        if failover.get("ServiceSubset") and not _SUBSET_NAME.match(failover["ServiceSubset"]):
            raise BadRequest(f"Bad {where}.ServiceSubset: invalid subset name {failover['ServiceSubset']!r}")
    lb = entry.get("LoadBalancer") or {}
    policy = lb.get("Policy", "")
    if lb.get("LeastRequestConfig") and policy != "least_request":
        raise BadRequest(f'LoadBalancer.LeastRequestConfig requires Policy "least_request", got {policy!r}')
    if lb.get("RingHashConfig") and policy != "ring_hash":
        raise BadRequest(f'LoadBalancer.RingHashConfig requires Policy "ring_hash", got {policy!r}')
    ring = lb.get("RingHashConfig") or {}
    if ring.get("MinimumRingSize") and ring.get("MaximumRingSize") and ring["MinimumRingSize"] > ring["MaximumRingSize"]:
        raise BadRequest("LoadBalancer.RingHashConfig: MinimumRingSize cannot exceed MaximumRingSize")
    if lb.get("HashPolicies") and policy not in ("ring_hash", "maglev"):
        raise BadRequest(f'LoadBalancer.HashPolicies require Policy "ring_hash" or "maglev", got {policy!r}')
    for i, hp in enumerate(lb.get("HashPolicies") or []):
        where = f"LoadBalancer.HashPolicies[{i}]"
        if hp.get("Field") and hp.get("SourceIP"):
            raise BadRequest(f"{where}: a single hash policy cannot hash both a Field and the SourceIP")
        if not hp.get("Field") and not hp.get("SourceIP"):
            raise BadRequest(f"{where}: one of Field or SourceIP is required")
        if hp.get("Field") and not hp.get("FieldValue"):
            raise BadRequest(f'{where}: FieldValue is required when Field is "{hp["Field"]}"')
        cookie = hp.get("CookieConfig") or {}
        if cookie and hp.get("Field") != "cookie":
            raise BadRequest(f'{where}: CookieConfig is only valid with Field "cookie"')
        if cookie.get("Session") and cookie.get("TTL"):
            raise BadRequest(f"{where}.CookieConfig: Session and TTL cannot both be set")


def _service_splitter(entry: dict[str, Any]) -> None:
    splits = entry.get("Splits") or []
    if not splits:
        raise BadRequest("Splits: at least one split is required")
    seen: set[tuple[str, str]] = set()
    total = 0.0
    for i, split in enumerate(splits):
        weight = split.get("Weight", 0.0)
        if not math.isfinite(weight) or not 0 <= weight <= 100:
            raise BadRequest(f"Splits[{i}].Weight must be between 0 and 100, got {weight:g}")
        total += weight
        key = (split.get("Service") or entry["Name"], split.get("ServiceSubset", ""))
        if key in seen:
            shown = key[0] + (f" (subset {key[1]})" if key[1] else "")
            raise BadRequest(f"Splits[{i}]: split destination {shown} occurs more than once")
        seen.add(key)
    if abs(total - 100.0) > WEIGHT_EPSILON:
        raise BadRequest(f"the sum of all split weights must be 100, not {total:.2f}")


def _service_router(entry: dict[str, Any]) -> None:
    for i, route in enumerate(entry.get("Routes") or []):
        where = f"Route[{i}]"
        http = (route.get("Match") or {}).get("HTTP") or {}
        paths = [k for k in ("PathExact", "PathPrefix", "PathRegex") if http.get(k)]
        if len(paths) > 1:
            raise BadRequest(f"{where} should only contain at most one of PathExact, PathPrefix, or PathRegex")
        for key in ("PathExact", "PathPrefix"):
            if http.get(key) and not http[key].startswith("/"):
                raise BadRequest(f"{where} {key} doesn't start with '/': {http[key]!r}")
        if http.get("PathRegex"):
            _check_regex(f"{where} PathRegex", http["PathRegex"])
        for j, hdr in enumerate(http.get("Header") or []):
            if not hdr.get("Name"):
                raise BadRequest(f"{where} Header[{j}] missing required Name field")
            if sum(bool(hdr.get(k)) for k in ("Present", "Exact", "Prefix", "Suffix", "Regex")) > 1:
                raise BadRequest(f"{where} Header[{j}] should only contain one of Present, Exact, Prefix, "
                                 "Suffix, or Regex")
            if hdr.get("Regex"):
                _check_regex(f"{where} Header[{j}].Regex", hdr["Regex"])
        for j, qp in enumerate(http.get("QueryParam") or []):
            if not qp.get("Name"):
                raise BadRequest(f"{where} QueryParam[{j}] missing required Name field")
            if sum(bool(qp.get(k)) for k in ("Present", "Exact", "Regex")) > 1:
                raise BadRequest(f"{where} QueryParam[{j}] should only contain one of Present, Exact, or Regex")
            if qp.get("Regex"):
                _check_regex(f"{where} QueryParam[{j}].Regex", qp["Regex"])
        seen: set[str] = set()
        for method in http.get("Methods") or []:
            upper = method.upper()
            if upper not in HTTP_METHODS:
                raise BadRequest(f"{where} Methods contains an invalid method {method!r}")
            if upper in seen:
                raise BadRequest(f"{where} Methods contains {upper!r} more than once")
            seen.add(upper)
        if http.get("Methods"):
            http["Methods"] = [m.upper() for m in http["Methods"]]
        dest = route.get("Destination") or {}
        if dest.get("PrefixRewrite") and not (http.get("PathExact") or http.get("PathPrefix")):
            raise BadRequest(f"{where} cannot make use of PrefixRewrite without configuring either PathExact "
                             "or PathPrefix")
        if dest.get("NumRetries", 0) < 0:
            raise BadRequest(f"{where} Destination.NumRetries must be >= 0")
        for code in dest.get("RetryOnStatusCodes") or []:
            if not 100 <= code <= 599:
                raise BadRequest(f"{where} Destination.RetryOnStatusCodes contains an invalid status code {code}")
        for cond in dest.get("RetryOn") or []:
            if cond not in RETRY_ON:
                raise BadRequest(f"{where} Destination.RetryOn contains an invalid retry condition {cond!r}")


def _ingress_gateway(entry: dict[str, Any]) -> None:
    ports: set[int] = set()
    for i, listener in enumerate(entry.get("Listeners") or []):
        port = listener.get("Port", 0)
        where = f"Listeners[{i}] (port {port})"
        if not 0 < port <= 65535:
            raise BadRequest(f"Listeners[{i}].Port must be between 1 and 65535, got {port}")
        if port in ports:
            raise BadRequest(f"port {port} declared on two listeners")
        ports.add(port)
        protocol = listener.get("Protocol") or "tcp"
        listener["Protocol"] = protocol
        services = listener.get("Services") or []
        if not services:
            raise BadRequest(f"{where}: no service declared for listener with port {port}")
        if protocol == "tcp" and len(services) != 1:
            raise BadRequest(f"multiple services per listener are only supported for L7 protocols 'http', "
                             f"'grpc' and 'http2' (listener on port {port} has protocol tcp and "
                             f"{len(services)} services)")
        hosts_seen: set[str] = set()
        for j, svc in enumerate(services):
            name = svc.get("Name", "")
            if not name:
                raise BadRequest(f"{where}: Services[{j}].Name is required")
            if name == "*" and protocol == "tcp":
                raise BadRequest(f"Wildcard service name is only valid for L7 protocols (listener on port {port})")
            hosts = svc.get("Hosts") or []
            if hosts and protocol == "tcp":
                raise BadRequest(f"Associating hosts to a service is not supported for the tcp protocol "
                                 f"(listener on port {port})")
            if hosts and name == "*":
                raise BadRequest(f"Associating hosts to a wildcard service is not supported "
                                 f"(listener on port {port})")
            for host in hosts:
                if host != "*" and not _HOST.match(host):
                    raise BadRequest(f"Host {host!r} is not valid: a host must be a domain name, optionally "
                                     "starting with '*.'")
                if host in hosts_seen:
                    raise BadRequest(f"Hosts must be unique within a specific listener (listener on port {port})")
                hosts_seen.add(host)


def _terminating_gateway(entry: dict[str, Any]) -> None:
    seen: set[str] = set()
    for i, svc in enumerate(entry.get("Services") or []):
        name = svc.get("Name", "")
        if not name:
            raise BadRequest(f"Services[{i}].Name is required")
        if name in seen:
            raise BadRequest(f"Service {name!r} was specified more than once")
        seen.add(name)
        if name == "*" and any(svc.get(k) for k in ("CAFile", "CertFile", "KeyFile", "SNI")):
            raise BadRequest("A wildcard service cannot carry TLS files or an SNI")
        if bool(svc.get("CertFile")) != bool(svc.get("KeyFile")):
            raise BadRequest(f"Services[{i}]: CertFile and KeyFile must be specified together")


def _service_intentions(entry: dict[str, Any]) -> None:
    from lictor.registry.intentions import validate_config_entry

    if entry.get("JWT"):
        raise BadRequest("JWT is not supported")
    entry.pop("JWT", None)
    normalized = validate_config_entry(entry)
    entry.clear()
    entry.update(normalized)


_VALIDATORS = {
    "service-defaults": _service_defaults,
    "proxy-defaults": _proxy_defaults,
    "service-router": _service_router,
    "service-splitter": _service_splitter,
    "service-resolver": _service_resolver,
    "ingress-gateway": _ingress_gateway,
    "terminating-gateway": _terminating_gateway,
    "service-intentions": _service_intentions,
    "mesh": _mesh,
}


# -- cross-entry checks ------------------------------------------------------------------------------

Entries = Mapping[str, Mapping[str, Mapping[str, Any]]]


def service_protocol(entries: Entries, service: str) -> str:
    """service-defaults Protocol, else proxy-defaults Config.protocol, else tcp."""
    defaults = entries.get("service-defaults", {}).get(service) or {}
    if defaults.get("Protocol"):
        return str(defaults["Protocol"]).lower()
    proxy = entries.get("proxy-defaults", {}).get("global") or {}
    for key, value in (proxy.get("Config") or {}).items():
        if key.lower() == "protocol" and value:
            return str(value).lower()
    return "tcp"


def _subset_refs(entries: Entries) -> list[tuple[str, str, str]]:
    """(service, subset, who references it) for every local subset reference in the graph."""
    refs = []
    for name, splitter in entries.get("service-splitter", {}).items():
        for split in splitter.get("Splits") or []:
            if split.get("ServiceSubset"):
                refs.append((split.get("Service") or name, split["ServiceSubset"], f'service-splitter "{name}"'))
    for name, router in entries.get("service-router", {}).items():
        for route in router.get("Routes") or []:
            dest = route.get("Destination") or {}
            if dest.get("ServiceSubset"):
                refs.append((dest.get("Service") or name, dest["ServiceSubset"], f'service-router "{name}"'))
    for name, resolver in entries.get("service-resolver", {}).items():
        redirect = resolver.get("Redirect") or {}
        remote = redirect.get("Datacenter") or redirect.get("Peer") or redirect.get("SamenessGroup")
        if redirect.get("ServiceSubset") and not remote:
            refs.append((redirect.get("Service") or name, redirect["ServiceSubset"],
                         f'the Redirect of service-resolver "{name}"'))
        for key, failover in (resolver.get("Failover") or {}).items():
            targets = [failover, *(failover.get("Targets") or [])]
            for target in targets:
                if target.get("ServiceSubset") and not (target.get("Datacenter") or target.get("Peer")
                                                        or target.get("Datacenters")):
                    refs.append((target.get("Service") or name, target["ServiceSubset"],
                                 f'Failover["{key}"] of service-resolver "{name}"'))
    return refs


def _redirect_cycles(entries: Entries) -> list[list[str]]:
    edges: dict[str, str] = {}
    for name, resolver in entries.get("service-resolver", {}).items():
        redirect = resolver.get("Redirect") or {}
        if redirect.get("Datacenter") or redirect.get("Peer") or redirect.get("SamenessGroup"):
            continue
        target = redirect.get("Service") or ""
        if target and target != name:
            edges[name] = target
    cycles: list[list[str]] = []
    seen_cycles: set[tuple[str, ...]] = set()
    for start in sorted(edges):
        path: list[str] = []
        node: str | None = start
        while node is not None and node not in path:
            path.append(node)
            node = edges.get(node)
        if node is None:
            continue
        cycle = path[path.index(node):]
        pivot = cycle.index(min(cycle))  # one canonical rotation, so each loop is reported once
        canonical = tuple(cycle[pivot:] + cycle[:pivot])
        if canonical not in seen_cycles:
            seen_cycles.add(canonical)
            cycles.append(list(canonical))
    return cycles


def graph_errors(entries: Entries) -> list[str]:
    """Every cross-entry problem in `entries` (kind -> name -> entry), in a stable order."""
    errors: list[str] = []
    for kind in ("service-router", "service-splitter"):
        for name in sorted(entries.get(kind, {})):
            protocol = service_protocol(entries, name)
            if protocol not in L7_PROTOCOLS:
                errors.append(f'discovery chain "{name}" uses a protocol "{protocol}" that does not permit advanced '
                              f'routing or splitting behavior ({kind} "{name}" needs service "{name}" to have '
                              "protocol http, http2 or grpc in service-defaults or proxy-defaults)")
    for service, subset, who in _subset_refs(entries):
        resolver = entries.get("service-resolver", {}).get(service) or {}
        if subset not in (resolver.get("Subsets") or {}):
            errors.append(f'{who} references subset "{subset}" of service "{service}", but service "{service}" '
                          f'does not have a subset named "{subset}" (define it in its service-resolver Subsets)')
    for cycle in _redirect_cycles(entries):
        errors.append("detected circular resolver redirect: " + " -> ".join([*cycle, cycle[0]]))
    for gateway, entry in sorted(entries.get("ingress-gateway", {}).items()):
        for listener in entry.get("Listeners") or []:
            listener_protocol = listener.get("Protocol") or "tcp"
            for svc in listener.get("Services") or []:
                name = svc.get("Name", "")
                if not name or name == "*":
                    continue
                protocol = service_protocol(entries, name)
                if protocol != listener_protocol:
                    errors.append(f'service "{name}" has protocol "{protocol}", which does not match defined '
                                  f'listener protocol "{listener_protocol}" (ingress-gateway "{gateway}", '
                                  f'port {listener.get("Port")})')
    return errors


def check_change(entries: Entries, kind: str, name: str, entry: Mapping[str, Any] | None) -> None:
    """400 if writing `entry` (or deleting, when None) at kind/name breaks the graph."""
    proposed: dict[str, dict[str, Mapping[str, Any]]] = {k: dict(v) for k, v in entries.items()}
    table = proposed.setdefault(kind, {})
    if entry is None:
        table.pop(name, None)
    else:
        table[name] = entry
    before = set(graph_errors(entries))
    for error in graph_errors(proposed):
        if error not in before:
            raise BadRequest(error)
