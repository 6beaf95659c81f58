"""ACLs on the wire: /v1/acl/* endpoints, token resolution, and the enforcing ASGI middleware.

Every request passes `ACLMiddleware` before routing. It takes the token (`?token=` >
`X-Consul-Token` > `Authorization: Bearer` > the agent's default token), resolves it to an
`Authorizer` (servers: from the replicated state; client agents: by asking a server, cached at most
`CLIENT_CACHE_TTL`), asks `lictor.acl.plan_request` what the request needs, refuses with
403 "Permission denied" or passes it on, and filters list responses.

A refusal never depends on whether the named object exists: endpoints addressed by ID (agent
service/check IDs, intention IDs) resolve the ID first, and an unknown ID needs access to every
name of that kind, so only a token that could see it anyway learns that it is missing.

Secrets: the server that handles a create generates the SecretID (uuid4); the Raft command and
the state hold only its sha256, so a snapshot or a captured log entry gives no usable token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from lictor import acl
from lictor.decode import AnyValue, Bool, ListOf, Str, Struct, decode_body
from lictor.durations import DurationError, parse_duration
from lictor.errors import APIError, BadRequest, NotFound
from lictor.httpapi import guarded, json_response, read_body
from lictor.registry.raft import new_command

log = logging.getLogger("lictor.acl")

# Client agents ask a server what a token may do and keep the answer this long, so a revoked
# token stops working on every agent within ~0.5 s plus one round trip.
CLIENT_CACHE_TTL = 0.5
# While no server answers, a client agent keeps using answers up to this old (Consul's
# `down_policy = "extend-cache"`), then fails closed.
CLIENT_STALE_LIMIT = 30.0
BODY_LIMIT = 64 * 1024 * 1024  # what the largest body-checked request (an agent's full sync) may be
HIDDEN = "<hidden>"

LINK = Struct("ACLLink", {"ID": Str(), "Name": Str()})
SERVICE_IDENTITY = Struct("ServiceIdentity", {"ServiceName": Str(), "Datacenters": ListOf(Str())})
NODE_IDENTITY = Struct("NodeIdentity", {"NodeName": Str(), "Datacenter": Str()})
_COMMON_LENIENT = frozenset({"Namespace", "Partition", "Hash", "CreateIndex", "ModifyIndex"})
TOKEN_BODY = Struct(
    "ACLToken",
    {
        "AccessorID": Str(), "SecretID": Str(), "Description": Str(), "Policies": ListOf(LINK), "Roles": ListOf(LINK),
        "ServiceIdentities": ListOf(SERVICE_IDENTITY), "NodeIdentities": ListOf(NODE_IDENTITY), "Local": Bool(),
        "ExpirationTTL": AnyValue(), "ExpirationTime": AnyValue(),
    },
    lenient=_COMMON_LENIENT | {"CreateTime", "TemplatedPolicies", "AuthMethod", "Legacy", "Rules", "Type", "Name"},
)
POLICY_BODY = Struct(
    "ACLPolicy", {"ID": Str(), "Name": Str(), "Description": Str(), "Rules": AnyValue(), "Datacenters": ListOf(Str())},
    lenient=_COMMON_LENIENT,
)
ROLE_BODY = Struct(
    "ACLRole",
    {"ID": Str(), "Name": Str(), "Description": Str(), "Policies": ListOf(LINK),
     "ServiceIdentities": ListOf(SERVICE_IDENTITY), "NodeIdentities": ListOf(NODE_IDENTITY)},
    lenient=_COMMON_LENIENT | {"TemplatedPolicies"},
)
BOOTSTRAP_BODY = Struct("Bootstrap", {"BootstrapSecret": Str()})


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def token_from_scope(scope: dict[str, Any], query: dict[str, list[str]]) -> str | None:
    """Consul's precedence: ?token= > X-Consul-Token > Authorization: Bearer. None = no token sent."""
    if query.get("token") and query["token"][-1]:
        return query["token"][-1]
    bearer = None
    for name, value in scope.get("headers") or []:
        lname = name.lower()
        if lname == b"x-consul-token" and value:
            return value.decode("latin-1").strip()
        if lname == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = value[7:].decode("latin-1").strip()
    return bearer or None


# -- resolution ------------------------------------------------------------------------------------


class Resolved:
    def __init__(self, authz: acl.Authorizer, accessor: str) -> None:
        self.authz = authz
        self.accessor = accessor


