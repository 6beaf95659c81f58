"""Connect intentions: validation, precedence, ordering, and the L4 / L7 authorization decisions.

Pure functions over plain dicts shaped like Consul's API JSON (PascalCase keys). Storage is the
caller's business; since Consul 1.9 intentions live in `service-intentions` config entries (one per
destination) and the conversion helpers at the bottom map between the two shapes.

Evaluation order (Consul `structs.IntentionPrecedenceSorter`): Precedence descending, then SourceNS,
SourceName, DestinationNS, DestinationName ascending. The first intention whose source and destination
match decides. L4 checks (`/v1/agent/connect/authorize`, `/v1/connect/intentions/check`) treat an
intention with `Permissions` (L7) as a deny, because an L4 caller cannot know the request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from lictor.errors import BadRequest

WILDCARD = "*"
DEFAULT_NS = "default"
DEFAULT_REASON = "Default behavior configured by ACLs"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512
DESCRIPTION_MAX = 512 * 8  # generous; Consul only bounds the whole request body

# Keys a client may send (case-insensitively) in an intention body; read-only ones are ignored.
_BODY_KEYS = {
    "sourcename": "SourceName", "destinationname": "DestinationName", "sourcens": "SourceNS",
    "destinationns": "DestinationNS", "sourcetype": "SourceType", "action": "Action",
    "permissions": "Permissions", "description": "Description", "meta": "Meta",
    "sourcepartition": "SourcePartition", "destinationpartition": "DestinationPartition",
    "sourcepeer": "SourcePeer", "sourcesamenessgroup": "SourceSamenessGroup",
}
_READ_ONLY = frozenset({"id", "precedence", "createindex", "modifyindex", "createdat", "updatedat", "hash",
                        "legacyid", "legacymeta", "legacycreatetime", "legacyupdatetime"})


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    intention: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------ validation

def _check_name(field: str, value: Any, *, allow_wildcard: bool = True) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")
    if value == "":
        raise BadRequest(f"{field} must be set")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BadRequest(f"{field} must not contain control characters")
    if WILDCARD in value and (value != WILDCARD or not allow_wildcard):
        raise BadRequest(f"{field}: wildcard character '*' cannot be used with partial values")
    if "/" in value:
        raise BadRequest(f"{field} must not contain '/': {value!r}")
    return value


def _ci_get(body: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical-case view of a request body; unknown keys are a 400 like Go's DisallowUnknownFields."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        low = str(key).lower()
        if low in _BODY_KEYS:
            out[_BODY_KEYS[low]] = value
        elif low not in _READ_ONLY:
            raise BadRequest(f'Request decode failed: json: unknown field "{key}"')
    return out


def _split_ns(value: str | None, field: str) -> tuple[str | None, str | None]:
    """`ns/name` or `name` as the exact endpoint's ?source= / ?destination= accept them."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")
    parts = value.split("/")
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise BadRequest(f"{field} must be 'name' or 'namespace/name', got {value!r}")


def _compile_regex(field: str, pattern: Any) -> re.Pattern[str]:
    if not isinstance(pattern, str) or pattern == "":
        raise BadRequest(f"{field} must be a non-empty string")
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise BadRequest(f"{field} is not a valid regular expression: {exc}") from None


def _validate_header(field: str, hdr: Any) -> dict[str, Any]:
    if not isinstance(hdr, Mapping):
        raise BadRequest(f"{field} must be an object")
    known = {"name": "Name", "present": "Present", "exact": "Exact", "prefix": "Prefix", "suffix": "Suffix",
             "regex": "Regex", "invert": "Invert"}
    h: dict[str, Any] = {}
    for k, v in hdr.items():
        canon = known.get(str(k).lower())
        if canon is None:
            raise BadRequest(f'{field} has unknown field "{k}"')
        h[canon] = v
    name = h.get("Name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{field} missing required Name field")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in name):
        raise BadRequest(f"{field}.Name must not contain whitespace or control characters")
    for key in ("Present", "Invert"):
        if key in h and not isinstance(h[key], bool):
            raise BadRequest(f"{field}.{key} must be a boolean")
    for key in ("Exact", "Prefix", "Suffix", "Regex"):
        if key in h and h[key] is not None and not isinstance(h[key], str):
            raise BadRequest(f"{field}.{key} must be a string")
    set_fields = [k for k in ("Exact", "Prefix", "Suffix", "Regex") if h.get(k)]
    if h.get("Present"):
        set_fields.insert(0, "Present")
    if len(set_fields) != 1:
        raise BadRequest(f"{field} should only contain one of Present, Exact, Prefix, Suffix, or Regex")
    if "Regex" in set_fields:
        _compile_regex(f"{field}.Regex", h["Regex"])
    out = {"Name": name, set_fields[0]: h[set_fields[0]]}
    if h.get("Invert"):
        out["Invert"] = True
    return out


