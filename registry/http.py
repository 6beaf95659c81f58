"""Consul's catalog, health, KV, txn, status and operator endpoints, served by every server.

The handlers are thin: decode and validate the request, propose a command or read a view,
shape the answer. Writes are acknowledged only once committed and applied.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from lictor.decode import (
    AnyValue,
    Bool,
    Int,
    ListOf,
    MapOf,
    Str,
    Struct,
    check_name,
    decode_body,
    parse_json_body,
)
from lictor.errors import APIError, BadRequest, PayloadTooLarge
from lictor.httpapi import (
    QueryOptions,
    blocking,
    empty_ok,
    guarded,
    json_response,
    node_meta_filters,
    query_bool,
    query_int,
    query_options,
    read_body,
)
from lictor.registry import views
from lictor.registry.raft import ConsensusLog, new_command

KV_MAX_VALUE = 512 * 1024
SNAPSHOT_MAX = 256 * 1024 * 1024
KV_MAX_KEY = 2048
CHECK_STATUSES = ("passing", "warning", "critical")

# -- request shapes -----------------------------------------------------------------------------

WEIGHTS = Struct("Weights", {"Passing": Int(), "Warning": Int()})
SERVICE_ADDRESS = Struct("ServiceAddress", {"Address": Str(), "Port": Int()})
CATALOG_SERVICE = Struct(
    "AgentService",
    {
        "ID": Str(),
        "Service": Str(),
        "Tags": ListOf(Str()),
        "Address": Str(),
        "TaggedAddresses": MapOf(SERVICE_ADDRESS),
        "Meta": MapOf(Str()),
        "Port": Int(),
        "SocketPath": Str(),
        "Kind": Str(),
        # Objects, not any JSON: the connect views read fields of them (a list here made every
        # /v1/catalog/connect and /v1/health/connect read a 500).
        "Proxy": MapOf(AnyValue()),
        "Connect": MapOf(AnyValue()),
        "Weights": WEIGHTS,
        "EnableTagOverride": Bool(),
        "Locality": AnyValue(),
    },
    aliases={"enable_tag_override": "EnableTagOverride", "tagged_addresses": "TaggedAddresses"},
    lenient=frozenset({"Namespace", "Partition", "Datacenter", "PeerName", "CreateIndex", "ModifyIndex"}),
)
CATALOG_CHECK = Struct(
    "HealthCheck",
    {
        "Node": Str(),
        "CheckID": Str(),
        "Name": Str(),
        "Status": Str(),
        "Notes": Str(),
        "Output": Str(),
        "ServiceID": Str(),
        "ServiceName": Str(),
        "ServiceTags": ListOf(Str()),
        "Type": Str(),
        "Interval": Str(),
        "Timeout": Str(),
        "Definition": AnyValue(),
    },
    aliases={"ID": "CheckID", "service_id": "ServiceID"},
    lenient=frozenset({"Namespace", "Partition", "PeerName", "ExposedPort", "CreateIndex", "ModifyIndex"}),
)
CATALOG_REGISTER = Struct(
    "RegisterRequest",
    {
        "ID": Str(),
        "Node": Str(),
        "Address": Str(),
        "Datacenter": Str(),
        "TaggedAddresses": MapOf(Str()),
        "NodeMeta": MapOf(Str()),
        "Service": CATALOG_SERVICE,
        "Check": CATALOG_CHECK,
        "Checks": ListOf(CATALOG_CHECK),
        "SkipNodeUpdate": Bool(),
    },
    aliases={"node_meta": "NodeMeta", "tagged_addresses": "TaggedAddresses", "skip_node_update": "SkipNodeUpdate"},
    lenient=frozenset({"WriteRequest", "Token", "Namespace", "Partition", "Locality", "PeerName"}),
)
CATALOG_DEREGISTER = Struct(
    "DeregisterRequest",
    {"Node": Str(), "Datacenter": Str(), "ServiceID": Str(), "CheckID": Str()},
    aliases={"service_id": "ServiceID", "check_id": "CheckID"},
    lenient=frozenset({"WriteRequest", "Token", "Namespace", "Partition", "PeerName"}),
)
TXN_KV = Struct(
    "KVTxnOp",
    {"Verb": Str(), "Key": Str(), "Value": AnyValue(), "Flags": Int(), "Index": Int(), "Session": Str()},
    lenient=frozenset({"Namespace", "Partition"}),
)
TXN_OP = Struct("TxnOp", {"KV": TXN_KV}, lenient=frozenset({"Node", "Service", "Check", "Session"}))
TXN_VERBS = {"set", "cas", "get", "get-tree", "check-index", "check-not-exists", "delete", "delete-tree", "delete-cas"}


def normalize_service(service: dict[str, Any], what: str = "Service") -> dict[str, Any]:
    """Consul's defaults for a stored service record, and validation of its fields."""
    name = service.get("Service", "")
    service_id = service.get("ID") or name
    if not name:
        if service.get("ID"):
            raise BadRequest("Must provide service name (Service.Service) when service ID is provided")
        raise BadRequest(f"Missing service name ({what}.Service)")
    check_name(name, "service name")
    check_name(service_id, "service ID")
    port = service.get("Port", 0)
    if not 0 <= port <= 65535:
        raise BadRequest(f"Invalid {what}.Port {port}: must be between 0 and 65535")
    address = service.get("Address", "")
    check_name(address, "service address")
    if address in ("0.0.0.0", "::", "[::]"):
        raise BadRequest("Invalid service address")
    for tag in service.get("Tags", []):
        check_name(tag, "service tag")
    for key in service.get("Meta", {}):
        if not key or len(key) > 128:
            raise BadRequest(f"Invalid Service Meta: key {key!r} must be 1-128 characters")
        check_name(key, "service meta key")
    weights = service.get("Weights") or {"Passing": 1, "Warning": 1}
    weights = {"Passing": weights.get("Passing", 1), "Warning": weights.get("Warning", 1)}
    if weights["Passing"] < 1 or weights["Warning"] < 0:
        raise BadRequest("Invalid Weights: Passing must be >= 1 and Warning >= 0")
    tagged = dict(service.get("TaggedAddresses") or {})
    record = {
        "ID": service_id,
        "Service": name,
        "Tags": list(service.get("Tags") or []),
        "Address": address,
        "TaggedAddresses": tagged,
        "Meta": dict(service.get("Meta") or {}),
        "Port": port,
        "Weights": weights,
        "EnableTagOverride": bool(service.get("EnableTagOverride", False)),
        "Kind": service.get("Kind", ""),
        "Proxy": service.get("Proxy") or {},
        "Connect": service.get("Connect") or {},
    }
    for optional in ("SocketPath", "Locality"):
        if service.get(optional):
            record[optional] = service[optional]
    return record


