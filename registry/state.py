"""The replicated state machine: nodes, services, checks, KV, intentions, config entries.

Pure and deterministic: `apply(command)` is the only way state changes, it never raises, never
reads a clock or a random source (the proposer puts time and ids in the command), and every
command is deduplicated by its request id, because after a leader change the proposer cannot
know whether its command committed and must be free to send it again.

Every applied command takes the next index. Each table, each service name, each node and each
KV key remembers the index it last changed at, and deletions leave tombstones, so a blocking
query on a resource wakes when that resource is deleted, too.
"""

from __future__ import annotations

import base64
import copy
import threading
from collections.abc import Callable
from typing import Any

# How many request ids we remember for deduplication; a retry arrives within seconds, so a
# window of this many commands is far more than enough.
DEDUP_WINDOW = 20_000
# KV tombstones kept before the oldest are folded into `kv_tomb_floor`.
KV_TOMBSTONE_LIMIT = 20_000

LIVENESS_CHECK_ID = "serfHealth"
CHECK_STATUSES = ("passing", "warning", "critical")

Result = dict[str, Any]


def _ok(value: Any = True) -> Result:
    return {"ok": True, "value": value}


def _err(message: str, status: int = 400) -> Result:
    return {"ok": False, "error": message, "status": status}


def liveness_check(status: str, output: str) -> dict[str, Any]:
    """The server-owned node check that says whether the node's agent is alive."""
    return {
        "CheckID": LIVENESS_CHECK_ID,
        "Name": "Serf Health Status",
        "Status": status,
        "Notes": "",
        "Output": output,
        "ServiceID": "",
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "Definition": {},
    }


