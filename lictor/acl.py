"""ACLs in Consul's shape, as pure code: rules, the authorizer, and what each endpoint requires.

Nothing here does I/O. The HTTP middleware (`lictor.registry.acl_http`) resolves a token to a
list of parsed policies, builds an `Authorizer`, asks `plan_request` what the request needs, and
filters list responses with `filter_response`.

Semantics follow Consul's `acl/policy_authorizer.go`:
- a rule's access is `read`, `write`, `deny` (and `list` for keys);
- several policies merge per (resource, segment) with deny > write > list > read;
- an exact rule beats every prefix rule; among prefix rules the longest wins;
- no rule at all falls through to the agent's default policy (`allow` or `deny`);
- `write` grants read and write, `list` read and list, `read` only read, `deny` nothing.
- a service rule without `intentions` grants intentions `read` if the service policy is
  read or write (Consul's rule), else deny.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

READ, WRITE, LIST, DENY = "read", "write", "list", "deny"
ACCESS_LEVELS = (READ, WRITE, LIST, DENY)

# Resources that take a name (`service "web" {...}`) and a prefix form (`service_prefix "" {...}`).
SEGMENTED = ("service", "node", "key", "agent", "session", "query", "event")
# Resources with a single value (`operator = "read"`).
SINGLE = ("operator", "acl", "keyring", "mesh", "peering")
# `intentions` lives inside service rules; we keep it as its own segmented table.
INTENTION = "intention"

MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
MANAGEMENT_POLICY_NAME = "global-management"
ANONYMOUS_ACCESSOR_ID = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"

PERMISSION_DENIED = "Permission denied"


class ACLRuleError(ValueError):
    """A policy's rules do not parse or name something unknown."""


# -- rules -------------------------------------------------------------------------------------


@dataclass
class Rules:
    """One policy's (or a merged set's) rules."""

    exact: dict[str, dict[str, str]] = field(default_factory=dict)  # resource -> name -> access
    prefix: dict[str, dict[str, str]] = field(default_factory=dict)  # resource -> prefix -> access
    single: dict[str, str] = field(default_factory=dict)  # operator/acl/... -> access
    management: bool = False

    def add(self, table: str, resource: str, segment: str, access: str) -> None:
        target = self.exact if table == "exact" else self.prefix
        current = target.setdefault(resource, {}).get(segment)
        target[resource][segment] = access if current is None else _stronger(current, access)

    def add_single(self, resource: str, access: str) -> None:
        current = self.single.get(resource)
        self.single[resource] = access if current is None else _stronger(current, access)

    def to_json(self) -> dict[str, Any]:
        return {"Exact": self.exact, "Prefix": self.prefix, "Single": self.single, "Management": self.management}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rules:
        return cls(
            exact={r: dict(v) for r, v in (data.get("Exact") or {}).items()},
            prefix={r: dict(v) for r, v in (data.get("Prefix") or {}).items()},
            single=dict(data.get("Single") or {}),
            management=bool(data.get("Management")),
        )


_PRECEDENCE = {DENY: 4, WRITE: 3, LIST: 2, READ: 1}


def _stronger(a: str, b: str) -> str:
    """Consul's `takesPrecedenceOver`: deny > write > list > read."""
    return a if _PRECEDENCE.get(a, 0) >= _PRECEDENCE.get(b, 0) else b


def merge(rule_sets: Iterable[Rules]) -> Rules:
    out = Rules()
    for rules in rule_sets:
        out.management = out.management or rules.management
        for table, source in (("exact", rules.exact), ("prefix", rules.prefix)):
            for resource, segments in source.items():
                for segment, access in segments.items():
                    out.add(table, resource, segment, access)
        for resource, access in rules.single.items():
            out.add_single(resource, access)
    return out


# -- the HCL subset ----------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_\-]*)
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<punct>[={}\[\],:])
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    tokens: list[tuple[str, Any, int]] = []
    pos = 0
    line = 1
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise ACLRuleError(f"rules: unexpected character {text[pos]!r} at line {line}")
        kind = match.lastgroup or ""
        value = match.group()
        if kind == "string":
            try:
                tokens.append(("string", json.loads(value), line))
            except ValueError:
                raise ACLRuleError(f"rules: bad string {value} at line {line}") from None
        elif kind in ("ident", "number", "punct"):
            tokens.append((kind if kind != "punct" else value, value, line))
        line += value.count("\n")
        pos = match.end()
    return tokens