def normalize_catalog_check(check: dict[str, Any], node: str) -> dict[str, Any]:
    check_id = check.get("CheckID") or check.get("Name", "")
    if not check_id:
        raise BadRequest("Invalid check: missing CheckID and Name")
    check_name(check_id, "check ID")
    status = check.get("Status") or "critical"
    if status not in CHECK_STATUSES:
        raise BadRequest(f"Invalid check status {status!r}: must be passing, warning or critical")
    if check.get("Node") and check["Node"] != node:
        raise BadRequest(f"Check node {check['Node']!r} does not match the registration's node {node!r}")
    definition = check.get("Definition") or {}
    kind = check.get("Type", "")
    if not kind and isinstance(definition, dict):
        for field_name, type_name in (("HTTP", "http"), ("TCP", "tcp"), ("GRPC", "grpc"), ("UDP", "udp")):
            if definition.get(field_name):
                kind = type_name
                break
    return {
        "CheckID": check_id,
        "Name": check.get("Name") or check_id,
        "Status": status,
        "Notes": check.get("Notes", ""),
        "Output": check.get("Output", ""),
        "ServiceID": check.get("ServiceID", ""),
        "Type": kind,
        "Interval": check.get("Interval", ""),
        "Timeout": check.get("Timeout", ""),
        "Definition": definition if isinstance(definition, dict) else {},
    }