class CommandError(Exception):
    """Raised inside apply for a rejected command; turned into an error result, never escapes."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# Attributes made by _init_runtime: neither replicated nor pickled.
_RUNTIME_ONLY = ("lock", "listeners", "read_cache", "block_cache", "entry_cache", "names_on_node",
                 "instance_version", "service_version", "node_version")


class StateStore:
    """All replicated data as plain dicts. Reads take `lock`; apply runs under it too."""

    def __init__(self) -> None:
        self.index = 0
        self.nodes: dict[str, dict[str, Any]] = {}
        self.services: dict[str, dict[str, dict[str, Any]]] = {}  # node -> service id -> service
        self.checks: dict[str, dict[str, dict[str, Any]]] = {}  # node -> check id -> check
        self.kv: dict[str, dict[str, Any]] = {}
        self.kv_tombstones: dict[str, int] = {}
        self.kv_tomb_floor = 0
        self.intentions: dict[str, dict[str, Any]] = {}  # "src\x00dst" -> intention
        self.config_entries: dict[str, dict[str, dict[str, Any]]] = {}  # kind -> name -> entry
        self.meta: dict[str, Any] = {}  # cluster-wide settings (cluster id, CA state, ...)
        self.table_index: dict[str, int] = {}
        self.service_index: dict[str, int] = {}  # service name -> last change (kept after delete)
        self.node_index: dict[str, int] = {}  # node name -> last change (kept after delete)
        self.recent_requests: dict[str, Result] = {}
        # ACLs (issue #9). Secrets never enter the state: tokens are found by sha256(secret).
        self.acl_tokens: dict[str, dict[str, Any]] = {}  # AccessorID -> token (with SecretHash)
        self.acl_secrets: dict[str, str] = {}  # SecretHash -> AccessorID
        self.acl_policies: dict[str, dict[str, Any]] = {}  # ID -> policy
        self.acl_roles: dict[str, dict[str, Any]] = {}  # ID -> role
        self.acl_bootstrapped = 0  # index of the bootstrap, 0 = not yet
        self._init_runtime()

    # -- runtime (not replicated, not pickled) -----------------------------------------------

    def _init_runtime(self) -> None:
        self.lock = threading.RLock()
        self.listeners: list[Callable[[int], None]] = []
        self.read_cache: dict[Any, Any] = {}  # views.read_shared_entry's cache; never replicated
        self.block_cache: dict[Any, Any] = {}  # views.health_service_body's per-node shares; never replicated
        self.entry_cache: dict[Any, Any] = {}  # views._health_block's encoded instances; never replicated
        self._index_instances()

    def _reset_derived(self) -> None:
        """After every table was replaced (restore): the views' caches go and the index is rebuilt.
        The restored index may equal one a cache entry was made at, and versions start again at 0."""
        self.read_cache.clear()
        self.block_cache.clear()
        self.entry_cache.clear()
        self._index_instances()

    # Derived from `services`, kept by every write, for views that serve one service name on one node
    # (a health answer's per-node share, catalog/services' per-node tags): a client node holds hundreds
    # of services, and a registration of one name used to make every name's share on it stale and be
    # rebuilt by scanning all of them.
    #   names_on_node[node][name]: the IDs of `name`'s instances on `node`, in `services[node]` order;
    #   instance_version[(node, name)]: the index that last changed one of them or their checks;
    #   service_version[(node, service ID)]: the same for one instance;
    #   node_version[node]: the index that last changed the node's record or its node-level checks.
    def _index_instances(self) -> None:
        self.names_on_node: dict[str, dict[str, dict[str, None]]] = {}
        self.instance_version: dict[tuple[str, str], int] = {}
        self.service_version: dict[tuple[str, str], int] = {}
        self.node_version: dict[str, int] = {}
        for node in self.services:
            self._reindex_node(node)

    def _reindex_node(self, node: str) -> None:
        names: dict[str, dict[str, None]] = {}
        for service_id, service in self.services.get(node, {}).items():
            names.setdefault(service["Service"], {})[service_id] = None
        self.names_on_node[node] = names

    def _touch_instances(self, node: str, name: str, service_id: str = "") -> None:
        self.instance_version[(node, name)] = self.index
        if service_id:
            self.service_version[(node, service_id)] = self.index

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for runtime_only in _RUNTIME_ONLY:
            state.pop(runtime_only, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def replace_with(self, other: StateStore) -> None:
        """Take over another store's data (snapshot restore), keeping our lock and listeners."""
        with self.lock:
            for key, value in other.__getstate__().items():
                setattr(self, key, value)
            self._reset_derived()
        self._notify()

    # -- applying --------------------------------------------------------------------------

    def apply(self, command: dict[str, Any]) -> Result:
        """Apply one command. Never raises: a rejected command returns an error result."""
        try:
            with self.lock:
                result = self._apply_locked(command)
        except Exception as exc:  # a bug must not wedge the replica; the command is a no-op
            result = _err(f"internal error applying {command.get('op')!r}: {exc!r}", 500)
        self._notify()
        return result

    def _notify(self) -> None:
        for listener in list(self.listeners):
            try:
                listener(self.index)
            except Exception:  # a listener's failure must not affect the state machine
                pass

    def _apply_locked(self, command: dict[str, Any]) -> Result:
        self.index += 1
        request_id = command.get("rid")
        if request_id and request_id in self.recent_requests:
            return self.recent_requests[request_id]
        op = command.get("op")
        handler = _HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            result = _err(f"unknown command {op!r}")
        else:
            # Apply to a scratch copy of nothing: handlers validate fully before mutating, so
            # a CommandError means nothing changed.
            try:
                result = handler(self, command)
            except CommandError as exc:
                result = _err(str(exc), exc.status)
        if request_id:
            self.recent_requests[request_id] = result
            if len(self.recent_requests) > DEDUP_WINDOW:
                del self.recent_requests[next(iter(self.recent_requests))]
        return result

    # -- index bookkeeping ------------------------------------------------------------------

    def _touch(self, table: str) -> None:
        self.table_index[table] = self.index

    def _touch_service(self, name: str) -> None:
        self.service_index[name] = self.index
        self._touch("services")

    def _touch_node(self, node: str) -> None:
        self.node_index[node] = self.index
        self.node_version[node] = self.index
        self._touch("nodes")
        # Node-level facts (address, node checks) are part of every service entry on the node.
        for service in self.services.get(node, {}).values():
            self.service_index[service["Service"]] = self.index

    # -- catalog -----------------------------------------------------------------------------

    def _upsert_node(self, node: dict[str, Any]) -> None:
        name = node["Node"]
        existing = self.nodes.get(name)
        record = {
            "ID": node.get("ID", "") or (existing or {}).get("ID", ""),
            "Node": name,
            "Address": node.get("Address", ""),
            "Datacenter": node.get("Datacenter", ""),
            "TaggedAddresses": dict(node.get("TaggedAddresses") or {}),
            "Meta": dict(node.get("Meta") or {}),
        }
        if existing is not None:
            current = {k: existing.get(k) for k in record}
            if current == record:
                return
            record["CreateIndex"] = existing["CreateIndex"]
        else:
            record["CreateIndex"] = self.index
        record["ModifyIndex"] = self.index
        self.nodes[name] = record
        self.services.setdefault(name, {})
        self.checks.setdefault(name, {})
        self._touch_node(name)

    def _upsert_service(self, node: str, service: dict[str, Any]) -> None:
        services = self.services.setdefault(node, {})
        existing = services.get(service["ID"])
        # Commands are decoded fresh for every apply and never reused, so a shallow copy suffices
        # (deepcopy here was a measurable share of the leader's CPU per registration).
        record = {k: v for k, v in service.items() if k not in ("CreateIndex", "ModifyIndex")}
        if existing is not None:
            current = {k: v for k, v in existing.items() if k not in ("CreateIndex", "ModifyIndex")}
            if current == record:
                return
            record["CreateIndex"] = existing["CreateIndex"]
            if existing["Service"] != record["Service"]:
                self._touch_service(existing["Service"])
                self._touch_instances(node, existing["Service"])
        else:
            record["CreateIndex"] = self.index
        record["ModifyIndex"] = self.index
        services[service["ID"]] = record
        if existing is not None and existing["Service"] != record["Service"]:
            self._reindex_node(node)  # renamed in place: its position in services[node] is kept
        else:
            self.names_on_node.setdefault(node, {}).setdefault(record["Service"], {})[record["ID"]] = None
        self.node_index[node] = self.index
        self._touch_service(record["Service"])
        self._touch_instances(node, record["Service"], record["ID"])
        # Service checks carry the service's name and tags.
        for check in self.checks.get(node, {}).values():
            if check.get("ServiceID") == record["ID"]:
                if check.get("ServiceName") != record["Service"] or check.get("ServiceTags") != record["Tags"]:
                    check["ServiceName"] = record["Service"]
                    check["ServiceTags"] = list(record["Tags"])
                    check["ModifyIndex"] = self.index
                    self._touch("checks")

    def _upsert_check(self, node: str, check: dict[str, Any]) -> None:
        checks = self.checks.setdefault(node, {})
        existing = checks.get(check["CheckID"])
        record = {k: v for k, v in check.items() if k not in ("CreateIndex", "ModifyIndex")}
        record["Node"] = node
        service_id = record.get("ServiceID", "")
        if service_id:
            service = self.services.get(node, {}).get(service_id)
            record["ServiceName"] = service["Service"] if service else ""
            record["ServiceTags"] = list(service["Tags"]) if service else []
        else:
            record["ServiceName"] = ""
            record["ServiceTags"] = []
        if existing is not None:
            current = {k: v for k, v in existing.items() if k not in ("CreateIndex", "ModifyIndex")}
            if current == record:
                return
            record["CreateIndex"] = existing["CreateIndex"]
        else:
            record["CreateIndex"] = self.index
        record["ModifyIndex"] = self.index
        checks[check["CheckID"]] = record
        self.node_index[node] = self.index
        self._touch("checks")
        self._touch_check_owner(node, record, existing)

    def _touch_check_owner(self, node: str, record: dict[str, Any], previous: dict[str, Any] | None) -> None:
        for rec in (record, previous):
            if rec is None:
                continue
            if rec.get("ServiceID"):
                if rec.get("ServiceName"):
                    self._touch_service(rec["ServiceName"])
                    self._touch_instances(node, rec["ServiceName"], rec["ServiceID"])
            else:
                self._touch_node(node)

    def _delete_check(self, node: str, check_id: str) -> bool:
        record = self.checks.get(node, {}).pop(check_id, None)
        if record is None:
            return False
        self.node_index[node] = self.index
        self._touch("checks")
        self._touch_check_owner(node, record, None)
        return True

    def _delete_service(self, node: str, service_id: str) -> bool:
        record = self.services.get(node, {}).pop(service_id, None)
        if record is None:
            return False
        for check_id, check in list(self.checks.get(node, {}).items()):
            if check.get("ServiceID") == service_id:
                self._delete_check(node, check_id)
        self.node_index[node] = self.index
        self._touch_service(record["Service"])
        self._touch_instances(node, record["Service"], service_id)
        same_name = self.names_on_node.get(node, {}).get(record["Service"])
        if same_name is not None:
            same_name.pop(service_id, None)
            if not same_name:
                del self.names_on_node[node][record["Service"]]
        return True

    def _delete_node(self, node: str) -> bool:
        if node not in self.nodes:
            return False
        for service_id in list(self.services.get(node, {})):
            self._delete_service(node, service_id)
        for check_id in list(self.checks.get(node, {})):
            self._delete_check(node, check_id)
        del self.nodes[node]
        self.services.pop(node, None)
        self.checks.pop(node, None)
        self.names_on_node.pop(node, None)
        self._touch_node(node)
        return True

    def op_register(self, cmd: dict[str, Any]) -> Result:
        node = cmd.get("Node") or ""
        if not node:
            raise CommandError("Must provide node")
        skip_node = bool(cmd.get("SkipNodeUpdate"))
        if not skip_node and not cmd.get("Address"):
            raise CommandError("Must provide address if SkipNodeUpdate is not set")
        if skip_node and node not in self.nodes:
            raise CommandError(f"Node {node!r} does not exist; cannot skip the node update", 404)
        service = cmd.get("Service")
        checks = list(cmd.get("Checks") or [])
        if cmd.get("Check"):
            checks.insert(0, cmd["Check"])
        service_ids = set(self.services.get(node, {}))
        if service:
            service_ids.add(service["ID"])
        for check in checks:
            if check.get("ServiceID") and check["ServiceID"] not in service_ids:
                raise CommandError(f"Unknown service ID {check['ServiceID']!r} for check {check['CheckID']!r}", 404)
        if not skip_node:
            self._upsert_node_from(node, cmd)
        if service:
            self._upsert_service(node, service)
        for check in checks:
            self._upsert_check(node, check)
        return _ok(True)

    def op_deregister(self, cmd: dict[str, Any]) -> Result:
        node = cmd.get("Node") or ""
        if not node:
            raise CommandError("Must provide node")
        if cmd.get("ServiceID"):
            self._delete_service(node, cmd["ServiceID"])
        if cmd.get("CheckID"):
            self._delete_check(node, cmd["CheckID"])
        if not cmd.get("ServiceID") and not cmd.get("CheckID"):
            self._delete_node(node)
        return _ok(True)

    def _upsert_node_from(self, node: str, cmd: dict[str, Any]) -> None:
        """The node record a registration or an agent's sync (full or partial) carries."""
        self._upsert_node(
            {
                "ID": cmd.get("ID", ""),
                "Node": node,
                "Address": cmd["Address"],
                "Datacenter": cmd.get("Datacenter", ""),
                "TaggedAddresses": cmd.get("TaggedAddresses") or {},
                "Meta": cmd.get("NodeMeta") or {},
            }
        )

    def _ensure_liveness(self, node: str) -> None:
        if LIVENESS_CHECK_ID not in self.checks.get(node, {}):
            # The agent just reached us, so it is alive; from now on the leader watches it.
            self._upsert_check(node, liveness_check("passing", "Agent alive and reachable"))

    def op_sync_node(self, cmd: dict[str, Any]) -> Result:
        """Anti-entropy: make the catalog's view of an agent's node exactly the agent's.

        The servers own the liveness check; everything else on the node belongs to the agent.
        Unchanged records keep their indexes, so a full sync that finds nothing to do wakes
        no blocking query.
        """
        node = cmd.get("Node") or ""
        if not node or not cmd.get("Address"):
            raise CommandError("Must provide node and address")
        services = {s["ID"]: s for s in cmd.get("Services") or []}
        checks = {c["CheckID"]: c for c in cmd.get("Checks") or []}
        for check in checks.values():
            if check.get("ServiceID") and check["ServiceID"] not in services:
                raise CommandError(f"Unknown service ID {check['ServiceID']!r} for check {check['CheckID']!r}", 404)
        self._upsert_node_from(node, cmd)
        for check_id in list(self.checks.get(node, {})):
            if check_id not in checks and check_id != LIVENESS_CHECK_ID:
                self._delete_check(node, check_id)
        for service_id in list(self.services.get(node, {})):
            if service_id not in services:
                self._delete_service(node, service_id)
        for service in services.values():
            self._upsert_service(node, service)
        for check in checks.values():
            if check["CheckID"] != LIVENESS_CHECK_ID:
                self._upsert_check(node, check)
        self._ensure_liveness(node)
        return _ok(True)

    def op_sync_partial(self, cmd: dict[str, Any]) -> Result:
        """Anti-entropy for what changed on an agent: upsert these, delete those, keep the rest.

        A full `sync_node` carries the whole node; with thousands of checks that made every
        registration cost O(node). The agent sends this between full syncs.
        """
        node = cmd.get("Node") or ""
        if not node or not cmd.get("Address"):
            raise CommandError("Must provide node and address")
        services = {s["ID"]: s for s in cmd.get("Services") or []}
        checks = {c["CheckID"]: c for c in cmd.get("Checks") or []}
        delete_services = set(cmd.get("DeleteServices") or [])
        delete_checks = set(cmd.get("DeleteChecks") or []) - {LIVENESS_CHECK_ID}
        known = (set(self.services.get(node, {})) | set(services)) - delete_services
        for check in checks.values():
            if check.get("ServiceID") and check["ServiceID"] not in known:
                raise CommandError(f"Unknown service ID {check['ServiceID']!r} for check {check['CheckID']!r}", 404)
        self._upsert_node_from(node, cmd)
        for check_id in delete_checks:
            self._delete_check(node, check_id)
        for service_id in delete_services:
            self._delete_service(node, service_id)
        for service in services.values():
            self._upsert_service(node, service)
        for check in checks.values():
            if check["CheckID"] != LIVENESS_CHECK_ID:
                self._upsert_check(node, check)
        self._ensure_liveness(node)
        return _ok(True)

    def op_check_batch(self, cmd: dict[str, Any]) -> Result:
        """Many check results of one node in one entry: agents coalesce status changes."""
        node = cmd.get("Node", "")
        applied = 0
        for update in cmd.get("Updates") or []:
            check = self.checks.get(node, {}).get(update.get("CheckID", ""))
            status = update.get("Status")
            if check is None or status not in CHECK_STATUSES:
                continue  # a full sync will follow for anything the servers don't know yet
            self._upsert_check(node, dict(check, Status=status, Output=update.get("Output", "")))
            applied += 1
        return _ok(applied)

    def op_check_status(self, cmd: dict[str, Any]) -> Result:
        """Set a check's status and output (agent pushes, TTL updates, node liveness)."""
        node, check_id, status = cmd.get("Node", ""), cmd.get("CheckID", ""), cmd.get("Status", "")
        if status not in CHECK_STATUSES:
            raise CommandError(f"Invalid check status: {status!r}")
        check = self.checks.get(node, {}).get(check_id)
        if check is None:
            if check_id != LIVENESS_CHECK_ID or node not in self.nodes:
                raise CommandError(f"Unknown check ID {check_id!r} on node {node!r}", 404)
            check = liveness_check(status, "")
        updated = dict(check, Status=status, Output=cmd.get("Output", ""))
        self._upsert_check(node, updated)
        return _ok(True)

    # -- KV ---------------------------------------------------------------------------------

    def _kv_put(self, key: str, value: str | None, flags: int) -> None:
        existing = self.kv.get(key)
        self.kv[key] = {
            "LockIndex": existing["LockIndex"] if existing else 0,
            "Key": key,
            "Flags": flags,
            "Value": value,
            "CreateIndex": existing["CreateIndex"] if existing else self.index,
            "ModifyIndex": self.index,
        }
        self.kv_tombstones.pop(key, None)
        self._touch("kv")

    def _kv_remove(self, key: str) -> None:
        if self.kv.pop(key, None) is not None:
            self.kv_tombstones[key] = self.index
            if len(self.kv_tombstones) > KV_TOMBSTONE_LIMIT:
                oldest = next(iter(self.kv_tombstones))
                self.kv_tomb_floor = max(self.kv_tomb_floor, self.kv_tombstones.pop(oldest))
            self._touch("kv")

    def op_kv_set(self, cmd: dict[str, Any]) -> Result:
        key = cmd["Key"]
        cas = cmd.get("Cas")
        if cas is not None:
            existing = self.kv.get(key)
            if cas == 0 and existing is not None:
                return _ok(False)
            if cas != 0 and (existing is None or existing["ModifyIndex"] != cas):
                return _ok(False)
        self._kv_put(key, cmd.get("Value"), int(cmd.get("Flags") or 0))
        return _ok(True)

    def op_kv_delete(self, cmd: dict[str, Any]) -> Result:
        key = cmd["Key"]
        cas = cmd.get("Cas")
        if cmd.get("Recurse"):
            for k in [k for k in self.kv if k.startswith(key)]:
                self._kv_remove(k)
            return _ok(True)
        if cas is not None:
            existing = self.kv.get(key)
            if existing is None or existing["ModifyIndex"] != cas:
                return _ok(False)
        self._kv_remove(key)
        return _ok(True)

    def op_txn(self, cmd: dict[str, Any]) -> Result:
        """KV transactions: every check runs first; if any fails, nothing is applied."""
        ops = cmd.get("Ops") or []
        errors = []
        # The checks see the earlier ops of the same txn (Consul runs them in order): a get after a
        # delete of the same key must fail the txn here, not raise half-way through applying it.
        pending: dict[str, dict[str, Any] | None] = {}
        for i, op in enumerate(ops):
            kv = op["KV"]
            verb, key = kv["Verb"], kv.get("Key", "")
            existing = pending[key] if key in pending else self.kv.get(key)
            index = kv.get("Index", 0)
            failed = None
            if verb in ("cas", "delete-cas", "check-index"):
                if verb == "cas" and index == 0:
                    if existing is not None:
                        failed = "key exists"
                elif existing is None or existing["ModifyIndex"] != index:
                    failed = f"current modify index {existing['ModifyIndex'] if existing else 0} != {index}"
            elif verb == "check-not-exists" and existing is not None:
                failed = "key exists"
            elif verb in ("get",) and existing is None:
                failed = "key does not exist"
            if failed:
                errors.append({"OpIndex": i, "What": f'failed to {verb} key "{key}": {failed}'})
            elif verb in ("set", "cas"):
                pending[key] = {"ModifyIndex": self.index}
            elif verb in ("delete", "delete-cas"):
                pending[key] = None
            elif verb == "delete-tree":
                pending.update((k, None) for k in set(self.kv) | set(pending) if k.startswith(key))
        if errors:
            return _ok({"Results": None, "Errors": errors})
        results = []
        for op in ops:
            kv = op["KV"]
            verb, key = kv["Verb"], kv.get("Key", "")
            if verb in ("set", "cas"):
                self._kv_put(key, kv.get("Value"), int(kv.get("Flags") or 0))
                results.append({"KV": _kv_meta(self.kv[key])})
            elif verb in ("delete", "delete-cas"):
                self._kv_remove(key)
            elif verb == "delete-tree":
                for k in [k for k in self.kv if k.startswith(key)]:
                    self._kv_remove(k)
            elif verb == "get":
                results.append({"KV": dict(self.kv[key])})
            elif verb == "get-tree":
                results.extend({"KV": dict(v)} for k, v in sorted(self.kv.items()) if k.startswith(key))
            elif verb in ("check-index", "check-not-exists"):
                if key in self.kv:
                    results.append({"KV": _kv_meta(self.kv[key])})
        return _ok({"Results": results, "Errors": None})

    # -- intentions and config entries (plain records for now) -----------------------------

    def op_intention_upsert(self, cmd: dict[str, Any]) -> Result:
        intention = dict(cmd["Intention"])
        key = f"{intention['SourceName']}\x00{intention['DestinationName']}"
        existing = self.intentions.get(key)
        intention["CreateIndex"] = existing["CreateIndex"] if existing else self.index
        intention["ModifyIndex"] = self.index
        if existing and existing.get("ID") and not intention.get("ID"):
            intention["ID"] = existing["ID"]
        if existing and existing.get("CreatedAt"):
            intention["CreatedAt"] = existing["CreatedAt"]
        self.intentions[key] = intention
        self._touch("intentions")
        return _ok(True)

    def op_intention_delete(self, cmd: dict[str, Any]) -> Result:
        key = f"{cmd['SourceName']}\x00{cmd['DestinationName']}"
        if self.intentions.pop(key, None) is not None:
            self._touch("intentions")
        return _ok(True)

    def op_intentions_replace(self, cmd: dict[str, Any]) -> Result:
        """All intentions of one destination at once (the service-intentions config entry)."""
        destination = cmd["DestinationName"]
        existing = {k: v for k, v in self.intentions.items() if v["DestinationName"] == destination}
        cas = cmd.get("Cas")
        if cas is not None:
            current = max((v["ModifyIndex"] for v in existing.values()), default=None)
            if (cas == 0 and existing) or (cas != 0 and current != cas):
                return _ok(False)
        wanted = cmd.get("Intentions") or []
        for intention in wanted:
            if intention.get("DestinationName") != destination or not intention.get("SourceName"):
                raise CommandError("every intention must name a source and this destination")
        keep = {f"{i['SourceName']}\x00{destination}" for i in wanted}
        for key in existing:
            if key not in keep:
                del self.intentions[key]
        for intention in wanted:
            self.op_intention_upsert({"Intention": intention})
        self._touch("intentions")
        return _ok(True)

    def op_config_set(self, cmd: dict[str, Any]) -> Result:
        entry = dict(cmd["Entry"])
        kind, name = entry["Kind"], entry["Name"]
        table = self.config_entries.setdefault(kind, {})
        existing = table.get(name)
        cas = cmd.get("Cas")
        if cas is not None:
            if (cas == 0 and existing is not None) or (
                cas != 0 and (existing is None or existing["ModifyIndex"] != cas)
            ):
                return _ok(False)
        entry["CreateIndex"] = existing["CreateIndex"] if existing else self.index
        entry["ModifyIndex"] = self.index
        table[name] = entry
        self._touch("config")
        return _ok(True)

    def op_config_delete(self, cmd: dict[str, Any]) -> Result:
        table = self.config_entries.get(cmd["Kind"], {})
        existing = table.get(cmd["Name"])
        cas = cmd.get("Cas")
        if cas is not None and (existing is None or existing["ModifyIndex"] != cas):
            return _ok(False)
        if existing is not None:
            del table[cmd["Name"]]
            self._touch("config")
        return _ok(True)

    def op_meta_set(self, cmd: dict[str, Any]) -> Result:
        """Cluster-wide settings; `IfAbsent` makes first-writer-wins (cluster id, CA bootstrap)."""
        key = cmd["Key"]
        if cmd.get("IfAbsent") and key in self.meta:
            return _ok(False)
        self.meta[key] = copy.deepcopy(cmd.get("Value"))
        self._touch("meta")
        return _ok(True)

    def export(self) -> dict[str, Any]:
        """The replicated data as plain JSON-able data (snapshot save). Caller holds the lock."""
        data = self.__getstate__()
        data.pop("recent_requests", None)
        return copy.deepcopy(data)

    def op_restore(self, cmd: dict[str, Any]) -> Result:
        """Replace everything with a saved snapshot. Indexes only move forward, so blocking
        queries and clients that remember an index see the restore as one more change."""
        data = cmd.get("State")
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
            raise CommandError("snapshot is not a Lictor state export")
        fields = ("nodes", "services", "checks", "kv", "kv_tombstones", "intentions", "config_entries", "meta")
        restored = {name: copy.deepcopy(data.get(name) or {}) for name in fields}
        for name, value in restored.items():
            if not isinstance(value, dict):
                raise CommandError(f"snapshot field {name!r} is not an object")
        _check_restored(restored)
        index = self.index
        for name, value in restored.items():
            setattr(self, name, value)
        self.kv_tomb_floor = index
        # Every resource changed at this index.
        self.table_index = {t: index for t in ("nodes", "services", "checks", "kv", "intentions", "config", "meta")}
        self.service_index = {name: index for name in self.service_index} | {
            s["Service"]: index for services in self.services.values() for s in services.values()
        }
        self.node_index = {name: index for name in set(self.node_index) | set(self.nodes)}
        self._reset_derived()
        return _ok(True)

    # -- ACLs ---------------------------------------------------------------------------------

    def acl_tables(self) -> tuple[dict[str, Any], dict[str, str], dict[str, Any], dict[str, Any]]:
        """The ACL tables; a snapshot from before ACLs existed lacks them, so create them empty."""
        d = self.__dict__
        return (d.setdefault("acl_tokens", {}), d.setdefault("acl_secrets", {}),
                d.setdefault("acl_policies", {}), d.setdefault("acl_roles", {}))

    def _acl_links(self, links: Any, table: dict[str, Any], what: str) -> list[dict[str, str]]:
        """Policy/role links by ID or Name -> [{ID, Name}], every one existing."""
        out = []
        for link in links or []:
            if not isinstance(link, dict):
                raise CommandError(f"invalid {what} link")
            found = table.get(link.get("ID") or "") or next(
                (v for v in table.values() if link.get("Name") and v["Name"] == link.get("Name")), None
            )
            if found is None:
                raise CommandError(f"cannot find {what} {link.get('ID') or link.get('Name')!r}")
            if all(x["ID"] != found["ID"] for x in out):
                out.append({"ID": found["ID"], "Name": found["Name"]})
        return out

    def _acl_put_token(self, token: dict[str, Any], create: bool) -> dict[str, Any]:
        tokens, secrets, policies, roles = self.acl_tables()
        accessor = token.get("AccessorID") or ""
        if not accessor:
            raise CommandError("missing AccessorID")
        existing = tokens.get(accessor)
        if create and existing is not None:
            raise CommandError(f"token with AccessorID {accessor!r} already exists")
        if not create and existing is None:
            raise CommandError("Cannot find token to update", 404)
        record = copy.deepcopy(token)
        if existing is not None:
            record["SecretHash"] = existing["SecretHash"]  # a secret never changes
            record["CreateTime"] = existing.get("CreateTime", record.get("CreateTime"))
            record["ExpirationTime"] = existing.get("ExpirationTime")
            record["CreateIndex"] = existing["CreateIndex"]
        else:
            secret_hash = record.get("SecretHash") or ""
            if len(secret_hash) != 64 or secret_hash in secrets:
                raise CommandError("invalid or duplicate SecretID")
            record["CreateIndex"] = self.index
        record["Policies"] = self._acl_links(record.get("Policies"), policies, "policy")
        record["Roles"] = self._acl_links(record.get("Roles"), roles, "role")
        record["ModifyIndex"] = self.index
        tokens[accessor] = record
        secrets[record["SecretHash"]] = accessor
        self._touch("acl")
        return record

    def op_acl_bootstrap(self, cmd: dict[str, Any]) -> Result:
        """Once per cluster: the management policy, the anonymous token and the first management token."""
        tokens, secrets, policies, _ = self.acl_tables()
        if self.__dict__.get("acl_bootstrapped"):
            raise CommandError(f"ACL bootstrap no longer allowed (reset index: {self.acl_bootstrapped})", 403)
        secret_hash = cmd["Token"].get("SecretHash") or ""
        if len(secret_hash) != 64 or secret_hash in secrets or cmd["Token"]["AccessorID"] in tokens:
            raise CommandError("invalid bootstrap token")
        self.acl_bootstrapped = self.index
        policies.setdefault(cmd["ManagementPolicy"]["ID"], dict(cmd["ManagementPolicy"], CreateIndex=self.index,
                                                                  ModifyIndex=self.index))
        if cmd["Anonymous"]["AccessorID"] not in tokens:
            self._acl_put_token(cmd["Anonymous"], create=True)
        return _ok(self._acl_put_token(cmd["Token"], create=True))

    def op_acl_token_set(self, cmd: dict[str, Any]) -> Result:
        return _ok(self._acl_put_token(cmd["Token"], create=bool(cmd.get("Create"))))

    def op_acl_token_delete(self, cmd: dict[str, Any]) -> Result:
        tokens, secrets, _, _ = self.acl_tables()
        if cmd["AccessorID"] == cmd.get("Anonymous"):
            raise CommandError("Delete operation not permitted on the anonymous token")
        record = tokens.pop(cmd["AccessorID"], None)
        if record is not None:
            secrets.pop(record["SecretHash"], None)
            self._touch("acl")
        return _ok(True)

    def op_acl_policy_set(self, cmd: dict[str, Any]) -> Result:
        _, _, policies, _ = self.acl_tables()
        policy = copy.deepcopy(cmd["Policy"])
        existing = _acl_check_upsert(policies, policy, bool(cmd.get("Create")), "policy", "Policy")
        if existing is not None and existing.get("Builtin") and (
            policy.get("Rules") != existing.get("Rules") or policy["Name"] != existing["Name"]
        ):
            raise CommandError("Changing the Rules or Name of the builtin global-management policy is not permitted")
        policy["Builtin"] = bool(existing and existing.get("Builtin"))
        policy["CreateIndex"] = existing["CreateIndex"] if existing else self.index
        policy["ModifyIndex"] = self.index
        policies[policy["ID"]] = policy
        for token in self.acl_tables()[0].values():  # links show the current name
            for link in token.get("Policies") or []:
                if link["ID"] == policy["ID"]:
                    link["Name"] = policy["Name"]
        self._touch("acl")
        return _ok(policy)

    def op_acl_policy_delete(self, cmd: dict[str, Any]) -> Result:
        _, _, policies, _ = self.acl_tables()
        existing = policies.get(cmd["ID"])
        if existing is not None and existing.get("Builtin"):
            raise CommandError("Delete operation not permitted on the builtin global-management policy")
        if policies.pop(cmd["ID"], None) is not None:
            self._touch("acl")
        return _ok(True)

    def op_acl_role_set(self, cmd: dict[str, Any]) -> Result:
        _, _, policies, roles = self.acl_tables()
        role = copy.deepcopy(cmd["Role"])
        existing = _acl_check_upsert(roles, role, bool(cmd.get("Create")), "role", "Role")
        role["Policies"] = self._acl_links(role.get("Policies"), policies, "policy")
        role["CreateIndex"] = existing["CreateIndex"] if existing else self.index
        role["ModifyIndex"] = self.index
        roles[role["ID"]] = role
        self._touch("acl")
        return _ok(role)

    def op_acl_role_delete(self, cmd: dict[str, Any]) -> Result:
        _, _, _, roles = self.acl_tables()
        if roles.pop(cmd["ID"], None) is not None:
            self._touch("acl")
        return _ok(True)

    def op_noop(self, cmd: dict[str, Any]) -> Result:
        """The read barrier: once applied here, everything committed before it is applied too."""
        return _ok(self.index)


