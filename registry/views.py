"""Pure read views over the state store, shaped as Consul's JSON responses.

Each view returns `(index, data)`: the index is the last change of exactly the resource read,
so a blocking query on it wakes on that resource's changes (deletes included) and no others.
Callers hold `store.lock` (or call through `read()`), and get deep copies they may mutate.
"""

from __future__ import annotations

import copy
import json
import marshal
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from lictor.httpapi import compact_json
from lictor.registry.state import StateStore

Index = int


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _copy(data: Any) -> Any:
    """A private deep copy. The views return plain JSON-shaped data, which marshal copies in C
    about 8x faster than copy.deepcopy (deepcopy was the largest share of a server's read CPU)."""
    try:
        return marshal.loads(marshal.dumps(data))
    except ValueError:  # something marshal can't carry: keep correctness, pay the price
        return copy.deepcopy(data)


def read(store: StateStore, view: Callable[..., tuple[Index, Any]], *args: Any, **kwargs: Any) -> tuple[Index, Any]:
    """Run a view under the store's lock and return a private copy of its result."""
    with store.lock:
        index, data = view(store, *args, **kwargs)
        return max(index, 1), _copy(data)


class SharedRead:
    """One cached view result shared by every caller until what the view reads changes.

    Built in one of two forms. A reply entry holds only the compact JSON, encoded straight from the
    live state under the lock: no private copy is made, and a write that wakes a thousand watchers of
    one view encodes once. Its `data` (for `?filter` and `?pretty`) is decoded from that JSON on first
    use. A data entry holds a private copy, for handlers that reshape the result themselves.
    """

    __slots__ = ("index", "stamp", "_data", "_body")

    def __init__(self, index: Index, stamp: Index, data: Any = None, body: bytes | None = None) -> None:
        self.index, self.stamp, self._data, self._body = index, stamp, data, body

    @property
    def data(self) -> Any:
        """Read-only: shared by every caller of this entry."""
        if self._data is None and self._body is not None:
            self._data = json.loads(self._body)
        return self._data

    def body(self) -> bytes:
        if self._body is None:
            self._body = compact_json(self._data)
        return self._body


def read_shared_entry(store: StateStore, view: Callable[..., tuple[Index, Any]], *args: Any,
                      as_body: bool = False, **kwargs: Any) -> SharedRead:
    """Like `read`, but results are shared between callers until what the view reads changes.

    `as_body=True` asks for the encoded reply (see `SharedRead`); otherwise `data` is a private copy
    made once. A view with a cheap index function (`_INDEX_OF`) stays cached while its own index is
    unchanged, so writes elsewhere (KV, other services) don't force a rebuild; any other view is
    cached for one store index. Callers must treat the result as read-only.
    """
    key = (view, as_body, _freeze(args), _freeze(kwargs))
    index_of = _INDEX_OF.get(view)
    with store.lock:
        stamp = _stamp(store, index_of, args, kwargs)
        cache = store.read_cache
        hit = cache.get(key)
        if hit is not None and hit.stamp == stamp:
            return hit
        body_of = _BODY_OF.get(view) if as_body else None
        if body_of is not None:
            index, body = body_of(store, *args, **kwargs)
            entry = SharedRead(max(index, 1), stamp, body=body)
        elif as_body:
            index, data = view(store, *args, **kwargs)
            # Encoding under the lock is what makes skipping the copy safe: the state can't change
            # mid-encode, and nothing keeps a reference to the live objects afterwards.
            entry = SharedRead(max(index, 1), stamp, body=compact_json(data))
        else:
            index, data = view(store, *args, **kwargs)
            entry = SharedRead(max(index, 1), stamp, data=_copy(data))
        if len(cache) >= 4096:  # bounded: distinct queries (tags, filters) can't grow it forever
            cache.clear()
        cache[key] = entry
        return entry


def stamp_function(store: StateStore, view: Callable[..., tuple[Index, Any]], *args: Any,
                   **kwargs: Any) -> Callable[[], Index] | None:
    """The stamp `read_shared_entry` caches this view's answer under, as a function a blocking
    query can re-check cheaply after each change; None when the view has no cheap index (its stamp
    would be the store's index, which every write moves)."""
    index_of = _INDEX_OF.get(view)
    if index_of is None:
        return None

    def stamp() -> Index:
        with store.lock:
            return _stamp(store, index_of, args, kwargs)

    return stamp


