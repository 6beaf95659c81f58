"""The proxy's configuration as plain frozen data, parsed from its agent registration (pure).

The registration is Consul's `connect-proxy` service JSON (`GET /v1/agent/service/<id>`):
`Port` is the inbound listener, `Proxy.LocalServiceAddress/Port` the app, `Proxy.Upstreams[]` the
outbound listeners. Upstream `Config` keys follow Consul/Envoy's escape-hatch names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lictor.agent.proxy.balancer import DEFAULT_EJECTION_TIME, DEFAULT_MAX_FAILURES, LB_POLICIES
from lictor.agent.proxy.observe import ObserveSettings, settings_from_config

__all__ = [
    "DEFAULT_CONNECT_RETRIES",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "HTTP_PROTOCOLS",
    "ProxySpec",
    "UpstreamSpec",
    "parse_registration",
]

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CONNECT_RETRIES = 3
HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    destination: str
    bind_address: str
    bind_port: int
    lb_policy: str = "round_robin"
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    connect_retries: int = DEFAULT_CONNECT_RETRIES
    max_failures: int = DEFAULT_MAX_FAILURES
    ejection_time: float = DEFAULT_EJECTION_TIME
    protocol: str = ""  # the upstream's Config.protocol; service-/proxy-defaults of the destination win

    @property
    def listener_key(self) -> tuple[str, int]:
        return (self.bind_address, self.bind_port)


@dataclass(frozen=True, slots=True)
class ProxySpec:
    proxy_id: str
    destination_name: str
    destination_id: str
    port: int
    address: str
    local_address: str
    local_port: int
    upstreams: tuple[UpstreamSpec, ...]
    content_hash: str = ""
    observe: ObserveSettings = ObserveSettings()  # Proxy.Config otlp_endpoint / trace_sample_ratio / access_log


def _num(value: Any, default: float, lo: float, hi: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return min(max(out, lo), hi)


def _duration_seconds(value: Any, default: float) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            from lictor.durations import parse_duration

            return float(parse_duration(value))
        except Exception:  # noqa: BLE001 - a bad knob falls back to the default, never kills the proxy
            return default
    return default


def _upstream(raw: Mapping[str, Any]) -> UpstreamSpec | None:
    name = raw.get("DestinationName")
    port = raw.get("LocalBindPort")
    if not name or not isinstance(port, int) or port <= 0:
        return None
    if (raw.get("DestinationType") or "service") != "service":
        return None  # prepared-query upstreams are not supported
    cfg = raw.get("Config") or {}
    if not isinstance(cfg, Mapping):
        cfg = {}
    limits = cfg.get("limits") or cfg.get("Limits") or {}
    passive = cfg.get("passive_health_check") or cfg.get("PassiveHealthCheck") or {}
    policy = str(cfg.get("lb_policy") or cfg.get("LBPolicy") or "round_robin").lower()
    if policy not in LB_POLICIES:
        policy = "round_robin"
    max_conns = limits.get("max_connections", limits.get("MaxConnections")) if isinstance(limits, Mapping) else None
    max_fail = passive.get("max_failures", passive.get("MaxFailures")) if isinstance(passive, Mapping) else None
    eject = passive.get("base_ejection_time", passive.get("BaseEjectionTime")) if isinstance(passive, Mapping) else None
    return UpstreamSpec(
        destination=str(name),
        bind_address=str(raw.get("LocalBindAddress") or "127.0.0.1"),
        bind_port=port,
        lb_policy=policy,
        max_connections=int(_num(max_conns, DEFAULT_MAX_CONNECTIONS, 1, 1 << 20)),
        connect_timeout=_num(cfg.get("connect_timeout_ms"), DEFAULT_CONNECT_TIMEOUT * 1000, 10, 600_000) / 1000,
        connect_retries=int(_num(cfg.get("connect_retries"), DEFAULT_CONNECT_RETRIES, 0, 16)),
        max_failures=int(_num(max_fail, DEFAULT_MAX_FAILURES, 1, 1000)),
        ejection_time=_duration_seconds(eject, DEFAULT_EJECTION_TIME),
        protocol=str(cfg.get("protocol") or cfg.get("Protocol") or "").lower(),
    )


def parse_registration(service: Mapping[str, Any]) -> ProxySpec:
    """A `connect-proxy` registration as a ProxySpec. ValueError when it is not one."""
    proxy = service.get("Proxy") or {}
    if service.get("Kind") != "connect-proxy" or not isinstance(proxy, Mapping):
        raise ValueError(f"service {service.get('ID')!r} is not a connect-proxy (Kind={service.get('Kind')!r})")
    dest = proxy.get("DestinationServiceName")
    if not dest:
        raise ValueError(f"service {service.get('ID')!r} has no Proxy.DestinationServiceName")
    port = service.get("Port")
    if not isinstance(port, int) or port <= 0:
        raise ValueError(f"service {service.get('ID')!r} has no Port for the inbound listener")
    upstreams: list[UpstreamSpec] = []
    seen: set[tuple[str, int]] = set()
    for raw in proxy.get("Upstreams") or []:
        if isinstance(raw, Mapping):
            up = _upstream(raw)
            if up is not None and up.listener_key not in seen:
                seen.add(up.listener_key)
                upstreams.append(up)
    return ProxySpec(
        proxy_id=str(service.get("ID") or ""),
        destination_name=str(dest),
        destination_id=str(proxy.get("DestinationServiceID") or dest),
        port=port,
        address=str(service.get("Address") or "127.0.0.1"),
        local_address=str(proxy.get("LocalServiceAddress") or "127.0.0.1"),
        local_port=int(proxy.get("LocalServicePort") or 0),
        upstreams=tuple(upstreams),
        content_hash=str(service.get("ContentHash") or ""),
        observe=settings_from_config(proxy.get("Config")),
    )