def _acl_check_upsert(
    table: dict[str, dict[str, Any]], record: dict[str, Any], create: bool, kind: str, title: str
) -> dict[str, Any] | None:
    """Create must not overwrite, update must find, and names stay unique; returns the existing record."""
    existing = table.get(record["ID"])
    if create and existing is not None:
        raise CommandError(f"{kind} {record['ID']!r} already exists")
    if not create and existing is None:
        raise CommandError(f"Cannot find {kind} to update", 404)
    if any(r["Name"] == record["Name"] and r["ID"] != record["ID"] for r in table.values()):
        raise CommandError(f"Invalid {title}: A {title} with Name {record['Name']!r} already exists")
    return existing


# The fields of each restored record that the views and writes read, and their types (NoneType: may
# be absent; agent-synced services carry no Proxy). A snapshot may come from anyone, and one junk
# record used to make every catalog read a 500.
_INT, _OPT_DICT = (int,), (dict, type(None))
_RESTORE_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "nodes": {"Node": (str,), "Meta": _OPT_DICT, "TaggedAddresses": _OPT_DICT, "CreateIndex": _INT,
              "ModifyIndex": _INT},
    "services": {"ID": (str,), "Service": (str,), "Tags": (list,), "Meta": _OPT_DICT, "Proxy": _OPT_DICT,
                 "Connect": _OPT_DICT, "Weights": _OPT_DICT, "CreateIndex": _INT, "ModifyIndex": _INT},
    "checks": {"CheckID": (str,), "Status": (str,), "ServiceID": (str, type(None)), "CreateIndex": _INT,
               "ModifyIndex": _INT},
    "kv": {"Key": (str,), "Flags": (int, type(None)), "LockIndex": _INT, "CreateIndex": _INT, "ModifyIndex": _INT},
}