class _HCLParser:
    """`body := item*; item := ident string* ('=' value | '{' body '}'); value := string | ident | number`.

    Produces nested dicts the same shape as Consul's JSON rules:
    `service "web" { policy = "write" }` -> {"service": {"web": {"policy": "write"}}}.
    """

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def _peek(self) -> tuple[str, Any, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, kind: str) -> tuple[str, Any, int]:
        token = self._peek()
        if token is None or token[0] != kind:
            where = f"line {token[2]}" if token else "end of input"
            raise ACLRuleError(f"rules: expected {kind!r} at {where}, got {token[1] if token else 'nothing'!r}")
        self.pos += 1
        return token

    def parse(self) -> dict[str, Any]:
        body = self._body(top=True)
        if self._peek() is not None:
            raise ACLRuleError(f"rules: unexpected {self._peek()[1]!r} at line {self._peek()[2]}")  # type: ignore[index]
        return body

    def _body(self, top: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            token = self._peek()
            if token is None or (token[0] == "}" and not top):
                return out
            if token[0] == ",":
                self.pos += 1
                continue
            if token[0] not in ("ident", "string"):
                raise ACLRuleError(f"rules: expected a name at line {token[2]}, got {token[1]!r}")
            self.pos += 1
            name = token[1]
            labels: list[str] = []
            while (nxt := self._peek()) is not None and nxt[0] == "string":
                labels.append(nxt[1])
                self.pos += 1
            nxt = self._peek()
            if nxt is not None and nxt[0] == "=":
                self.pos += 1
                after = self._peek()
                if after is not None and after[0] == "{":
                    value: Any = self._block()
                else:
                    value = self._value()
            elif nxt is not None and nxt[0] == "{":
                value = self._block()
            else:
                raise ACLRuleError(f"rules: expected '=' or '{{' after {name!r} at line {token[2]}")
            if labels:
                target = out
                for label in [name, *labels[:-1]]:
                    existing = target.setdefault(label, {})
                    if not isinstance(existing, dict):
                        raise ACLRuleError(f"rules: {name!r} given twice at line {token[2]}")
                    target = existing
                key = labels[-1]
                if key in target:
                    raise ACLRuleError(f"rules: {name} {key!r} given twice (line {token[2]})")
                target[key] = value
            elif isinstance(value, dict) and isinstance(out.get(name), dict):
                for sub_key, sub_value in value.items():
                    if sub_key in out[name]:
                        raise ACLRuleError(f"rules: {name} {sub_key!r} given twice (line {token[2]})")
                    out[name][sub_key] = sub_value
            else:
                if name in out:
                    raise ACLRuleError(f"rules: {name!r} given twice (line {token[2]})")
                out[name] = value

    def _block(self) -> dict[str, Any]:
        self._take("{")
        body = self._body(top=False)
        self._take("}")
        return body

    def _value(self) -> Any:
        token = self._peek()
        if token is None:
            raise ACLRuleError("rules: expected a value at end of input")
        self.pos += 1
        if token[0] == "string":
            return token[1]
        if token[0] == "ident" and token[1] in ("true", "false"):
            return token[1] == "true"
        if token[0] == "number":
            return float(token[1]) if "." in token[1] else int(token[1])
        if token[0] == "[":
            items = []
            while (nxt := self._peek()) is not None and nxt[0] != "]":
                if nxt[0] == ",":
                    self.pos += 1
                    continue
                items.append(self._value())
            self._take("]")
            return items
        raise ACLRuleError(f"rules: unexpected {token[1]!r} at line {token[2]}")


def parse_rules(text: str) -> Rules:
    """Parse a policy's rules: Consul's HCL subset, or the same structure as JSON."""
    stripped = text.strip()
    if not stripped:
        return Rules()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError as exc:
            raise ACLRuleError(f"rules: invalid JSON: {exc}") from None
    else:
        data = _HCLParser(text).parse()
    if not isinstance(data, dict):
        raise ACLRuleError("rules: the top level must be an object")
    return _rules_from_tree(data)


def _access(value: Any, what: str, allowed: tuple[str, ...] = (READ, WRITE, DENY)) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ACLRuleError(f"rules: invalid policy {value!r} for {what}: must be one of {', '.join(allowed)}")
    return value


def _rules_from_tree(data: Mapping[str, Any]) -> Rules:
    rules = Rules()
    for raw_name, value in data.items():
        name = raw_name
        prefixed = name.endswith("_prefix")
        resource = name[: -len("_prefix")] if prefixed else name
        if resource in SINGLE and not prefixed:
            if isinstance(value, dict):  # `operator { policy = "read" }` is not Consul's form
                raise ACLRuleError(f"rules: {name} takes a value: {name} = \"read\"")
            rules.add_single(resource, _access(value, name))
            continue
        if resource not in SEGMENTED:
            raise ACLRuleError(f"rules: unknown resource {name!r}")
        if not isinstance(value, dict):
            raise ACLRuleError(f'rules: {name} needs a name and a block: {name} "x" {{ policy = "read" }}')
        table = "prefix" if prefixed else "exact"
        for segment, block in value.items():
            if not isinstance(block, dict):
                raise ACLRuleError(f"rules: {name} {segment!r} must be a block")
            unknown = set(block) - {"policy", "intentions"}
            if unknown:
                raise ACLRuleError(f"rules: unknown field(s) {sorted(unknown)} in {name} {segment!r}")
            if resource != "service" and "intentions" in block:
                raise ACLRuleError(f"rules: intentions are only valid in service rules ({name} {segment!r})")
            policy = block.get("policy")
            if policy is not None:
                allowed = (READ, WRITE, LIST, DENY) if resource == "key" else (READ, WRITE, DENY)
                rules.add(table, resource, segment, _access(policy, f"{name} {segment!r}", allowed))
            if resource == "service":
                intentions = block.get("intentions")
                if intentions is not None:
                    intentions = _access(intentions, f"{name} {segment!r} intentions")
                elif policy in (READ, WRITE):
                    intentions = READ
                elif policy == DENY:
                    intentions = DENY
                if intentions is not None:
                    rules.add(table, INTENTION, segment, intentions)
    return rules


def service_identity_rules(service: str) -> Rules:
    """Consul's service identity: write its own service (and sidecar), read the catalog."""
    rules = Rules()
    rules.add("exact", "service", service, WRITE)
    rules.add("exact", "service", f"{service}-sidecar-proxy", WRITE)
    rules.add("exact", INTENTION, service, READ)
    rules.add("exact", INTENTION, f"{service}-sidecar-proxy", READ)
    rules.add("prefix", "service", "", READ)
    rules.add("prefix", "node", "", READ)
    return rules


def node_identity_rules(node: str) -> Rules:
    rules = Rules()
    rules.add("exact", "node", node, WRITE)
    rules.add("prefix", "service", "", READ)
    return rules


# -- the authorizer ------------------------------------------------------------------------------


def _enforce(rule: str, required: str) -> bool:
    if rule == WRITE:
        return True
    if rule == LIST:
        return required in (READ, LIST)
    if rule == READ:
        return required == READ
    return False


class Authorizer:
    """Answers "may this token do `access` on `resource` `segment`?" for one resolved token."""

    def __init__(self, rules: Rules | None, default_policy: str = "deny", accessor_id: str = "", anonymous: bool = False) -> None:
        self.rules = rules or Rules()
        self.default_allow = default_policy == "allow"
        self.accessor_id = accessor_id
        self.anonymous = anonymous
        # Longest prefix first, so the first match is the most specific.
        self._prefixes = {
            resource: sorted(segments.items(), key=lambda item: len(item[0]), reverse=True)
            for resource, segments in self.rules.prefix.items()
        }

    @property
    def management(self) -> bool:
        return self.rules.management

    def rule_for(self, resource: str, segment: str) -> str | None:
        exact = self.rules.exact.get(resource, {}).get(segment)
        if exact is not None:
            return exact
        for prefix, access in self._prefixes.get(resource, ()):
            if segment.startswith(prefix):
                return access
        return None

    def allowed(self, resource: str, segment: str, access: str) -> bool:
        if self.management:
            return True
        if resource in SINGLE:
            rule = self.rules.single.get(resource)
            if rule is None and resource == "mesh":
                rule = self.rules.single.get("operator")  # Consul: operator implies mesh
        else:
            rule = self.rule_for(resource, segment)
        if rule is None:
            return self.default_allow
        return _enforce(rule, access)

    def allowed_prefix(self, resource: str, prefix: str, access: str) -> bool:
        """Access to every name under `prefix` (Consul's KeyWritePrefix, generalised).

        The prefix itself must be granted by a prefix rule (or the default), and no more
        specific rule beneath it may take the access away.
        """
        if self.management:
            return True
        rule = next((a for p, a in self._prefixes.get(resource, ()) if prefix.startswith(p)), None)
        if rule is None:
            if not self.default_allow:
                return False
        elif not _enforce(rule, access):
            return False
        for table in (self.rules.exact, self.rules.prefix):
            for segment, sub in table.get(resource, {}).items():
                if segment.startswith(prefix) and not _enforce(sub, access):
                    return False
        return True


# -- what each endpoint needs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    resource: str
    segment: str
    access: str
    whole: bool = False  # the named object is unknown: require access to every name instead


@dataclass
class Plan:
    """What the middleware must check for one request."""

    needs: list[Need] = field(default_factory=list)
    body: str | None = None  # body-dependent check kind (see `body_needs`)
    lookup: tuple[str, str, str] | None = None  # (kind, id, access): resolve an ID to a name first
    filter: str | None = None  # response filter kind (see `filter_response`)
    public: bool = False  # no token needed at all


def _q(query: Mapping[str, Any], name: str) -> str | None:
    value = query.get(name)
    if isinstance(value, list):
        return value[-1] if value else None
    return value


def _key_plan(method: str, key: str, query: Mapping[str, Any]) -> Plan:
    if method == "GET":
        if "keys" in query:
            return Plan(filter="kv_keys")
        if "recurse" in query:
            return Plan(filter="kv_entries")
        return Plan(needs=[Need("key", key, READ)])
    if method == "DELETE" and "recurse" in query:
        return Plan(needs=[Need("key", key, WRITE, whole=True)])
    return Plan(needs=[Need("key", key, WRITE)])


_CONFIG_SERVICE_KINDS = {"service-defaults", "service-router", "service-splitter", "service-resolver",
                         "ingress-gateway", "terminating-gateway", "api-gateway", "http-route", "tcp-route"}


def config_need(kind: str, name: str, access: str) -> Need | None:
    """Who may read or write a config entry: service kinds by service, intentions by intentions.

    Global kinds (proxy-defaults, mesh, ...) are readable by anyone (Consul: `CanRead` is true)
    and writable with operator:write. None means no check.
    """
    if kind == "service-intentions":
        return Need(INTENTION, name, access)
    if kind in _CONFIG_SERVICE_KINDS:
        return Need("service", name, access)
    if access == READ:
        return None
    return Need("operator", "", WRITE)


# (methods, path regex, plan builder(match groups, method, query, node))
PlanBuilder = Callable[[dict[str, str], str, Mapping[str, Any], str], Plan]
_ROUTES: list[tuple[frozenset[str], re.Pattern[str], PlanBuilder]] = []


def _route(methods: str, pattern: str) -> Callable[[PlanBuilder], PlanBuilder]:
    regex = re.compile("^" + re.sub(r"\{(\w+):path\}", r"(?P<\1>.*)", re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)) + "$")

    def register(builder: PlanBuilder) -> PlanBuilder:
        _ROUTES.append((frozenset(methods.split(",")), regex, builder))
        return builder

    return register


