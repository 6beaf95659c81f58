"""The ingress-gateway config entry as a listener table: port -> protocol -> virtual hosts -> service.

Pure. An HTTP listener routes by the Host header: each exposed service answers on its Hosts, or on
`<service>.ingress.*` when it lists none; a `*` service answers `<any>.ingress.*` for every service
(the caller says which exist). A TCP listener carries exactly one service.

    table = build_listeners(entry)
    table[0].service_for_host("web.ingress.example.com:8080")   # -> IngressService(name="web")
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from lictor.gateway.chain import HeaderMods

__all__ = ["IngressListener", "IngressService", "build_listeners", "host_matches", "strip_port"]


@dataclass(frozen=True, slots=True)
class IngressService:
    name: str  # "*" for the wildcard
    hosts: tuple[str, ...]  # lower-cased; default `<name>.ingress.*`
    request_headers: HeaderMods = HeaderMods()
    response_headers: HeaderMods = HeaderMods()


@dataclass(frozen=True, slots=True)
class IngressListener:
    port: int
    protocol: str  # tcp | http | http2 | grpc
    services: tuple[IngressService, ...]

    def service_for_host(self, host: str, known: Container[str] = ()) -> tuple[IngressService, str] | None:
        """(exposed service, the concrete service name) for a Host header; None -> 404.

        Exact hosts beat wildcard hosts (Envoy's virtual-host order); a `*` service matches
        `<name>.ingress.<anything>` for a `name` in `known`."""
        if self.protocol == "tcp":
            return (self.services[0], self.services[0].name) if self.services else None
        bare = strip_port(host.lower())
        best: tuple[int, IngressService] | None = None
        for svc in self.services:
            if svc.name == "*":
                continue
            for pattern in svc.hosts:
                score = host_matches(pattern, bare, host.lower())
                if score and (best is None or score > best[0]):
                    best = (score, svc)
        if best is not None:
            return best[1], best[1].name
        for svc in self.services:
            if svc.name == "*":
                label, sep, rest = bare.partition(".ingress.")
                if sep and rest and label in known:
                    return svc, label
        return None


def strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def host_matches(pattern: str, bare: str, full: str) -> int:
    """0 = no match; higher = more specific (exact 3, `*.suffix` / `prefix.*` 2, `*` 1)."""
    if pattern == "*":
        return 1
    if pattern in (bare, full):
        return 3
    if pattern.startswith("*.") and bare.endswith(pattern[1:]) and len(bare) > len(pattern) - 1:
        return 2
    if pattern.endswith(".*") and bare.startswith(pattern[:-1]) and len(bare) > len(pattern) - 1:
        return 2
    return 0


def build_listeners(entry: Mapping[str, Any]) -> tuple[IngressListener, ...]:
    out = []
    for listener in entry.get("Listeners") or ():
        protocol = (listener.get("Protocol") or "tcp").lower()
        services = []
        for svc in listener.get("Services") or ():
            name = svc.get("Name") or ""
            hosts = tuple(h.lower() for h in svc.get("Hosts") or ()) or (f"{name}.ingress.*",)
            services.append(IngressService(
                name=name, hosts=hosts if name != "*" else (),
                request_headers=HeaderMods.from_api(svc.get("RequestHeaders")),
                response_headers=HeaderMods.from_api(svc.get("ResponseHeaders")),
            ))
        out.append(IngressListener(port=int(listener.get("Port") or 0), protocol=protocol, services=tuple(services)))
    return tuple(out)