def _check_record(table: str, name: str, record: Any) -> None:
    if not isinstance(record, dict):
        raise CommandError(f"snapshot {table} record {name!r} is not an object")
    for field_name, types in _RESTORE_FIELDS[table].items():
        value = record.get(field_name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise CommandError(f"snapshot {table} record {name!r}: {field_name} must be {types[0].__name__}")


def _check_restored(restored: dict[str, dict[str, Any]]) -> None:
    """Refuse a snapshot whose records the views could not read (before anything is replaced)."""
    nodes = restored["nodes"]
    for name, node in nodes.items():
        _check_record("nodes", name, node)
        if node["Node"] != name:
            raise CommandError(f"snapshot node {name!r} is stored under another name")
    for table, key_field in (("services", "ID"), ("checks", "CheckID")):
        for node_name, records in restored[table].items():
            if node_name not in nodes or not isinstance(records, dict):
                raise CommandError(f"snapshot {table} of {node_name!r}: not an object of a known node")
            for name, record in records.items():
                _check_record(table, name, record)
                if record[key_field] != name or (table == "services" and not all(isinstance(t, str) for t in record["Tags"])):
                    raise CommandError(f"snapshot {table} record {name!r} is inconsistent")
    for key, entry in restored["kv"].items():
        _check_record("kv", key, entry)
        value = entry.get("Value")
        try:  # ?raw decodes it
            valid = value is None or (isinstance(value, str) and base64.b64decode(value, validate=True) is not None)
        except ValueError:
            valid = False
        if entry["Key"] != key or not valid:
            raise CommandError(f"snapshot KV entry {key!r} is inconsistent")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in restored["kv_tombstones"].values()):
        raise CommandError("snapshot kv_tombstones must map keys to indexes")
    for name in ("intentions", "config_entries"):
        if not all(isinstance(v, dict) for v in restored[name].values()):
            raise CommandError(f"snapshot {name} records must be objects")