def _simple(methods: str, pattern: str, builder: PlanBuilder) -> None:
    _route(methods, pattern)(builder)


def _need(resource: str, access: str, param: str | None = None, const: str = "") -> PlanBuilder:
    return lambda p, m, q, n: Plan(needs=[Need(resource, p[param] if param else const, access)])


def _public(p: dict[str, str], m: str, q: Mapping[str, Any], n: str) -> Plan:
    return Plan(public=True)


def _by_method(resource: str) -> PlanBuilder:
    return lambda p, m, q, n: Plan(needs=[Need(resource, "", READ if m == "GET" else WRITE)])


# catalog
_simple("PUT", "/v1/catalog/register", lambda p, m, q, n: Plan(body="catalog_register"))
_simple("PUT", "/v1/catalog/deregister", lambda p, m, q, n: Plan(body="catalog_deregister"))
_simple("GET", "/v1/catalog/datacenters", _public)
_simple("GET", "/v1/catalog/nodes", lambda p, m, q, n: Plan(filter="nodes"))
_simple("GET", "/v1/catalog/services", lambda p, m, q, n: Plan(filter="services_map"))
for _path in ("/v1/catalog/service/{name:path}", "/v1/catalog/connect/{name:path}"):
    _simple("GET", _path, lambda p, m, q, n: Plan(needs=[Need("service", p["name"], READ)], filter="service_nodes"))
