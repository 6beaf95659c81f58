"""Discovery-chain compiler: config entries for one service -> routes -> splits -> resolver targets.

Pure: plain dicts in (exactly what `GET /v1/config/{kind}/{name}` returns), frozen dataclasses out,
no I/O, clock or randomness. The shape follows Consul's `discoverychain.Compile`:

* a **router** (service-router of the service) holds routes in order; the first match wins, and a
  catch-all route to the service itself is always appended ("unmatched traffic goes to the service");
* a route's destination leads to a **splitter** (service-splitter of the destination service, only
  when the destination names no subset) or straight to a **resolver**; nested splitters are
  flattened with their weights multiplied, so the data plane draws once per request;
* a **resolver** node is one target (service + subset, after Redirect and DefaultSubset) followed by
  its failover targets in order, with the resolver's timeouts and load-balancer policy.

Weights are kept in basis points (1/100 of a percent), summing to 10000, so a draw in [0, 100) maps
to a split exactly. tcp chains ignore routers and splitters, as Consul does.

Usage::

    chain = compile_chain("web", {"service-router": {...}, "service-resolver": {...}}, protocol="http")
    chain.routes[-1].destination.splits[0].resolver.targets[0].subset  # "v1"
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lictor.bexpr import compile_filter
from lictor.durations import DurationError, parse_duration

__all__ = [
    "CompiledChain", "Destination", "HashPolicy", "HeaderMatch", "HeaderMods", "LoadBalancer", "QueryMatch",
    "ResolverNode", "RetryPolicy", "Route", "RouteMatch", "Split", "Target", "ChainError",
    "DEFAULT_CONNECT_TIMEOUT", "compile_chain", "chain_protocol", "target_id", "discovery_chain_json",
]

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_DC = "dc1"
_MAX_DEPTH = 16  # redirect / nested-splitter hops before we call it a loop

Entries = Mapping[str, Mapping[str, Mapping[str, Any]]]


class ChainError(ValueError):
    """The entries cannot form a chain (redirect loop, splitter loop, bad duration)."""


# ------------------------------------------------------------------------------------------ model

@dataclass(frozen=True, slots=True)
class HeaderMods:
    """Consul's HTTPHeaderModifiers: Add appends, Set replaces, Remove deletes (names lower-cased)."""

    add: tuple[tuple[str, str], ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.set or self.remove)

    @classmethod
    def from_api(cls, raw: Mapping[str, Any] | None) -> HeaderMods:
        raw = raw or {}
        return cls(
            add=tuple((str(k), str(v)) for k, v in sorted((raw.get("Add") or {}).items())),
            set=tuple((str(k), str(v)) for k, v in sorted((raw.get("Set") or {}).items())),
            remove=tuple(str(h).lower() for h in raw.get("Remove") or ()),
        )

    def then(self, other: HeaderMods) -> HeaderMods:
        """Both modifiers, `other` applied last (its Set wins)."""
        if not self:
            return other
        if not other:
            return self
        return HeaderMods(self.add + other.add, self.set + other.set, self.remove + other.remove)

    def to_api(self) -> dict[str, Any]:
        return {"Add": dict(self.add), "Set": dict(self.set), "Remove": list(self.remove)}


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lower-cased
    present: bool = False
    exact: str = ""
    prefix: str = ""
    suffix: str = ""
    regex: re.Pattern[str] | None = None
    invert: bool = False


@dataclass(frozen=True, slots=True)
class QueryMatch:
    name: str
    present: bool = False
    exact: str = ""
    regex: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path_exact: str = ""
    path_prefix: str = ""
    path_regex: re.Pattern[str] | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    methods: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """What Consul hands Envoy: NumRetries and the retry conditions of one route.

    Envoy's rule, which Consul relies on: conditions without NumRetries mean 1 retry; NumRetries
    without any condition means no retry at all."""

    num_retries: int = 0
    on_connect_failure: bool = False
    on_status_codes: frozenset[int] = frozenset()
    on: frozenset[str] = frozenset()  # RetryOn: 5xx, gateway-error, reset, connect-failure, ...

    @property
    def enabled(self) -> bool:
        return self.num_retries > 0 and bool(self.on_connect_failure or self.on_status_codes or self.on)