def _kv_meta(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "Value"} | {"Value": None}


_HANDLERS: dict[str, Callable[[StateStore, dict[str, Any]], Result]] = {
    "register": StateStore.op_register,
    "deregister": StateStore.op_deregister,
    "sync_node": StateStore.op_sync_node,
    "sync_partial": StateStore.op_sync_partial,
    "check_status": StateStore.op_check_status,
    "check_batch": StateStore.op_check_batch,
    "kv_set": StateStore.op_kv_set,
    "kv_delete": StateStore.op_kv_delete,
    "txn": StateStore.op_txn,
    "intention_upsert": StateStore.op_intention_upsert,
    "intention_delete": StateStore.op_intention_delete,
    "intentions_replace": StateStore.op_intentions_replace,
    "config_set": StateStore.op_config_set,
    "config_delete": StateStore.op_config_delete,
    "meta_set": StateStore.op_meta_set,
    "noop": StateStore.op_noop,
    "restore": StateStore.op_restore,
    "acl_bootstrap": StateStore.op_acl_bootstrap,
    "acl_token_set": StateStore.op_acl_token_set,
    "acl_token_delete": StateStore.op_acl_token_delete,
    "acl_policy_set": StateStore.op_acl_policy_set,
    "acl_policy_delete": StateStore.op_acl_policy_delete,
    "acl_role_set": StateStore.op_acl_role_set,
    "acl_role_delete": StateStore.op_acl_role_delete,
}
