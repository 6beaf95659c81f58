"""Per-request routing decisions over a compiled discovery chain.

Pure: the caller passes the request head, a uniform draw in [0, 100) for the split, and the health
entries it keeps per service; nothing here reads a clock, a socket or a global random generator.

    head = RequestHead("GET", "/api/x", "", {"x-beta": "1"})
    decision = decide(chain, head, draw=rng.random() * 100)
    picked = select_target(decision.resolver, entries_by_service)   # failover in target order
    instance = pick_instance(picked.instances, decision.resolver.load_balancer, state, rng, hash_key)

The split draw maps to basis points: `int(draw * 100)` lands in exactly one split's cumulative range,
so a 90/10 split receives 90.00 % / 10.00 % of a uniform draw, with no rounding drift.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

from lictor.gateway.chain import (
    CompiledChain,
    HashPolicy,
    HeaderMods,
    LoadBalancer,
    ResolverNode,
    RetryPolicy,
    Route,
    RouteMatch,
    Split,
    Target,
)

__all__ = [
    "BalancerState", "Decision", "Instance", "RequestHead", "TargetPick", "apply_header_mods", "choose_split",
    "decide", "entry_healthy", "hash_key", "instance_from_entry", "instances_by_target", "match_route", "pick_instance",
    "rewrite_path", "route_matches", "select_target", "should_retry", "target_instances",
]


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str  # without the query string
    query: str = ""  # raw query string, no leading "?"
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-cased; repeated values comma-joined
    source_ip: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    split: Split
    resolver: ResolverNode
    path: str  # after PrefixRewrite
    timeout: float | None  # route RequestTimeout, else the resolver's; None = the proxy's default
    retry: RetryPolicy
    request_headers: HeaderMods  # route's, then the split's (the more specific one is applied last)
    response_headers: HeaderMods


# ------------------------------------------------------------------------------------- matching

def _header_matches(hm: Any, headers: Mapping[str, str]) -> bool:
    value = headers.get(hm.name)
    if hm.present:
        ok = value is not None
    elif value is None:
        ok = False
    elif hm.exact:
        ok = value == hm.exact
    elif hm.prefix:
        ok = value.startswith(hm.prefix)
    elif hm.suffix:
        ok = value.endswith(hm.suffix)
    elif hm.regex is not None:
        ok = hm.regex.fullmatch(value) is not None  # Envoy's safe_regex matches the whole value
    else:
        ok = value is not None  # Name only: Consul treats it as Present
    return ok != hm.invert


def _query_pairs(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        out.setdefault(key, value)  # Envoy matches the first occurrence
    return out


def route_matches(match: RouteMatch, head: RequestHead, query: Mapping[str, str] | None = None) -> bool:
    if match.methods and head.method.upper() not in match.methods:
        return False
    path = head.path
    if match.path_exact and path != match.path_exact:
        return False
    if match.path_prefix and not path.startswith(match.path_prefix):
        return False
    if match.path_regex is not None and match.path_regex.fullmatch(path) is None:
        return False
    for hm in match.headers:
        if not _header_matches(hm, head.headers):
            return False
    if match.query:
        params = query if query is not None else _query_pairs(head.query)
        for qm in match.query:
            value = params.get(qm.name)
            if qm.present:
                if value is None:
                    return False
            elif value is None:
                return False
            elif qm.exact and value != qm.exact:
                return False
            elif qm.regex is not None and qm.regex.fullmatch(value) is None:
                return False
    return True


def match_route(chain: CompiledChain, head: RequestHead) -> Route:
    """The first route that matches; the chain's catch-all when none does."""
    query = _query_pairs(head.query) if head.query else {}
    for route in chain.routes:
        if route_matches(route.match, head, query):
            return route
    return chain.default_route


def choose_split(splits: Sequence[Split], draw: float) -> Split:
    """The split whose cumulative basis-point range holds `draw` (percent, in [0, 100))."""
    point = min(max(int(draw * 100), 0), 9999)
    upto = 0
    for split in splits:
        upto += split.basis_points
        if point < upto:
            return split
    return splits[-1]


def rewrite_path(path: str, match: RouteMatch, prefix_rewrite: str) -> str:
    """Envoy's prefix_rewrite: replace the matched PathPrefix (or the whole PathExact)."""
    if not prefix_rewrite:
        return path
    if match.path_exact:
        return prefix_rewrite
    if match.path_prefix and path.startswith(match.path_prefix):
        return prefix_rewrite + path[len(match.path_prefix):]
    return path


