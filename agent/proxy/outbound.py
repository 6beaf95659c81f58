"""Outbound listeners: one plain TCP port per upstream, mTLS to a healthy sidecar of the destination.

An upstream whose destination protocol is http gets a `route` (its compiled discovery chain, kept by
`l7.ChainWatcher`): its new connections are then parsed and routed per request by `l7.HTTPOutbound`.
Without a route (tcp, http2, grpc) a connection is relayed at L4 as described here.

Per accepted connection: refuse it when the upstream is at its connection limit (circuit breaker),
else pick an endpoint (balancer), dial it with TLS presenting our leaf, check the server's chain
(the ssl module, against the roots) and its URI SAN (must be the destination service), and on a
connect failure retry on another endpoint. Bytes the app sends meanwhile are buffered (`Pipe`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

from lictor.agent.proxy.balancer import Balancer, Endpoint
from lictor.agent.proxy.config import UpstreamSpec
from lictor.agent.proxy.relay import Pipe
from lictor.agent.proxy.state import ProxyState
from lictor.agent.proxy.tls import peer_uris, sni_for
from lictor.errors import BadRequest
from lictor.registry.intentions import spiffe_service

if TYPE_CHECKING:
    from lictor.agent.proxy.l7 import L7Router, RouteTable

__all__ = ["OutboundClient", "Upstream", "endpoints_from_health"]

log = logging.getLogger("lictor.proxy.outbound")


def endpoints_from_health(entries: list[dict[str, Any]]) -> list[Endpoint]:
    """`/v1/health/connect/<dest>` entries → dialable endpoints (service address, else the node's)."""
    out = []
    for entry in entries or []:
        svc = entry.get("Service") or {}
        node = entry.get("Node") or {}
        port = svc.get("Port")
        host = svc.get("Address") or node.get("Address")
        if isinstance(port, int) and port > 0 and host:
            out.append(Endpoint(str(host), port, str(svc.get("ID") or ""), str(node.get("Node") or "")))
    return out


class _ServerSide(Pipe):
    __slots__ = ("endpoint",)

    def __init__(self) -> None:
        super().__init__()
        self.endpoint: Endpoint | None = None


class OutboundClient(Pipe):
    """The app's plain connection to an upstream's local port."""

    __slots__ = ("upstream", "_counted", "_task")

    def __init__(self, upstream: Upstream) -> None:
        super().__init__()
        self.upstream = upstream
        self._counted = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        up = self.upstream
        if up.active >= up.spec.max_connections:
            up.state.stats.inc("upstream_overflow", upstream=up.spec.destination)
            log.warning("upstream %s: %d connections open, refusing (limit)", up.spec.destination, up.active)
            transport.abort()
            return
        up.active += 1
        self._counted = True
        up.clients.add(self)
        self._task = asyncio.get_running_loop().create_task(up.dial(self))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.upstream.active -= 1
            self.upstream.clients.discard(self)
        super().connection_lost(exc)


class Upstream:
    """One upstream listener, its endpoints and its balancer."""

    def __init__(self, state: ProxyState, spec: UpstreamSpec) -> None:
        self.state = state
        self.spec = spec
        self.balancer = Balancer(spec.lb_policy, max_failures=spec.max_failures, ejection_time=spec.ejection_time)
        self.active = 0
        self.clients: set[OutboundClient] = set()
        self.server: asyncio.AbstractServer | None = None
        self.have_endpoints = asyncio.Event()
        self.route: RouteTable | None = None  # set (and swapped whole) by l7.ChainWatcher for http
        self.router: L7Router | None = None

    def _protocol(self) -> asyncio.Protocol:
        if self.route is not None and self.router is not None:
            from lictor.agent.proxy.l7 import HTTPOutbound

            return HTTPOutbound(self, self.router)
        return OutboundClient(self)

    def reconfigure(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.balancer.configure(spec.lb_policy, spec.max_failures, spec.ejection_time)

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        self.balancer.update(endpoints)
        if endpoints:
            self.have_endpoints.set()
        self.state.stats.set("upstream_endpoints", len(endpoints), upstream=self.spec.destination)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, self.spec.bind_address,
                                               self.spec.bind_port, reuse_address=True, backlog=4096)

    async def stop(self, close_connections: bool = True) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if close_connections:
            for client in list(self.clients):
                client.close()

    def _identity_ok(self, uris: list[str]) -> bool:
        if len(uris) != 1:
            return False
        try:
            _td, ns, _dc, svc = spiffe_service(uris[0])
        except BadRequest:
            return False
        return svc == self.spec.destination and ns == "default"

    async def dial(self, client: OutboundClient) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        stats = self.state.stats
        tried: set[tuple[str, int]] = set()
        sni = sni_for(spec.destination, self.state.datacenter, self.state.trust_domain)
        for _attempt in range(1 + spec.connect_retries):
            if client._lost:
                return
            ep = self.balancer.pick(time.monotonic(), tried)
            if ep is None:
                break
            tried.add(ep.key)
            ctx = self.state.client_ctx
            if ctx is None:
                break
            try:
                transport, side = await asyncio.wait_for(
                    loop.create_connection(_ServerSide, ep.host, ep.port, ssl=ctx, server_hostname=sni or ep.host,
                                           ssl_handshake_timeout=spec.connect_timeout),
                    spec.connect_timeout)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                self._failed(ep, f"{type(exc).__name__}: {exc}")
                continue
            uris = peer_uris(transport.get_extra_info("peercert"))
            if not self._identity_ok(uris):
                transport.abort()
                self._failed(ep, f"server identity {uris} is not service {spec.destination!r}")
                continue
            self.balancer.connected(ep)
            stats.inc("upstream_connections", upstream=spec.destination)
            side.endpoint = ep
            side.on_lost = self._released
            if client._lost:
                transport.close()
                return
            client.link(side)
            return
        stats.inc("upstream_connect_failed", upstream=spec.destination)
        log.warning("upstream %s: no endpoint reachable (tried %d)", spec.destination, len(tried))
        if client.transport is not None:
            client.transport.close()

    def _failed(self, ep: Endpoint, why: str) -> None:
        self.state.stats.inc("upstream_connect_errors", upstream=self.spec.destination)
        ejected = self.balancer.failed(ep, time.monotonic())
        log.info("upstream %s: connect to %s:%d failed: %s", self.spec.destination, ep.host, ep.port, why)
        if ejected:
            self.state.stats.inc("upstream_ejections", upstream=self.spec.destination)
            log.warning("upstream %s: ejected %s:%d for %.0fs after %d consecutive connect failures",
                        self.spec.destination, ep.host, ep.port, self.balancer.ejection_time,
                        self.balancer.max_failures)

    def _released(self, side: Pipe) -> None:
        ep = getattr(side, "endpoint", None)
        if ep is not None:
            self.balancer.released(ep)

    def snapshot(self) -> dict[str, Any]:
        return {
            "DestinationName": self.spec.destination,
            "LocalBindAddress": self.spec.bind_address,
            "LocalBindPort": self.spec.bind_port,
            "Protocol": "http" if self.route is not None else "tcp",
            "Chain": self.route.summary() if self.route is not None else None,
            "LBPolicy": self.balancer.policy,
            "ActiveConnections": self.active,
            "MaxConnections": self.spec.max_connections,
            "Endpoints": self.balancer.snapshot(time.monotonic()),
        }