def _stamp(store: StateStore, index_of: Callable[..., Index | None] | None, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> Index:
    """What a view's cached answer is valid for: its cheap index, else the store's (caller holds the lock)."""
    value = index_of(store, *args, **kwargs) if index_of is not None else None
    return store.index if value is None else value


def _table(store: StateStore, *tables: str) -> Index:
    return max((store.table_index.get(t, 0) for t in tables), default=0)


def _tags_match(service: dict[str, Any], tags: list[str]) -> bool:
    return all(tag in service.get("Tags", []) for tag in tags)


def _meta_match(meta: dict[str, str], node_meta: list[tuple[str, str]]) -> bool:
    return all(meta.get(k) == v for k, v in node_meta)


def _sorted_instances(store: StateStore, name: str) -> list[tuple[str, dict[str, Any]]]:
    """`name`'s instances by node, then service ID. Filtered before sorting: a client node holds
    hundreds of services, and sorting all their IDs on every rebuild was most of this function."""
    found = []
    for node in sorted(store.services):
        services = store.services[node]
        ids = [service_id for service_id, service in services.items() if service["Service"] == name]
        ids.sort()
        found.extend((node, services[service_id]) for service_id in ids)
    return found


def _service_index(store: StateStore, name: str) -> Index:
    return store.service_index.get(name) or _table(store, "services", "nodes")


# -- catalog -------------------------------------------------------------------------------------


def catalog_nodes(store: StateStore, node_meta: list[tuple[str, str]] = ()) -> tuple[Index, list[dict]]:
    nodes = [n for _, n in sorted(store.nodes.items()) if _meta_match(n.get("Meta", {}), list(node_meta))]
    return _table(store, "nodes"), nodes


def catalog_services(store: StateStore, node_meta: list[tuple[str, str]] = ()) -> tuple[Index, dict[str, list]]:
    # name -> tags as dict keys: deduplicated in first-seen order (nodes in order, then each node's
    # services in order), merged from per-(node, name) summaries that are rebuilt only for the name
    # whose instances on that node changed: a registration on a node of 270 services rescans the
    # ~50 of its name there, not all 270 (state.py: names_on_node, instance_version).
    result: dict[str, dict[str, None]] = {}
    summaries = store.read_cache.get(_NAME_TAGS)
    if summaries is None:
        summaries = store.read_cache[_NAME_TAGS] = {}
    for node, services in store.services.items():
        if node_meta and not _meta_match(store.nodes.get(node, {}).get("Meta", {}), list(node_meta)):
            continue
        for name, ids in store.names_on_node.get(node, {}).items():
            tags = _name_tags(store, summaries, node, name, services, ids)
            merged = result.get(name)
            if merged is None:
                result[name] = dict(tags)
            else:
                merged.update(tags)  # keeps the first-seen order; new tags go last
    return _table(store, "services", "nodes"), {name: list(result[name]) for name in sorted(result)}


_NAME_TAGS = ("catalog_services", "per-node tags")  # the read_cache key of the per-(node, name) summaries


def _name_tags(store: StateStore, summaries: dict[tuple[str, str], Any], node: str, name: str,
               services: dict[str, dict[str, Any]], ids: dict[str, None]) -> dict[str, None]:
    """The tags of `name`'s instances on `node` (first-seen order), reused while none of them changed."""
    key = (node, name)
    version = store.instance_version.get(key, 0)
    hit = summaries.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    tags: dict[str, None] = {}
    for service_id in ids:
        for tag in services[service_id].get("Tags") or ():
            tags[tag] = None
    if len(summaries) >= 65536:  # bounded: names and nodes that come and go can't grow it forever
        summaries.clear()
    summaries[key] = (version, tags)
    return tags


def catalog_service_entry(node: dict[str, Any], service: dict[str, Any]) -> dict[str, Any]:
    return {
        "ID": node.get("ID", ""),
        "Node": node["Node"],
        "Address": node.get("Address", ""),
        "Datacenter": node.get("Datacenter", ""),
        "TaggedAddresses": node.get("TaggedAddresses", {}),
        "NodeMeta": node.get("Meta", {}),
        "ServiceKind": service.get("Kind", ""),
        "ServiceID": service["ID"],
        "ServiceName": service["Service"],
        "ServiceTags": service.get("Tags", []),
        "ServiceAddress": service.get("Address", ""),
        "ServiceTaggedAddresses": service.get("TaggedAddresses", {}),
        "ServiceWeights": service.get("Weights", {"Passing": 1, "Warning": 1}),
        "ServiceMeta": service.get("Meta", {}),
        "ServicePort": service.get("Port", 0),
        "ServiceSocketPath": service.get("SocketPath", ""),
        "ServiceEnableTagOverride": service.get("EnableTagOverride", False),
        "ServiceProxy": service.get("Proxy", {}),
        "ServiceConnect": service.get("Connect", {}),
        "CreateIndex": service["CreateIndex"],
        "ModifyIndex": service["ModifyIndex"],
    }


def catalog_service(
    store: StateStore, name: str, tags: list[str] = (), node_meta: list[tuple[str, str]] = ()
) -> tuple[Index, list[dict]]:
    entries = []
    for node_name, service in _sorted_instances(store, name):
        node = store.nodes.get(node_name)
        if node is None or not _tags_match(service, list(tags)) or not _meta_match(node.get("Meta", {}), list(node_meta)):
            continue
        entries.append(catalog_service_entry(node, service))
    return _service_index(store, name), entries


def catalog_connect(store: StateStore, name: str) -> tuple[Index, list[dict]]:
    """Instances that can accept mesh traffic for `name`: its sidecars and native services."""
    entries = []
    index = _service_index(store, name)
    for node_name in sorted(store.services):
        for service_id in sorted(store.services[node_name]):
            service = store.services[node_name][service_id]
            is_proxy = service.get("Kind") == "connect-proxy" and (service.get("Proxy") or {}).get(
                "DestinationServiceName"
            ) == name
            is_native = service["Service"] == name and (service.get("Connect") or {}).get("Native")
            if is_proxy or is_native:
                entries.append(catalog_service_entry(store.nodes[node_name], service))
                index = max(index, store.service_index.get(service["Service"], 0))
    return index, entries


def _node_index(store: StateStore, node_name: str) -> Index:
    return store.node_index.get(node_name) or _table(store, "nodes")


def catalog_node(store: StateStore, node_name: str) -> tuple[Index, dict | None]:
    node = store.nodes.get(node_name)
    index = _node_index(store, node_name)
    if node is None:
        return index, None
    return index, {"Node": node, "Services": dict(sorted(store.services.get(node_name, {}).items()))}


# -- health ----------------------------------------------------------------------------------------


def health_service_entries(
    store: StateStore,
    name: str,
    passing: bool = False,
    tags: list[str] = (),
    node_meta: list[tuple[str, str]] = (),
    connect: bool = False,
) -> tuple[Index, list[dict]]:
    if connect:
        index, catalog_entries = catalog_connect(store, name)
        instances = [(e["Node"], store.services[e["Node"]][e["ServiceID"]]) for e in catalog_entries]
    else:
        index, instances = _service_index(store, name), _sorted_instances(store, name)
    tags, node_meta = list(tags), list(node_meta)
    by_node: dict[str, _NodeChecks] = {}
    entries = []
    for node_name, service in instances:
        node = store.nodes.get(node_name)
        if node is None or (tags and not _tags_match(service, tags)) or (
                node_meta and not _meta_match(node.get("Meta", {}), node_meta)):
            continue
        grouped = by_node.get(node_name)
        if grouped is None:
            grouped = by_node[node_name] = _NodeChecks(store.checks.get(node_name, {}))
        entry = _health_entry(node, service, grouped, passing)
        if entry is not None:
            entries.append(entry)
    return index, entries


def _health_entry(node: dict[str, Any], service: dict[str, Any], grouped: _NodeChecks,
                  passing: bool) -> dict[str, Any] | None:
    """One instance's health entry, or None when `?passing` drops it (any of its checks not passing)."""
    checks = grouped.of(service["ID"])
    if passing and any(c["Status"] != "passing" for c in checks):
        return None
    return {"Node": node, "Service": service, "Checks": checks}


def health_service_body(
    store: StateStore,
    name: str,
    passing: bool = False,
    tags: list[str] = (),
    node_meta: list[tuple[str, str]] = (),
    connect: bool = False,
) -> tuple[Index, bytes]:
    """`health_service_entries` as its compact JSON reply, rebuilt only for the nodes that changed.

    Under churn every health read after a registration was a full rebuild: ~110 us for a
    100-instance answer on the soak's catalog (the view, then orjson), on the read's own path. Here
    each node's share of the answer (its instances of `name`, encoded) is kept in
    `store.block_cache` under the versions of the node's record and of `name`'s instances on it
    (state.py: node_version, instance_version), so only the shares that changed are rebuilt: a
    registration of another name on the same node leaves this one's share as it was. The bytes
    are those `compact_json` gives for the whole list: orjson writes a list as its elements' own
    encodings joined by commas."""
    if connect:
        index, entries = health_service_entries(store, name, passing, tags, node_meta, connect)
        return index, compact_json(entries)
    tags, node_meta = list(tags), list(node_meta)
    filters = (name, passing, tuple(tags), tuple(node_meta))
    cache = store.block_cache
    if len(cache) >= 65536:  # bounded: distinct filters over many nodes can't grow it forever
        cache.clear()
    blocks = []
    for node_name in sorted(store.services):
        version = (store.node_version.get(node_name, 0), store.instance_version.get((node_name, name), 0))
        key = (node_name, filters)
        hit = cache.get(key)
        if hit is None or hit[0] != version:
            hit = cache[key] = (version, _health_block(store, node_name, name, passing, tags, node_meta))
        if hit[1]:
            blocks.append(hit[1])
    return _service_index(store, name), b"[" + b",".join(blocks) + b"]"


def _health_block(store: StateStore, node_name: str, name: str, passing: bool, tags: list[str],
                  node_meta: list[tuple[str, str]]) -> bytes:
    """One node's entries of `health_service_entries`, encoded and comma-joined (b"" if none)."""
    node = store.nodes.get(node_name)
    if node is None or (node_meta and not _meta_match(node.get("Meta", {}), node_meta)):
        return b""
    services = store.services.get(node_name, {})
    ids = sorted(store.names_on_node.get(node_name, {}).get(name, ()))
    if not ids:
        return b""
    # Each instance's encoding is kept under the versions of its node (record, node-level checks)
    # and of the instance itself (record, checks): a share is rebuilt because one instance of its
    # name on the node changed, and the others' encodings, most of that rebuild, stay valid.
    cache = store.entry_cache
    if len(cache) >= 262144:  # bounded: instances that come and go can't grow it forever
        cache.clear()
    node_version = store.node_version.get(node_name, 0)
    grouped: _NodeChecks | None = None
    encoded = []
    for service_id in ids:
        service = services[service_id]
        if tags and not _tags_match(service, tags):
            continue
        key = (node_name, service_id)
        version = (node_version, store.service_version.get(key, 0))
        hit = cache.get(key)
        if hit is None or hit[0] != version:
            if grouped is None:
                grouped = _NodeChecks(store.checks.get(node_name, {}))
            entry = _health_entry(node, service, grouped, False)
            assert entry is not None
            all_passing = all(check["Status"] == "passing" for check in entry["Checks"])
            hit = cache[key] = (version, all_passing, compact_json(entry))
        if passing and not hit[1]:
            continue  # `?passing` drops an instance with any check not passing
        encoded.append(hit[2])
    return b",".join(encoded)


class _NodeChecks:
    """One node's checks grouped once per view build: each of its instances gets its own and the
    node's, in CheckID order, without a sort and scan of all the node's checks per instance."""

    __slots__ = ("_node_level", "_by_service")

    def __init__(self, checks: dict[str, dict[str, Any]]) -> None:
        self._node_level: list[tuple[str, dict[str, Any]]] = []
        self._by_service: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for check_id in sorted(checks):
            check = checks[check_id]
            service_id = check.get("ServiceID", "")
            if service_id:
                self._by_service.setdefault(service_id, []).append((check_id, check))
            else:
                self._node_level.append((check_id, check))

    def of(self, service_id: str) -> list[dict[str, Any]]:
        own = self._by_service.get(service_id)
        if not own:
            return [check for _, check in self._node_level]
        if not self._node_level:
            return [check for _, check in own]
        return [check for _, check in sorted(self._node_level + own, key=itemgetter(0))]


def health_checks(store: StateStore, name: str) -> tuple[Index, list[dict]]:
    checks = []
    for node_name, service in _sorted_instances(store, name):
        node_checks = store.checks.get(node_name, {})
        checks.extend(node_checks[c] for c in sorted(node_checks) if node_checks[c].get("ServiceID") == service["ID"])
    return _service_index(store, name), checks


def health_state(store: StateStore, state: str) -> tuple[Index, list[dict]]:
    checks = []
    for node_name in sorted(store.checks):
        for check_id in sorted(store.checks[node_name]):
            check = store.checks[node_name][check_id]
            if state == "any" or check["Status"] == state:
                checks.append(check)
    return _table(store, "checks", "nodes"), checks


def health_node(store: StateStore, node_name: str) -> tuple[Index, list[dict]]:
    checks = store.checks.get(node_name, {})
    return _node_index(store, node_name), [checks[c] for c in sorted(checks)]


# -- KV ----------------------------------------------------------------------------------------------


def _kv_prefix_index(store: StateStore, prefix: str) -> Index:
    index = store.kv_tomb_floor
    for key, entry in store.kv.items():
        if key.startswith(prefix):
            index = max(index, entry["ModifyIndex"])
    for key, tomb in store.kv_tombstones.items():
        if key.startswith(prefix):
            index = max(index, tomb)
    return index or _table(store, "kv")


def _kv_key_index(store: StateStore, key: str) -> Index:
    entry = store.kv.get(key)
    if entry is not None:
        # A restore changes every key at its index (kv_tomb_floor), whatever ModifyIndex it restored.
        return max(entry["ModifyIndex"], store.kv_tomb_floor)
    return max(store.kv_tombstones.get(key, 0), store.kv_tomb_floor) or _table(store, "kv")


def kv_get(store: StateStore, key: str) -> tuple[Index, dict | None]:
    return _kv_key_index(store, key), store.kv.get(key)


def kv_list(store: StateStore, prefix: str) -> tuple[Index, list[dict]]:
    entries = [store.kv[k] for k in sorted(store.kv) if k.startswith(prefix)]
    return _kv_prefix_index(store, prefix), entries


def kv_keys(store: StateStore, prefix: str, separator: str = "") -> tuple[Index, list[str]]:
    keys: list[str] = []
    seen: set[str] = set()
    for key in sorted(store.kv):
        if not key.startswith(prefix):
            continue
        if separator:
            cut = key.find(separator, len(prefix))
            if cut != -1:
                key = key[: cut + len(separator)]
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return _kv_prefix_index(store, prefix), keys


# -- intentions, config, whole-catalog snapshot ------------------------------------------------------


def intentions_list(store: StateStore) -> tuple[Index, list[dict]]:
    return _table(store, "intentions"), list(store.intentions.values())


def config_get(store: StateStore, kind: str, name: str) -> tuple[Index, dict | None]:
    return _table(store, "config"), store.config_entries.get(kind, {}).get(name)


def config_list(store: StateStore, kind: str) -> tuple[Index, list[dict]]:
    entries = store.config_entries.get(kind, {})
    return _table(store, "config"), [entries[n] for n in sorted(entries)]


def catalog_snapshot_index(store: StateStore) -> Index:
    """catalog_snapshot's index without building it."""
    return tables_index(store, SNAPSHOT_TABLES)


def tables_index(store: StateStore, tables: tuple[str, ...]) -> Index:
    """The last index that changed any of `tables`: a stamp for a watcher of those tables."""
    with store.lock:
        return _table(store, *tables)


SNAPSHOT_TABLES = ("nodes", "services", "checks", "config")


def catalog_snapshot(store: StateStore) -> tuple[Index, dict[str, Any]]:
    """Every node, service and check: what agents watch to keep their DNS view current."""
    services = [dict(s, Node=n) for n in sorted(store.services) for _, s in sorted(store.services[n].items())]
    checks = [c for n in sorted(store.checks) for _, c in sorted(store.checks[n].items())]
    ingress: dict[str, list[str]] = {}
    for gateway, entry in sorted(store.config_entries.get("ingress-gateway", {}).items()):
        for listener in entry.get("Listeners") or []:
            for exposed in listener.get("Services") or []:
                gateways = ingress.setdefault(exposed.get("Name", ""), [])
                if gateway not in gateways:
                    gateways.append(gateway)
    return _table(store, *SNAPSHOT_TABLES), {
        "Nodes": [store.nodes[n] for n in sorted(store.nodes)],
        "Services": services,
        "Checks": checks,
        "IngressServices": ingress,
    }


def meta_get(store: StateStore, key: str) -> tuple[Index, Any]:
    return _table(store, "meta"), store.meta.get(key)


# -- cheap indexes for the shared-read cache -------------------------------------------------------
# Each returns exactly the index its view returns (the same helpers compute both), without building
# the view; None means "not cheap: cache for one store index".

# Views whose encoded reply has a faster builder than encoding the view's data.
_BODY_OF: dict[Callable[..., Any], Callable[..., tuple[Index, bytes]]] = {
    health_service_entries: health_service_body,
}

_INDEX_OF: dict[Callable[..., Any], Callable[..., Index | None]] = {
    catalog_nodes: lambda store, node_meta=(): _table(store, "nodes"),
    catalog_services: lambda store, node_meta=(): _table(store, "services", "nodes"),
    catalog_service: lambda store, name, tags=(), node_meta=(): _service_index(store, name),
    catalog_node: _node_index,
    health_service_entries: lambda store, name, passing=False, tags=(), node_meta=(), connect=False: (
        None if connect else _service_index(store, name)),
    health_checks: lambda store, name: _service_index(store, name),
    health_state: lambda store, state: _table(store, "checks", "nodes"),
    health_node: _node_index,
    kv_get: _kv_key_index,
    catalog_snapshot: catalog_snapshot_index,
}
