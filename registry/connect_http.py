"""Server-side Connect: the built-in CA, leaf signing, intentions and config entries over HTTP.

Everything random (cluster id, root keys, intention ids) and every timestamp is produced here, on
the proposer, and written into the replicated state as plain data; the state machine only stores
it. The CA lives in `store.meta["ca/state"]` (roots with their private keys, as Consul's built-in
provider keeps them in its Raft state).

Intentions are the source of truth for the `service-intentions` config-entry kind: that kind is
never stored as a config entry, it is derived from the intentions table on read and written as
intention commands, so the two views cannot drift apart.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lictor.config import AgentConfig
from lictor.decode import AnyValue, Bool, Str, Struct, decode_body, parse_json_body
from lictor.durations import DurationError, format_duration, parse_duration
from lictor.errors import APIError, BadRequest, NotFound
from lictor.httpapi import blocking, guarded, json_response, query_bool, query_int, query_options, read_body
from lictor.registry import ca, config_entries, views
from lictor.registry import intentions as ixns
from lictor.registry.http import RegistryAPI, ServerInfo
from lictor.registry.raft import ChangeFeed, ConsensusLog, new_command
from lictor.registry.state import StateStore

log = logging.getLogger("lictor.connect")

CA_KEY = "ca/state"
DEFAULT_ROTATION_PERIOD = 2160 * 3600
DEFAULT_INTERMEDIATE_TTL = 8760 * 3600
MIN_LEAF_TTL = 3600
MAX_LEAF_TTL = 8760 * 3600
LEAF_IDLE_EXPIRY = 72 * 3600  # drop a cached leaf nobody asked for in this long (Consul's cache TTL)

CA_CONFIG_BODY = Struct(
    "CAConfiguration",
    {"Provider": Str(), "Config": AnyValue(), "ForceWithoutCrossSigning": Bool(), "State": AnyValue()},
    lenient=frozenset({"ClusterID", "CreateIndex", "ModifyIndex", "Datacenter"}),
)
_CA_CONFIG_KEYS = {
    k.lower(): k
    for k in (
        "LeafCertTTL", "RotationPeriod", "IntermediateCertTTL", "PrivateKeyType", "PrivateKeyBits",
        "PrivateKey", "RootCert", "RootCertTTL", "CSRMaxPerSecond", "CSRMaxConcurrent",
    )
}
SIGN_BODY = Struct("CASignRequest", {"Service": Str(), "CSR": Str()}, lenient=frozenset({"Datacenter", "Namespace"}))
AUTHORIZE_BODY = Struct(
    "ConnectAuthorizeRequest",
    {"Target": Str(), "ClientCertURI": Str(), "ClientCertSerial": Str()},
    lenient=frozenset({"Namespace", "Partition"}),
)


def _now() -> datetime:
    return datetime.now(UTC)


def _go_duration(seconds: float) -> str:
    """Consul echoes whole hours as "72h"; anything else in Go's long form."""
    if seconds and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return format_duration(seconds)


_ROOT_FIELDS = frozenset(ca.CARoot.__dataclass_fields__)


def _root(raw: dict[str, Any]) -> ca.CARoot:
    """A stored root (which carries bookkeeping such as RotatedAt) as a CARoot."""
    return ca.CARoot(**{k: v for k, v in raw.items() if k in _ROOT_FIELDS})


def _rfc3339_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- pure views over the store (callers hold the lock, via views.read) -------------------------------


def ca_state_view(store: StateStore) -> tuple[int, dict[str, Any] | None]:
    return store.table_index.get("meta", 0), store.meta.get(CA_KEY)


def _intention_index(store: StateStore) -> int:
    return store.table_index.get("intentions", 0)


def service_intentions_entry(store: StateStore, name: str) -> tuple[int, dict[str, Any] | None]:
    found = [i for i in store.intentions.values() if i["DestinationName"] == name]
    return _intention_index(store), _entry_from_intentions(name, found)


