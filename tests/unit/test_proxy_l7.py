"""HTTP upstreams in process: protocol precedence, chain recompiles swapped whole (and held until a new
target's health is known), and the data path outbound → mTLS → inbound → app with splits, retries,
timeouts and the target identity check."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from lictor.agent.proxy.authz import Authorizer
from lictor.agent.proxy.config import ProxySpec, UpstreamSpec, parse_registration
from lictor.agent.proxy.inbound import InboundListener
from lictor.agent.proxy.l7 import ChainWatcher, L7Router, RouteTable, upstream_protocol
from lictor.agent.proxy.outbound import Upstream
from lictor.agent.proxy.state import ProxyState
from lictor.agent.proxy.tls import TLSMaterial, client_context, server_context
from lictor.gateway.chain import compile_chain
from lictor.gateway.router import instances_by_target
from lictor.registry import ca

TD = "11111111-2222-3333-4444-555555555555.consul"
NOW = datetime.now(UTC)
ROOT = ca.generate_root(TD, now=NOW)


def material(service: str) -> TLSMaterial:
    leaf = ca.sign_leaf(ROOT, service, TD, "dc1", NOW, ttl_seconds=3600)
    return TLSMaterial(leaf.CertPEM, leaf.PrivateKeyPEM, (ROOT.RootCert,), TD)


HTTP = {"service-defaults": {"inv": {"Kind": "service-defaults", "Name": "inv", "Protocol": "http"}}}


def test_protocol_precedence() -> None:
    assert upstream_protocol("inv", {}) == "tcp"
    assert upstream_protocol("inv", {}, "HTTP") == "http"
    pd = {"proxy-defaults": {"global": {"Config": {"protocol": "grpc"}}}}
    assert upstream_protocol("inv", pd, "http") == "grpc"
    assert upstream_protocol("inv", {**pd, **HTTP}, "tcp") == "http"


def test_upstream_config_protocol_is_parsed() -> None:
    spec = parse_registration({"ID": "web-sidecar-proxy", "Kind": "connect-proxy", "Port": 21000, "Proxy": {
        "DestinationServiceName": "web", "Upstreams": [
            {"DestinationName": "inv", "LocalBindPort": 9191, "Config": {"protocol": "HTTP"}}]}})
    assert spec.upstreams[0].protocol == "http"


# ----------------------------------------------------------------------------- control plane

class FakeAgent:
    """Answers blocking queries from dicts; a query with an index blocks until `bump()`."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.index = 1
        self.changed = asyncio.Event()
        self.held: set[str] = set()  # paths that do not answer yet

    def bump(self) -> None:
        self.index += 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        while path in self.held:
            await self.changed.wait()
        if params and int(params.get("index", 0)) >= self.index:
            await self.changed.wait()
        body = self.answers.get(path, [])
        return httpx.Response(200, json=body, headers={"X-Consul-Index": str(self.index)})


def _entry(svc: str, version: str, port: int) -> dict[str, Any]:
    return {"Node": {"Node": "n1", "Address": "127.0.0.1"},
            "Service": {"ID": f"{svc}-{version}-sidecar-proxy", "Service": f"{svc}-sidecar-proxy", "Port": port,
                        "Address": "127.0.0.1", "Meta": {"version": version}}, "Checks": []}


def _splitter(v2: float, service: str = "inv") -> dict[str, Any]:
    return {"Kind": "service-splitter", "Name": "inv", "Splits": [
        {"Weight": 100 - v2, "ServiceSubset": "v1"}, {"Weight": v2, "ServiceSubset": "v2", "Service": service}]}