_simple("GET", "/v1/catalog/node/{node:path}", lambda p, m, q, n: Plan(needs=[Need("node", p["node"], READ)], filter="node_services"))
_simple("GET", "/v1/catalog/node-services/{node:path}",
        lambda p, m, q, n: Plan(needs=[Need("node", p["node"], READ)], filter="node_services"))
# health
for _path in ("/v1/health/service/{name:path}", "/v1/health/connect/{name:path}", "/v1/health/ingress/{name:path}"):
    _simple("GET", _path, lambda p, m, q, n: Plan(needs=[Need("service", p["name"], READ)], filter="health_entries"))
_simple("GET", "/v1/health/checks/{name:path}", lambda p, m, q, n: Plan(needs=[Need("service", p["name"], READ)], filter="checks"))
_simple("GET", "/v1/health/state/{state:path}", lambda p, m, q, n: Plan(filter="checks"))
_simple("GET", "/v1/health/node/{node:path}", lambda p, m, q, n: Plan(needs=[Need("node", p["node"], READ)], filter="checks"))
# KV and transactions
_simple("GET,PUT,DELETE", "/v1/kv/{key:path}", lambda p, m, q, n: _key_plan(m, p["key"], q))
_simple("PUT", "/v1/txn", lambda p, m, q, n: Plan(body="txn"))
# status, operator, snapshots
_simple("GET", "/v1/status/{what:path}", _public)
_simple("GET,PUT,POST,DELETE", "/v1/operator/{what:path}", _by_method("operator"))
_simple("GET,PUT", "/v1/snapshot", lambda p, m, q, n: Plan(needs=[Need("acl", "", WRITE)]))  # management only
# connect
_simple("GET", "/v1/connect/ca/roots", _public)
_simple("GET", "/v1/agent/connect/ca/roots", _public)
_simple("GET,PUT", "/v1/connect/ca/configuration", _by_method("operator"))
_simple("GET", "/v1/agent/connect/ca/leaf/{service:path}", _need("service", WRITE, "service"))
_simple("POST,PUT", "/v1/agent/connect/authorize", lambda p, m, q, n: Plan(body="authorize"))
_simple("POST,PUT", "/v1/internal/connect/sign", lambda p, m, q, n: Plan(body="sign"))
_simple("GET", "/v1/connect/intentions", lambda p, m, q, n: Plan(filter="intentions"))
_simple("POST", "/v1/connect/intentions", lambda p, m, q, n: Plan(body="intention"))
_simple(
    "GET,PUT,DELETE", "/v1/connect/intentions/exact",
    lambda p, m, q, n: Plan(needs=[Need(INTENTION, _q(q, "destination") or "", READ if m == "GET" else WRITE)]),
)
_simple("GET", "/v1/connect/intentions/match", lambda p, m, q, n: Plan(needs=[Need(INTENTION, _q(q, "name") or "", READ)]))
_simple("GET", "/v1/connect/intentions/check", lambda p, m, q, n: Plan(needs=[Need("service", _q(q, "destination") or "", READ)]))
_simple(
    "GET,PUT,DELETE", "/v1/connect/intentions/{id}",
    lambda p, m, q, n: Plan(lookup=("intention", p["id"], READ if m == "GET" else WRITE)),
)
_simple("GET,POST", "/v1/discovery-chain/{name:path}", _need("service", READ, "name"))
# config entries
_simple("PUT", "/v1/config", lambda p, m, q, n: Plan(body="config"))
_simple("GET", "/v1/config/{kind}", lambda p, m, q, n: Plan(filter="config_entries"))
_simple(
    "GET,DELETE", "/v1/config/{kind}/{name:path}",
    lambda p, m, q, n: Plan(needs=[x for x in [config_need(p["kind"], p["name"], READ if m == "GET" else WRITE)] if x]),
)
# the agent's own endpoints
_simple("GET", "/v1/agent/self", _need("agent", READ, const="\x00node"))
_simple("GET", "/v1/agent/metrics", _need("agent", READ, const="\x00node"))
_simple("GET", "/v1/agent/monitor", _need("agent", READ, const="\x00node"))
_simple("GET", "/v1/agent/host", _need("operator", READ))
_simple("GET", "/v1/agent/members", lambda p, m, q, n: Plan(filter="members"))
_simple("PUT", "/v1/agent/leave", _need("agent", WRITE, const="\x00node"))
_simple("PUT", "/v1/agent/reload", _need("agent", WRITE, const="\x00node"))
_simple("PUT", "/v1/agent/join/{address:path}", _need("agent", WRITE, const="\x00node"))
_simple("PUT", "/v1/agent/force-leave/{node:path}", _need("operator", WRITE))
_simple("PUT", "/v1/agent/maintenance", _need("node", WRITE, const="\x00node"))
_simple("PUT", "/v1/agent/token/{type:path}", _need("acl", WRITE))
_simple("PUT", "/v1/agent/service/register", lambda p, m, q, n: Plan(body="agent_service"))
for _path in ("/v1/agent/service/deregister/{id:path}", "/v1/agent/service/maintenance/{id:path}"):
    _simple("PUT", _path, lambda p, m, q, n: Plan(lookup=("agent_service", p["id"], WRITE)))