def service_intentions_list(store: StateStore) -> tuple[int, list[dict[str, Any]]]:
    by_dest: dict[str, list[dict[str, Any]]] = {}
    for ixn in store.intentions.values():
        by_dest.setdefault(ixn["DestinationName"], []).append(ixn)
    entries = [_entry_from_intentions(d, by_dest[d]) for d in sorted(by_dest)]
    return _intention_index(store), [e for e in entries if e is not None]


def config_snapshot(store: StateStore) -> tuple[int, dict[str, dict[str, dict[str, Any]]]]:
    return store.table_index.get("config", 0), store.config_entries


def _entry_from_intentions(name: str, found: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not found:
        return None
    meta = next((i.get("EntryMeta") for i in found if i.get("EntryMeta")), None)
    # Only legacy (ID-carrying) intentions show Legacy* timestamps in the entry, as in Consul.
    shown = [public_intention(i) if i.get("ID") else
             {k: v for k, v in public_intention(i).items() if k not in ("CreatedAt", "UpdatedAt")} for i in found]
    entry = ixns.config_entry_from_intentions(name, shown, meta=meta)
    entry["CreateIndex"] = min(i["CreateIndex"] for i in found)
    entry["ModifyIndex"] = max(i["ModifyIndex"] for i in found)
    return entry


def public_intention(ixn: dict[str, Any]) -> dict[str, Any]:
    """An intention as the API shows it: no internal bookkeeping keys."""
    out = {k: v for k, v in ixn.items() if k != "EntryMeta"}
    out.setdefault("SourcePartition", "default")
    out.setdefault("DestinationPartition", "default")
    out.setdefault("Permissions", None)
    return out


# -- the leaf cache for this server's own local agent ------------------------------------------------


@dataclass
class CachedLeaf:
    leaf: dict[str, Any]
    root_id: str
    index: int
    issued: float
    renew_at: float
    last_used: float


class ConnectAPI:
    """Routes for Connect (CA, leaves, intentions, authorize) and /v1/config."""

    def __init__(self, log: ConsensusLog, info: ServerInfo, config: AgentConfig) -> None:
        self.log = log
        self.store = log.store
        self.info = info
        self.config = config
        self.reg = RegistryAPI(log, info)  # its read/blocking/consistency helpers
        self.default_allow = config.default_intention_policy != "deny"
        self._bootstrap_lock = asyncio.Lock()
        self._leaves: dict[str, CachedLeaf] = {}
        self._leaf_feed = ChangeFeed()
        self._leaf_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- CA state -------------------------------------------------------------------------------

    def ca_state(self) -> dict[str, Any] | None:
        return views.read(self.store, ca_state_view)[1]

    def _default_ca_config(self) -> dict[str, Any]:
        return {
            "LeafCertTTL": _go_duration(self.config.leaf_cert_ttl or ca.DEFAULT_LEAF_TTL),
            "RotationPeriod": _go_duration(DEFAULT_ROTATION_PERIOD),
            "IntermediateCertTTL": _go_duration(DEFAULT_INTERMEDIATE_TTL),
            "PrivateKeyType": "ec",
            "PrivateKeyBits": 256,
        }

    async def ensure_ca(self) -> dict[str, Any]:
        """The CA state, bootstrapping it if nobody has yet. IfAbsent makes the first writer win."""
        state = self.ca_state()
        if state is not None:
            return state
        async with self._bootstrap_lock:
            state = self.ca_state()
            if state is not None:
                return state
            cluster_id = str(uuid.uuid4())
            trust_domain = f"{cluster_id}.consul"
            ca_config = self._default_ca_config()
            root = await asyncio.to_thread(
                ca.generate_root, trust_domain, ca_config["PrivateKeyType"], ca_config["PrivateKeyBits"], now=_now()
            )
            state = {
                "ClusterID": cluster_id,
                "TrustDomain": trust_domain,
                "ActiveRootID": root.ID,
                "Roots": [asdict(root)],
                "Provider": "consul",
                "Config": ca_config,
                "ForceWithoutCrossSigning": False,
            }
            await self.log.submit(new_command("meta_set", Key=CA_KEY, Value=state, IfAbsent=True))
        state = self.ca_state()
        if state is None:  # pragma: no cover - the write committed, so it is applied here
            raise APIError("CA bootstrap did not take effect", 500)
        return state

    async def _bootstrap_loop(self) -> None:
        """The leader bootstraps the CA right away, so roots exist before anyone asks."""
        while self.ca_state() is None:
            try:
                if self.log.is_leader():
                    await self.ensure_ca()
                    break
            except Exception as exc:  # keep trying: a leader change mid-write is expected
                log.warning("CA bootstrap failed, retrying: %s", getattr(exc, "message", exc))
            await asyncio.sleep(0.5)

    def _start(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (unit tests building routes): start lazily instead
            coro.close()
            return
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    @staticmethod
    def active_root(state: dict[str, Any]) -> ca.CARoot:
        for raw in state["Roots"]:
            if raw["ID"] == state["ActiveRootID"]:
                return _root(raw)
        raise APIError("CA state has no active root", 500)

    @staticmethod
    def roots_json(state: dict[str, Any] | None, index: int) -> dict[str, Any]:
        if state is None:
            return {"ActiveRootID": "", "TrustDomain": "", "Roots": []}
        roots = []
        for raw in state["Roots"]:
            item = _root(raw).to_api()
            item["Active"] = raw["ID"] == state["ActiveRootID"]
            item["CreateIndex"] = index
            item["ModifyIndex"] = index
            roots.append(item)
        return {"ActiveRootID": state["ActiveRootID"], "TrustDomain": state["TrustDomain"], "Roots": roots}

    def leaf_ttl(self, state: dict[str, Any]) -> int:
        try:
            return int(parse_duration(state["Config"].get("LeafCertTTL") or "72h"))
        except DurationError:
            return ca.DEFAULT_LEAF_TTL

    # -- CA endpoints ---------------------------------------------------------------------------

    async def ca_roots(self, request: Request) -> Response:
        await self.ensure_ca()
        pem = query_bool(request, "pem")
        opts, index, state = await self.reg._read(request, ca_state_view)
        data = self.roots_json(state, index)
        if pem:
            chain = "".join(r["RootCert"] + "".join(r["IntermediateCerts"] or []) for r in data["Roots"])
            return Response(chain, media_type="application/pem-certificate-chain",
                            headers={"X-Consul-Index": str(index)} | self.reg.meta_headers(opts))
        return self.reg._reply(request, data, index, opts)

    async def ca_configuration(self, request: Request) -> Response:
        if request.method == "PUT":
            return await self._ca_configuration_put(request)
        await self.ensure_ca()
        opts, index, state = await self.reg._read(request, ca_state_view)
        assert state is not None
        data = {
            "Provider": state["Provider"],
            "Config": dict(state["Config"]),
            "State": None,
            "ForceWithoutCrossSigning": state.get("ForceWithoutCrossSigning", False),
            "CreateIndex": index,
            "ModifyIndex": index,
        }
        return self.reg._reply(request, data, index, opts)

    async def _ca_configuration_put(self, request: Request) -> Response:
        self.reg._check_dc(request)
        body = decode_body(await read_body(request), CA_CONFIG_BODY)
        state = await self.ensure_ca()
        new_state = await asyncio.to_thread(self.plan_ca_update, state, body, _now())
        if new_state is not None:
            await self.log.submit(new_command("meta_set", Key=CA_KEY, Value=new_state))
        return json_response(True)

    def plan_ca_update(self, state: dict[str, Any], body: dict[str, Any], now: datetime) -> dict[str, Any] | None:
        """The new CA state for a configuration PUT (None when nothing changes). Rotates when the
        key type/size changes or another root is supplied: the new root is cross-signed by the old
        one and the old root stays listed, inactive, so leaves it signed keep validating."""
        provider = body.get("Provider") or "consul"
        if provider != "consul":
            raise BadRequest(f"Provider {provider!r} is not supported: only the built-in 'consul' provider is")
        raw = body.get("Config") or {}
        if not isinstance(raw, dict):
            raise BadRequest("Config must be an object")
        given: dict[str, Any] = {}
        for key, value in raw.items():
            canonical = _CA_CONFIG_KEYS.get(str(key).lower())
            if canonical is None:
                raise BadRequest(f"Config: unknown field {key!r}")
            given[canonical] = value
        current = state["Config"]
        # Unspecified settings keep their current values: a PUT of one TTL must not rotate the root.
        merged = {k: given.get(k, current.get(k)) for k in ("LeafCertTTL", "RotationPeriod", "IntermediateCertTTL",
                                                            "PrivateKeyType", "PrivateKeyBits")}
        durations: dict[str, float] = {}
        for key in ("LeafCertTTL", "RotationPeriod", "IntermediateCertTTL"):
            try:
                durations[key] = parse_duration(merged[key])
            except DurationError:
                raise BadRequest(f"Config.{key}: invalid duration {merged[key]!r}") from None
            if isinstance(merged[key], int | float):
                merged[key] = _go_duration(durations[key])
        if durations["LeafCertTTL"] < MIN_LEAF_TTL:
            raise BadRequest("Config.LeafCertTTL must be at least 1h")
        if durations["LeafCertTTL"] > MAX_LEAF_TTL:
            raise BadRequest("Config.LeafCertTTL must be at most 8760h")
        if durations["IntermediateCertTTL"] < 3 * durations["LeafCertTTL"]:
            raise BadRequest(f"Config.IntermediateCertTTL must be at least 3 * LeafCertTTL "
                             f"(>= {_go_duration(3 * durations['LeafCertTTL'])})")
        key_type = merged["PrivateKeyType"]
        if key_type not in ("ec", "rsa"):
            raise BadRequest(f"Config.PrivateKeyType must be 'ec' or 'rsa', got {key_type!r}")
        bits = merged["PrivateKeyBits"]
        if "PrivateKeyType" in given and "PrivateKeyBits" not in given and key_type != current.get("PrivateKeyType"):
            bits = 256 if key_type == "ec" else 2048
        if isinstance(bits, str) and bits.isdigit():
            bits = int(bits)
        allowed = {"ec": (256, 384), "rsa": (2048, 3072, 4096)}[key_type]
        if bits not in allowed:
            raise BadRequest(f"Config.PrivateKeyBits for {key_type} must be one of {list(allowed)}, got {bits!r}")
        merged["PrivateKeyBits"] = bits

        active = self.active_root(state)
        new_root: ca.CARoot | None = None
        if given.get("PrivateKey") or given.get("RootCert"):
            if not (given.get("PrivateKey") and given.get("RootCert")):
                raise BadRequest("Config.PrivateKey and Config.RootCert must be supplied together")
            try:
                supplied = ca.root_from_pem(str(given["RootCert"]), str(given["PrivateKey"]), state["TrustDomain"])
            except ValueError as exc:
                raise BadRequest(f"Config.PrivateKey: {exc}") from None
            if supplied.ID != active.ID:
                new_root = supplied
            merged["PrivateKeyType"], merged["PrivateKeyBits"] = supplied.PrivateKeyType, supplied.PrivateKeyBits
        elif (key_type, bits) != (active.PrivateKeyType, active.PrivateKeyBits):
            new_root = ca.generate_root(state["TrustDomain"], key_type, bits, now=now)

        new_state = copy.deepcopy(state)
        new_state["Config"] = merged
        new_state["ForceWithoutCrossSigning"] = bool(body.get("ForceWithoutCrossSigning"))
        if new_root is not None:
            if any(r["ID"] == new_root.ID for r in state["Roots"]):
                raise BadRequest("Config.RootCert: that root was used before; supply a new one")
            try:
                new_root.IntermediateCerts = [ca.cross_sign(active, new_root, now)]
            except BadRequest:
                if not body.get("ForceWithoutCrossSigning"):
                    raise BadRequest("The old root cannot cross-sign the new one (expired?); "
                                     "set ForceWithoutCrossSigning to rotate anyway") from None
            ts = now.timestamp()
            leaf_ttl = durations["LeafCertTTL"]
            kept = []
            for old in new_state["Roots"]:
                if old["ID"] == active.ID:
                    old["Active"] = False
                    old["RotatedAt"] = ts
                # Keep an inactive root while leaves it signed may still be alive (2 x leaf TTL).
                if old.get("RotatedAt") is None or ts - old["RotatedAt"] < 2 * max(leaf_ttl, self.leaf_ttl(state)):
                    kept.append(old)
            new_state["Roots"] = kept + [asdict(new_root)]
            new_state["ActiveRootID"] = new_root.ID
        if new_state == state:
            return None
        return new_state

    # -- leaves ---------------------------------------------------------------------------------

    def _sign(self, state: dict[str, Any], service: str, csr: str | None = None) -> dict[str, Any]:
        root = self.active_root(state)
        leaf = ca.sign_leaf(root, service, state["TrustDomain"], self.info.datacenter, _now(),
                            ttl_seconds=self.leaf_ttl(state), csr_pem=csr)
        out = leaf.to_api()
        if csr is not None:
            out.pop("PrivateKeyPEM", None)
        return out

    async def internal_sign(self, request: Request) -> Response:
        """What client agents call to get a leaf signed: `{Service, CSR?}` -> Leaf JSON."""
        self.reg._check_dc(request)
        body = decode_body(await read_body(request), SIGN_BODY)
        service = body.get("Service", "")
        if not service:
            raise BadRequest("Service must be specified")
        state = await self.ensure_ca()
        leaf = await asyncio.to_thread(self._sign, state, service, body.get("CSR") or None)
        index = self.store.index
        leaf["CreateIndex"] = leaf["ModifyIndex"] = index
        leaf["RootID"] = state["ActiveRootID"]
        return json_response(leaf, index=index)

    async def _issue(self, service: str, state: dict[str, Any], previous: CachedLeaf | None) -> CachedLeaf:
        leaf = await asyncio.to_thread(self._sign, state, service)
        now = time.time()
        lifetime = self.leaf_ttl(state)
        index = max(self.store.index, (previous.index + 1) if previous else 1)
        leaf["CreateIndex"] = leaf["ModifyIndex"] = index
        entry = CachedLeaf(
            leaf=leaf, root_id=state["ActiveRootID"], index=index, issued=now,
            renew_at=now + lifetime * random.uniform(0.6, 0.9),  # spread renewals out (Consul's rule)
            last_used=previous.last_used if previous else now,
        )
        self._leaves[service] = entry
        self._leaf_feed.notify()
        return entry

    def _stale(self, entry: CachedLeaf, state: dict[str, Any]) -> bool:
        return entry.root_id != state["ActiveRootID"] or time.time() >= entry.renew_at

    async def _fresh_leaf(self, service: str) -> CachedLeaf:
        state = await self.ensure_ca()
        async with self._leaf_lock:
            entry = self._leaves.get(service)
            if entry is None or self._stale(entry, state):
                entry = await self._issue(service, state, entry)
        entry.last_used = time.time()
        return entry

    async def _renew_loop(self) -> None:
        """Renew cached leaves between 60 % and 90 % of their life, or when the root changes."""
        while True:
            generation = self.log.feed.generation
            try:
                state = self.ca_state()
                now = time.time()
                if state is not None:
                    async with self._leaf_lock:
                        for service, entry in list(self._leaves.items()):
                            if now - entry.last_used > LEAF_IDLE_EXPIRY:
                                del self._leaves[service]
                            elif self._stale(entry, state):
                                await self._issue(service, state, entry)
                next_due = min((e.renew_at for e in self._leaves.values()), default=now + 60)
                await self.log.feed.wait(generation, max(0.05, min(next_due - time.time(), 60.0)))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("leaf renewal failed; retrying")
                await asyncio.sleep(1.0)

    async def agent_leaf(self, request: Request) -> Response:
        service = request.path_params["service"]
        if not service:
            raise BadRequest("Missing service name")
        if not self._leaf_feed.loop:
            self._leaf_feed.bind(asyncio.get_running_loop())
            self._start(self._renew_loop())
        opts = query_options(request)
        entry = await self._fresh_leaf(service)
        if opts.index:

            def read() -> tuple[int, Any]:
                current = self._leaves.get(service, entry)
                return current.index, current.leaf

            index, leaf = await blocking(opts, self._leaf_feed, read)
        else:
            index, leaf = entry.index, entry.leaf
        return json_response(leaf, index=index, headers=self.reg.meta_headers(opts))

    # -- intentions -----------------------------------------------------------------------------

    def _intentions(self) -> list[dict[str, Any]]:
        return views.read(self.store, views.intentions_list)[1]

    @staticmethod
    def _exact_params(request: Request) -> tuple[str, str]:
        source = request.query_params.get("source")
        destination = request.query_params.get("destination")
        if not source:
            raise BadRequest("required query parameter 'source' not set")
        if not destination:
            raise BadRequest("required query parameter 'destination' not set")
        return source, destination

    @staticmethod
    def _find(items: list[dict[str, Any]], source: str, destination: str) -> dict[str, Any] | None:
        src = source.split("/")[-1]
        dst = destination.split("/")[-1]
        return next((i for i in items if i["SourceName"] == src and i["DestinationName"] == dst), None)

    def _upsert_command(self, ixn: dict[str, Any], siblings: list[dict[str, Any]]) -> dict[str, Any]:
        command = new_command("intention_upsert", Intention={})
        record = dict(ixn)
        stamp = _rfc3339_ts(command["ts"])
        record.setdefault("CreatedAt", stamp)  # apply keeps the original on updates
        record["UpdatedAt"] = stamp
        meta = next((s.get("EntryMeta") for s in siblings if s["DestinationName"] == ixn["DestinationName"]
                     and s.get("EntryMeta")), None)
        if meta and "EntryMeta" not in record:
            record["EntryMeta"] = meta
        command["Intention"] = record
        return command

    async def intention_exact(self, request: Request) -> Response:
        self.reg._check_dc(request)
        source, destination = self._exact_params(request)
        if request.method == "GET":
            opts, index, items = await self.reg._read(request, views.intentions_list)
            found = self._find(items, source, destination)
            if found is None:
                return Response(f"Intention not found: {source} => {destination}", status_code=404,
                                media_type="text/plain",
                                headers={"X-Consul-Index": str(index)} | self.reg.meta_headers(opts))
            return self.reg._reply(request, public_intention(found), index, opts)
        if request.method == "DELETE":
            ns_s, src = ixns._split_ns(source, "source")
            ns_d, dst = ixns._split_ns(destination, "destination")
            await self.log.submit(new_command("intention_delete", SourceName=src, DestinationName=dst))
            return json_response(True)
        body = parse_json_body(await read_body(request))
        ixn = ixns.validate_intention(source, destination, body)
        items = self._intentions()
        existing = self._find(items, ixn["SourceName"], ixn["DestinationName"])
        if existing is not None and existing.get("ID"):
            ixn["ID"] = existing["ID"]
        await self.log.submit(self._upsert_command(ixn, items))
        return json_response(True)

    async def intention_list(self, request: Request) -> Response:
        opts, index, items = await self.reg._read(request, views.intentions_list)
        items = [public_intention(i) for i in ixns.sort_intentions(items)]
        return self.reg._reply(request, self.reg._filter(request, items), index, opts)

    async def intention_create(self, request: Request) -> Response:
        """Legacy `POST /v1/connect/intentions`: the proposer picks the ID."""
        self.reg._check_dc(request)
        body = parse_json_body(await read_body(request))
        ixn = ixns.validate_intention(None, None, body)
        items = self._intentions()
        if self._find(items, ixn["SourceName"], ixn["DestinationName"]) is not None:
            raise BadRequest(f"duplicate intention found: {ixns.describe(ixn)}")
        ixn["ID"] = str(uuid.uuid4())
        await self.log.submit(self._upsert_command(ixn, items))
        return json_response({"ID": ixn["ID"]})

    async def intention_by_id(self, request: Request) -> Response:
        self.reg._check_dc(request)
        ixn_id = request.path_params["id"]
        if request.method == "GET":
            opts, index, items = await self.reg._read(request, views.intentions_list)
            found = next((i for i in items if i.get("ID") == ixn_id), None)
            if found is None:
                return Response("Intention not found", status_code=404, media_type="text/plain",
                                headers={"X-Consul-Index": str(index)} | self.reg.meta_headers(opts))
            return self.reg._reply(request, public_intention(found), index, opts)
        items = self._intentions()
        found = next((i for i in items if i.get("ID") == ixn_id), None)
        if request.method == "DELETE":
            if found is not None:
                await self.log.submit(new_command("intention_delete", SourceName=found["SourceName"],
                                                  DestinationName=found["DestinationName"]))
            return json_response(True)
        if found is None:
            raise NotFound(f"Intention lookup failed: intention {ixn_id!r} not found")
        body = parse_json_body(await read_body(request)) or {}
        if not isinstance(body, dict):
            raise BadRequest("Request decode failed: intention body must be a JSON object")
        merged = {"SourceName": found["SourceName"], "DestinationName": found["DestinationName"]}
        merged.update({k: v for k, v in body.items() if str(k).lower() != "id"})
        ixn = ixns.validate_intention(None, None, merged)
        ixn["ID"] = ixn_id
        moved = (ixn["SourceName"], ixn["DestinationName"]) != (found["SourceName"], found["DestinationName"])
        if moved and self._find(items, ixn["SourceName"], ixn["DestinationName"]) is not None:
            raise BadRequest(f"duplicate intention found: {ixns.describe(ixn)}")
        if moved:
            await self.log.submit(new_command("intention_delete", SourceName=found["SourceName"],
                                              DestinationName=found["DestinationName"]))
        else:
            ixn["CreatedAt"] = found.get("CreatedAt", "")
        await self.log.submit(self._upsert_command(ixn, items))
        return json_response(True)

    async def intention_match(self, request: Request) -> Response:
        by = request.query_params.get("by", "")
        names = request.query_params.getlist("name")
        if by not in ("source", "destination"):
            raise BadRequest("required query parameter 'by' must be 'source' or 'destination'")
        if not names:
            raise BadRequest("required query parameter 'name' not set")
        opts, index, items = await self.reg._read(request, views.intentions_list)
        result = {n: [public_intention(i) for i in ixns.match(items, by, n)] for n in names}
        return self.reg._reply(request, result, index, opts)

    async def intention_check(self, request: Request) -> Response:
        source, destination = self._exact_params(request)
        source_type = request.query_params.get("source-type") or "consul"
        if source_type != "consul":
            raise BadRequest(f"unsupported source-type {source_type!r}: must be 'consul'")
        opts, index, items = await self.reg._read(request, views.intentions_list)
        decision = ixns.check_l4(items, source, destination, self.default_allow)
        return self.reg._reply(request, {"Allowed": decision.allowed}, index, opts)

    async def agent_authorize(self, request: Request) -> Response:
        body = decode_body(await read_body(request), AUTHORIZE_BODY)
        target = body.get("Target", "")
        if not target:
            raise BadRequest("Target service must be specified")
        uri = body.get("ClientCertURI", "")
        if not uri:
            raise BadRequest("ClientCertURI must be given")
        _td, ns, _dc, service = ixns.spiffe_service(uri)
        items = self._intentions()
        decision = ixns.check_l4(items, f"{ns}/{service}", target, self.default_allow)
        return json_response({"Authorized": decision.allowed, "Reason": decision.reason})

    # -- config entries -------------------------------------------------------------------------

    def _kind(self, request: Request) -> str:
        kind = request.path_params["kind"]
        if kind not in config_entries.KINDS:
            raise BadRequest(f"invalid config entry kind: {kind}")
        return kind

    async def config_put(self, request: Request) -> Response:
        self.reg._check_dc(request)
        cas = query_int(request, "cas")
        raw = parse_json_body(await read_body(request))
        entry = config_entries.validate_entry(raw)
        if entry["Kind"] == "service-intentions":
            return json_response(await self._put_service_intentions(entry, cas))
        _index, current = views.read(self.store, config_snapshot)
        config_entries.check_change(current, entry["Kind"], entry["Name"], entry)
        result = await self.log.submit(new_command("config_set", Entry=entry, Cas=cas))
        return json_response(bool(result))

    async def _put_service_intentions(self, entry: dict[str, Any], cas: int | None) -> bool:
        name = entry["Name"]
        desired = ixns.intentions_from_config_entry(entry)
        # One command: the destination's intentions change together or not at all.
        records = []
        for ixn in desired:
            ixn.pop("CreateIndex", None)
            ixn.pop("ModifyIndex", None)
            if entry.get("Meta"):
                ixn["EntryMeta"] = dict(entry["Meta"])
            records.append(self._upsert_command(ixn, [])["Intention"])
        result = await self.log.submit(
            new_command("intentions_replace", DestinationName=name, Intentions=records, Cas=cas)
        )
        return bool(result)

    async def config_get(self, request: Request) -> Response:
        kind = self._kind(request)
        name = request.path_params["name"]
        if kind == "service-intentions":
            opts, index, entry = await self.reg._read(request, service_intentions_entry, name)
        else:
            opts, index, entry = await self.reg._read(request, views.config_get, kind, name)
        if entry is None:
            return Response(f"Config entry not found for {kind!r} / {name!r}", status_code=404,
                            media_type="text/plain",
                            headers={"X-Consul-Index": str(index)} | self.reg.meta_headers(opts))
        return self.reg._reply(request, entry, index, opts)

    async def config_list(self, request: Request) -> Response:
        kind = self._kind(request)
        if kind == "service-intentions":
            opts, index, entries = await self.reg._read(request, service_intentions_list)
        else:
            opts, index, entries = await self.reg._read(request, views.config_list, kind)
        return self.reg._reply(request, self.reg._filter(request, entries), index, opts)

    async def config_delete(self, request: Request) -> Response:
        self.reg._check_dc(request)
        kind = self._kind(request)
        name = request.path_params["name"]
        cas = query_int(request, "cas")
        if kind == "service-intentions":
            existing = [i for i in self._intentions() if i["DestinationName"] == name]
            if cas is not None and not existing:
                return json_response(False)
            result = await self.log.submit(
                new_command("intentions_replace", DestinationName=name, Intentions=[], Cas=cas)
            )
            return json_response(bool(result) if cas is not None else {})
        _index, current = views.read(self.store, config_snapshot)
        if current.get(kind, {}).get(name) is not None:
            config_entries.check_change(current, kind, name, None)
        result = await self.log.submit(new_command("config_delete", Kind=kind, Name=name, Cas=cas))
        return json_response(bool(result) if cas is not None else {})

    # -- routes ---------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        self._start(self._bootstrap_loop())
        g = guarded
        return [
            Route("/v1/connect/ca/roots", g(self.ca_roots), methods=["GET"]),
            Route("/v1/connect/ca/configuration", g(self.ca_configuration), methods=["GET", "PUT"]),
            Route("/v1/internal/connect/sign", g(self.internal_sign), methods=["POST", "PUT"]),
            Route("/v1/agent/connect/ca/roots", g(self.ca_roots), methods=["GET"]),
            Route("/v1/agent/connect/ca/leaf/{service:path}", g(self.agent_leaf), methods=["GET"]),
            Route("/v1/agent/connect/authorize", g(self.agent_authorize), methods=["POST", "PUT"]),
            Route("/v1/connect/intentions", g(self.intention_list), methods=["GET"]),
            Route("/v1/connect/intentions", g(self.intention_create), methods=["POST"]),
            Route("/v1/connect/intentions/exact", g(self.intention_exact), methods=["GET", "PUT", "DELETE"]),
            Route("/v1/connect/intentions/match", g(self.intention_match), methods=["GET"]),
            Route("/v1/connect/intentions/check", g(self.intention_check), methods=["GET"]),
            Route("/v1/connect/intentions/{id}", g(self.intention_by_id), methods=["GET", "PUT", "DELETE"]),
            Route("/v1/config", g(self.config_put), methods=["PUT"]),
            Route("/v1/config/{kind}", g(self.config_list), methods=["GET"]),
            Route("/v1/config/{kind}/{name:path}", g(self.config_get), methods=["GET"]),
            Route("/v1/config/{kind}/{name:path}", g(self.config_delete), methods=["DELETE"]),
        ]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