RESOLVER = {"Kind": "service-resolver", "Name": "inv", "Subsets": {
    "v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}}


async def _until(pred: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_watcher_swaps_route_tables_whole_and_waits_for_new_targets() -> None:
    agent = FakeAgent()
    agent.answers = {
        "/v1/config/service-defaults": [HTTP["service-defaults"]["inv"]],
        "/v1/config/service-resolver": [RESOLVER],
        "/v1/config/service-splitter": [_splitter(10)],
        "/v1/health/connect/inv": [_entry("inv", "v1", 1), _entry("inv", "v2", 2)],
        "/v1/health/connect/other": [_entry("other", "v1", 3)],
    }
    state = ProxyState(ProxySpec("web-sidecar-proxy", "web", "web", 1, "127.0.0.1", "127.0.0.1", 2, ()),
                       Authorizer("web"))
    up = Upstream(state, UpstreamSpec("inv", "127.0.0.1", 0))
    watcher = ChainWatcher(agent, "dc1")  # type: ignore[arg-type]
    watcher.start()
    try:
        await asyncio.wait_for(watcher.wait_ready(), 3)
        watcher.attach(up)
        await _until(lambda: up.route is not None and all(up.route.instances.values()))
        first = up.route
        assert first is not None
        assert [s.weight for s in first.chain.default_route.destination.splits] == [90.0, 10.0]
        assert {k: len(v) for k, v in first.instances.items()} == {"v1.inv.default.default.dc1": 1,
                                                                   "v2.inv.default.default.dc1": 1}
        # A new split: a new table object; the old one (held by in-flight requests) is untouched.
        agent.answers["/v1/config/service-splitter"] = [_splitter(50)]
        agent.bump()
        await _until(lambda: up.route is not first)
        assert [s.weight for s in up.route.chain.default_route.destination.splits] == [50.0, 50.0]
        assert [s.weight for s in first.chain.default_route.destination.splits] == [90.0, 10.0]
        # A split to a service nobody watched yet: held until its health is known.
        agent.held.add("/v1/health/connect/other")
        second = up.route
        agent.answers["/v1/config/service-splitter"] = [
            {"Kind": "service-splitter", "Name": "inv", "Splits": [{"Weight": 70, "ServiceSubset": "v1"},
                                                                   {"Weight": 30, "Service": "other"}]}]
        agent.bump()
        await asyncio.sleep(0.3)
        assert up.route is second
        agent.held.clear()
        agent.bump()
        await _until(lambda: up.route is not second)
        assert up.route.instances["other.default.default.dc1"]
        # The destination goes back to tcp: the upstream relays at L4 again.
        agent.answers["/v1/config/service-defaults"] = []
        agent.bump()
        await _until(lambda: up.route is None)
    finally:
        await watcher.stop()


# -------------------------------------------------------------------------------- data path

def _app(name: str, mode: str = "ok") -> Any:
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                n = int(headers.get("content-length", headers.get("Content-Length", "0")))
                body = await reader.readexactly(n) if n else b""
                count += 1
                status = 503 if mode == "alternate" and count % 2 == 1 else 200
                if path.startswith("/slow"):
                    await asyncio.sleep(1.0)
                out = json.dumps({"name": name, "path": path, "body": body.decode(),
                                  "headers": {k.lower(): v for k, v in headers.items()}}).encode()
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%b" % (status, len(out), out))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


class Mesh:
    def __init__(self) -> None:
        self.closers: list[Any] = []
        self.entries: list[dict[str, Any]] = []

    async def service(self, name: str, version: str, mode: str = "ok", cert_for: str | None = None) -> None:
        app = await asyncio.start_server(_app(f"{name}-{version}", mode), "127.0.0.1", 0)
        port = app.sockets[0].getsockname()[1]
        mat = material(cert_for or name)
        st = ProxyState(ProxySpec(f"{name}-sidecar-proxy", name, name, 0, "127.0.0.1", "127.0.0.1", port, ()),
                        Authorizer(name), trust_domain=TD, own_uri=f"spiffe://{TD}/ns/default/dc/dc1/svc/{name}",
                        server_ctx=server_context(mat), client_ctx=client_context(mat), l7=True)
        inbound = InboundListener(st, "127.0.0.1", 0)
        await inbound.start()
        self.closers += [inbound.stop, app.close]
        entry = _entry(name, version, inbound.port)
        self.entries.append(entry)


@pytest.fixture
async def mesh() -> AsyncIterator[tuple[Mesh, Upstream]]:
    m = Mesh()
    await m.service("inv", "v1")
    await m.service("inv", "v2")
    await m.service("flaky", "v1", mode="alternate")
    await m.service("impostor", "v1", cert_for="db")  # presents a `db` certificate
    web = material("web")
    state = ProxyState(ProxySpec("web-sidecar-proxy", "web", "web", 1, "127.0.0.1", "127.0.0.1", 2, ()),
                       Authorizer("web"), trust_domain=TD, client_ctx=client_context(web))
    router = L7Router(state.stats, random.Random(7))
    router.set_tls(client_context(web), TD)
    up = Upstream(state, UpstreamSpec("inv", "127.0.0.1", 0))
    up.router = router
    await up.start()
    assert up.server is not None
    up.spec = UpstreamSpec("inv", "127.0.0.1", up.server.sockets[0].getsockname()[1])
    try:
        yield m, up
    finally:
        await up.stop()
        router.close()
        for close in m.closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result


def _route(m: Mesh, up: Upstream, extra: dict[str, Any]) -> None:
    entries = {**HTTP, "service-defaults": {**HTTP["service-defaults"],
                                            "flaky": {"Protocol": "http"}, "impostor": {"Protocol": "http"}},
               "service-resolver": {"inv": RESOLVER}, **extra}
    chain = compile_chain("inv", entries)
    health: dict[str, list[dict[str, Any]]] = {}
    for e in m.entries:
        health.setdefault(e["Service"]["Service"].removesuffix("-sidecar-proxy"), []).append(e)
    up.route = RouteTable(chain, instances_by_target(chain.targets.values(), health))


ROUTER = {"service-router": {"inv": {"Routes": [
    {"Match": {"HTTP": {"PathPrefix": "/flaky"}},
     "Destination": {"Service": "flaky", "NumRetries": 3, "RetryOnStatusCodes": [503]}},
    {"Match": {"HTTP": {"PathPrefix": "/once"}}, "Destination": {"Service": "flaky"}},
    {"Match": {"HTTP": {"PathPrefix": "/impostor"}}, "Destination": {"Service": "impostor"}},
    {"Match": {"HTTP": {"PathPrefix": "/slow"}}, "Destination": {"ServiceSubset": "v1", "RequestTimeout": "200ms",
                                                                "RequestHeaders": {"Set": {"x-r": "slow"}}}},
    {"Match": {"HTTP": {"PathPrefix": "/api/"}},
     "Destination": {"ServiceSubset": "v2", "PrefixRewrite": "/", "RequestHeaders": {"Add": {"x-r": "api"}},
                     "ResponseHeaders": {"Set": {"x-resp": "1"}}}},
]}}}


async def test_split_routes_by_weight(mesh: tuple[Mesh, Upstream]) -> None:
    m, up = mesh
    _route(m, up, {"service-splitter": {"inv": _splitter(25)}})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{up.spec.bind_port}") as c:
        names = [(await c.get("/")).json()["name"] for _ in range(400)]
    share = names.count("inv-v2") / len(names)
    assert set(names) == {"inv-v1", "inv-v2"} and 0.17 < share < 0.33, share
    assert up.snapshot()["Protocol"] == "http"


async def test_routes_retries_timeouts_and_identity(mesh: tuple[Mesh, Upstream]) -> None:
    m, up = mesh
    _route(m, up, ROUTER)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{up.spec.bind_port}", timeout=5) as c:
        assert [(await c.get("/flaky/x")).status_code for _ in range(10)] == [200] * 10
        once = [(await c.get("/once")).status_code for _ in range(6)]
        assert sorted(once) == [200] * 3 + [503] * 3
        r = await c.get("/api/items?q=1")
        body = r.json()
        assert r.status_code == 200 and body["name"] == "inv-v2" and body["path"] == "/items?q=1"
        assert body["headers"]["x-r"] == "api" and r.headers["x-resp"] == "1"
        r = await c.post("/api/p", content=b"payload")
        assert r.json()["body"] == "payload"
        r = await c.get("/slow")
        assert r.status_code == 504
        # The target is `impostor` but its sidecar presents `db`: never forwarded.
        r = await c.get("/impostor")
        assert r.status_code == 503 and "identity" in r.text
        assert (await c.get("/")).json()["name"] in ("inv-v1", "inv-v2")  # no DefaultSubset: any instance
    assert up.state.stats.get("upstream_rq_retry", upstream="inv") >= 5


async def test_in_flight_request_finishes_on_its_chain(mesh: tuple[Mesh, Upstream]) -> None:
    m, up = mesh
    _route(m, up, {"service-router": {"inv": {"Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/slow"}}, "Destination": {"ServiceSubset": "v2"}}]}}})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{up.spec.bind_port}", timeout=5) as c:
        slow = asyncio.ensure_future(c.get("/slow"))
        await asyncio.sleep(0.2)
        _route(m, up, {"service-router": {"inv": {"Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/slow"}}, "Destination": {"ServiceSubset": "v1"}}]}}})
        assert (await c.get("/slow")).json()["name"] == "inv-v1"
        r = await slow
        assert r.status_code == 200 and r.json()["name"] == "inv-v2"