_simple("GET", "/v1/agent/services", lambda p, m, q, n: Plan(filter="agent_services"))
_simple("GET", "/v1/agent/service/{id:path}", lambda p, m, q, n: Plan(lookup=("agent_service", p["id"], READ)))
_simple("GET", "/v1/agent/health/service/name/{name:path}", _need("service", READ, "name"))
_simple("GET", "/v1/agent/health/service/id/{id:path}", lambda p, m, q, n: Plan(lookup=("agent_service", p["id"], READ)))
_simple("GET", "/v1/agent/checks", lambda p, m, q, n: Plan(filter="agent_checks"))
_simple("PUT", "/v1/agent/check/register", lambda p, m, q, n: Plan(body="agent_check"))
_simple(
    "PUT", "/v1/agent/check/{verb}/{id:path}",
    lambda p, m, q, n: Plan(lookup=("agent_check", p["id"], WRITE))
    if p["verb"] in ("deregister", "pass", "warn", "fail", "update") else Plan(needs=[Need("acl", "", WRITE)]),
)
# server-internal endpoints
_simple("POST", "/v1/internal/cluster/hello", _public)  # cluster formation; Raft itself needs the cluster key
_simple("POST", "/v1/internal/cluster/join", _public)
_simple("PUT", "/v1/internal/heartbeat", lambda p, m, q, n: Plan(body="node_write"))
_simple("PUT", "/v1/internal/agent/sync", lambda p, m, q, n: Plan(body="node_write"))
_simple("PUT", "/v1/internal/agent/checks", lambda p, m, q, n: Plan(body="node_write"))
_simple("GET", "/v1/internal/snapshot", lambda p, m, q, n: Plan(filter="catalog_snapshot"))
_simple("GET", "/v1/internal/acl/authorizer", _public)  # describes the caller's own token
# ACL endpoints: bootstrap and token/self resolve the caller themselves
_simple("PUT", "/v1/acl/bootstrap", _public)
_simple("GET", "/v1/acl/token/self", _public)
_simple("GET,PUT,POST,DELETE", "/v1/acl/{what:path}", _by_method("acl"))