def decide(chain: CompiledChain, head: RequestHead, draw: float) -> Decision:
    route = match_route(chain, head)
    dest = route.destination
    split = choose_split(dest.splits, draw)
    resolver = split.resolver
    return Decision(
        route=route, split=split, resolver=resolver,
        path=rewrite_path(head.path, route.match, dest.prefix_rewrite),
        timeout=dest.request_timeout or resolver.request_timeout,
        retry=dest.retry,
        request_headers=dest.request_headers.then(split.request_headers),
        response_headers=dest.response_headers.then(split.response_headers),
    )


def apply_header_mods(headers: list[tuple[str, str]], mods: HeaderMods) -> list[tuple[str, str]]:
    """Remove, then Set (replacing every value of that name), then Add (appending)."""
    if not mods:
        return headers
    drop = set(mods.remove) | {k.lower() for k, _ in mods.set}
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    out.extend(mods.set)
    out.extend(mods.add)
    return out


# ------------------------------------------------------------------------------------ instances

@dataclass(frozen=True, slots=True)
class Instance:
    id: str  # node/service-id: stable across polls, the hash ring's key
    address: str
    port: int
    service: str  # the registered service name (a sidecar's own name for mesh instances)


def instance_from_entry(entry: Mapping[str, Any]) -> Instance:
    svc = entry.get("Service") or {}
    node = entry.get("Node") or {}
    address = svc.get("Address") or node.get("Address") or "127.0.0.1"
    return Instance(id=f"{node.get('Node', '')}/{svc.get('ID', '')}", address=address, port=int(svc.get("Port") or 0),
                    service=svc.get("Service", ""))


def entry_healthy(entry: Mapping[str, Any], only_passing: bool) -> bool:
    """Consul's chain rule: critical is out; warning is out only with OnlyPassing."""
    for check in entry.get("Checks") or ():
        status = check.get("Status")
        if status == "critical" or (only_passing and status != "passing"):
            return False
    return True


def target_instances(target: Target, entries: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in entries if entry_healthy(e, target.only_passing) and target.accepts(e)]


@dataclass(frozen=True, slots=True)
class TargetPick:
    target: Target
    instances: tuple[Instance, ...]
    failover: bool  # not the primary target


def instances_by_target(targets: Iterable[Target], entries_by_service: Mapping[str, Sequence[Mapping[str, Any]]]
                        ) -> dict[str, tuple[Instance, ...]]:
    """Healthy instances of every target, filters applied: computed once per health/chain change so
    a request only does a dict lookup."""
    return {t.id: tuple(instance_from_entry(e) for e in target_instances(t, entries_by_service.get(t.service, ())))
            for t in targets}


def select_target(resolver: ResolverNode, instances: Mapping[str, Sequence[Instance]],
                  excluded: Container[str] = ()) -> TargetPick | None:
    """The first target (primary, then failovers in order) with a usable instance; None = 503.

    `instances` is `instances_by_target(...)`; `excluded` holds instance ids the caller has seen fail
    (passive outlier ejection), so traffic fails over before the health checks notice."""
    for i, target in enumerate(resolver.targets):
        found = instances.get(target.id, ())
        if excluded and found:
            found = tuple(x for x in found if x.id not in excluded)
        if found:
            return TargetPick(target, tuple(found), i > 0)
    return None


# ------------------------------------------------------------------------------- load balancing

def _cookie(headers: Mapping[str, str], name: str) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # noqa: BLE001 - a malformed cookie header just does not hash
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def hash_key(policies: Sequence[HashPolicy], head: RequestHead, rng: random.Random | None = None
             ) -> tuple[int | None, str | None]:
    """(64-bit request hash or None, Set-Cookie value to send or None), Envoy's hash_policy rules:
    each policy that yields a value is folded in; a Terminal one that yields stops the walk. A cookie
    policy with a TTL or Session and no cookie yet mints one so the client sticks from now on."""
    acc: int | None = None
    set_cookie: str | None = None
    for policy in policies:
        value: str | None = None
        if policy.source_ip:
            value = head.source_ip or None
        elif policy.field == "header":
            value = head.headers.get(policy.field_value.lower())
        elif policy.field == "query_parameter":
            value = _query_pairs(head.query).get(policy.field_value)
        elif policy.field == "cookie":
            value = _cookie(head.headers, policy.field_value)
            if value is None and (policy.cookie_ttl or policy.cookie_session) and rng is not None:
                value = f"{rng.getrandbits(64):016x}"
                attrs = f"; Path={policy.cookie_path or '/'}"
                if policy.cookie_ttl and not policy.cookie_session:
                    attrs += f"; Max-Age={int(policy.cookie_ttl)}"
                set_cookie = f"{policy.field_value}={value}{attrs}; HttpOnly"
        if value is None:
            continue
        h = _hash64(f"{policy.field}:{policy.field_value}:{value}".encode())
        acc = h if acc is None else ((acc << 1 | acc >> 63) & 0xFFFFFFFFFFFFFFFF) ^ h
        if policy.terminal:
            break
    return acc, set_cookie


