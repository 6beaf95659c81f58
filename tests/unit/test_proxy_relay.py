"""In-process data path: outbound listener → mTLS → inbound listener → echo app, with CA-issued
leaves (registry/ca), identity checks, intentions re-evaluated on open connections, flow control."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from lictor.agent.proxy.authz import Authorizer
from lictor.agent.proxy.balancer import Endpoint
from lictor.agent.proxy.config import ProxySpec, UpstreamSpec
from lictor.agent.proxy.inbound import InboundListener
from lictor.agent.proxy.outbound import Upstream
from lictor.agent.proxy.state import ProxyState
from lictor.agent.proxy.tls import TLSMaterial, client_context, server_context
from lictor.registry import ca
from lictor.registry.intentions import validate_intention

TD = "11111111-2222-3333-4444-555555555555.consul"
NOW = datetime.now(UTC)
ROOT = ca.generate_root(TD, now=NOW)


def material(service: str, root: ca.CARoot = ROOT) -> TLSMaterial:
    leaf = ca.sign_leaf(root, service, TD, "dc1", NOW, ttl_seconds=3600)
    return TLSMaterial(leaf.CertPEM, leaf.PrivateKeyPEM, (ROOT.RootCert,), TD)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def _spec(name: str, app_port: int) -> ProxySpec:
    return ProxySpec(f"{name}-sidecar-proxy", name, name, 0, "127.0.0.1", "127.0.0.1", app_port, ())


class Pair:
    def __init__(self, inbound: InboundListener, upstream: Upstream, server_state: ProxyState) -> None:
        self.inbound, self.upstream, self.server_state = inbound, upstream, server_state


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    app = await asyncio.start_server(_echo, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    srv_mat = material("api")
    server_state = ProxyState(_spec("api", app_port), Authorizer("api"), trust_domain=TD,
                              own_uri=f"spiffe://{TD}/ns/default/dc/dc1/svc/api",
                              server_ctx=server_context(srv_mat), client_ctx=client_context(srv_mat))
    inbound = InboundListener(server_state, "127.0.0.1", 0)
    await inbound.start()
    cli_mat = material("web")
    client_state = ProxyState(_spec("web", 1), Authorizer("web"), trust_domain=TD,
                              server_ctx=server_context(cli_mat), client_ctx=client_context(cli_mat))
    upstream = Upstream(client_state, UpstreamSpec("api", "127.0.0.1", 0, connect_timeout=2.0))
    await upstream.start()
    assert upstream.server is not None
    upstream.spec = UpstreamSpec("api", "127.0.0.1", upstream.server.sockets[0].getsockname()[1], connect_timeout=2.0)
    upstream.set_endpoints([Endpoint("127.0.0.1", inbound.port, "api")])
    try:
        yield Pair(inbound, upstream, server_state)
    finally:
        await upstream.stop()
        await inbound.stop()
        app.close()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    writer.close()
    return got


async def test_bytes_flow_both_ways_through_mtls(pair: Pair) -> None:
    assert await _roundtrip(pair.upstream.spec.bind_port, b"hello mesh") == b"hello mesh"
    big = bytes(range(256)) * 8192  # 2 MiB: exercises pause/resume on both legs
    assert await _roundtrip(pair.upstream.spec.bind_port, big) == big
    assert pair.server_state.stats.get("inbound_accepted") == 2


async def test_deny_then_reevaluate_closes_open_connection(pair: Pair) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.upstream.spec.bind_port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    await asyncio.sleep(0.05)
    assert len(pair.inbound.live) == 1
    pair.server_state.authz.replace([validate_intention("web", "api", {"Action": "deny"})])
    assert pair.inbound.reevaluate() == 1
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    writer.close()
    # New connections are refused at the inbound: the client sees EOF without an echo.
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.upstream.spec.bind_port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_wrong_server_identity_is_a_connect_failure(pair: Pair) -> None:
    # The inbound now presents a `db` certificate: the upstream for `api` must refuse it.
    pair.server_state.server_ctx = server_context(material("db"))
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.upstream.spec.bind_port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert pair.upstream.state.stats.get("upstream_connect_errors", upstream="api") >= 1


async def test_foreign_ca_client_is_rejected(pair: Pair) -> None:
    other = ca.generate_root(TD, now=NOW)
    leaf = ca.sign_leaf(other, "web", TD, "dc1", NOW, ttl_seconds=3600)
    evil = client_context(TLSMaterial(leaf.CertPEM, leaf.PrivateKeyPEM, (ROOT.RootCert,), TD))
    with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
        reader, writer = await asyncio.open_connection("127.0.0.1", pair.inbound.port, ssl=evil,
                                                       server_hostname="api")
        writer.write(b"x")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        if not data:
            raise ConnectionError("closed")
    assert pair.server_state.stats.get("inbound_accepted") == 0


async def test_circuit_breaker_refuses_excess_connections(pair: Pair) -> None:
    spec = pair.upstream.spec
    pair.upstream.spec = UpstreamSpec("api", spec.bind_address, spec.bind_port, max_connections=1)
    r1, w1 = await asyncio.open_connection("127.0.0.1", spec.bind_port)
    w1.write(b"a")
    assert await asyncio.wait_for(r1.readexactly(1), 5) == b"a"
    r2, w2 = await asyncio.open_connection("127.0.0.1", spec.bind_port)
    assert await asyncio.wait_for(r2.read(), 5) == b""
    assert pair.upstream.state.stats.get("upstream_overflow", upstream="api") == 1
    w1.close()
    w2.close()