def plan_request(method: str, path: str, query: Mapping[str, Any], node: str) -> Plan:
    """What a request needs. Unknown `/v1/` endpoints need a management token (fail closed)."""
    if not path.startswith("/v1/"):
        return Plan(public=True)
    if method in ("OPTIONS", "HEAD"):
        method = "GET"
    for methods, regex, builder in _ROUTES:
        if method not in methods:
            continue
        match = regex.match(path)
        if match is None:
            continue
        plan = builder(match.groupdict(), method, query, node)
        plan.needs = [Need(x.resource, node if x.segment == "\x00node" else x.segment, x.access, x.whole) for x in plan.needs]
        return plan
    return Plan(needs=[Need("acl", "", WRITE)])


# -- body-dependent checks --------------------------------------------------------------------------


class AmbiguousBody(ValueError):
    """A field the decision depends on appears under two spellings: refuse rather than guess."""


def field_of(body: Mapping[str, Any], *names: str) -> Any:
    """Case-insensitive field lookup (Go's encoding/json), refusing two spellings of one field."""
    wanted = {n.lower() for n in names}
    found = [k for k in body if isinstance(k, str) and k.lower() in wanted]
    if len(found) > 1:
        raise AmbiguousBody(f"field {names[0]} given more than once ({', '.join(found)})")
    return body[found[0]] if found else None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