@lru_cache(maxsize=256)
def _ring(ids: tuple[str, ...], size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Ketama-style ring: (sorted hashes, owner index per hash). ids sorted, so order-independent."""
    per = max(1, size // len(ids))
    points = sorted((_hash64(f"{iid}_{n}".encode()), idx) for idx, iid in enumerate(ids) for n in range(per))
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


_MAGLEV_SIZE = 65537  # Envoy's default table size (a prime)


@lru_cache(maxsize=64)
def _maglev(ids: tuple[str, ...], size: int = _MAGLEV_SIZE) -> tuple[int, ...]:
    """Maglev lookup table (Eisenbud et al. 2016): each backend fills its permutation in turn."""
    n = len(ids)
    offsets = [_hash64(b"o" + i.encode()) % size for i in ids]
    skips = [_hash64(b"s" + i.encode()) % (size - 1) + 1 for i in ids]
    nxt = [0] * n
    table = [-1] * size
    filled = 0
    while True:
        for b in range(n):
            c = (offsets[b] + nxt[b] * skips[b]) % size
            while table[c] >= 0:
                nxt[b] += 1
                c = (offsets[b] + nxt[b] * skips[b]) % size
            table[c] = b
            nxt[b] += 1
            filled += 1
            if filled == size:
                return tuple(table)


@dataclass
class BalancerState:
    """The mutable bits a balancer needs between requests (owned by the data plane)."""

    rr: dict[str, int] = field(default_factory=dict)  # target id -> next index
    inflight: dict[str, int] = field(default_factory=dict)  # instance id -> outstanding requests


def pick_instance(instances: Sequence[Instance], lb: LoadBalancer, state: BalancerState, rng: random.Random,
                  key: int | None = None, target_id: str = "") -> Instance:
    """One instance per the resolver's LoadBalancer policy. Hash policies without a hash fall back to
    random (Envoy does the same)."""
    if len(instances) == 1:
        return instances[0]
    policy = lb.policy
    if policy in ("ring_hash", "maglev"):
        if key is None:
            return instances[rng.randrange(len(instances))]
        ordered = sorted(instances, key=lambda i: i.id)
        ids = tuple(i.id for i in ordered)
        if policy == "maglev":
            return ordered[_maglev(ids)[key % _MAGLEV_SIZE]]
        size = min(max(lb.min_ring_size, len(ids)), lb.max_ring_size, 65536)
        hashes, owners = _ring(ids, size)
        pos = bisect.bisect_left(hashes, key)
        return ordered[owners[pos % len(hashes)]]
    if policy == "random":
        return instances[rng.randrange(len(instances))]
    if policy == "least_request":
        # Power of N choices (Envoy's default N = 2): fewest outstanding requests wins.
        choices = [instances[rng.randrange(len(instances))] for _ in range(max(lb.choice_count, 2))]
        return min(choices, key=lambda i: state.inflight.get(i.id, 0))
    n = state.rr.get(target_id, 0)
    state.rr[target_id] = n + 1
    return instances[n % len(instances)]


# --------------------------------------------------------------------------------------- retries

_GATEWAY_ERRORS = frozenset({502, 503, 504})


def should_retry(policy: RetryPolicy, attempt: int, *, status: int | None = None,
                 connect_failure: bool = False, reset: bool = False) -> bool:
    """Whether attempt number `attempt` (0 = the first try) that ended this way gets another try."""
    if attempt >= policy.num_retries or not policy.enabled:
        return False
    if connect_failure:
        return policy.on_connect_failure or bool(policy.on & {"reset", "5xx", "gateway-error"})
    if reset:
        return bool(policy.on & {"reset", "5xx", "gateway-error"})
    if status is None:
        return False
    if status in policy.on_status_codes:
        return True
    if status >= 500 and "5xx" in policy.on:
        return True
    if status in _GATEWAY_ERRORS and "gateway-error" in policy.on:
        return True
    if status == 409 and "retriable-4xx" in policy.on:
        return True
    return False