def _validate_permission(field: str, perm: Any) -> dict[str, Any]:
    if not isinstance(perm, Mapping):
        raise BadRequest(f"{field} must be an object")
    p = {str(k).lower(): v for k, v in perm.items()}
    unknown = set(p) - {"action", "http", "jwt"}
    if unknown:
        raise BadRequest(f'{field} has unknown field "{sorted(unknown)[0]}"')
    action = p.get("action")
    if action not in ("allow", "deny"):
        raise BadRequest(f"{field}.Action must be set to 'allow' or 'deny'")
    if p.get("jwt"):
        raise BadRequest(f"{field}.JWT is not supported")
    http = p.get("http")
    if http is None:
        raise BadRequest(f"{field}.HTTP is required")
    if not isinstance(http, Mapping):
        raise BadRequest(f"{field}.HTTP must be an object")
    known = {"pathexact": "PathExact", "pathprefix": "PathPrefix", "pathregex": "PathRegex",
             "header": "Header", "methods": "Methods"}
    hp: dict[str, Any] = {}
    for k, v in http.items():
        canon = known.get(str(k).lower())
        if canon is None:
            raise BadRequest(f'{field}.HTTP has unknown field "{k}"')
        hp[canon] = v
    out: dict[str, Any] = {}
    paths = [k for k in ("PathExact", "PathPrefix", "PathRegex") if hp.get(k)]
    if len(paths) > 1:
        raise BadRequest(f"{field}.HTTP should only contain at most one of PathExact, PathPrefix, or PathRegex")
    for key in ("PathExact", "PathPrefix"):
        if key in paths:
            val = hp[key]
            if not isinstance(val, str) or not val.startswith("/"):
                raise BadRequest(f"{field}.HTTP.{key} doesn't start with '/': {val!r}")
            out[key] = val
    if "PathRegex" in paths:
        _compile_regex(f"{field}.HTTP.PathRegex", hp["PathRegex"])
        out["PathRegex"] = hp["PathRegex"]
    headers = hp.get("Header") or []
    if not isinstance(headers, list):
        raise BadRequest(f"{field}.HTTP.Header must be a list")
    if headers:
        out["Header"] = [_validate_header(f"{field}.HTTP.Header[{i}]", h) for i, h in enumerate(headers)]
    methods = hp.get("Methods") or []
    if not isinstance(methods, list):
        raise BadRequest(f"{field}.HTTP.Methods must be a list")
    if methods:
        seen: list[str] = []
        for m in methods:
            up = m.upper() if isinstance(m, str) else m
            if up not in HTTP_METHODS:
                raise BadRequest(f"{field}.HTTP.Methods contains an invalid method {m!r}")
            if up in seen:
                raise BadRequest(f"{field}.HTTP.Methods contains {up!r} more than once")
            seen.append(up)
        out["Methods"] = seen
    if not out:
        raise BadRequest(f"{field}.HTTP should not be empty")
    return {"Action": action, "HTTP": out}


def validate_permissions(perms: Any, field: str = "Permissions") -> list[dict[str, Any]]:
    if perms is None:
        return []
    if not isinstance(perms, list):
        raise BadRequest(f"{field} must be a list")
    return [_validate_permission(f"{field}[{i}]", p) for i, p in enumerate(perms)]