def decode_catalog_register(raw: bytes) -> dict[str, Any]:
    body = decode_body(raw, CATALOG_REGISTER)
    node = body.get("Node", "")
    if not node:
        raise BadRequest("Must provide node")
    check_name(node, "node name")
    if not body.get("SkipNodeUpdate"):
        if not body.get("Address"):
            raise BadRequest("Must provide address if SkipNodeUpdate is not set")
        check_name(body["Address"], "node address")
    command: dict[str, Any] = {
        "ID": body.get("ID", ""),
        "Node": node,
        "Address": body.get("Address", ""),
        "Datacenter": body.get("Datacenter", ""),
        "TaggedAddresses": body.get("TaggedAddresses", {}),
        "NodeMeta": body.get("NodeMeta", {}),
        "SkipNodeUpdate": body.get("SkipNodeUpdate", False),
    }
    if body.get("Service"):
        command["Service"] = normalize_service(body["Service"])
    checks = ([body["Check"]] if body.get("Check") else []) + list(body.get("Checks", []))
    command["Checks"] = [normalize_catalog_check(c, node) for c in checks]
    return command


def encode_kv_value(raw: bytes) -> str | None:
    return base64.b64encode(raw).decode() if raw else None


# -- the application ----------------------------------------------------------------------------


@dataclass
class ServerInfo:
    node_name: str
    datacenter: str
    http_addr: str
    raft_addr: str
    server: bool = True
    version: str = "0.1.0"
    extra_members: Callable[[], list[dict[str, Any]]] = field(default=lambda: [])


