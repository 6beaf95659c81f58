"""The sidecar proxy: composition of the control-plane watches and the data-plane listeners.

Startup (`start()`): find our registration at the local agent, take the first answers of every
watch (roots, leaf, intentions, destination protocol, our own registration), build the TLS
contexts, bind the inbound and upstream listeners, then keep following. Every later change is
applied in place: new SSL contexts for new connections, the intention cache (and closing open
connections it now denies), the L4/L7 mode, upstream listeners added or removed, endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

from lictor.agent.proxy.authz import Authorizer
from lictor.agent.proxy.config import HTTP_PROTOCOLS, ProxySpec, UpstreamSpec, parse_registration
from lictor.agent.proxy.inbound import InboundListener
from lictor.agent.proxy.l7 import ChainWatcher, L7Router
from lictor.agent.proxy.observe import Observer
from lictor.agent.proxy.outbound import Upstream, endpoints_from_health
from lictor.agent.proxy.state import ProxyState
from lictor.agent.proxy.tls import TLSMaterial, client_context, server_context
from lictor.agent.proxy.watch import AgentClient, follow_hash, follow_index

__all__ = ["ProxyError", "SidecarProxy", "run_proxy"]

log = logging.getLogger("lictor.proxy")

STARTUP_TIMEOUT = 30.0


class ProxyError(Exception):
    """The proxy cannot start (no registration, agent unreachable, ...)."""


class SidecarProxy:
    """A Connect sidecar for one service instance.

    >>> proxy = SidecarProxy("127.0.0.1:8500", "web")   # doctest: +SKIP
    >>> await proxy.start(); await proxy.wait()          # doctest: +SKIP
    """

    def __init__(self, http_addr: str, sidecar_for: str | None = None, *, proxy_id: str | None = None,
                 metrics_port: int | None = None, default_intention_policy: str | None = None,
                 token: str | None = None, otlp_endpoint: str | None = None,
                 trace_sample_ratio: float | None = None, access_log: str | None = None) -> None:
        if not sidecar_for and not proxy_id:
            raise ProxyError("either -sidecar-for or -proxy-id is required")
        self.http_addr = http_addr
        self.sidecar_for = sidecar_for
        self.proxy_id = proxy_id
        self.metrics_port = metrics_port
        self.policy_override = default_intention_policy
        self.client = AgentClient(http_addr, token)
        self.state: ProxyState | None = None
        self.inbound: InboundListener | None = None
        self.upstreams: dict[tuple[str, int], Upstream] = {}
        self._upstream_tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._leaf: dict[str, Any] | None = None
        self._roots: dict[str, Any] | None = None
        self._metrics: asyncio.AbstractServer | None = None
        self._stopped = asyncio.Event()
        self.started_at = time.time()
        self.chains: ChainWatcher | None = None  # discovery chains of http upstreams
        self.l7: L7Router | None = None
        # Tracing / access-log flags; None = take the registration's Proxy.Config (managed proxies)
        self._observe_flags = (otlp_endpoint, trace_sample_ratio, access_log)
        self.obs: Observer | None = None

    # -- startup --------------------------------------------------------------------------------

    async def _find_registration(self) -> dict[str, Any]:
        candidates = [self.proxy_id] if self.proxy_id else [f"{self.sidecar_for}-sidecar-proxy"]
        for sid in candidates:
            resp = await self.client.get(f"/v1/agent/service/{sid}")
            if resp.status_code == 200:
                return resp.json()  # type: ignore[no-any-return]
        if self.sidecar_for:
            resp = await self.client.get("/v1/agent/services")
            resp.raise_for_status()
            for svc in resp.json().values():
                proxy = svc.get("Proxy") or {}
                if svc.get("Kind") == "connect-proxy" and proxy.get("DestinationServiceID") == self.sidecar_for:
                    return svc  # type: ignore[no-any-return]
        raise ProxyError(f"no connect-proxy registration found for {self.sidecar_for or self.proxy_id!r} "
                         "at the local agent: register the service with Connect.SidecarService first")

    async def _agent_self(self) -> tuple[str, bool]:
        resp = await self.client.get("/v1/agent/self")
        resp.raise_for_status()
        data = resp.json()
        cfg = data.get("Config") or {}
        debug = data.get("DebugConfig") or {}
        # The agent does not publish its default intention policy yet: allow (Consul's default with
        # ACLs off) unless the agent says otherwise or the operator passes -default-intention-policy.
        policy = (self.policy_override or cfg.get("DefaultIntentionPolicy") or debug.get("DefaultIntentionPolicy")
                  or debug.get("ACLDefaultPolicy") or "allow")
        return str(cfg.get("Datacenter") or "dc1"), str(policy).lower() != "deny"

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.append(task)
        return task

    async def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the agent may still be starting; retry until the deadline
            try:
                dc, default_allow = await self._agent_self()
                service = await self._find_registration()
                break
            except ProxyError:
                if time.monotonic() > deadline:
                    raise
            except Exception as exc:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise ProxyError(f"cannot reach the agent at {self.client.base}: {exc}") from None
            await asyncio.sleep(0.5)
        spec = parse_registration(service)
        self.proxy_id = spec.proxy_id
        state = self.state = ProxyState(spec, Authorizer(spec.destination_name, default_allow), datacenter=dc)
        dest = spec.destination_name
        obs = Observer(dest, spec.observe.merged(*self._observe_flags))
        if obs.active:
            self.obs = state.obs = obs
            log.info("proxy %s: %s", spec.proxy_id, obs.describe())

        ready = {k: asyncio.Event() for k in ("roots", "leaf", "intentions", "protocol")}
        c = self.client
        self._spawn(follow_index(c, "/v1/agent/connect/ca/roots", {}, self._apply_roots, ready=ready["roots"],
                                 what="CA roots"), "roots")
        self._spawn(follow_index(c, f"/v1/agent/connect/ca/leaf/{dest}", {}, self._apply_leaf, ready=ready["leaf"],
                                 what=f"leaf {dest}"), "leaf")
        self._spawn(follow_index(c, "/v1/connect/intentions/match", {"by": "destination", "name": dest},
                                 self._apply_intentions, ready=ready["intentions"], what="intentions"), "intentions")
        self._spawn(follow_index(c, f"/v1/config/service-defaults/{dest}", {}, self._apply_protocol,
                                 ready=ready["protocol"], allow_404=True, what="service-defaults"), "protocol")
        self.l7 = L7Router(state.stats)
        self.l7.obs = state.obs
        self.chains = ChainWatcher(c, dc)
        self.chains.start()
        ready.update({f"config {k}": e for k, e in self.chains.ready.items()})
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready.values())),
                                   max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            missing = [k for k, e in ready.items() if not e.is_set()]
            raise ProxyError(f"timed out waiting for {', '.join(missing)} from the agent") from None
        if state.server_ctx is None:
            raise ProxyError("no usable leaf certificate / CA roots")

        self.inbound = InboundListener(state, spec.address if _is_ip(spec.address) else "127.0.0.1", spec.port)
        await self.inbound.start()
        await self._apply_upstreams(spec.upstreams)
        await self.chains.settled()  # http upstreams route from their first request
        self._spawn(follow_hash(c, f"/v1/agent/service/{spec.proxy_id}", self._apply_service,
                                what=f"service {spec.proxy_id}"), "service")
        if self.metrics_port is not None:
            self._metrics = await asyncio.start_server(self._serve_admin, "127.0.0.1", self.metrics_port)
        log.info("proxy %s for %s: inbound mTLS on %s:%d -> %s:%d; upstreams: %s", spec.proxy_id, dest,
                 self.inbound.host, self.inbound.port, spec.local_address, spec.local_port,
                 ", ".join(f"{u.destination}@{u.bind_address}:{u.bind_port}" for u in spec.upstreams) or "none")

    # -- appliers (called by the watch loops) -----------------------------------------------------

    def _rebuild_tls(self) -> None:
        state = self.state
        if state is None or self._leaf is None or self._roots is None:
            return
        roots = tuple(r["RootCert"] for r in self._roots.get("Roots") or [] if r.get("RootCert"))
        if not roots:
            log.warning("CA roots are empty; keeping the current TLS contexts")
            return
        material = TLSMaterial(self._leaf["CertPEM"], self._leaf["PrivateKeyPEM"], roots,
                               str(self._roots.get("TrustDomain") or ""))
        try:
            server, client = server_context(material), client_context(material)
        except Exception:
            log.exception("cannot build TLS contexts from the new leaf/roots; keeping the current ones")
            return
        state.server_ctx, state.client_ctx = server, client  # swapped whole: new connections only
        state.trust_domain = material.trust_domain
        if self.l7 is not None:
            self.l7.set_tls(client, material.trust_domain)
        state.own_uri = str(self._leaf.get("ServiceURI") or "")
        state.stats.inc("tls_reloads")

    def _apply_roots(self, roots: dict[str, Any]) -> None:
        self._roots = roots
        log.info("CA roots: active %s, %d root(s)", roots.get("ActiveRootID"), len(roots.get("Roots") or []))
        self._rebuild_tls()

    def _apply_leaf(self, leaf: dict[str, Any]) -> None:
        self._leaf = leaf
        log.info("leaf for %s: serial %s valid until %s", leaf.get("Service"), leaf.get("SerialNumber"),
                 leaf.get("ValidBefore"))
        self._rebuild_tls()

    def _apply_intentions(self, data: dict[str, Any]) -> None:
        assert self.state is not None
        items = data.get(self.state.spec.destination_name) or []
        self.state.authz.replace(items)
        closed = self.inbound.reevaluate() if self.inbound is not None else 0
        log.info("intentions for %s: %d (closed %d open connection(s))", self.state.spec.destination_name,
                 len(items), closed)

    def _apply_protocol(self, entry: dict[str, Any] | None) -> None:
        assert self.state is not None
        protocol = str((entry or {}).get("Protocol") or "tcp").lower()
        # Only HTTP/1.1 is parsed; http2/grpc are relayed at L4, where an L7 intention counts as deny
        # (Consul's L4 rule) rather than feeding h2 frames to an HTTP/1.1 parser.
        self.state.l7 = protocol == "http"
        if protocol in HTTP_PROTOCOLS and not self.state.l7:
            log.warning("destination protocol %s: no L7 parsing for it yet; relaying at L4", protocol)
        log.info("destination protocol: %s (%s)", protocol, "L7 request checks" if self.state.l7 else "L4 relay")

    async def _apply_service(self, service: dict[str, Any] | None) -> None:
        if service is None or self.state is None:
            log.warning("our registration %s is gone; keeping the last configuration", self.proxy_id)
            return
        try:
            spec = parse_registration(service)
        except ValueError as exc:
            log.warning("ignoring registration update: %s", exc)
            return
        old = self.state.spec
        self.state.spec = spec  # local app address/port apply to the next connection
        if spec.port != old.port:
            log.warning("inbound port changed %d -> %d: restart the proxy to rebind", old.port, spec.port)
        if spec.observe != old.observe:
            log.warning("Proxy.Config tracing / access-log settings changed: restart the proxy to apply them")
        if spec.upstreams != old.upstreams:
            await self._apply_upstreams(spec.upstreams)

    async def _apply_upstreams(self, wanted: tuple[UpstreamSpec, ...]) -> None:
        assert self.state is not None
        by_key = {u.listener_key: u for u in wanted}
        for key in list(self.upstreams):
            spec = by_key.get(key)
            current = self.upstreams[key]
            if spec is None or spec.destination != current.spec.destination:
                await self._remove_upstream(key)
        for key, spec in by_key.items():
            if key in self.upstreams:
                self.upstreams[key].reconfigure(spec)
                if self.chains is not None:
                    self.chains.recompile()  # the upstream's Config.protocol may have changed
                continue
            up = Upstream(self.state, spec)
            up.router = self.l7
            try:
                await up.start()
            except OSError as exc:
                log.error("upstream %s: cannot listen on %s:%d: %s", spec.destination, *key, exc)
                continue
            self.upstreams[key] = up
            if self.chains is not None:
                self.chains.attach(up)
            self._upstream_tasks[key] = asyncio.get_running_loop().create_task(
                follow_index(self.client, f"/v1/health/connect/{spec.destination}", {"passing": "1"},
                             lambda entries, u=up: u.set_endpoints(endpoints_from_health(entries)),
                             what=f"health/connect/{spec.destination}"))
            log.info("upstream %s listening on %s:%d (lb %s)", spec.destination, *key, spec.lb_policy)

    async def _remove_upstream(self, key: tuple[str, int]) -> None:
        up = self.upstreams.pop(key)
        if self.chains is not None:
            self.chains.detach(up)
        task = self._upstream_tasks.pop(key, None)
        if task is not None:
            task.cancel()
        await up.stop()
        log.info("upstream %s on %s:%d removed", up.spec.destination, *key)

    # -- admin / metrics --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        assert state is not None
        spec: ProxySpec = state.spec
        return {
            "ProxyID": spec.proxy_id,
            "Destination": spec.destination_name,
            "InboundPort": self.inbound.port if self.inbound else None,
            "Protocol": "http" if state.l7 else "tcp",
            "LiveInbound": len(self.inbound.live) if self.inbound else 0,
            "Intentions": len(state.authz.intentions),
            "DefaultAllow": state.authz.default_allow,
            "LeafSerial": (self._leaf or {}).get("SerialNumber"),
            "ActiveRootID": (self._roots or {}).get("ActiveRootID"),
            "Upstreams": [u.snapshot() for u in self.upstreams.values()],
            "Counters": state.stats.as_json(),
            "Observability": self.obs.stats() if self.obs is not None else {},
        }

    async def _serve_admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path.startswith("/metrics") and self.state is not None:
                body, ctype, status = self.state.stats.prometheus().encode(), "text/plain; version=0.0.4", 200
            elif path.startswith("/stats") and self.state is not None:
                body, ctype, status = json.dumps(self.snapshot()).encode(), "application/json", 200
            elif path.startswith("/ready"):
                body, ctype, status = b"ready\n", "text/plain", 200
            else:
                body, ctype, status = b"not found\n", "text/plain", 404
            writer.write(f"HTTP/1.1 {status} OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    # -- lifecycle --------------------------------------------------------------------------------

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        for task in self._tasks + list(self._upstream_tasks.values()):
            task.cancel()
        for task in self._tasks + list(self._upstream_tasks.values()):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self.chains is not None:
            await self.chains.stop()
        for key in list(self.upstreams):
            await self._remove_upstream(key)
        if self.l7 is not None:
            self.l7.close()
        if self.inbound is not None:
            await self.inbound.stop()
        if self._metrics is not None:
            self._metrics.close()
        if self.obs is not None:
            await asyncio.to_thread(self.obs.close)  # the last spans and log lines go out
        await self.client.close()
        self._stopped.set()


def _is_ip(value: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


async def run_proxy(http_addr: str, sidecar_for: str | None, *, proxy_id: str | None = None,
                    metrics_port: int | None = None, default_intention_policy: str | None = None,
                    token: str | None = None, stop: asyncio.Event | None = None, otlp_endpoint: str | None = None,
                    trace_sample_ratio: float | None = None, access_log: str | None = None) -> None:
    """Run a sidecar until `stop` is set (or the task is cancelled). Prints one ready line.

    `otlp_endpoint`, `trace_sample_ratio`, `access_log`: None takes the registration's Proxy.Config.
    """
    proxy = SidecarProxy(http_addr, sidecar_for, proxy_id=proxy_id, metrics_port=metrics_port,
                         default_intention_policy=default_intention_policy, token=token,
                         otlp_endpoint=otlp_endpoint, trace_sample_ratio=trace_sample_ratio, access_log=access_log)
    try:
        await proxy.start()
        assert proxy.state is not None and proxy.inbound is not None
        print(f"==> Lictor sidecar proxy ready: {proxy.state.spec.proxy_id} inbound "
              f"{proxy.inbound.host}:{proxy.inbound.port}", flush=True)
        if stop is None:
            await proxy.wait()
        else:
            await stop.wait()
    finally:
        await proxy.stop()