Lookup = Callable[[str, str], "tuple[str, str] | None"]


def body_needs(kind: str, body: Any, lookup: Lookup) -> list[Need]:
    """The permissions a body-dependent request needs. `lookup(kind, id)` -> (resource, name)."""
    if kind == "txn":
        needs = []
        for op in body if isinstance(body, list) else []:
            kv = field_of(op, "KV") if isinstance(op, dict) else None
            if not isinstance(kv, dict):
                continue  # non-KV ops are refused by the handler
            verb, key = _str(field_of(kv, "Verb")), _str(field_of(kv, "Key"))
            if verb in ("get", "check-index", "check-not-exists"):
                needs.append(Need("key", key, READ))
            elif verb == "get-tree":
                needs.append(Need("key", key, READ, whole=True))
            elif verb == "delete-tree":
                needs.append(Need("key", key, WRITE, whole=True))
            else:
                needs.append(Need("key", key, WRITE))
        return needs
    if not isinstance(body, dict):
        return []  # the handler rejects a malformed body before doing anything
    if kind == "catalog_register":
        needs = []
        node = _str(field_of(body, "Node"))
        if not field_of(body, "SkipNodeUpdate"):
            needs.append(Need("node", node, WRITE))
        service = field_of(body, "Service")
        if isinstance(service, dict):
            needs.append(Need("service", _str(field_of(service, "Service")), WRITE))
        checks = list(field_of(body, "Checks") or []) if isinstance(field_of(body, "Checks"), list) else []
        if isinstance(field_of(body, "Check"), dict):
            checks.append(field_of(body, "Check"))
        for check in checks:
            if not isinstance(check, dict):
                continue
            sid = _str(field_of(check, "ServiceID", "service_id"))
            if not sid:
                needs.append(Need("node", node, WRITE))
            elif isinstance(service, dict) and sid == (_str(field_of(service, "ID")) or _str(field_of(service, "Service"))):
                continue
            else:
                found = lookup("catalog_service", f"{node}\x00{sid}")
                needs.append(Need("service", found[1], WRITE) if found else Need("node", node, WRITE))
        return needs
    if kind == "catalog_deregister":
        node = _str(field_of(body, "Node"))
        sid = _str(field_of(body, "ServiceID", "service_id"))
        if sid and not _str(field_of(body, "CheckID", "check_id")):
            found = lookup("catalog_service", f"{node}\x00{sid}")
            if found:
                return [Need("service", found[1], WRITE)]
        return [Need("node", node, WRITE)]
    if kind == "agent_service":
        name = _str(field_of(body, "Name")) or _str(field_of(body, "Service"))
        needs = [Need("service", name, WRITE)]
        connect = field_of(body, "Connect")
        sidecar = field_of(connect, "SidecarService", "sidecar_service") if isinstance(connect, dict) else None
        if isinstance(sidecar, dict) and _str(field_of(sidecar, "Name")):
            needs.append(Need("service", _str(field_of(sidecar, "Name")), WRITE))
        proxy = field_of(body, "Proxy")
        if isinstance(proxy, dict) and _str(field_of(proxy, "DestinationServiceName")):
            needs.append(Need("service", _str(field_of(proxy, "DestinationServiceName")), WRITE))
        return needs
    if kind == "agent_check":
        sid = _str(field_of(body, "ServiceID", "service_id"))
        if sid:
            found = lookup("agent_service", sid)
            return [Need("service", found[1], WRITE) if found else Need("service", "", WRITE, whole=True)]
        return [Need("node", "\x00node", WRITE)]
    if kind == "intention":
        return [Need(INTENTION, _str(field_of(body, "DestinationName")), WRITE)]
    if kind == "config":
        need = config_need(_str(field_of(body, "Kind")), _str(field_of(body, "Name")), WRITE)
        return [need] if need else []
    if kind == "authorize":
        return [Need("service", _str(field_of(body, "Target")), WRITE)]
    if kind == "sign":
        return [Need("service", _str(field_of(body, "Service")), WRITE)]
    if kind == "node_write":
        return [Need("node", _str(field_of(body, "Node")), WRITE)]
    return [Need("acl", "", WRITE)]