class ServerResolver:
    """Resolve a secret from the replicated state. Parsed policies are cached per ModifyIndex;
    whole answers per ACL table index, so any ACL change takes effect on the next request."""

    def __init__(self, get_store: Callable[[], Any], default_policy: str, initial_management: str = "") -> None:
        self.get_store = get_store
        self.default_policy = default_policy
        self.initial_management = initial_management
        self._policy_cache: dict[str, tuple[int, acl.Rules]] = {}
        self._answers: dict[tuple[str, int], tuple[acl.Rules, str, bool, float | None] | None] = {}

    def rules_for(self, secret: str) -> tuple[acl.Rules, str, bool] | None:
        """(merged rules, accessor id, anonymous?) or None when the token is unknown or expired."""
        if self.initial_management and hmac.compare_digest(secret.encode(), self.initial_management.encode()):
            return acl.Rules(management=True), "initial-management", False
        store = self.get_store()
        if store is None:
            raise APIError("No cluster leader", 500)
        anonymous = secret in ("", acl.ANONYMOUS_SECRET)
        digest = hash_secret(secret or acl.ANONYMOUS_SECRET)
        with store.lock:
            tokens, secrets, policies, roles = store.acl_tables()
            key = (digest, store.table_index.get("acl", 0))
            if key in self._answers:
                cached = self._answers[key]
                if cached is None or (cached[3] is not None and cached[3] < time.time()):
                    return None
                return cached[0], cached[1], cached[2]
            accessor = secrets.get(digest)
            token = tokens.get(accessor or "")
            answer: tuple[acl.Rules, str, bool, float | None] | None
            if token is None or not hmac.compare_digest(token["SecretHash"], digest):
                answer = (acl.Rules(), acl.ANONYMOUS_ACCESSOR_ID, True, None) if anonymous else None
            else:
                answer = (self._merge(token, policies, roles), token["AccessorID"], anonymous, token.get("ExpirationTime"))
        if len(self._answers) > 4096:
            self._answers.clear()
        self._answers[key] = answer
        if answer is None or (answer[3] is not None and answer[3] < time.time()):
            return None
        return answer[0], answer[1], answer[2]

    def _policy_rules(self, policy: dict[str, Any]) -> acl.Rules:
        if policy["ID"] == acl.MANAGEMENT_POLICY_ID:
            return acl.Rules(management=True)
        cached = self._policy_cache.get(policy["ID"])
        if cached is not None and cached[0] == policy["ModifyIndex"]:
            return cached[1]
        try:
            rules = acl.parse_rules(policy.get("Rules") or "")
        except acl.ACLRuleError:  # validated on write; a bad stored policy grants nothing
            rules = acl.Rules()
        self._policy_cache[policy["ID"]] = (policy["ModifyIndex"], rules)
        return rules

    def _merge(self, token: dict[str, Any], policies: dict[str, Any], roles: dict[str, Any]) -> acl.Rules:
        sets: list[acl.Rules] = []
        holders = [token] + [roles[r["ID"]] for r in token.get("Roles") or [] if r["ID"] in roles]
        for holder in holders:
            for link in holder.get("Policies") or []:
                if link["ID"] == acl.MANAGEMENT_POLICY_ID:
                    sets.append(acl.Rules(management=True))
                elif link["ID"] in policies:
                    sets.append(self._policy_rules(policies[link["ID"]]))
            for ident in holder.get("ServiceIdentities") or []:
                sets.append(acl.service_identity_rules(ident["ServiceName"]))
            for ident in holder.get("NodeIdentities") or []:
                sets.append(acl.node_identity_rules(ident["NodeName"]))
        return acl.merge(sets)

    async def resolve(self, secret: str) -> Resolved | None:
        found = self.rules_for(secret)
        if found is None:
            return None
        rules, accessor, anonymous = found
        return Resolved(acl.Authorizer(rules, self.default_policy, accessor, anonymous), accessor)