@dataclass(frozen=True, slots=True)
class Target:
    """One service (+ subset) instances are picked from. `id` is Consul's chain target ID."""

    id: str
    service: str
    subset: str = ""
    datacenter: str = DEFAULT_DC
    filter: str = ""
    only_passing: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # Compiled bexpr predicate over {"Service": ..., "Node": ...}; not part of equality.
    predicate: Callable[[Any], bool] | None = field(default=None, compare=False, repr=False)

    def accepts(self, entry: Mapping[str, Any]) -> bool:
        return self.predicate is None or self.predicate(entry)


@dataclass(frozen=True, slots=True)
class HashPolicy:
    field: str = ""  # header | cookie | query_parameter
    field_value: str = ""
    source_ip: bool = False
    terminal: bool = False
    cookie_ttl: float = 0.0
    cookie_session: bool = False
    cookie_path: str = ""


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    policy: str = "round_robin"  # round_robin | least_request | ring_hash | maglev | random
    hash_policies: tuple[HashPolicy, ...] = ()
    choice_count: int = 2
    min_ring_size: int = 1024
    max_ring_size: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ResolverNode:
    """A primary target followed by its failover targets, tried in order."""

    name: str  # the primary target's id
    targets: tuple[Target, ...]
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    request_timeout: float | None = None
    load_balancer: LoadBalancer = LoadBalancer()
    default: bool = False  # no service-resolver exists for the primary service

    @property
    def target(self) -> Target:
        return self.targets[0]


@dataclass(frozen=True, slots=True)
class Split:
    weight: float  # percent, as configured (after flattening)
    basis_points: int  # cumulative ranges are built from these; the splits of one node sum to 10000
    resolver: ResolverNode
    request_headers: HeaderMods = HeaderMods()
    response_headers: HeaderMods = HeaderMods()


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a matched route sends traffic, and how (retries, timeout, header changes)."""

    service: str
    subset: str
    splits: tuple[Split, ...]  # one split of 10000 when there is no splitter
    splitter: str = ""  # name of the splitter node, "" when routed straight to a resolver
    prefix_rewrite: str = ""
    request_timeout: float | None = None
    idle_timeout: float | None = None
    retry: RetryPolicy = RetryPolicy()
    request_headers: HeaderMods = HeaderMods()
    response_headers: HeaderMods = HeaderMods()


@dataclass(frozen=True, slots=True)
class Route:
    match: RouteMatch
    destination: Destination
    definition: Mapping[str, Any] = field(default_factory=dict, compare=False)
    default: bool = False  # the appended catch-all


@dataclass(frozen=True, slots=True)
class CompiledChain:
    service: str
    protocol: str
    datacenter: str
    routes: tuple[Route, ...]  # last one is always the catch-all to the service itself
    targets: Mapping[str, Target]
    has_router: bool = False
    start_node: str = ""

    @property
    def default_route(self) -> Route:
        return self.routes[-1]

    def services(self) -> frozenset[str]:
        """Every service the chain may send traffic to (what the data plane must watch)."""
        return frozenset(t.service for t in self.targets.values())


# ------------------------------------------------------------------------------------- compiling

def target_id(service: str, subset: str = "", datacenter: str = DEFAULT_DC) -> str:
    """Consul's chain target ID: `[subset.]service.namespace.partition.dc`."""
    base = f"{service}.default.default.{datacenter}"
    return f"{subset}.{base}" if subset else base


def chain_protocol(service: str, entries: Entries, default: str = "tcp") -> str:
    """service-defaults Protocol, else proxy-defaults Config.protocol, else `default`."""
    sd = entries.get("service-defaults", {}).get(service) or {}
    if sd.get("Protocol"):
        return str(sd["Protocol"]).lower()
    pd = entries.get("proxy-defaults", {}).get("global") or {}
    for key, value in (pd.get("Config") or {}).items():
        if key.lower() == "protocol" and value:
            return str(value).lower()
    return default


