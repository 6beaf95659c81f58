"""Immutable, plain-data view of the catalog used by the DNS resolver.

Built once per catalog snapshot (``/v1/internal/snapshot``) so that every DNS
query is answered from precomputed, health-aggregated indexes without touching
the store. ``version`` changes with every new view; the server uses it (and the
object identity) to invalidate its answer cache.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"

_RANK = {PASSING: 0, WARNING: 1, CRITICAL: 2}
_versions = itertools.count(1)


def _worst(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


def _norm_status(status: Any) -> str:
    # "maintenance" and anything unknown count as critical, as in Consul.
    s = str(status or "").lower()
    return s if s in (PASSING, WARNING) else CRITICAL


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    address: str
    datacenter: str
    meta: tuple[tuple[str, str], ...] = ()
    tagged_addresses: Mapping[str, str] = field(default_factory=dict)
    status: str = PASSING  # worst node-level check


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    node: str
    node_address: str
    service_id: str
    service: str
    address: str  # effective address: service Address if set, else node address
    own_address: bool  # True when the service registered its own Address
    port: int
    tags: tuple[str, ...]
    tags_lower: frozenset[str]
    meta: tuple[tuple[str, str], ...]
    weight_passing: int
    weight_warning: int
    status: str  # aggregated over service checks and node checks
    kind: str = ""
    node_meta: tuple[tuple[str, str], ...] = ()

    @property
    def weight(self) -> int:
        return self.weight_warning if self.status == WARNING else self.weight_passing


def _meta_items(meta: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(meta, Mapping):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in meta.items()))


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True, slots=True)
class CatalogView:
    """Read-only catalog indexes keyed by lowercased names."""

    datacenter: str
    nodes: Mapping[str, NodeInfo]
    services: Mapping[str, tuple[ServiceInstance, ...]]
    connect: Mapping[str, tuple[ServiceInstance, ...]]
    ingress: Mapping[str, tuple[ServiceInstance, ...]]
    ptr: Mapping[str, str]  # IP -> name relative to the domain, e.g. "n1.node.dc1"
    servers: tuple[str, ...] = ()
    serial: int = 0
    version: int = 0

    @classmethod
    def empty(cls, datacenter: str = "dc1") -> CatalogView:
        return cls.from_snapshot({}, datacenter)

    @classmethod
    def from_snapshot(
        cls,
        snapshot: Mapping[str, Any],
        datacenter: str,
        ingress_services: Mapping[str, Iterable[str]] | None = None,
        servers: Iterable[str] = (),
        serial: int | None = None,
    ) -> CatalogView:
        """Build the view.

        ``ingress_services`` maps a service name to the names of the ingress
        gateway services exposing it (from ingress-gateway config entries).
        ``servers`` lists node names of servers, used for NS answers.
        """
        node_status: dict[str, str] = {}
        svc_status: dict[tuple[str, str], str] = {}
        for chk in snapshot.get("Checks") or ():
            node = str(chk.get("Node", ""))
            status = _norm_status(chk.get("Status"))
            sid = str(chk.get("ServiceID") or "")
            if sid:
                key = (node, sid)
                svc_status[key] = _worst(svc_status.get(key, PASSING), status)
            else:
                node_status[node] = _worst(node_status.get(node, PASSING), status)

        nodes: dict[str, NodeInfo] = {}
        for n in snapshot.get("Nodes") or ():
            name = str(n.get("Node", ""))
            if not name:
                continue
            tagged = n.get("TaggedAddresses") or {}
            nodes[name.lower()] = NodeInfo(
                name=name,
                address=str(n.get("Address", "")),
                datacenter=str(n.get("Datacenter") or datacenter),
                meta=_meta_items(n.get("Meta")),
                tagged_addresses=MappingProxyType({str(k): str(v) for k, v in tagged.items()}),
                status=node_status.get(name, PASSING),
            )

        services: dict[str, list[ServiceInstance]] = {}
        connect: dict[str, list[ServiceInstance]] = {}
        by_name_all: dict[str, list[ServiceInstance]] = {}
        ptr: dict[str, str] = {}
        for s in snapshot.get("Services") or ():
            node_name = str(s.get("Node", ""))
            node = nodes.get(node_name.lower())
            if node is None:
                continue  # orphan service; the catalog never returns these
            sid = str(s.get("ID") or s.get("Service") or "")
            sname = str(s.get("Service", ""))
            if not sname:
                continue
            own = str(s.get("Address") or "")
            status = _worst(node_status.get(node_name, PASSING), svc_status.get((node_name, sid), PASSING))
            weights = s.get("Weights") or {}
            tags = tuple(str(t) for t in (s.get("Tags") or ()))
            inst = ServiceInstance(
                node=node.name,
                node_address=node.address,
                service_id=sid,
                service=sname,
                address=own or node.address,
                own_address=bool(own),
                port=_int(s.get("Port"), 0),
                tags=tags,
                tags_lower=frozenset(t.lower() for t in tags),
                meta=_meta_items(s.get("Meta")),
                weight_passing=_int(weights.get("Passing"), 1),
                weight_warning=_int(weights.get("Warning"), 1),
                status=status,
                kind=str(s.get("Kind") or ""),
                node_meta=node.meta,
            )
            by_name_all.setdefault(sname.lower(), []).append(inst)
            # Proxies and gateways stay addressable by their own name too.
            services.setdefault(sname.lower(), []).append(inst)
            kind = inst.kind
            if kind == "connect-proxy":
                dest = str((s.get("Proxy") or {}).get("DestinationServiceName") or "")
                if dest:
                    connect.setdefault(dest.lower(), []).append(inst)
            elif (s.get("Connect") or {}).get("Native"):
                connect.setdefault(sname.lower(), []).append(inst)
            if own and _is_ip(own):
                ptr.setdefault(str(ipaddress.ip_address(own)), f"{sname}.service.{datacenter}")

        # Node addresses win over service addresses for PTR, as in Consul.
        for node in nodes.values():
            if _is_ip(node.address):
                ptr[str(ipaddress.ip_address(node.address))] = f"{node.name}.node.{node.datacenter}"

        ingress: dict[str, list[ServiceInstance]] = {}
        for svc, gateways in (ingress_services or {}).items():
            for gw in gateways:
                for inst in by_name_all.get(str(gw).lower(), ()):
                    if inst.kind == "ingress-gateway":
                        ingress.setdefault(str(svc).lower(), []).append(inst)

        def freeze(d: dict[str, list[ServiceInstance]]) -> Mapping[str, tuple[ServiceInstance, ...]]:
            return MappingProxyType({k: tuple(v) for k, v in d.items()})

        return cls(
            datacenter=datacenter,
            nodes=MappingProxyType(nodes),
            services=freeze(services),
            connect=freeze(connect),
            ingress=freeze(ingress),
            ptr=MappingProxyType(ptr),
            servers=tuple(servers),
            serial=int(time.time()) if serial is None else serial,
            version=next(_versions),
        )