class ClientResolver:
    """A client agent asks a server (`/v1/internal/acl/authorizer`) and caches briefly."""

    def __init__(self, get_pool: Callable[[], Any], default_policy: str) -> None:
        self.get_pool = get_pool
        self.default_policy = default_policy
        self._cache: dict[str, tuple[float, Resolved | None]] = {}

    async def resolve(self, secret: str) -> Resolved | None:
        key = hash_secret(secret)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CLIENT_CACHE_TTL:
            return cached[1]
        pool = self.get_pool()
        try:
            if pool is None:
                raise APIError("no servers known yet", 500)
            resp = await pool.request("GET", "/v1/internal/acl/authorizer", headers={"X-Consul-Token": secret or "anonymous"},
                                      timeout=3.0)
        except APIError as exc:
            if cached is not None and now - cached[0] < CLIENT_STALE_LIMIT:
                return cached[1]
            raise APIError(f"ACL not resolvable: {exc.message}", 500) from None
        if resp.status_code == 403:
            answer = None
        elif resp.status_code == 200:
            data = resp.json()
            rules = acl.Rules.from_json(data.get("Rules") or {})
            answer = Resolved(acl.Authorizer(rules, self.default_policy, data.get("AccessorID", ""),
                                             bool(data.get("Anonymous"))), data.get("AccessorID", ""))
        else:
            raise APIError(f"ACL not resolvable: server answered {resp.status_code}", 500)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (now, answer)
        return answer


# -- the enforcing middleware ---------------------------------------------------------------------------


def _denied(message: str = acl.PERMISSION_DENIED, status: int = 403) -> Response:
    return PlainTextResponse(message, status_code=status)


def _count_denied(kind: str) -> None:
    try:
        from lictor.limits import count_refusal
    except ImportError:  # pragma: no cover
        return
    count_refusal(kind)