def _duration(value: Any, where: str) -> float | None:
    if value in (None, "", 0):
        return None
    try:
        seconds = parse_duration(value)
    except DurationError as exc:
        raise ChainError(f"{where}: {exc}") from None
    return seconds or None


def _regex(pattern: str, where: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ChainError(f"{where}: invalid regular expression: {exc}") from None


def _route_match(raw: Mapping[str, Any] | None, where: str) -> RouteMatch:
    http = (raw or {}).get("HTTP") or {}
    headers = tuple(
        HeaderMatch(
            name=str(h.get("Name", "")).lower(), present=bool(h.get("Present")), exact=h.get("Exact") or "",
            prefix=h.get("Prefix") or "", suffix=h.get("Suffix") or "",
            regex=_regex(h.get("Regex") or "", f"{where}.Header[{i}]"), invert=bool(h.get("Invert")),
        )
        for i, h in enumerate(http.get("Header") or ())
    )
    query = tuple(
        QueryMatch(name=str(q.get("Name", "")), present=bool(q.get("Present")), exact=q.get("Exact") or "",
                   regex=_regex(q.get("Regex") or "", f"{where}.QueryParam[{i}]"))
        for i, q in enumerate(http.get("QueryParam") or ())
    )
    return RouteMatch(
        path_exact=http.get("PathExact") or "", path_prefix=http.get("PathPrefix") or "",
        path_regex=_regex(http.get("PathRegex") or "", f"{where}.PathRegex"), headers=headers, query=query,
        methods=frozenset(str(m).upper() for m in http.get("Methods") or ()),
    )


def _retry_policy(dest: Mapping[str, Any]) -> RetryPolicy:
    codes = frozenset(int(c) for c in dest.get("RetryOnStatusCodes") or ())
    on = frozenset(str(c) for c in dest.get("RetryOn") or ())
    on_connect = bool(dest.get("RetryOnConnectFailure")) or "connect-failure" in on
    num = int(dest.get("NumRetries") or 0)
    if num <= 0 and (codes or on or on_connect):
        num = 1  # Envoy's default when a retry condition is configured
    return RetryPolicy(num_retries=max(num, 0), on_connect_failure=on_connect, on_status_codes=codes, on=on)


# (weight %, resolver, request header mods, response header mods) after flattening nested splitters
_Flat = tuple[float, ResolverNode, HeaderMods, HeaderMods]


class _Compiler:
    def __init__(self, service: str, entries: Entries, protocol: str, datacenter: str,
                 connect_timeout: float | None) -> None:
        self.service = service
        self.entries = entries
        self.protocol = protocol
        self.dc = datacenter
        self.override_connect_timeout = connect_timeout
        self.targets: dict[str, Target] = {}
        self.resolvers: dict[str, ResolverNode] = {}

    def _entry(self, kind: str, name: str) -> Mapping[str, Any] | None:
        return self.entries.get(kind, {}).get(name)

    # -- resolvers ------------------------------------------------------------------------------

    def _redirected(self, service: str, subset: str) -> tuple[str, str]:
        """Follow resolver Redirects (local ones only) and apply DefaultSubset."""
        seen: list[str] = []
        while True:
            resolver = self._entry("service-resolver", service) or {}
            redirect = resolver.get("Redirect") or {}
            if redirect and (redirect.get("Service") or redirect.get("ServiceSubset")):
                if service in seen:
                    raise ChainError("detected circular resolver redirect: " + " -> ".join([*seen, service]))
                seen.append(service)
                if len(seen) > _MAX_DEPTH:
                    raise ChainError(f"resolver redirects nest deeper than {_MAX_DEPTH}")
                service, subset = redirect.get("Service") or service, redirect.get("ServiceSubset") or ""
                continue
            if not subset and resolver.get("DefaultSubset"):
                subset = resolver["DefaultSubset"]
            return service, subset

    def _target(self, service: str, subset: str) -> Target:
        tid = target_id(service, subset, self.dc)
        if tid in self.targets:
            return self.targets[tid]
        resolver = self._entry("service-resolver", service) or {}
        spec: Mapping[str, Any] = {}
        if subset:
            spec = (resolver.get("Subsets") or {}).get(subset)  # type: ignore[assignment]
            if spec is None:
                raise ChainError(f'service "{service}" does not have a subset named "{subset}"')
        expr = spec.get("Filter") or ""
        try:
            predicate = compile_filter(expr) if expr else None
        except Exception as exc:  # noqa: BLE001 - bexpr raises BadRequest; report it as a chain error
            raise ChainError(f'subset "{subset}" of "{service}": bad Filter: {exc}') from None
        connect_timeout = (self.override_connect_timeout
                           or _duration(resolver.get("ConnectTimeout"), f"service-resolver {service} ConnectTimeout")
                           or DEFAULT_CONNECT_TIMEOUT)
        target = Target(id=tid, service=service, subset=subset, datacenter=self.dc, filter=expr,
                        only_passing=bool(spec.get("OnlyPassing")), connect_timeout=connect_timeout,
                        predicate=predicate)
        self.targets[tid] = target
        return target

    def resolver(self, service: str, subset: str) -> ResolverNode:
        service, subset = self._redirected(service, subset)
        primary = self._target(service, subset)
        if primary.id in self.resolvers:
            return self.resolvers[primary.id]
        entry = self._entry("service-resolver", service)
        resolver = entry or {}
        failover_map = resolver.get("Failover") or {}
        failover = failover_map.get(subset) if subset in failover_map else failover_map.get("*")
        chain = [primary]
        for raw_target in self._failover_targets(service, subset, failover or {}):
            t_service, t_subset = raw_target
            if t_service != service:
                # A failover to another service goes through that service's own resolver rules.
                t_service, t_subset = self._redirected(t_service, t_subset)
            target = self._target(t_service, t_subset)
            if target not in chain:
                chain.append(target)
        lb = _load_balancer(resolver.get("LoadBalancer") or {})
        node = ResolverNode(
            name=primary.id, targets=tuple(chain), connect_timeout=primary.connect_timeout,
            request_timeout=_duration(resolver.get("RequestTimeout"), f"service-resolver {service} RequestTimeout"),
            load_balancer=lb, default=entry is None,
        )
        self.resolvers[primary.id] = node
        return node

    def _failover_targets(self, service: str, subset: str, failover: Mapping[str, Any]) -> list[tuple[str, str]]:
        if failover.get("Targets"):
            # Remote targets (Peer, other Datacenter) are outside one cluster: skipped here.
            return [(t.get("Service") or service, t.get("ServiceSubset") or "")
                    for t in failover["Targets"]
                    if not t.get("Peer") and t.get("Datacenter", "") in ("", self.dc)]
        if failover.get("Service") or failover.get("ServiceSubset"):
            return [(failover.get("Service") or service, failover.get("ServiceSubset") or "")]
        return []

    # -- splitters ------------------------------------------------------------------------------

    def splits(self, service: str, subset: str, depth: int = 0) -> tuple[list[_Flat], str]:
        """Flattened (weight %, resolver, request mods, response mods) and the splitter name."""
        splitter = None
        if not subset and self.protocol != "tcp":
            splitter = self._entry("service-splitter", service)
        if splitter is None:
            return [(100.0, self.resolver(service, subset), HeaderMods(), HeaderMods())], ""
        if depth > _MAX_DEPTH:
            raise ChainError(f'service-splitter "{service}": splitters nest deeper than {_MAX_DEPTH} (a loop?)')
        out: list[_Flat] = []
        for split in splitter.get("Splits") or ():
            weight = float(split.get("Weight") or 0.0)
            if weight <= 0:
                continue  # a zero split never gets traffic; Consul drops it too
            s_service = split.get("Service") or service
            s_subset = split.get("ServiceSubset") or ""
            req = HeaderMods.from_api(split.get("RequestHeaders"))
            resp = HeaderMods.from_api(split.get("ResponseHeaders"))
            if s_service == service and not s_subset:
                # Splitting to yourself means "the resolver", not the splitter again.
                out.append((weight, self.resolver(s_service, ""), req, resp))
                continue
            inner, _ = self.splits(s_service, s_subset, depth + 1)
            for inner_weight, node, inner_req, inner_resp in inner:
                out.append((weight * inner_weight / 100.0, node, req.then(inner_req), resp.then(inner_resp)))
        return out, service

    def destination(self, raw: Mapping[str, Any]) -> Destination:
        service = raw.get("Service") or self.service
        subset = raw.get("ServiceSubset") or ""
        flat, splitter = self.splits(service, subset)
        return Destination(
            service=service, subset=subset, splits=_to_basis_points(flat), splitter=splitter,
            prefix_rewrite=raw.get("PrefixRewrite") or "",
            request_timeout=_duration(raw.get("RequestTimeout"), "Destination.RequestTimeout"),
            idle_timeout=_duration(raw.get("IdleTimeout"), "Destination.IdleTimeout"),
            retry=_retry_policy(raw),
            request_headers=HeaderMods.from_api(raw.get("RequestHeaders")),
            response_headers=HeaderMods.from_api(raw.get("ResponseHeaders")),
        )

    def compile(self) -> CompiledChain:
        routes: list[Route] = []
        router = self._entry("service-router", self.service) if self.protocol != "tcp" else None
        for i, raw in enumerate((router or {}).get("Routes") or ()):
            where = f'service-router "{self.service}" Routes[{i}]'
            routes.append(Route(match=_route_match(raw.get("Match"), where),
                                destination=self.destination(raw.get("Destination") or {}), definition=raw))
        default_def = {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": self.service}}
        routes.append(Route(match=RouteMatch(path_prefix="/"), destination=self.destination({}),
                            definition=default_def, default=True))
        default_dest = routes[-1].destination
        if router is not None:
            start = f"router:{self.service}.default.default"
        elif default_dest.splitter:
            start = f"splitter:{default_dest.splitter}.default.default"
        else:
            start = f"resolver:{default_dest.splits[0].resolver.name}"
        return CompiledChain(service=self.service, protocol=self.protocol, datacenter=self.dc, routes=tuple(routes),
                             targets=dict(self.targets), has_router=router is not None, start_node=start)


def _to_basis_points(flat: list[_Flat]) -> tuple[Split, ...]:
    """Percent weights -> integer basis points summing to exactly 10000 (largest remainder)."""
    total = sum(w for w, *_ in flat) or 1.0
    exact = [w * 10000.0 / total for w, *_ in flat]
    points = [int(x) for x in exact]
    by_remainder = sorted(range(len(flat)), key=lambda i: exact[i] - points[i], reverse=True)
    for i in by_remainder[: 10000 - sum(points)]:
        points[i] += 1
    return tuple(Split(weight=round(w, 4), basis_points=bp, resolver=node, request_headers=req,
                       response_headers=resp)
                 for (w, node, req, resp), bp in zip(flat, points, strict=True))


def _load_balancer(raw: Mapping[str, Any]) -> LoadBalancer:
    policies = []
    for hp in raw.get("HashPolicies") or ():
        cookie = hp.get("CookieConfig") or {}
        policies.append(HashPolicy(
            field=hp.get("Field") or "", field_value=hp.get("FieldValue") or "", source_ip=bool(hp.get("SourceIP")),
            terminal=bool(hp.get("Terminal")), cookie_ttl=_duration(cookie.get("TTL"), "CookieConfig.TTL") or 0.0,
            cookie_session=bool(cookie.get("Session")), cookie_path=cookie.get("Path") or "",
        ))
    ring = raw.get("RingHashConfig") or {}
    least = raw.get("LeastRequestConfig") or {}
    return LoadBalancer(
        policy=raw.get("Policy") or "round_robin", hash_policies=tuple(policies),
        choice_count=int(least.get("ChoiceCount") or 2),
        min_ring_size=int(ring.get("MinimumRingSize") or 1024),
        max_ring_size=int(ring.get("MaximumRingSize") or 8 * 1024 * 1024),
    )


def compile_chain(service: str, entries: Entries, *, protocol: str | None = None, datacenter: str = DEFAULT_DC,
                  override_connect_timeout: float | None = None) -> CompiledChain:
    """Compile the discovery chain of `service` from `entries` (kind -> name -> entry dict).

    `protocol` overrides what service-defaults / proxy-defaults say (Consul's OverrideProtocol)."""
    proto = (protocol or chain_protocol(service, entries)).lower()
    return _Compiler(service, entries, proto, datacenter, override_connect_timeout).compile()


# ---------------------------------------------------------------------------- Consul's Chain JSON

def _secs(value: float | None) -> str:
    if not value:
        return "0s"
    return f"{value:g}s" if value >= 1 else f"{value * 1000:g}ms"


def _resolver_json(node: ResolverNode) -> dict[str, Any]:
    resolver: dict[str, Any] = {"Default": node.default, "ConnectTimeout": _secs(node.connect_timeout),
                                "Target": node.target.id}
    if node.request_timeout:
        resolver["RequestTimeout"] = _secs(node.request_timeout)
    if len(node.targets) > 1:
        resolver["Failover"] = {"Targets": [t.id for t in node.targets[1:]]}
    lb = node.load_balancer
    out: dict[str, Any] = {"Type": "resolver", "Name": node.name, "Resolver": resolver}
    if lb != LoadBalancer():
        out["LoadBalancer"] = {
            "Policy": lb.policy,
            "HashPolicies": [{"Field": h.field, "FieldValue": h.field_value, "SourceIP": h.source_ip,
                              "Terminal": h.terminal} for h in lb.hash_policies],
        }
    return out


def discovery_chain_json(chain: CompiledChain, trust_domain: str = "") -> dict[str, Any]:
    """`GET /v1/discovery-chain/{service}`'s body, `{"Chain": {...}}`, as close to Consul's as we keep."""
    nodes: dict[str, Any] = {}
    suffix = ".default.default"

    def next_node(dest: Destination) -> str:
        if dest.splitter:
            name = f"splitter:{dest.splitter}{suffix}"
            if name not in nodes:
                nodes[name] = {"Type": "splitter", "Name": f"{dest.splitter}{suffix}", "Splits": [
                    {"Weight": s.weight, "NextNode": f"resolver:{s.resolver.name}",
                     "RequestHeaders": s.request_headers.to_api() if s.request_headers else None,
                     "ResponseHeaders": s.response_headers.to_api() if s.response_headers else None}
                    for s in dest.splits]}
                for s in dest.splits:
                    nodes.setdefault(f"resolver:{s.resolver.name}", _resolver_json(s.resolver))
            return name
        node = dest.splits[0].resolver
        nodes.setdefault(f"resolver:{node.name}", _resolver_json(node))
        return f"resolver:{node.name}"

    routes = [{"Definition": dict(r.definition), "NextNode": next_node(r.destination)} for r in chain.routes]
    if chain.has_router:
        nodes[f"router:{chain.service}{suffix}"] = {"Type": "router", "Name": f"{chain.service}{suffix}",
                                                    "Routes": routes}
    targets = {}
    for tid, t in sorted(chain.targets.items()):
        sni = f"{(t.subset + '.') if t.subset else ''}{t.service}.default.{t.datacenter}.internal.{trust_domain}"
        targets[tid] = {
            "ID": tid, "Service": t.service, "ServiceSubset": t.subset, "Namespace": "default",
            "Partition": "default", "Datacenter": t.datacenter, "Subset": {"Filter": t.filter,
                                                                           "OnlyPassing": t.only_passing},
            "ConnectTimeout": _secs(t.connect_timeout), "SNI": sni if trust_domain else "", "Name": sni,
        }
    default = (not chain.has_router and not chain.default_route.destination.splitter
               and chain.default_route.destination.splits[0].resolver.default)
    return {"Chain": {
        "ServiceName": chain.service, "Namespace": "default", "Partition": "default",
        "Datacenter": chain.datacenter, "Protocol": chain.protocol, "StartNode": chain.start_node,
        "Nodes": nodes, "Targets": targets, "Default": default,
    }}
