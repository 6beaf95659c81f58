"""The agent's DNS: a catalog view kept current by blocking queries, served by `lictor.dns`.

DNS answers never cost a server round trip: the agent holds the whole catalog, refreshed the
moment the servers report a change (a blocking query on `/v1/internal/snapshot`), or directly
from the replicated store on a server agent, and builds its DNS view from it when queried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from lictor.config import AgentConfig
from lictor.dns import CatalogView, DnsConfig, DnsServer, QueryRateLimiter
from lictor.errors import APIError
from lictor.limits import count_refusal
from lictor.registry import views

log = logging.getLogger("lictor.dns")

# Rebuilding the view costs O(catalog); coalesce write bursts into one rebuild per this period.
REBUILD_MIN_PERIOD = 0.05


def dns_config(config: AgentConfig) -> DnsConfig:
    return DnsConfig(
        domain=config.domain,
        alt_domain=config.alt_domain or None,
        node_ttl=int(config.node_ttl),
        service_ttl={k: int(v) for k, v in config.service_ttl.items()},
        only_passing=config.only_passing,
        a_record_limit=config.a_record_limit,
    )


def rate_limiter(config: AgentConfig) -> QueryRateLimiter | None:
    """The per-client query limit (-dns-rate-limit / -dns-rate-burst); None when off (the default)."""
    if config.dns_rate_limit <= 0:
        return None
    return QueryRateLimiter(config.dns_rate_limit, config.dns_rate_burst)


def _count_rate_refusal() -> None:
    count_refusal("dns_rate")


class CatalogFollower:
    """Holds the catalog the DNS answers from and keeps it fresh.

    Following is cheap and eager: a change is noticed at once (a blocking query, or the local store's
    change feed). Building the CatalogView is O(catalog) (~6 ms at 540 services) and lazy: it happens
    when a DNS query needs a view newer than the last one built, at most once per
    REBUILD_MIN_PERIOD. An agent nobody queries over DNS builds nothing while its catalog churns.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.view = CatalogView.empty(config.datacenter)
        self.index = 0  # of the newest catalog known
        self.updated = 0.0  # monotonic time of the last successful refresh
        self.waiting = False  # a blocking query is parked on a server right now
        self._task: asyncio.Task[None] | None = None
        self._pending: Callable[[], dict[str, Any]] | None = None  # the newest catalog, not built yet
        self._built_at = -REBUILD_MIN_PERIOD

    def build(self, snapshot: dict[str, Any]) -> None:
        servers = [s["Node"] for s in snapshot.get("Services", []) if s.get("Service") == "consul"]
        self.view = CatalogView.from_snapshot(
            snapshot, self.config.datacenter, ingress_services=snapshot.get("IngressServices") or {}, servers=servers
        )
        self._built_at = time.monotonic()

    def _offer(self, index: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        """A newer catalog: `snapshot()` gives it when a query needs it."""
        self.index = index
        self._pending = snapshot
        self.updated = time.monotonic()

    def get(self) -> CatalogView | None:
        """The view to answer from; None (SERVFAIL) before the first one or past `max_stale`."""
        if self.updated == 0.0:
            return None
        # While a blocking query is parked on a server, the view is current by definition.
        if not self.waiting and time.monotonic() - self.updated > self.config.dns_max_stale:
            return None
        if self._pending is not None and time.monotonic() - self._built_at >= REBUILD_MIN_PERIOD:
            snapshot, self._pending = self._pending, None
            self.build(snapshot())
        return self.view

    async def follow_store(self, log_: Any) -> None:
        """Server agents: note every change of the local replicated store's catalog. With ACLs on,
        the view holds only what the agent's default token (-acl-token, else anonymous) may read."""
        feed = log_.feed
        resolver = None
        authz: Any = None
        if self.config.acl_enabled:
            from lictor.registry.acl_http import ServerResolver

            resolver = ServerResolver(lambda: log_.store, self.config.acl_default_policy, self.config.acl_initial_management)
        # What the view depends on: the catalog, and with ACLs the tokens and policies that filter it.
        # As the wait's check, a change elsewhere (a KV write) does not wake this loop at all.
        watched = views.SNAPSHOT_TABLES + (("acl",) if resolver is not None else ())
        while True:
            generation = feed.generation
            seen = views.tables_index(log_.store, watched)
            index = views.catalog_snapshot_index(log_.store)  # cheap: KV writes don't touch the catalog
            previous_authz = authz
            if resolver is not None:
                authz = await self._authorizer(resolver)  # a token or policy change re-filters the view
            if index != self.index or authz is not previous_authz:
                self._offer(index, lambda authz=authz: self._store_snapshot(log_.store, authz))
            self.updated = time.monotonic()
            await feed.wait(generation, 30.0, lambda seen=seen: views.tables_index(log_.store, watched) == seen)
            await asyncio.sleep(REBUILD_MIN_PERIOD)

    @staticmethod
    def _store_snapshot(store: Any, authz: Any) -> dict[str, Any]:
        snapshot = views.read(store, views.catalog_snapshot)[1]
        if authz is None:
            return snapshot
        from lictor import acl

        return acl.filter_response("catalog_snapshot", snapshot, authz)[0]

    async def _authorizer(self, resolver: Any) -> Any:
        from lictor import acl

        try:
            resolved = await resolver.resolve(self.config.acl_token)
        except APIError:
            resolved = None
        return resolved.authz if resolved is not None else acl.Authorizer(acl.Rules(), "deny", "", True)

    async def follow_servers(self, pool: Any) -> None:
        """Client agents: a blocking query on the whole catalog, stale reads allowed."""
        backoff = 0.2
        while True:
            try:
                self.waiting = self.updated > 0.0
                try:
                    # DNS answers with the default token's view (Consul's rule), not the agent token's.
                    headers = {"X-Consul-Token": self.config.acl_token or "anonymous"} if self.config.acl_enabled else {}
                    resp = await pool.request(
                        "GET", f"/v1/internal/snapshot?stale&index={self.index}&wait=30s", timeout=45.0, headers=headers
                    )
                finally:
                    self.waiting = False
                if resp.status_code != 200:
                    raise APIError(f"snapshot answered {resp.status_code}", resp.status_code)
                index = int(resp.headers.get("X-Consul-Index", "0"))
                self.updated = time.monotonic()  # the servers answered: our view is current
                if index < self.index:
                    self.index = 0  # the servers' index went backwards (restore): start over
                elif index != self.index:
                    self._offer(index, resp.json)  # decoded when a query needs it
                backoff = 0.2
                await asyncio.sleep(REBUILD_MIN_PERIOD)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep answering from the last view while servers are away
                log.debug("catalog follow failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def start(self, runtime: Any, pool: Any) -> None:
        if runtime.server is not None:
            self._task = asyncio.create_task(self.follow_store(runtime.server.log))
        else:
            self._task = asyncio.create_task(self.follow_servers(pool))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class DnsService:
    """What the runtime stops at shutdown: the follower and the DNS server."""

    def __init__(self, follower: CatalogFollower, server: DnsServer) -> None:
        self.follower = follower
        self.server = server

    async def stop(self) -> None:
        await self.server.stop()
        await self.follower.stop()


async def start_dns(runtime: Any, pool: Any) -> None:
    config: AgentConfig = runtime.config
    if config.dns_port < 0:
        return
    follower = CatalogFollower(config)
    follower.start(runtime, pool)
    server = DnsServer(follower.get, dns_config(config), host=config.client, port=config.dns_port,
                       recursors=list(config.recursors), rate_limiter=rate_limiter(config),
                       on_rate_limited=_count_rate_refusal)
    await server.start()
    runtime.extras.append(DnsService(follower, server))
    runtime.dns = follower
    print(f"    DNS: {config.client}:{server.port} (UDP and TCP), domain {config.domain}", flush=True)
