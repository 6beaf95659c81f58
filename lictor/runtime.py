"""Process assembly: build the agent's pieces from its config, serve them, shut down cleanly."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from lictor import __version__, metrics, monitor
from lictor.config import AgentConfig
from lictor.errors import APIError
from lictor.httpapi import empty_ok, guarded, json_response, method_not_allowed
from lictor.routing import DirectApp, IndexedRouter

log = logging.getLogger("lictor")


class NotReadyMiddleware:
    """Until consensus is up, only the cluster-formation endpoints answer; the rest get 500."""

    def __init__(self, app: Any, is_ready: Any) -> None:
        self.app = app
        self.is_ready = is_ready

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.is_ready() and not scope["path"].startswith("/v1/internal/"):
            response = PlainTextResponse("No cluster leader", status_code=500)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def tls_options(config: AgentConfig) -> dict[str, Any]:
    """uvicorn.Config options for the HTTPS listener; -verify-incoming requires a client cert signed by -ca-file."""
    options: dict[str, Any] = {"ssl_certfile": config.cert_file, "ssl_keyfile": config.key_file}
    if config.ca_file:
        options["ssl_ca_certs"] = config.ca_file
    options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if config.verify_incoming else ssl.CERT_NONE
    return options


class Agent:
    """One `lictor agent` process. Servers hold the replicated state; clients forward to them."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.app = Starlette(exception_handlers={405: method_not_allowed, 404: method_not_allowed})
        self.app.router = IndexedRouter()  # before the first request builds the middleware stack
        self.server: Any = None
        self.local: Any = None
        self.extras: list[Any] = []  # DNS server, proxies ...: objects with async stop()
        self._uvicorn: uvicorn.Server | None = None  # the first listener
        self._uvicorns: list[uvicorn.Server] = []
        self._ready = False
        self.shutdown = asyncio.Event()

    def is_ready(self) -> bool:
        return self._ready

    async def run(self) -> None:
        config = self.config
        self.app.router.routes.extend(
            [
                Route("/v1/agent/self", guarded(self.agent_self), methods=["GET"]),
                Route("/v1/agent/members", guarded(self.agent_members), methods=["GET"]),
                Route("/v1/agent/leave", guarded(self.agent_leave), methods=["PUT"]),
                Route("/v1/agent/metrics", guarded(metrics.agent_metrics), methods=["GET"]),
                Route("/v1/agent/monitor", guarded(monitor.agent_monitor), methods=["GET"]),
            ]
        )
        self.metrics = metrics.MetricsRuntime(self)
        self.metrics.start()
        self.extras.append(self.metrics)
        if config.server:
            from lictor.registry.server import ServerAgent

            self.server = ServerAgent(config)
            self.app.router.routes.extend(self.server.routes())
        asgi = NotReadyMiddleware(DirectApp(self.app), self.is_ready)
        from lictor import limits  # ACLs and request limits (issue #9)

        # Metrics outermost, so requests refused by limits/ACLs (429, 403) are counted too.
        asgi = metrics.HTTPMetricsMiddleware(limits.wrap(asgi, self))
        listeners: list[tuple[int, dict[str, Any]]] = []
        if config.http_port > 0:
            listeners.append((config.http_port, {}))
        if config.https_port > 0:
            listeners.append((config.https_port, tls_options(config)))
        serve_tasks: list[asyncio.Task[None]] = []
        for port, extra in listeners:  # the same app on each listener, on this loop
            uv_config = uvicorn.Config(
                asgi, host=config.client, port=port, log_level="warning", lifespan="off",
                access_log=False, timeout_keep_alive=30, loop="none", **limits.uvicorn_options(config), **extra,
                # No X-Forwarded-For rewriting: a local client could otherwise pick the address the
                # per-client limits and logs see (and it is one ASGI layer less per request).
                proxy_headers=False,
            )
            server = uvicorn.Server(uv_config)
            server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            self._uvicorns.append(server)
            serve_tasks.append(asyncio.create_task(server.serve()))
            for _ in range(100):
                if server.started or serve_tasks[-1].done():
                    break
                await asyncio.sleep(0.05)
            if serve_tasks[-1].done():
                serve_tasks[-1].result()
                raise SystemExit(f"HTTP server failed to start on {config.client}:{port}")
        self._uvicorn = self._uvicorns[0]
        print(f"==> Lictor agent running: node {config.node!r}, datacenter {config.datacenter!r}", flush=True)
        if config.http_port > 0:
            print(f"    HTTP API: http://{config.http_addr}", flush=True)
        if config.https_port > 0:
            print(f"    HTTPS API: https://{config.client}:{config.https_port}", flush=True)
        heap_task: asyncio.Task[None] | None = None
        try:
            if self.server is not None:
                await self.server.start_consensus()
                self.metrics.hook_store()
                self.app.router.routes.extend(self.server.api.routes())
                self.app.router.routes.extend(self._optional_server_routes())
                print(f"    Raft: {config.raft_addr} ({'in-memory' if config.dev else config.data_dir})", flush=True)
            await self._start_local_agent()
            self._ready = True
            if config.dev and config.dev_gateway:
                await self._start_dev_gateway()  # it registers itself through our own API
            print("==> Agent ready", flush=True)
            heap_task = asyncio.create_task(keep_collector_pauses_short())
            stop_wait = asyncio.create_task(self.shutdown.wait())
            await asyncio.wait({*serve_tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if heap_task is not None:
                heap_task.cancel()
            await self.close()
            for server in self._uvicorns:
                server.should_exit = True
            for task in serve_tasks:
                try:
                    await asyncio.wait_for(task, 5)
                except (TimeoutError, asyncio.CancelledError, Exception):
                    pass

    def _optional_server_routes(self) -> list[Any]:
        """Server-side endpoints that live in their own modules (Connect, config entries)."""
        try:
            from lictor.registry.connect_http import ConnectAPI
        except ImportError:
            return []
        self.connect_api = ConnectAPI(self.server.log, self.server.api.info, self.config)
        return self.connect_api.routes()

    async def _start_dev_gateway(self) -> None:
        """`-dev -dev-gateway`: an ingress gateway in this process, exposing every HTTP service.

        It registers `ingress-gw` and, unless one exists, an ingress-gateway entry with one HTTP
        listener for `*`: a service `web` answers at `Host: web.ingress.consul`.
        """
        import httpx

        from lictor.gateway.proxy import Gateway, GatewayConfig

        config = self.config
        base = f"http://{config.http_addr}"
        headers = {"X-Consul-Token": config.acl_token} if getattr(config, "acl_token", "") else {}
        async with httpx.AsyncClient(timeout=10, headers=headers) as client:
            await client.put(base + "/v1/agent/service/register", json={
                "ID": "ingress-gw", "Name": "ingress-gw", "Kind": "ingress-gateway", "Port": config.gateway_port})
            existing = await client.get(base + "/v1/config/ingress-gateway/ingress-gw")
            if existing.status_code == 404:
                await client.put(base + "/v1/config", json={
                    "Kind": "ingress-gateway", "Name": "ingress-gw",
                    "Listeners": [{"Port": config.gateway_port, "Protocol": "http", "Services": [{"Name": "*"}]}]})
        gateway = Gateway(GatewayConfig(service="ingress-gw", agent_addr=config.http_addr, bind_address=config.client))
        await gateway.start()
        self.extras.append(gateway)
        print(f"    Ingress gateway: http://{config.client}:{config.gateway_port} (Host: <service>.ingress.consul)",
              flush=True)

    async def _start_local_agent(self) -> None:
        try:
            from lictor.agent.local import attach_local_agent
        except ImportError:
            return
        await attach_local_agent(self)

    async def close(self) -> None:
        from lictor.registry.raft import ChangeFeed

        ChangeFeed.close_all()  # parked blocking queries answer instead of being cancelled
        for extra in reversed(self.extras):
            try:
                await extra.stop()
            except Exception:
                log.exception("error stopping %r", extra)
        if self.local is not None:
            await self.local.close()
        if self.server is not None:
            await self.server.close()

    # -- agent endpoints every agent serves ------------------------------------------------------

    def member_self(self) -> dict[str, Any]:
        from lictor.registry.server import member_entry

        config = self.config
        role = "consul" if config.server else "node"
        return member_entry(config.node, config.bind, 8301, role, config.datacenter, 1, {})

    async def agent_self(self, request: Request) -> Response:
        config = self.config
        stats: dict[str, dict[str, str]] = {"agent": {"checks": "0", "services": "0"}, "build": {"version": __version__}}
        raft: dict[str, Any] = {}
        if self.server is not None and self.server.log is not None:
            raft = self.server.log.status()
            stats["raft"] = {k: str(v) for k, v in raft.items()}
            healthy, reason = self.server.log.health()
            stats["raft"]["healthy"] = str(healthy).lower()
            stats["raft"]["health_reason"] = reason
        if self.local is not None:
            stats["agent"] = self.local.stats()
        member = self.member_self()
        if self.server is not None and self.server.log is not None:
            for entry in self.server.members():
                if entry["Name"] == config.node:
                    member = entry
        return json_response(
            {
                "Config": {
                    "Datacenter": config.datacenter,
                    "PrimaryDatacenter": config.datacenter,
                    "NodeName": config.node,
                    "NodeID": self.local.node_id if self.local is not None else "",
                    "Revision": "lictor",
                    "Server": config.server,
                    "Version": __version__,
                    "BuildDate": "2026-11-25T00:00:00Z",
                    "DefaultIntentionPolicy": config.default_intention_policy,
                },
                "DebugConfig": {"DataDir": config.data_dir, "DevMode": config.dev, "HTTPAddr": config.http_addr,
                                "RaftAddr": config.raft_addr if config.server else "", "DNSPort": config.dns_port},
                "Coord": None,
                "Member": member,
                "Stats": stats,
                "Meta": dict(config.node_meta),
            }
        )

    async def agent_members(self, request: Request) -> Response:
        if request.query_params.get("wan") not in (None, "", "0", "false", "False"):
            return json_response([self.member_self()] if self.config.server else [])
        if self.server is not None and self.server.log is not None:
            return json_response(self.server.members())
        if self.local is not None:
            return json_response(await self.local.members())
        return json_response([self.member_self()])

    async def agent_leave(self, request: Request) -> Response:
        if self.server is not None and self.server.log is not None:
            await self.server.leave()
        if self.local is not None:
            await self.local.leave()
        asyncio.get_running_loop().call_later(0.2, self.shutdown.set)
        return empty_ok()


GC_REFREEZE_INTERVAL = 600.0


async def keep_collector_pauses_short(interval: float = GC_REFREEZE_INTERVAL) -> None:
    """Keep CPython's full collections small: they scan every tracked object, and a started agent
    holds ~50k of them (modules, routes, the restored catalog) that live as long as the process.
    Scanning those took 20-150 ms per full collection under load — the largest read latency tail in
    the soak. Freezing them (gc.freeze) takes them out of every scan. Objects frozen are still freed
    by reference counting; only cyclic garbage among them would wait, so every `interval` the heap
    is collected in full once (one pause) and frozen again."""
    gc.collect()
    gc.freeze()
    while True:
        await asyncio.sleep(interval)
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def run_agent(config: AgentConfig) -> int:
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    monitor.install(config.log_level)  # ring buffer behind /v1/agent/monitor and `lictor debug`
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable without it
        pass

    async def main() -> None:
        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.shutdown.set)
        await agent.run()

    try:
        asyncio.run(main())
    except APIError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