def _validate_meta(meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise BadRequest("Meta must be an object of string values")
    if len(meta) > META_MAX_PAIRS:
        raise BadRequest(f"Meta exceeds maximum element count {META_MAX_PAIRS}")
    for k, v in meta.items():
        if not isinstance(k, str) or not k:
            raise BadRequest("Meta keys must be non-empty strings")
        if len(k) > META_KEY_MAX:
            raise BadRequest(f"Meta key too long (limit: {META_KEY_MAX} characters): {k[:32]!r}")
        if not isinstance(v, str):
            raise BadRequest(f"Meta value for key {k!r} must be a string")
        if len(v) > META_VALUE_MAX:
            raise BadRequest(f"Meta value for key {k!r} too long (limit: {META_VALUE_MAX} characters)")
    return dict(meta)


def precedence(ixn: Mapping[str, Any]) -> int:
    """Consul `UpdatePrecedence`: 9/8/6/5 without namespace wildcards, 9..1 with them."""

    def exact(ns: str, name: str) -> int:
        return (ns != WILDCARD) + (name != WILDCARD)

    dst = exact(ixn.get("DestinationNS") or DEFAULT_NS, ixn["DestinationName"])
    src = exact(ixn.get("SourceNS") or DEFAULT_NS, ixn["SourceName"])
    top = {2: 9, 1: 6, 0: 3}[dst]
    return top - (2 - src)


def validate_intention(source: str | None, destination: str | None, body: Mapping[str, Any] | None) -> dict[str, Any]:
    """Normalize an intention write. `source`/`destination` (query args, `name` or `ns/name`) win over
    the body's SourceName/DestinationName (legacy POST body carries them)."""
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise BadRequest("Request decode failed: intention body must be a JSON object")
    b = _ci_get(body)
    src_ns, src_name = _split_ns(source, "source")
    dst_ns, dst_name = _split_ns(destination, "destination")
    src_name = src_name if src_name is not None else b.get("SourceName")
    dst_name = dst_name if dst_name is not None else b.get("DestinationName")
    src_ns = src_ns if src_ns is not None else (b.get("SourceNS") or DEFAULT_NS)
    dst_ns = dst_ns if dst_ns is not None else (b.get("DestinationNS") or DEFAULT_NS)
    if src_name is None or src_name == "":
        raise BadRequest("SourceName must be set")
    if dst_name is None or dst_name == "":
        raise BadRequest("DestinationName must be set")
    src_name = _check_name("SourceName", src_name)
    dst_name = _check_name("DestinationName", dst_name)
    src_ns = _check_name("SourceNS", src_ns)
    dst_ns = _check_name("DestinationNS", dst_ns)
    # `*/web` would match web in every namespace yet rank above an exact namespace: Consul forbids it.
    if src_ns == WILDCARD and src_name != WILDCARD:
        raise BadRequest("SourceName: exact value cannot follow wildcard namespace")
    if dst_ns == WILDCARD and dst_name != WILDCARD:
        raise BadRequest("DestinationName: exact value cannot follow wildcard namespace")
    for key in ("SourcePartition", "DestinationPartition"):
        if b.get(key) not in (None, "", "default"):
            raise BadRequest(f"{key} must be 'default' (admin partitions are not supported)")
    if b.get("SourcePeer") or b.get("SourceSamenessGroup"):
        raise BadRequest("SourcePeer/SourceSamenessGroup are not supported")

    source_type = b.get("SourceType") or "consul"
    if source_type != "consul":
        raise BadRequest("SourceType must be set to 'consul'")
    perms = validate_permissions(b.get("Permissions"))
    action = b.get("Action")
    if perms:
        if action not in (None, ""):
            raise BadRequest("Action must be empty when Permissions are specified (they are mutually exclusive)")
        action = ""
    else:
        if isinstance(action, str):
            action = action.lower()
        if action not in ("allow", "deny"):
            raise BadRequest("Action must be set to 'allow' or 'deny'")
    description = b.get("Description") or ""
    if not isinstance(description, str):
        raise BadRequest("Description must be a string")
    if len(description) > DESCRIPTION_MAX:
        raise BadRequest(f"Description too long (limit: {DESCRIPTION_MAX} characters)")

    ixn: dict[str, Any] = {
        "Description": description,
        "SourceNS": src_ns,
        "SourceName": src_name,
        "DestinationNS": dst_ns,
        "DestinationName": dst_name,
        "SourceType": "consul",
        "Action": action,
        "Meta": _validate_meta(b.get("Meta")),
    }
    if perms:
        ixn["Permissions"] = perms
    ixn["Precedence"] = precedence(ixn)
    return ixn


# ------------------------------------------------------------------------------ ordering/matching

def sort_key(ixn: Mapping[str, Any]) -> tuple[int, str, str, str, str]:
    prec = ixn.get("Precedence")
    if not isinstance(prec, int):
        prec = precedence(ixn)
    return (-prec, ixn.get("SourceNS") or DEFAULT_NS, ixn["SourceName"],
            ixn.get("DestinationNS") or DEFAULT_NS, ixn["DestinationName"])


def sort_intentions(intentions: Iterable[Mapping[str, Any]]) -> list[Any]:
    """Consul's evaluation order: Precedence desc, then SrcNS, Src, DstNS, Dst ascending."""
    return sorted(intentions, key=sort_key)


def _name_matches(pattern_ns: str, pattern: str, ns: str, name: str) -> bool:
    return (pattern_ns in (WILDCARD, ns)) and (pattern in (WILDCARD, name))


def _parse_target(name: str) -> tuple[str, str]:
    ns, svc = _split_ns(name, "name")
    return ns or DEFAULT_NS, svc or ""


def match(intentions: Iterable[Mapping[str, Any]], by: str, name: str) -> list[Any]:
    """What `/v1/connect/intentions/match?by=&name=` lists for one name: every intention whose
    source (by=source) or destination (by=destination) matches `name`, wildcards included, in
    evaluation order."""
    if by not in ("source", "destination"):
        raise BadRequest("by must be 'source' or 'destination'")
    if not name:
        raise BadRequest("name must be specified")
    ns, svc = _parse_target(name)
    if by == "source":
        hits = [i for i in intentions
                if _name_matches(i.get("SourceNS") or DEFAULT_NS, i["SourceName"], ns, svc)]
    else:
        hits = [i for i in intentions
                if _name_matches(i.get("DestinationNS") or DEFAULT_NS, i["DestinationName"], ns, svc)]
    return sort_intentions(hits)


def find_intention(intentions: Iterable[Mapping[str, Any]], source: str, destination: str) -> Any | None:
    """The first intention, in evaluation order, that applies to source → destination."""
    src_ns, src = _parse_target(source)
    dst_ns, dst = _parse_target(destination)
    for ixn in match(intentions, "destination", f"{dst_ns}/{dst}"):
        if _name_matches(ixn.get("SourceNS") or DEFAULT_NS, ixn["SourceName"], src_ns, src):
            return ixn
    return None


def describe(ixn: Mapping[str, Any]) -> str:
    """Consul `Intention.String()`: `ALLOW default/web => default/db (ID: x, Precedence: 9)`; an L7
    intention has no Action, so it reports its permission count instead."""
    prec = ixn.get("Precedence")
    if not isinstance(prec, int):
        prec = precedence(ixn)
    parts = []
    if ixn.get("ID"):
        parts.append(f"ID: {ixn['ID']}")
    parts.append(f"Precedence: {prec}")
    src = f"{ixn.get('SourceNS') or DEFAULT_NS}/{ixn['SourceName']}"
    dst = f"{ixn.get('DestinationNS') or DEFAULT_NS}/{ixn['DestinationName']}"
    if ixn.get("Permissions"):
        parts.append(f"Permissions: {len(ixn['Permissions'])}")
        return f"{src} => {dst} ({', '.join(parts)})"
    return f"{str(ixn.get('Action', '')).upper()} {src} => {dst} ({', '.join(parts)})"


def check_l4(intentions: Iterable[Mapping[str, Any]], source: str, destination: str,
             default_allow: bool) -> Decision:
    """Connection-level decision (authorize / intentions/check). L7 intentions deny: without a
    request there is nothing to evaluate their permissions against."""
    ixn = find_intention(intentions, source, destination)
    if ixn is None:
        return Decision(default_allow, DEFAULT_REASON, None)
    if ixn.get("Permissions"):
        return Decision(False, f"Matched L7 intention: {describe(ixn)}", dict(ixn))
    return Decision(ixn.get("Action") == "allow", f"Matched L4 intention: {describe(ixn)}", dict(ixn))


# ---------------------------------------------------------------------------------- L7 requests

_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def _regex(pattern: str) -> re.Pattern[str]:
    rx = _REGEX_CACHE.get(pattern)
    if rx is None:
        if len(_REGEX_CACHE) > 4096:  # bound the cache; patterns come from validated intentions
            _REGEX_CACHE.clear()
        rx = _REGEX_CACHE[pattern] = re.compile(pattern)
    return rx


def _header_matches(rule: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
    value = headers.get(rule["Name"].lower())
    invert = bool(rule.get("Invert"))
    if value is None:
        # Envoy: an absent header only satisfies an inverted presence match.
        return invert and bool(rule.get("Present"))
    if rule.get("Present"):
        hit = True
    elif rule.get("Exact"):
        hit = value == rule["Exact"]
    elif rule.get("Prefix"):
        hit = value.startswith(rule["Prefix"])
    elif rule.get("Suffix"):
        hit = value.endswith(rule["Suffix"])
    elif rule.get("Regex"):
        hit = _regex(rule["Regex"]).fullmatch(value) is not None  # Envoy safe_regex: full match
    else:
        hit = False
    return hit != invert


def permission_matches(perm: Mapping[str, Any], method: str, path: str, headers: Mapping[str, str]) -> bool:
    """All conditions of one permission's HTTP block must hold (Envoy RBAC `and_rules`)."""
    http = perm.get("HTTP") or {}
    path_only = path.split("?", 1)[0]  # Envoy path matchers ignore the query string
    if http.get("PathExact") and path_only != http["PathExact"]:
        return False
    if http.get("PathPrefix") and not path_only.startswith(http["PathPrefix"]):
        return False
    if http.get("PathRegex") and _regex(http["PathRegex"]).fullmatch(path_only) is None:
        return False
    if http.get("Methods") and method.upper() not in http["Methods"]:
        return False
    return all(_header_matches(rule, headers) for rule in http.get("Header") or [])


def check_request(intentions: Iterable[Mapping[str, Any]], source: str, destination: str, method: str,
                  path: str, headers: Mapping[str, str] | None, default_allow: bool) -> Decision:
    """Per-request decision: first matching intention by precedence; an L7 one evaluates its
    permissions top-to-bottom (first match terminal); a request no permission matches gets the
    default policy."""
    ixn = find_intention(intentions, source, destination)
    if ixn is None:
        return Decision(default_allow, DEFAULT_REASON, None)
    perms = ixn.get("Permissions") or []
    if not perms:
        return Decision(ixn.get("Action") == "allow", f"Matched L4 intention: {describe(ixn)}", dict(ixn))
    hdrs = {str(k).lower(): v for k, v in (headers or {}).items()}
    for idx, perm in enumerate(perms):
        if permission_matches(perm, method, path, hdrs):
            allowed = perm.get("Action") == "allow"
            return Decision(allowed, f"Matched L7 intention: {describe(ixn)}, permission {idx}: "
                                     f"{str(perm.get('Action')).upper()}", dict(ixn))
    return Decision(default_allow, f"{DEFAULT_REASON} (no permission of L7 intention {describe(ixn)} "
                                   "matched the request)", dict(ixn))


# ----------------------------------------------------------------------------------- identities

def spiffe_service(uri: str) -> tuple[str, str, str, str]:
    """`spiffe://<td>[/ap/default]/ns/<ns>/dc/<dc>/svc/<service>` → (trust_domain, ns, dc, service).
    The trust domain is returned, not checked: Consul's authorize does not validate it."""
    if not isinstance(uri, str) or not uri.lower().startswith("spiffe://"):
        raise BadRequest("ClientCertURI not a valid Connect identifier")
    rest = uri[len("spiffe://"):]
    td, sep, path = rest.partition("/")
    if not td or any(c in td for c in "?#@ ") or (path and ("?" in path or "#" in path)):
        raise BadRequest("ClientCertURI not a valid Connect identifier")
    segs = [unquote(s) for s in path.split("/")] if sep else []
    if len(segs) >= 2 and segs[0] == "ap":
        if segs[1] != "default":
            raise BadRequest("ClientCertURI not a valid Service identifier: only the default partition is supported")
        segs = segs[2:]
    if len(segs) != 6 or segs[0] != "ns" or segs[2] != "dc" or segs[4] != "svc" or not all(segs[1::2]):
        raise BadRequest("ClientCertURI not a valid Service identifier")
    if any(ord(c) < 0x20 for s in segs for c in s):
        raise BadRequest("ClientCertURI not a valid Service identifier")
    return td.lower(), segs[1], segs[3], segs[5]


# ------------------------------------------------------------------ service-intentions entries

def intentions_from_config_entry(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Explode a `service-intentions` config entry into one intention per source."""
    if str(entry.get("Kind", "service-intentions")).lower() != "service-intentions":
        raise BadRequest("Kind must be 'service-intentions'")
    dest = entry.get("Name")
    dst_ns = entry.get("Namespace") or DEFAULT_NS
    out = []
    for i, src in enumerate(entry.get("Sources") or []):
        if not isinstance(src, Mapping):
            raise BadRequest(f"Sources[{i}] must be an object")
        body: dict[str, Any] = {
            "SourceNS": src.get("Namespace") or DEFAULT_NS,
            "SourceName": src.get("Name"),
            "DestinationNS": dst_ns,
            "DestinationName": dest,
            "SourceType": src.get("Type") or "consul",
            "Action": src.get("Action") or "",
            "Permissions": src.get("Permissions"),
            "Description": src.get("Description") or "",
            "Meta": src.get("LegacyMeta") or {},
        }
        try:
            ixn = validate_intention(None, None, body)
        except BadRequest as exc:
            raise BadRequest(f"Sources[{i}]: {exc.message}") from None
        for legacy, key in (("LegacyID", "ID"), ("LegacyCreateTime", "CreatedAt"), ("LegacyUpdateTime", "UpdatedAt")):
            if src.get(legacy):
                ixn[key] = src[legacy]
        for key in ("CreateIndex", "ModifyIndex"):
            if key in entry:
                ixn[key] = entry[key]
        out.append(ixn)
    seen: set[tuple[str, str]] = set()
    for i, ixn in enumerate(out):
        key = (ixn["SourceNS"], ixn["SourceName"])
        if key in seen:
            raise BadRequest(f"Sources[{i}] defines {'/'.join(key)!r} more than once")
        seen.add(key)
    return sort_intentions(out)


def validate_config_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and normalize a `service-intentions` entry (Name = destination or "*")."""
    name = entry.get("Name")
    _check_name("Name", name)
    intentions = intentions_from_config_entry(entry)
    normalized = config_entry_from_intentions(name, intentions, meta=entry.get("Meta"))
    if entry.get("Namespace") not in (None, "", DEFAULT_NS):
        normalized["Namespace"] = entry["Namespace"]
    return normalized


def _source_from_intention(ixn: Mapping[str, Any]) -> dict[str, Any]:
    src: dict[str, Any] = {"Name": ixn["SourceName"]}
    if (ixn.get("SourceNS") or DEFAULT_NS) != DEFAULT_NS:
        src["Namespace"] = ixn["SourceNS"]
    if ixn.get("Permissions"):
        src["Permissions"] = list(ixn["Permissions"])
    else:
        src["Action"] = ixn["Action"]
    src["Precedence"] = ixn.get("Precedence") or precedence(ixn)
    src["Type"] = "consul"
    if ixn.get("Description"):
        src["Description"] = ixn["Description"]
    if ixn.get("ID"):
        src["LegacyID"] = ixn["ID"]
    if ixn.get("Meta"):
        src["LegacyMeta"] = dict(ixn["Meta"])
    for key, legacy in (("CreatedAt", "LegacyCreateTime"), ("UpdatedAt", "LegacyUpdateTime")):
        if ixn.get(key):
            src[legacy] = ixn[key]
    return src


def config_entry_from_intentions(destination: str, intentions: Iterable[Mapping[str, Any]],
                                 meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fold the intentions for one destination back into a `service-intentions` entry."""
    ixns = [i for i in intentions if i["DestinationName"] == destination]
    entry: dict[str, Any] = {
        "Kind": "service-intentions",
        "Name": destination,
        "Sources": [_source_from_intention(i) for i in sort_intentions(ixns)],
    }
    if meta:
        entry["Meta"] = _validate_meta(meta)
    return entry


def upsert_into_entry(entry: Mapping[str, Any] | None, ixn: Mapping[str, Any]) -> dict[str, Any]:
    """The destination's entry with `ixn`'s source added or replaced (PUT intentions/exact)."""
    existing = intentions_from_config_entry(entry) if entry else []
    key = (ixn.get("SourceNS") or DEFAULT_NS, ixn["SourceName"])
    kept = [i for i in existing if (i["SourceNS"], i["SourceName"]) != key]
    return config_entry_from_intentions(ixn["DestinationName"], [*kept, ixn],
                                        meta=(entry or {}).get("Meta"))


def remove_from_entry(entry: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """The entry without `source` (`name` or `ns/name`); None when no sources remain (delete it)."""
    ns, name = _parse_target(source)
    kept = [i for i in intentions_from_config_entry(entry) if (i["SourceNS"], i["SourceName"]) != (ns, name)]
    if not kept:
        return None
    return config_entry_from_intentions(entry["Name"], kept, meta=entry.get("Meta"))