def check(authz: Authorizer, need: Need) -> bool:
    if need.whole:
        return authz.allowed_prefix(need.resource, need.segment, need.access)
    return authz.allowed(need.resource, need.segment, need.access)


# -- response filtering -------------------------------------------------------------------------------


def _check_visible(authz: Authorizer, item: Mapping[str, Any]) -> bool:
    if item.get("ServiceName"):
        return authz.allowed("service", item["ServiceName"], READ) and authz.allowed("node", item.get("Node", ""), READ)
    return authz.allowed("node", item.get("Node", ""), READ)


def filter_response(kind: str, data: Any, authz: Authorizer) -> tuple[Any, bool]:
    """Drop what the token may not read. Returns (filtered data, whether anything was dropped)."""
    if authz.management or data is None:
        return data, False
    keep: Callable[[Any], bool]
    if kind == "services_map" and isinstance(data, dict):
        out = {k: v for k, v in data.items() if authz.allowed("service", k, READ)}
        return out, len(out) != len(data)
    if kind == "agent_services" and isinstance(data, dict):
        out = {k: v for k, v in data.items() if authz.allowed("service", _str(v.get("Service")), READ)}
        return out, len(out) != len(data)
    if kind == "agent_checks" and isinstance(data, dict):
        out = {k: v for k, v in data.items() if _check_visible(authz, v)}
        return out, len(out) != len(data)
    if kind == "node_services" and isinstance(data, dict):
        services = data.get("Services")
        if isinstance(services, dict):
            kept = {k: v for k, v in services.items() if authz.allowed("service", _str(v.get("Service")), READ)}
            return dict(data, Services=kept), len(kept) != len(services)
        if isinstance(services, list):
            kept_list = [v for v in services if authz.allowed("service", _str(v.get("Service")), READ)]
            return dict(data, Services=kept_list), len(kept_list) != len(services)
        return data, False
    if kind == "catalog_snapshot" and isinstance(data, dict):
        nodes = [n for n in data.get("Nodes") or [] if authz.allowed("node", n.get("Node", ""), READ)]
        services = [s for s in data.get("Services") or []
                    if authz.allowed("service", s.get("Service", ""), READ) and authz.allowed("node", s.get("Node", ""), READ)]
        checks = [c for c in data.get("Checks") or [] if _check_visible(authz, c)]
        dropped = (len(nodes), len(services), len(checks)) != tuple(len(data.get(k) or []) for k in ("Nodes", "Services", "Checks"))
        return dict(data, Nodes=nodes, Services=services, Checks=checks), dropped
    if not isinstance(data, list):
        return data, False
    if kind == "nodes":
        keep = lambda x: authz.allowed("node", x.get("Node", ""), READ)  # noqa: E731
    elif kind == "service_nodes":
        keep = lambda x: authz.allowed("node", x.get("Node", ""), READ)  # noqa: E731
    elif kind == "health_entries":
        keep = lambda x: authz.allowed("node", (x.get("Node") or {}).get("Node", ""), READ)  # noqa: E731
    elif kind == "checks":
        keep = lambda x: _check_visible(authz, x)  # noqa: E731
    elif kind == "kv_entries":
        keep = lambda x: authz.allowed("key", x.get("Key", ""), READ)  # noqa: E731
    elif kind == "kv_keys":
        keep = lambda x: isinstance(x, str) and authz.allowed("key", x, READ)  # noqa: E731
    elif kind == "intentions":
        keep = lambda x: authz.allowed(INTENTION, x.get("DestinationName", ""), READ)  # noqa: E731
    elif kind == "members":
        keep = lambda x: authz.allowed("node", x.get("Name", ""), READ)  # noqa: E731
    elif kind == "config_entries":
        def keep(x: Any) -> bool:
            need = config_need(_str(x.get("Kind")), _str(x.get("Name")), READ)
            return need is None or authz.allowed(need.resource, need.segment, READ)
    else:
        return data, False
    out = [x for x in data if isinstance(x, (dict, str)) and keep(x)]
    return out, len(out) != len(data)