class RegistryAPI:
    """Routes that read and write the replicated state. `log` is the consensus log."""

    def __init__(self, log: ConsensusLog, info: ServerInfo) -> None:
        self.log = log
        self.store = log.store
        self.info = info

    # -- helpers --------------------------------------------------------------------------------

    def _check_dc(self, request: Request) -> None:
        dc = request.query_params.get("dc")
        if dc and dc != self.info.datacenter:
            raise APIError(f"No path to datacenter {dc!r}", 500)

    def meta_headers(self, opts: QueryOptions | None = None) -> dict[str, str]:
        consistency = "leader"
        if opts is not None and opts.consistent:
            consistency = "consistent"
        elif opts is not None and opts.stale:
            consistency = "stale"
        return {
            "X-Consul-KnownLeader": "true" if self.log.leader() else "false",
            "X-Consul-LastContact": str(self.log.last_contact_ms()),
            "X-Consul-Effective-Consistency": consistency,
        }

    async def _read_entry(self, request: Request, view: Callable[..., tuple[int, Any]], *args: Any,
                          as_body: bool = False, **kwargs: Any) -> tuple[QueryOptions, views.SharedRead]:
        self._check_dc(request)
        opts = query_options(request)
        if opts.consistent:
            await self.log.barrier()
        elif not opts.stale and self.log.leader() is None:
            # Default consistency needs a leader; `?stale` is how a client says it doesn't.
            raise APIError("No cluster leader", 500)

        def read() -> tuple[int, views.SharedRead]:
            entry = views.read_shared_entry(self.store, view, *args, as_body=as_body, **kwargs)
            return entry.index, entry

        stamp = views.stamp_function(self.store, view, *args, **kwargs) if opts.index else None
        _index, entry = await blocking(opts, self.log.feed, read, stamp)
        return opts, entry

    async def _read(self, request: Request, view: Callable[..., tuple[int, Any]], *args: Any, **kwargs: Any):
        """A view's (shared, read-only) data for handlers that reshape it before answering."""
        opts, entry = await self._read_entry(request, view, *args, **kwargs)
        return opts, entry.index, entry.data

    async def _read_reply(self, request: Request, view: Callable[..., tuple[int, Any]], *args: Any,
                          filterable: bool = True, **kwargs: Any) -> Response:
        """Answer with a view as it is: the cached JSON body unless `?filter` or `?pretty` reshape it."""
        opts, entry = await self._read_entry(request, view, *args, as_body=True, **kwargs)
        filtering = filterable and request.query_params.get("filter")
        if filtering or "pretty" in request.query_params:
            data = self._filter(request, entry.data) if filtering else entry.data
            return self._reply(request, data, entry.index, opts)
        headers = self.meta_headers(opts)
        headers["X-Consul-Index"] = str(entry.index)
        return Response(entry.body(), media_type="application/json", headers=headers)

    def _reply(self, request: Request, data: Any, index: int, opts: QueryOptions, status: int = 200) -> Response:
        return json_response(
            data, status=status, index=index, headers=self.meta_headers(opts), pretty="pretty" in request.query_params
        )

    async def _write(self, command: dict[str, Any]) -> Any:
        return await self.log.submit(command)

    # -- catalog ----------------------------------------------------------------------------------

    async def catalog_register(self, request: Request) -> Response:
        self._check_dc(request)
        command = decode_catalog_register(await read_body(request))
        command["Datacenter"] = command.get("Datacenter") or self.info.datacenter
        if "node-meta" in request.query_params:
            command["NodeMeta"] = dict(command["NodeMeta"]) | dict(node_meta_filters(request))
        await self._write(new_command("register", **command))
        return json_response(True)

    async def catalog_deregister(self, request: Request) -> Response:
        self._check_dc(request)
        body = decode_body(await read_body(request), CATALOG_DEREGISTER)
        if not body.get("Node"):
            raise BadRequest("Must provide node")
        await self._write(
            new_command("deregister", Node=body["Node"], ServiceID=body.get("ServiceID", ""), CheckID=body.get("CheckID", ""))
        )
        return json_response(True)

    async def catalog_datacenters(self, request: Request) -> Response:
        return json_response([self.info.datacenter])

    async def catalog_nodes(self, request: Request) -> Response:
        return await self._read_reply(request, views.catalog_nodes, node_meta_filters(request))

    async def catalog_services(self, request: Request) -> Response:
        return await self._read_reply(request, views.catalog_services, node_meta_filters(request), filterable=False)

    async def catalog_service(self, request: Request) -> Response:
        name = request.path_params["name"]
        tags = request.query_params.getlist("tag")
        return await self._read_reply(request, views.catalog_service, name, tags, node_meta_filters(request))

    async def catalog_connect(self, request: Request) -> Response:
        return await self._read_reply(request, views.catalog_connect, request.path_params["name"])

    async def catalog_node(self, request: Request) -> Response:
        return await self._read_reply(request, views.catalog_node, request.path_params["node"], filterable=False)

    # -- health -----------------------------------------------------------------------------------

    async def health_service(self, request: Request, connect: bool = False) -> Response:
        name = request.path_params["name"]
        passing = query_bool(request, "passing")
        if request.query_params.get("peer"):
            return json_response([], index=1, headers=self.meta_headers())
        return await self._read_reply(
            request,
            views.health_service_entries,
            name,
            passing=passing,
            tags=request.query_params.getlist("tag"),
            node_meta=node_meta_filters(request),
            connect=connect,
        )

    async def health_connect(self, request: Request) -> Response:
        return await self.health_service(request, connect=True)

    async def health_checks(self, request: Request) -> Response:
        return await self._read_reply(request, views.health_checks, request.path_params["name"])

    async def health_state(self, request: Request) -> Response:
        state = request.path_params["state"]
        if state not in ("any", "passing", "warning", "critical"):
            raise BadRequest(f"Invalid check state {state!r}: must be any, passing, warning or critical")
        return await self._read_reply(request, views.health_state, state)

    async def health_state_missing(self, request: Request) -> Response:
        raise BadRequest("Missing check state")

    async def health_node(self, request: Request) -> Response:
        return await self._read_reply(request, views.health_node, request.path_params["node"])

    def _filter(self, request: Request, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        expression = request.query_params.get("filter")
        if not expression:
            return items
        try:
            from lictor.bexpr import evaluate_filter
        except ImportError:  # pragma: no cover - bexpr lands separately
            raise BadRequest("filter expressions are not supported yet") from None
        return evaluate_filter(expression, items)

    # -- KV ---------------------------------------------------------------------------------------

    def _kv_key(self, request: Request) -> str:
        key = request.path_params.get("key", "")
        if len(key) > KV_MAX_KEY:
            raise BadRequest(f"Key too long: {len(key)} characters exceeds {KV_MAX_KEY}")
        if any(ord(c) < 0x20 for c in key):
            raise BadRequest("Invalid key: must not contain control characters")
        return key

    async def kv(self, request: Request) -> Response:
        key = self._kv_key(request)
        if request.method == "GET":
            return await self._kv_get(request, key)
        if request.method == "PUT":
            return await self._kv_put(request, key)
        return await self._kv_delete(request, key)

    async def _kv_get(self, request: Request, key: str) -> Response:
        if "keys" in request.query_params:
            separator = request.query_params.get("separator", "")
            opts, index, keys = await self._read(request, views.kv_keys, key, separator)
            if not keys and key:
                return self._reply(request, None, index, opts, status=404)
            return self._reply(request, keys, index, opts)
        if "recurse" in request.query_params:
            opts, index, entries = await self._read(request, views.kv_list, key)
            if not entries:
                return self._reply(request, None, index, opts, status=404)
            return self._reply(request, entries, index, opts)
        if not key:
            raise BadRequest("Missing key name")
        opts, index, entry = await self._read(request, views.kv_get, key)
        if entry is None:
            return Response(b"", status_code=404, headers={"X-Consul-Index": str(index)} | self.meta_headers(opts))
        if "raw" in request.query_params:
            value = base64.b64decode(entry["Value"]) if entry["Value"] else b""
            return Response(value, media_type="text/plain", headers={"X-Consul-Index": str(index)})
        return self._reply(request, [entry], index, opts)

    async def _kv_put(self, request: Request, key: str) -> Response:
        if not key:
            raise BadRequest("Missing key name")
        flags = query_int(request, "flags", 0)
        cas = query_int(request, "cas")
        if "acquire" in request.query_params or "release" in request.query_params:
            raise BadRequest("sessions are not supported yet: ?acquire and ?release are refused")
        if flags is not None and flags >= 2**64:
            raise BadRequest("Invalid value for ?flags: out of range")
        try:
            raw = await read_body(request, KV_MAX_VALUE)
        except PayloadTooLarge:
            raise PayloadTooLarge(
                f"Request body(value) too large: the limit is {KV_MAX_VALUE} bytes (kv_max_value_size)"
            ) from None
        result = await self._write(new_command("kv_set", Key=key, Value=encode_kv_value(raw), Flags=flags, Cas=cas))
        return json_response(bool(result))

    async def _kv_delete(self, request: Request, key: str) -> Response:
        recurse = query_bool(request, "recurse")
        cas = query_int(request, "cas")
        if not key and not recurse:
            raise BadRequest("Missing key name")
        if recurse and cas is not None:
            raise BadRequest("Conflicting flags: cas cannot be used with recurse")
        result = await self._write(new_command("kv_delete", Key=key, Recurse=recurse, Cas=cas))
        return json_response(bool(result))

    async def txn(self, request: Request) -> Response:
        self._check_dc(request)
        data = parse_json_body(await read_body(request))
        if not isinstance(data, list):
            raise BadRequest("Request decode failed: the body must be a JSON array of operations")
        if len(data) > 128:
            raise PayloadTooLarge(f"Transaction contains too many operations ({len(data)} > 128)")
        ops = []
        for i, item in enumerate(data):
            op = TXN_OP.decode(item, f"[{i}]")
            kv = op.get("KV")
            if not kv:
                raise BadRequest(f"Operation {i}: only KV operations are supported")
            verb = kv.get("Verb", "")
            if verb not in TXN_VERBS:
                raise BadRequest(f"Operation {i}: unknown KV verb {verb!r}")
            if verb not in ("delete-tree", "get-tree") and not kv.get("Key"):
                raise BadRequest(f"Operation {i}: missing key")
            value = kv.get("Value")
            if value is not None:
                if not isinstance(value, str):
                    raise BadRequest(f"Operation {i}: Value must be a base64 string")
                try:
                    decoded = base64.b64decode(value, validate=True)
                except ValueError:
                    raise BadRequest(f"Operation {i}: Value is not valid base64") from None
                if len(decoded) > KV_MAX_VALUE:
                    raise PayloadTooLarge(f"Operation {i}: value exceeds {KV_MAX_VALUE} bytes")
                value = value or None
            ops.append({"KV": dict(kv, Value=value)})
        result = await self._write(new_command("txn", Ops=ops))
        status = 409 if result.get("Errors") else 200
        return json_response(result, status=status, index=self.store.index)

    # -- status and operator ------------------------------------------------------------------------

    async def status_leader(self, request: Request) -> Response:
        return json_response(self.log.leader() or "")

    async def status_peers(self, request: Request) -> Response:
        return json_response(self.log.peers())

    def raft_configuration(self) -> dict[str, Any]:
        leader = self.log.leader()
        servers = []
        names = self.server_names()
        for addr in self.log.peers():
            servers.append(
                {
                    "ID": addr,
                    "Node": names.get(addr, {}).get("Node", addr),
                    "Address": addr,
                    "Leader": addr == leader,
                    "Voter": True,
                    "ProtocolVersion": "3",
                }
            )
        status = self.log.status()
        return {"Servers": servers, "Index": status.get("commit_index", 0), "Raft": status}

    def server_names(self) -> dict[str, dict[str, Any]]:
        with self.store.lock:
            return {k.partition("/")[2]: v for k, v in self.store.meta.items() if k.startswith("server/")}

    async def operator_raft_configuration(self, request: Request) -> Response:
        return json_response(self.raft_configuration(), index=self.store.index)

    async def operator_raft_remove_peer(self, request: Request) -> Response:
        address = request.query_params.get("address") or request.query_params.get("id")
        if not address:
            raise BadRequest("Must specify ?address with a Raft peer address (host:port)")
        if address == self.log.leader():
            raise BadRequest(f"{address} is the current leader; transfer leadership first (leave it gracefully)")
        await self.log.remove_peer(address)
        return empty_ok()

    # -- snapshots ----------------------------------------------------------------------------------

    async def snapshot_save(self, request: Request) -> Response:
        """The whole replicated state as JSON (never pickle: a snapshot may come from anyone)."""
        self._check_dc(request)
        if query_bool(request, "consistent") or not query_bool(request, "stale"):
            await self.log.barrier()
        with self.store.lock:
            state = self.store.export()
            index = self.store.index
        body = json.dumps({"Format": "lictor-snapshot", "Version": 1, "Index": index, "State": state})
        return Response(body, media_type="application/json", headers={"X-Consul-Index": str(max(index, 1))})

    async def snapshot_restore(self, request: Request) -> Response:
        self._check_dc(request)
        data = parse_json_body(await read_body(request, SNAPSHOT_MAX), SNAPSHOT_MAX)
        if not isinstance(data, dict) or data.get("Format") != "lictor-snapshot":
            raise BadRequest("Not a Lictor snapshot: expected the JSON written by GET /v1/snapshot")
        if data.get("Version") != 1:
            raise BadRequest(f"Unsupported snapshot version {data.get('Version')!r}")
        await self.log.submit(new_command("restore", State=data.get("State")), timeout=30.0)
        return empty_ok()

    # -- routes -----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        g = guarded
        return [
            Route("/v1/catalog/register", g(self.catalog_register), methods=["PUT"]),
            Route("/v1/catalog/deregister", g(self.catalog_deregister), methods=["PUT"]),
            Route("/v1/catalog/datacenters", g(self.catalog_datacenters), methods=["GET"]),
            Route("/v1/catalog/nodes", g(self.catalog_nodes), methods=["GET"]),
            Route("/v1/catalog/services", g(self.catalog_services), methods=["GET"]),
            Route("/v1/catalog/service/{name:path}", g(self.catalog_service), methods=["GET"]),
            Route("/v1/catalog/connect/{name:path}", g(self.catalog_connect), methods=["GET"]),
            Route("/v1/catalog/node/{node:path}", g(self.catalog_node), methods=["GET"]),
            Route("/v1/health/service/{name:path}", g(self.health_service), methods=["GET"]),
            Route("/v1/health/connect/{name:path}", g(self.health_connect), methods=["GET"]),
            Route("/v1/health/checks/{name:path}", g(self.health_checks), methods=["GET"]),
            Route("/v1/health/state/", g(self.health_state_missing), methods=["GET"]),
            Route("/v1/health/state/{state}", g(self.health_state), methods=["GET"]),
            Route("/v1/health/node/{node:path}", g(self.health_node), methods=["GET"]),
            Route("/v1/kv/{key:path}", g(self.kv), methods=["GET", "PUT", "DELETE"]),
            Route("/v1/txn", g(self.txn), methods=["PUT"]),
            Route("/v1/status/leader", g(self.status_leader), methods=["GET"]),
            Route("/v1/status/peers", g(self.status_peers), methods=["GET"]),
            Route("/v1/operator/raft/configuration", g(self.operator_raft_configuration), methods=["GET"]),
            Route("/v1/operator/raft/peer", g(self.operator_raft_remove_peer), methods=["DELETE"]),
            Route("/v1/snapshot", g(self.snapshot_save), methods=["GET"]),
            Route("/v1/snapshot", g(self.snapshot_restore), methods=["PUT"]),
        ]


def valid_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def text(message: str, status: int = 200) -> Response:
    return PlainTextResponse(message, status_code=status)
