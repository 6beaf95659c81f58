"""Consul-compatible DNS interface: catalog view, pure resolver and UDP/TCP server."""

from .ratelimit import QueryRateLimiter
from .resolver import FORWARD, DnsConfig, Forward, SoaConfig, resolve, resolve_wire
from .server import DnsServer
from .view import CatalogView, NodeInfo, ServiceInstance

__all__ = [
    "FORWARD",
    "CatalogView",
    "DnsConfig",
    "DnsServer",
    "Forward",
    "NodeInfo",
    "QueryRateLimiter",
    "ServiceInstance",
    "SoaConfig",
    "resolve",
    "resolve_wire",
]