class ACLMiddleware:
    """Enforce ACLs on every HTTP request of an agent (see the module docstring)."""

    def __init__(self, app: Any, runtime: Any) -> None:
        self.app = app
        self.runtime = runtime
        config = runtime.config
        self.config = config
        if config.server:
            self.resolver: Any = ServerResolver(self._store, config.acl_default_policy, config.acl_initial_management)
        else:
            self.resolver = ClientResolver(lambda: getattr(runtime.local, "pool", None), config.acl_default_policy)
        try:
            from lictor.agent.local import FORWARDED_PREFIXES
        except ImportError:  # pragma: no cover
            FORWARDED_PREFIXES = ()  # noqa: N806
        self.forwarded = tuple(FORWARDED_PREFIXES) + ("/v1/acl/",)

    def _store(self) -> Any:
        server = self.runtime.server
        log_ = getattr(server, "log", None)
        return log_.store if log_ is not None else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.config.acl_enabled:
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        sent = token_from_scope(scope, query)
        secret = sent if sent is not None else (self.config.acl_token or "")
        path: str = scope["path"]
        if not self.config.server and path.startswith(self.forwarded):
            # The servers decide; make sure they judge the caller's token (or our default),
            # never the agent token our server connection carries.
            if "token" not in query:
                headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"x-consul-token", b"authorization")]
                headers.append((b"x-consul-token", (secret or acl.ANONYMOUS_SECRET).encode("latin-1")))
                scope = dict(scope, headers=headers)
            await self.app(scope, receive, send)
            return
        plan = acl.plan_request(scope["method"], path, query, self.config.node)
        if plan.public:
            await self.app(scope, receive, send)
            return
        try:
            resolved = await self.resolver.resolve(secret)
        except APIError as exc:
            await _denied(exc.message, exc.status)(scope, receive, send)
            return
        if resolved is None:
            _count_denied("acl_not_found")
            await _denied("ACL not found")(scope, receive, send)
            return
        authz = resolved.authz
        needs = list(plan.needs)
        if plan.body is not None:
            body, receive = await _buffer_body(receive, BODY_LIMIT)
            if body is None:
                await _denied("Request body too large", 413)(scope, receive, send)
                return
            try:
                parsed = json.loads(body, object_pairs_hook=_no_duplicates) if body.strip() else None
                needs += acl.body_needs(plan.body, parsed, self._lookup)
            except (ValueError, acl.AmbiguousBody) as exc:
                await _denied(f"Request decode failed: {exc}", 400)(scope, receive, send)
                return
        if plan.lookup is not None:
            kind, ident, access = plan.lookup
            found = self._lookup(kind, ident)
            resource = "service" if kind == "agent_service" else acl.INTENTION if kind == "intention" else "service"
            needs.append(acl.Need(found[0], found[1], access) if found else acl.Need(resource, "", access, whole=True))
        for need in needs:
            if need.segment == "\x00node":
                need = acl.Need(need.resource, self.config.node, need.access, need.whole)
            if not acl.check(authz, need):
                _count_denied("permission_denied")
                await _denied()(scope, receive, send)
                return
        if plan.filter is None or authz.management:
            await self.app(scope, receive, send)
            return
        await self._filtered(scope, receive, send, plan.filter, authz, explicit=sent is not None, query=query)

    def _lookup(self, kind: str, ident: str) -> tuple[str, str] | None:
        local = self.runtime.local
        if kind == "agent_service":
            service = local.services.get(ident) if local is not None else None
            return ("service", service["Service"]) if service else None
        if kind == "agent_check":
            check = local.checks.get(ident) if local is not None else None
            if check is None:
                return None
            if check.spec.service_id:
                service = local.services.get(check.spec.service_id)
                return ("service", service["Service"]) if service else None
            return ("node", self.config.node)
        store = self._store()
        if store is None:
            return None
        with store.lock:
            if kind == "intention":
                found = next((i for i in store.intentions.values() if i.get("ID") == ident), None)
                return (acl.INTENTION, found["DestinationName"]) if found else None
            if kind == "catalog_service":
                node, _, sid = ident.partition("\x00")
                service = store.services.get(node, {}).get(sid)
                return ("service", service["Service"]) if service else None
        return None

    async def _filtered(self, scope: dict[str, Any], receive: Any, send: Any, kind: str, authz: acl.Authorizer,
                        explicit: bool, query: dict[str, list[str]]) -> None:
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            await send_filtered()

        async def send_filtered() -> None:
            body = b"".join(chunks)
            headers = list(start.get("headers") or [])
            status = start.get("status", 200)
            content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            if status == 200 and content_type.startswith(b"application/json") and body:
                try:
                    data = json.loads(body)
                except ValueError:
                    data = None
                else:
                    data, dropped = acl.filter_response(kind, data, authz)
                    if kind == "kv_entries" and data == []:
                        status = 404  # Consul: a recurse that finds nothing visible is a 404
                    pretty = "pretty" in query
                    body = json.dumps(data, indent=4 if pretty else None, separators=None if pretty else (",", ":")).encode()
                    if status == 404:
                        body = b""
                    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                    headers.append((b"content-length", str(len(body)).encode()))
                    if dropped and explicit:
                        headers.append((b"x-consul-results-filtered-by-acls", b"true"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, capture)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


async def _buffer_body(receive: Any, limit: int) -> tuple[bytes | None, Callable[[], Awaitable[dict[str, Any]]]]:
    """Read the whole request body (bounded) and give back a `receive` that replays it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None, receive
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


# -- /v1/acl/* -------------------------------------------------------------------------------------------


class ACLAPI:
    """The ACL endpoints, served by servers. Writes are Raft commands carrying hashes only."""

    def __init__(self, runtime: Any, resolver_of: Callable[[], Any]) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.resolver_of = resolver_of

    @property
    def log(self) -> Any:
        server = self.runtime.server
        if server is None or server.log is None:
            raise APIError("No cluster leader", 500)
        return server.log

    def _enabled(self) -> None:
        if not self.config.acl_enabled:
            raise APIError("ACL support disabled", 401)

    def _tables(self) -> tuple[dict[str, Any], dict[str, str], dict[str, Any], dict[str, Any]]:
        return self.log.store.acl_tables()

    def _index(self) -> int:
        return self.log.store.table_index.get("acl", 0) or self.log.store.index

    def public_token(self, token: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
        out = {
            "AccessorID": token["AccessorID"],
            "SecretID": secret if secret is not None else (acl.ANONYMOUS_SECRET if token["AccessorID"] == acl.ANONYMOUS_ACCESSOR_ID
                                                           else HIDDEN),
            "Description": token.get("Description", ""),
            "Policies": list(token.get("Policies") or []),
            "Roles": list(token.get("Roles") or []),
            "ServiceIdentities": list(token.get("ServiceIdentities") or []),
            "NodeIdentities": list(token.get("NodeIdentities") or []),
            "Local": bool(token.get("Local")),
            "CreateTime": token.get("CreateTime", ""),
            "Hash": token["SecretHash"][:16],
            "CreateIndex": token["CreateIndex"],
            "ModifyIndex": token["ModifyIndex"],
        }
        for empty in ("Roles", "ServiceIdentities", "NodeIdentities"):
            if not out[empty]:
                del out[empty]
        if token.get("ExpirationTime"):
            out["ExpirationTime"] = _now_iso(token["ExpirationTime"])
        return out

    # -- bootstrap and tokens --

    async def bootstrap(self, request: Request) -> Response:
        self._enabled()
        body = decode_body(await read_body(request), BOOTSTRAP_BODY)
        secret = body.get("BootstrapSecret") or str(uuid.uuid4())
        now = time.time()
        token = {
            "AccessorID": str(uuid.uuid4()), "SecretHash": hash_secret(secret),
            "Description": "Bootstrap Token (Global Management)",
            "Policies": [{"ID": acl.MANAGEMENT_POLICY_ID}], "Local": False, "CreateTime": _now_iso(now),
        }
        command = new_command(
            "acl_bootstrap", Token=token,
            ManagementPolicy={"ID": acl.MANAGEMENT_POLICY_ID, "Name": acl.MANAGEMENT_POLICY_NAME,
                              "Description": "Builtin Policy that grants unlimited access", "Rules": "", "Builtin": True},
            Anonymous={"AccessorID": acl.ANONYMOUS_ACCESSOR_ID, "SecretHash": hash_secret(acl.ANONYMOUS_SECRET),
                       "Description": "Anonymous Token", "Policies": [], "Local": False, "CreateTime": _now_iso(now)},
        )
        try:
            record = await self.log.submit(command)
        except APIError as exc:
            if exc.status == 403:
                raise APIError(f"Permission denied: {exc.message}", 403) from None
            raise
        return json_response(self.public_token(record, secret), index=record["ModifyIndex"])

    def _token_command(self, body: dict[str, Any], accessor: str, create: bool) -> tuple[dict[str, Any], str | None]:
        secret: str | None = None
        token: dict[str, Any] = {
            "AccessorID": accessor,
            "Description": body.get("Description", ""),
            "Policies": body.get("Policies", []),
            "Roles": body.get("Roles", []),
            "ServiceIdentities": [s for s in body.get("ServiceIdentities", []) if s.get("ServiceName")],
            "NodeIdentities": [n for n in body.get("NodeIdentities", []) if n.get("NodeName")],
            "Local": bool(body.get("Local")),
        }
        if create:
            secret = body.get("SecretID") or str(uuid.uuid4())
            token["SecretHash"] = hash_secret(secret)
            now = time.time()
            token["CreateTime"] = _now_iso(now)
            ttl = body.get("ExpirationTTL")
            if ttl:
                try:
                    seconds = parse_duration(ttl) if isinstance(ttl, str) else float(ttl) / 1e9
                except (DurationError, ValueError):
                    raise BadRequest(f"Invalid ExpirationTTL {ttl!r}") from None
                if seconds < 60 or seconds > 24 * 3600:
                    raise BadRequest("Token Expiration TTL must be between 1 minute and 24 hours")
                token["ExpirationTime"] = now + seconds
            elif body.get("ExpirationTime"):
                try:
                    token["ExpirationTime"] = datetime.fromisoformat(str(body["ExpirationTime"]).replace("Z", "+00:00")).timestamp()
                except ValueError:
                    raise BadRequest(f"Invalid ExpirationTime {body['ExpirationTime']!r}") from None
        elif body.get("SecretID"):
            tokens, secrets, _, _ = self._tables()
            if secrets.get(hash_secret(body["SecretID"])) != accessor:
                raise BadRequest("Cannot change the SecretID of a token")
        return token, secret

    async def token_create(self, request: Request) -> Response:
        self._enabled()
        body = decode_body(await read_body(request), TOKEN_BODY)
        accessor = body.get("AccessorID") or str(uuid.uuid4())
        if not _is_uuid(accessor) or (body.get("SecretID") and not _is_uuid(body["SecretID"])):
            raise BadRequest("AccessorID and SecretID must be UUIDs")
        token, secret = self._token_command(body, accessor, create=True)
        record = await self.log.submit(new_command("acl_token_set", Token=token, Create=True))
        return json_response(self.public_token(record, secret), index=record["ModifyIndex"])

    async def token_self(self, request: Request) -> Response:
        self._enabled()
        query = parse_qs(request.url.query, keep_blank_values=True)
        secret = token_from_scope(request.scope, query) or self.config.acl_token or ""
        found = self.resolver_of().rules_for(secret)
        if found is None:
            raise APIError("ACL not found", 403)
        tokens, secrets, _, _ = self._tables()
        token = tokens.get(found[1])
        if token is None:
            raise APIError("ACL not found", 403)
        return json_response(self.public_token(token, secret), index=self._index())

    async def token_by_id(self, request: Request) -> Response:
        self._enabled()
        accessor = request.path_params["id"]
        tokens, _, _, _ = self._tables()
        if request.method == "GET":
            token = tokens.get(accessor)
            if token is None:
                raise APIError("ACL not found", 403)
            return json_response(self.public_token(token), index=self._index())
        if request.method == "DELETE":
            await self.log.submit(new_command("acl_token_delete", AccessorID=accessor, Anonymous=acl.ANONYMOUS_ACCESSOR_ID))
            return json_response(True)
        body = decode_body(await read_body(request), TOKEN_BODY)
        if body.get("AccessorID") and body["AccessorID"] != accessor:
            raise BadRequest("AccessorID in the body does not match the URL")
        token, _ = self._token_command(body, accessor, create=False)
        record = await self.log.submit(new_command("acl_token_set", Token=token, Create=False))
        return json_response(self.public_token(record), index=record["ModifyIndex"])

    async def token_clone(self, request: Request) -> Response:
        self._enabled()
        tokens, _, _, _ = self._tables()
        source = tokens.get(request.path_params["id"])
        if source is None:
            raise APIError("ACL not found", 403)
        body = decode_body(await read_body(request), TOKEN_BODY)
        clone = {k: source.get(k) for k in ("Policies", "Roles", "ServiceIdentities", "NodeIdentities", "Local")}
        clone["Description"] = body.get("Description") or source.get("Description", "")
        token, secret = self._token_command(clone, str(uuid.uuid4()), create=True)
        record = await self.log.submit(new_command("acl_token_set", Token=token, Create=True))
        return json_response(self.public_token(record, secret), index=record["ModifyIndex"])

    async def token_list(self, request: Request) -> Response:
        self._enabled()
        tokens, _, _, _ = self._tables()
        policy = request.query_params.get("policy")
        role = request.query_params.get("role")
        out = []
        for token in sorted(tokens.values(), key=lambda t: t["CreateIndex"]):
            if policy and all(p["ID"] != policy for p in token.get("Policies") or []):
                continue
            if role and all(r["ID"] != role for r in token.get("Roles") or []):
                continue
            out.append(self.public_token(token))
        return json_response(out, index=self._index())

    # -- policies --

    def _policy_body(self, raw: bytes) -> dict[str, Any]:
        body = decode_body(raw, POLICY_BODY)
        rules = body.get("Rules") or ""
        if isinstance(rules, dict):  # JSON rules given as an object
            rules = json.dumps(rules)
        if not isinstance(rules, str):
            raise BadRequest("Rules must be a string (HCL or JSON)")
        if rules.strip().startswith('"'):  # py-consul json.dumps() an HCL string
            try:
                rules = json.loads(rules)
            except ValueError:
                pass
        try:
            acl.parse_rules(rules)
        except acl.ACLRuleError as exc:
            raise BadRequest(f"Invalid Policy: {exc}") from None
        name = body.get("Name", "")
        if not name or len(name) > 128 or not all(c.isalnum() or c in "-_" for c in name):
            raise BadRequest("Invalid Policy: invalid Name: only alphanumerics, '-' and '_', 1-128 characters")
        return {"Name": name, "Description": body.get("Description", ""), "Rules": rules,
                "Datacenters": body.get("Datacenters", []), "ID": body.get("ID", "")}

    def public_policy(self, policy: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in policy.items() if k != "Builtin"} | {
            "Hash": hashlib.sha256((policy.get("Rules") or "").encode()).hexdigest()[:16]
        }

    async def policy_create(self, request: Request) -> Response:
        self._enabled()
        policy = self._policy_body(await read_body(request))
        policy["ID"] = str(uuid.uuid4())
        record = await self.log.submit(new_command("acl_policy_set", Policy=policy, Create=True))
        return json_response(self.public_policy(record), index=record["ModifyIndex"])

    async def policy_by_id(self, request: Request) -> Response:
        self._enabled()
        policy_id = request.path_params["id"]
        _, _, policies, _ = self._tables()
        if request.method == "GET":
            if policy_id not in policies:
                raise APIError("ACL not found", 403)
            return json_response(self.public_policy(policies[policy_id]), index=self._index())
        if request.method == "DELETE":
            await self.log.submit(new_command("acl_policy_delete", ID=policy_id))
            return json_response(True)
        policy = self._policy_body(await read_body(request))
        if policy["ID"] and policy["ID"] != policy_id:
            raise BadRequest("Policy ID in the body does not match the URL")
        policy["ID"] = policy_id
        record = await self.log.submit(new_command("acl_policy_set", Policy=policy, Create=False))
        return json_response(self.public_policy(record), index=record["ModifyIndex"])

    async def policy_by_name(self, request: Request) -> Response:
        self._enabled()
        _, _, policies, _ = self._tables()
        found = next((p for p in policies.values() if p["Name"] == request.path_params["name"]), None)
        if found is None:
            raise APIError("ACL not found", 403)
        return json_response(self.public_policy(found), index=self._index())

    async def policy_list(self, request: Request) -> Response:
        self._enabled()
        _, _, policies, _ = self._tables()
        out = [{k: v for k, v in self.public_policy(p).items() if k != "Rules"}
               for p in sorted(policies.values(), key=lambda p: p["CreateIndex"])]
        return json_response(out, index=self._index())

    # -- roles --

    def _role_body(self, raw: bytes) -> dict[str, Any]:
        body = decode_body(raw, ROLE_BODY)
        name = body.get("Name", "")
        if not name or len(name) > 256 or not all(c.isalnum() or c in "-_" for c in name):
            raise BadRequest("Invalid Role: invalid Name: only alphanumerics, '-' and '_'")
        return {"ID": body.get("ID", ""), "Name": name, "Description": body.get("Description", ""),
                "Policies": body.get("Policies", []),
                "ServiceIdentities": [s for s in body.get("ServiceIdentities", []) if s.get("ServiceName")],
                "NodeIdentities": [n for n in body.get("NodeIdentities", []) if n.get("NodeName")]}

    async def role_create(self, request: Request) -> Response:
        self._enabled()
        role = self._role_body(await read_body(request))
        role["ID"] = str(uuid.uuid4())
        record = await self.log.submit(new_command("acl_role_set", Role=role, Create=True))
        return json_response(record, index=record["ModifyIndex"])

    async def role_by_id(self, request: Request) -> Response:
        self._enabled()
        role_id = request.path_params["id"]
        _, _, _, roles = self._tables()
        if request.method == "GET":
            if role_id not in roles:
                raise APIError("ACL not found", 403)
            return json_response(roles[role_id], index=self._index())
        if request.method == "DELETE":
            await self.log.submit(new_command("acl_role_delete", ID=role_id))
            return json_response(True)
        role = self._role_body(await read_body(request))
        role["ID"] = role_id
        record = await self.log.submit(new_command("acl_role_set", Role=role, Create=False))
        return json_response(record, index=record["ModifyIndex"])

    async def role_by_name(self, request: Request) -> Response:
        self._enabled()
        _, _, _, roles = self._tables()
        found = next((r for r in roles.values() if r["Name"] == request.path_params["name"]), None)
        if found is None:
            raise APIError("ACL not found", 403)
        return json_response(found, index=self._index())

    async def role_list(self, request: Request) -> Response:
        self._enabled()
        _, _, _, roles = self._tables()
        return json_response(sorted(roles.values(), key=lambda r: r["CreateIndex"]), index=self._index())

    # -- for client agents --

    async def authorizer(self, request: Request) -> Response:
        """What the caller's own token may do, for client agents' enforcement of /v1/agent/*."""
        if not self.config.acl_enabled:
            raise APIError("ACL support disabled", 401)
        query = parse_qs(request.url.query, keep_blank_values=True)
        secret = token_from_scope(request.scope, query) or ""
        found = self.resolver_of().rules_for(secret)
        if found is None:
            raise APIError("ACL not found", 403)
        rules, accessor, anonymous = found
        return json_response({"AccessorID": accessor, "Anonymous": anonymous, "Rules": rules.to_json()})

    def routes(self) -> list[Route]:
        g = guarded
        return [
            Route("/v1/acl/bootstrap", g(self.bootstrap), methods=["PUT"]),
            Route("/v1/acl/token", g(self.token_create), methods=["PUT"]),
            Route("/v1/acl/token/self", g(self.token_self), methods=["GET"]),
            Route("/v1/acl/token/{id}/clone", g(self.token_clone), methods=["PUT"]),
            Route("/v1/acl/token/{id}", g(self.token_by_id), methods=["GET", "PUT", "DELETE"]),
            Route("/v1/acl/tokens", g(self.token_list), methods=["GET"]),
            Route("/v1/acl/policy", g(self.policy_create), methods=["PUT"]),
            Route("/v1/acl/policy/name/{name}", g(self.policy_by_name), methods=["GET"]),
            Route("/v1/acl/policy/{id}", g(self.policy_by_id), methods=["GET", "PUT", "DELETE"]),
            Route("/v1/acl/policies", g(self.policy_list), methods=["GET"]),
            Route("/v1/acl/role", g(self.role_create), methods=["PUT"]),
            Route("/v1/acl/role/name/{name}", g(self.role_by_name), methods=["GET"]),
            Route("/v1/acl/role/{id}", g(self.role_by_id), methods=["GET", "PUT", "DELETE"]),
            Route("/v1/acl/roles", g(self.role_list), methods=["GET"]),
            Route("/v1/internal/acl/authorizer", g(self.authorizer), methods=["GET"]),
        ]


# -- wiring ------------------------------------------------------------------------------------------------


def agent_token_route(runtime: Any) -> Route:
    """PUT /v1/agent/token/{type}: set the agent's tokens at runtime (in memory), as Consul does."""

    async def handler(request: Request) -> Response:
        config = runtime.config
        if not config.acl_enabled:
            return PlainTextResponse("ACL support disabled", status_code=401)
        kind = request.path_params["type"]
        body = decode_body(await read_body(request), Struct("Token", {"Token": Str()}, lenient=frozenset({"AccessorID"})))
        token = body.get("Token", "")
        if kind in ("default", "acl_token"):
            config.acl_token = token
        elif kind in ("agent", "acl_agent_token"):
            config.acl_agent_token = token
            apply_agent_token(runtime)
        elif kind in ("agent_recovery", "acl_agent_master_token", "replication", "acl_replication_token",
                      "config_file_service_registration"):
            pass  # accepted for compatibility; nothing here uses them
        else:
            raise NotFound(f"Token {kind!r} is unknown")
        return Response(b"", status_code=200)

    return Route("/v1/agent/token/{type:path}", guarded(handler), methods=["PUT"])


def apply_agent_token(runtime: Any) -> None:
    """Our own calls to servers (anti-entropy, heartbeats, forwarding between servers) carry the agent token."""
    token = runtime.config.acl_agent_token or runtime.config.acl_token
    clients: list[httpx.AsyncClient] = []
    pool = getattr(runtime.local, "pool", None)
    if pool is not None:
        clients.append(pool.client)
    server = runtime.server
    if server is not None and getattr(server, "http", None) is not None:
        clients.append(server.http)
    for client in clients:
        if token:
            client.headers["X-Consul-Token"] = token
        else:
            client.headers.pop("X-Consul-Token", None)


def mount(app: Any, runtime: Any) -> Any:
    """Add the ACL routes and wrap `app` in the enforcing middleware. Returns the new ASGI app."""
    middleware = ACLMiddleware(app, runtime)
    routes = [agent_token_route(runtime)]
    if runtime.config.server:
        api = ACLAPI(runtime, lambda: middleware.resolver)
        routes += api.routes()
    else:
        routes.append(Route("/v1/acl/{rest:path}", guarded(_lazy_forward(runtime)), methods=["GET", "PUT", "POST", "DELETE"]))
    # Ours go first: the local agent's own /v1/agent/token route only knows "ACLs are disabled".
    runtime.app.router.routes[:0] = routes
    _watch_for_pool(runtime)
    return middleware


def _lazy_forward(runtime: Any) -> Callable[[Request], Awaitable[Response]]:
    async def forward(request: Request) -> Response:
        pool = getattr(runtime.local, "pool", None)
        if pool is None:
            raise APIError("No known Consul servers", 500)
        from lictor.agent.local import forwarding_route

        return await forwarding_route(pool)(request)

    return forward


def _watch_for_pool(runtime: Any) -> None:
    """The local agent (and its server pool) is built after us: apply the agent token once it is."""

    async def wait() -> None:
        apply_agent_token(runtime)
        for _ in range(1200):
            if runtime.local is not None:
                break
            await asyncio.sleep(0.1)
        apply_agent_token(runtime)

    try:
        asyncio.get_running_loop().create_task(wait())
    except RuntimeError:  # no loop: nothing to wait for
        apply_agent_token(runtime)
