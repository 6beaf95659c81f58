"""The local agent: the services and checks of this host, their health, and keeping servers in sync.

The agent is the authority for its node. Every registration is persisted (SQLite in the data
dir) before it is acknowledged, runs its checks locally, and is pushed to the servers at once;
a periodic full sync repairs drift in both directions, and while no server is reachable the
agent keeps serving from local state and converges when one comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import socket
import sqlite3
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

import aiosqlite
import httpx
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from lictor.agent.checks import CheckRunner
from lictor.agent.definitions import (
    CRITICAL,
    PASSING,
    WARNING,
    CheckSpec,
    ServiceRegistration,
    decode_check_registration_with_warnings,
    decode_service_registration,
    load_config_dir,
)
from lictor.agent.server_http import ServerHTTP, ServerHTTPError, ServerResponse
from lictor.config import AgentConfig
from lictor.decode import AnyValue, Str, Struct, decode_body
from lictor.errors import APIError, BadRequest, NotFound
from lictor.httpapi import compact_json, empty_ok, guarded, json_response, parse_bool, read_body
from lictor.registry.raft import new_command

log = logging.getLogger("lictor.agent")

NODE_MAINT_ID = "_node_maintenance"
RAFT_CHECK_ID = "raft_health"
SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT_NOTES = "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
SERVICE_MAINT_NOTES = "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
CHECK_UPDATE = Struct("CheckUpdate", {"Status": Str(), "Output": Str()})
TOKEN_BODY = Struct("Token", {"Token": Str()}, lenient=frozenset({"AccessorID"}))
ANY_BODY = Struct("Any", {"Any": AnyValue()})
STATUS_ORDER = {PASSING: 0, WARNING: 1, CRITICAL: 2}


class ServerBackend:
    """How the local agent reaches the servers. Implemented for in-process and remote servers."""

    async def sync_node(self, payload: dict[str, Any]) -> None: ...

    async def check_batch(self, node: str, updates: list[dict[str, Any]]) -> None: ...

    async def heartbeat(self, node: str) -> None: ...

    async def members(self) -> list[dict[str, Any]]:
        return []


class InProcessBackend(ServerBackend):
    """The agent of a server process: commands go straight to the consensus log."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def sync_node(self, payload: dict[str, Any]) -> None:
        if payload.pop("Partial", False):
            await self.server.log.submit(new_command("sync_partial", **payload))
        else:
            await self.server.log.submit(new_command("sync_node", **payload))

    async def check_batch(self, node: str, updates: list[dict[str, Any]]) -> None:
        await self.server.log.submit(new_command("check_batch", Node=node, Updates=updates))

    async def heartbeat(self, node: str) -> None:
        await self.server.heartbeat(node)

    async def members(self) -> list[dict[str, Any]]:
        return self.server.members()


class ServerPool:
    """The servers a client agent knows (its -retry-join list); sticks to one until it fails."""

    def __init__(self, addresses: list[str], *, scheme: str = "http", verify: ssl.SSLContext | bool = True) -> None:
        self.addresses = list(dict.fromkeys(addresses))
        # Start on a random server, as Consul's agents shuffle theirs: agents that all list the same
        # servers would otherwise all land on the first one and leave the others idle.
        self.current = random.randrange(len(self.addresses)) if self.addresses else 0
        self.scheme = scheme  # for addresses given without one; `https://host:port` in -retry-join also works
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0), limits=httpx.Limits(max_connections=512),
                                        verify=verify)
        # The hot path (forwarding, anti-entropy, ACL lookups) uses lean keep-alive connections; the
        # httpx client stays for rare calls and carries the agent token (`apply_agent_token`).
        self.http = ServerHTTP(verify if isinstance(verify, ssl.SSLContext) else None)

    @classmethod
    def from_config(cls, config: AgentConfig) -> ServerPool:
        """TLS towards the servers (lictor/tls.py): https:// addresses, or bare ones under -verify-outgoing or
        LICTOR_HTTP_SSL/CONSUL_HTTP_SSL; verified against -ca-file, presenting -client-cert/-key."""
        from lictor import tls

        pool = cls(config.retry_join, scheme=tls.default_scheme(config), verify=tls.outgoing_context(config))
        tls.apply_server_name(pool.client, config)
        if config.verify_server_hostname:
            pool.http.server_hostname = tls.server_name(config)
        return pool

    def url(self, address: str, path: str) -> str:
        return f"{address}{path}" if "://" in address else f"{self.scheme}://{address}{path}"

    def add(self, address: str) -> None:
        if address not in self.addresses:
            self.addresses.append(address)

    async def request(self, method: str, path: str, *, timeout: float = 10.0, json_body: Any = None,
                      content: bytes = b"", headers: dict[str, str] | None = None) -> ServerResponse:
        if not self.addresses:
            raise APIError("No known Consul servers: start the agent with -retry-join <server HTTP address>", 500)
        headers = dict(headers or {})
        if json_body is not None:
            content = compact_json(json_body)  # anti-entropy pushes: orjson, ~9x faster than json
            headers.setdefault("Content-Type", "application/json")
        token = self.client.headers.get("X-Consul-Token")
        if token and not any(k.lower() in ("x-consul-token", "authorization") for k in headers):
            headers["X-Consul-Token"] = token
        last: Exception | None = None
        for attempt in range(len(self.addresses)):
            address = self.addresses[(self.current + attempt) % len(self.addresses)]
            try:
                resp = await self.http.request(method, self.url(address, path), headers=headers, content=content,
                                               timeout=timeout)
            except ServerHTTPError as exc:
                last = exc
                continue
            if resp.status_code == 500 and "No cluster leader" in resp.text and attempt + 1 < len(self.addresses):
                last = APIError(resp.text, 500)
                continue
            self.current = (self.current + attempt) % len(self.addresses)
            return resp
        raise APIError(f"No known Consul servers reachable ({last})", 500)

    async def close(self) -> None:
        await self.http.close()
        await self.client.aclose()


class RemoteBackend(ServerBackend):
    def __init__(self, pool: ServerPool) -> None:
        self.pool = pool

    async def _put(self, path: str, body: dict[str, Any]) -> None:
        resp = await self.pool.request("PUT", path, json_body=body)
        if resp.status_code != 200:
            raise APIError(f"server answered {resp.status_code}: {resp.text[:200]}", resp.status_code)

    async def sync_node(self, payload: dict[str, Any]) -> None:
        await self._put("/v1/internal/agent/sync", payload)

    async def check_batch(self, node: str, updates: list[dict[str, Any]]) -> None:
        await self._put("/v1/internal/agent/checks", {"Node": node, "Updates": updates})

    async def heartbeat(self, node: str) -> None:
        await self._put("/v1/internal/heartbeat", {"Node": node})

    async def members(self) -> list[dict[str, Any]]:
        resp = await self.pool.request("GET", "/v1/agent/members")
        return resp.json() if resp.status_code == 200 else []


class _Deferred(Mapping[Any, int]):
    """A mapping computed when first read (iterating it gives its keys, as for any mapping)."""

    def __init__(self, make: Callable[[], dict[Any, int]]) -> None:
        self.make = make
        self._value: dict[Any, int] | None = None

    def _get(self) -> dict[Any, int]:
        if self._value is None:
            self._value = self.make()
        return self._value

    def __getitem__(self, key: Any) -> int:
        return self._get()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class LocalStore:
    """SQLite persistence of the agent's own services and checks (None path = memory only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.db: aiosqlite.Connection | None = None
        # One connection, many coroutines: a transaction must not interleave with another's
        # statements ("cannot start a transaction within a transaction").
        self.lock = asyncio.Lock()

    async def open(self) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Autocommit: a change of one row is one statement, atomic by itself, and one hand-off to
        # aiosqlite's thread; BEGIN/COMMIT are spent only on changes of several rows (see _write_locked).
        self.db = await aiosqlite.connect(self.path, isolation_level=None)
        await self.db.execute("PRAGMA journal_mode=WAL")
        await self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged registration survives a crash
        await self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS services (id TEXT PRIMARY KEY, body TEXT NOT NULL, source TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS checks (id TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL,
                output TEXT NOT NULL, ttl_deadline REAL, source TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            """
        )
        await self.db.commit()

    async def load(self) -> tuple[list[tuple[dict, str]], list[tuple[CheckSpec, str, str, float | None, str]], dict[str, str]]:
        if self.db is None:
            return [], [], {}
        services = [(json.loads(b), src) for b, src in await self.db.execute_fetchall("SELECT body, source FROM services")]
        checks = []
        for spec, status, output, deadline, source in await self.db.execute_fetchall(
            "SELECT spec, status, output, ttl_deadline, source FROM checks"
        ):
            checks.append((CheckSpec(**json.loads(spec)), status, output, deadline, source))
        meta = dict(await self.db.execute_fetchall("SELECT key, value FROM meta"))
        return services, checks, meta

    async def write(
        self,
        services: list[tuple[dict, str]] = (),
        checks: list[tuple[CheckSpec, str, str, float | None, str]] = (),
        delete_services: list[str] = (),
        delete_checks: list[str] = (),
        meta: dict[str, str] | None = None,
    ) -> None:
        """One transaction, so a registration and its checks are stored together or not at all.

        A change that cannot be stored (a full disk, an I/O error) is refused whole: the caller
        applies it in memory only after this returns, so nothing is acknowledged that a restart
        would forget. The refusal says why: 507 when the disk is full, 500 otherwise."""
        if self.db is None:
            return
        async with self.lock:
            try:
                await self._write_locked(self.db, services, checks, delete_services, delete_checks, meta)
            except (sqlite3.DatabaseError, OSError) as exc:
                if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.IntegrityError, sqlite3.DataError)):
                    raise  # a bug in what we asked SQLite to store, not the disk
                raise store_failure(exc, self.path) from exc

    async def _write_locked(
        self,
        db: aiosqlite.Connection,
        services: list[tuple[dict, str]],
        checks: list[tuple[CheckSpec, str, str, float | None, str]],
        delete_services: list[str],
        delete_checks: list[str],
        meta: dict[str, str] | None,
    ) -> None:
        statements: list[tuple[str, tuple[Any, ...]]] = []
        statements += [("DELETE FROM services WHERE id = ?", (sid,)) for sid in delete_services]
        statements += [("DELETE FROM checks WHERE id = ?", (cid,)) for cid in delete_checks]
        statements += [("INSERT OR REPLACE INTO services VALUES (?, ?, ?)", (body["ID"], json.dumps(body), source))
                       for body, source in services]
        statements += [("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?, ?)",
                        (spec.check_id, json.dumps(dataclasses.asdict(spec)), status, output, deadline, source))
                       for spec, status, output, deadline, source in checks]
        statements += [("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)) for key, value in (meta or {}).items()]
        await _in_one_transaction(db, statements)

    async def update_check_states(self, rows: list[tuple[str, str, str, float | None]]) -> None:
        if self.db is None or not rows:
            return
        async with self.lock:
            await _in_one_transaction(self.db, [("UPDATE checks SET status = ?, output = ?, ttl_deadline = ? WHERE id = ?",
                                                 (status, output, deadline, cid)) for cid, status, output, deadline in rows])

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None


def store_failure(exc: BaseException, path: str | None) -> APIError:
    """The API error for a change the agent's store could not take, logged once per failure."""
    where = os.path.dirname(path or "") or "."
    full = getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or getattr(exc, "errno", None) == errno.ENOSPC
    log.warning("storing a change in %s failed: %s; the change was refused", path, exc)
    if full:
        return APIError(f"The agent's disk is full: storing the change in {where} failed ({exc}). Nothing was "
                        "applied; free space there and retry.", 507)
    return APIError(f"The agent could not store the change in {where} ({type(exc).__name__}: {exc}). Nothing "
                    "was applied.", 500)


async def _in_one_transaction(db: aiosqlite.Connection, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Run `statements` so they are stored together or not at all.

    Each aiosqlite call is a hand-off to its thread and back (two cross-thread wake-ups), so BEGIN,
    the statements and COMMIT were three hand-offs for every registration and deregistration, the
    soak's most frequent agent writes (issue #9). One statement on an autocommit connection is a
    transaction of its own: one hand-off, with the same durability (synchronous=FULL)."""
    if not statements:
        return
    if len(statements) == 1:
        await db.execute(*statements[0])
        return
    await db.execute("BEGIN")
    try:
        for sql, params in statements:
            await db.execute(sql, params)
        await db.execute("COMMIT")
    except BaseException:
        await db.rollback()
        raise


@dataclasses.dataclass
class LocalCheck:
    spec: CheckSpec
    status: str
    output: str
    source: str = "api"  # "api" or the config file it came from
    static: bool = False  # maintenance checks: not run by the runner


class LocalAgent:
    def __init__(self, config: AgentConfig, backend: ServerBackend, pool: ServerPool | None = None) -> None:
        self.config = config
        self.backend = backend
        self.pool = pool
        self.node = config.node
        self.node_id = ""
        self.services: dict[str, dict[str, Any]] = {}
        self.service_sources: dict[str, str] = {}
        self.checks: dict[str, LocalCheck] = {}
        self.store = LocalStore(os.path.join(config.data_dir, "agent.db") if config.data_dir and not config.dev else None)
        self.runner = CheckRunner(
            self._on_check_change, alias_source=self._alias_statuses, node_name=config.node,
            deregister_min=config.check_deregister_min,
        )
        self._full_sync_needed = asyncio.Event()
        # What changed since the last push: sent as a partial sync instead of the whole node.
        self._dirty_services: set[str] = set()
        self._dirty_checks: set[str] = set()
        self._pending_updates: dict[str, tuple[str, str]] = {}
        self._dirty_states: set[str] = set()
        self._wake_sync = asyncio.Event()
        self._lock = asyncio.Lock()  # serializes registrations (check IDs, ports, persistence)
        self._tasks: list[asyncio.Task[Any]] = []
        self.in_sync = False
        self.last_sync_error = ""
        self.changed = asyncio.Event()  # pulses on any local change (hash-blocking endpoints)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        services, checks, meta = await self.store.load()
        self.node_id = meta.get("node_id") or str(uuid.uuid4())
        if "node_id" not in meta:
            await self.store.write(meta={"node_id": self.node_id})
        for body, source in services:
            self.services[body["ID"]] = body
            self.service_sources[body["ID"]] = source
        for spec, status, output, deadline, source in checks:
            self._start_check(spec, status, output, deadline, source)
        await self._load_config_dir()
        self._full_sync_needed.set()
        if self.config.server and not self.config.dev:
            await self._register_raft_check()
        self._tasks = [
            asyncio.create_task(self._sync_loop()),
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._reap_loop()),
        ]

    def _start_check(self, spec: CheckSpec, status: str, output: str, deadline: float | None, source: str) -> None:
        if spec.kind == "maintenance":
            self.checks[spec.check_id] = LocalCheck(spec, status, output, source, static=True)
            return
        # Consul restores only unexpired TTL state; other checks start from their initial status.
        restored = status if spec.kind == "ttl" else None
        self.checks[spec.check_id] = LocalCheck(spec, restored or spec.status, output if restored else "", source)
        self.runner.add(spec, initial_status=restored, initial_output=output if restored else "", ttl_deadline=deadline)
        current = self.runner.status(spec.check_id)
        if current:
            self.checks[spec.check_id].status, self.checks[spec.check_id].output = current

    async def _register_raft_check(self) -> None:
        """A node check that turns critical when this server's Raft node is wedged or leaderless.

        It is a TTL check fed by a loop: if the loop itself stalls, the TTL expires and the
        check goes critical too.
        """
        spec = CheckSpec(check_id=RAFT_CHECK_ID, name="Raft health", kind="ttl", ttl=10.0, status=CRITICAL,
                         notes="Critical when apply is stuck below commit, the tick thread fails, or no leader")
        self.checks[RAFT_CHECK_ID] = LocalCheck(spec, CRITICAL, "", "internal")
        self.runner.add(spec)
        self._tasks.append(asyncio.create_task(self._raft_health_loop()))

    async def _raft_health_loop(self) -> None:
        server = getattr(self.backend, "server", None)
        while True:
            if server is not None and server.log is not None:
                healthy, reason = server.log.health()
                self.runner.ttl_update(RAFT_CHECK_ID, PASSING if healthy else CRITICAL, reason)
            await asyncio.sleep(2.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.runner.close()
        await self._persist_states()
        await self.store.close()
        if self.pool is not None:
            await self.pool.close()

    async def leave(self) -> None:
        """Deregister this node from the catalog on a graceful leave, as Consul's agents do."""
        try:
            await self.backend.sync_node(self._node_payload(services={}, checks={}))
        except APIError:
            pass

    def stats(self) -> dict[str, str]:
        return {
            "checks": str(len(self.checks)),
            "services": str(len(self.services)),
            "in_sync": str(self.in_sync).lower(),
            "last_sync_error": self.last_sync_error,
        }

    # -- check results ------------------------------------------------------------------------------

    def _on_check_change(self, check_id: str, status: str, output: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            return
        check.status, check.output = status, output
        self._pending_updates[check_id] = (status, output)
        self._dirty_states.add(check_id)
        self._wake_sync.set()
        self._pulse()
        if check.spec.service_id:
            self.runner.alias_changed(check.spec.service_id)

    def _alias_statuses(self, service_id: str) -> list[str] | None:
        if service_id not in self.services:
            return None
        return [c.status for c in self.checks.values() if c.spec.service_id in (service_id, "")]

    def _pulse(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # -- syncing with the servers ----------------------------------------------------------------

    def _node_payload(self, services: dict[str, dict] | None = None, checks: dict[str, LocalCheck] | None = None,
                      include_server: bool = True) -> dict[str, Any]:
        services = self.services if services is None else services
        checks = self.checks if checks is None else checks
        config = self.config
        catalog_checks = []
        for check in checks.values():
            service = self.services.get(check.spec.service_id) if check.spec.service_id else None
            if check.spec.service_id and service is None:
                continue
            hc = check.spec.to_health_check(
                self.node, service["Service"] if service else "", service.get("Tags", []) if service else [],
                check.status, check.output,
            )
            catalog_checks.append({k: hc[k] for k in (
                "CheckID", "Name", "Status", "Notes", "Output", "ServiceID", "Type", "Interval", "Timeout", "Definition"
            )})
        catalog_services = []
        for service in services.values():
            record = {k: v for k, v in service.items() if k not in ("ContentHash", "CreateIndex", "ModifyIndex", "Datacenter")}
            record.setdefault("Proxy", {})
            record.setdefault("Connect", {})
            catalog_services.append(record)
        return {
            "ID": self.node_id,
            "Node": self.node,
            "Address": config.bind,
            "Datacenter": config.datacenter,
            "TaggedAddresses": {"lan": config.bind, "lan_ipv4": config.bind, "wan": config.bind, "wan_ipv4": config.bind},
            "NodeMeta": {"consul-network-segment": ""} | dict(config.node_meta),
            "Services": catalog_services + (self._server_services(services) if include_server else []),
            "Checks": catalog_checks,
        }

    def _server_services(self, services: dict[str, dict]) -> list[dict[str, Any]]:
        """A server agent's node carries the `consul` service; keep it through full syncs."""
        if not self.config.server or "consul" in services:
            return []
        return [{
            "ID": "consul", "Service": "consul", "Tags": [], "Address": "", "TaggedAddresses": {},
            "Meta": {"raft_version": "3", "version": "0.1.0"}, "Port": self.config.raft_port,
            "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False, "Kind": "", "Proxy": {}, "Connect": {},
        }]

    def request_full_sync(self) -> None:
        self._full_sync_needed.set()
        self._wake_sync.set()

    def mark_dirty(self, services: Iterable[str] = (), checks: Iterable[str] = ()) -> None:
        """Push these (present or removed) at once; the periodic full sync repairs anything else."""
        self._dirty_services.update(services)
        self._dirty_checks.update(checks)
        self._wake_sync.set()

    def _partial_payload(self) -> dict[str, Any]:
        dirty_services, self._dirty_services = self._dirty_services, set()
        dirty_checks, self._dirty_checks = self._dirty_checks, set()
        present_services = {sid: self.services[sid] for sid in dirty_services if sid in self.services}
        check_ids = {cid for cid in dirty_checks if cid in self.checks}
        check_ids |= {cid for cid, c in self.checks.items() if c.spec.service_id in present_services}
        payload = self._node_payload(
            services=present_services, checks={cid: self.checks[cid] for cid in check_ids}, include_server=False
        )
        # A check of a service that is not in this push must still be known to the servers.
        payload["Checks"] = [c for c in payload["Checks"] if not c["ServiceID"] or c["ServiceID"] in self.services]
        payload["Partial"] = True
        payload["DeleteServices"] = sorted(sid for sid in dirty_services if sid not in self.services)
        payload["DeleteChecks"] = sorted(cid for cid in dirty_checks if cid not in self.checks)
        return payload

    async def _sync_loop(self) -> None:
        """Push changes at once; a full sync every ae_interval (staggered) and after any failure."""
        backoff = 0.5
        next_full = time.monotonic()
        while True:
            try:
                now = time.monotonic()
                if self._full_sync_needed.is_set() or now >= next_full:
                    self._full_sync_needed.clear()
                    self._pending_updates.clear()
                    self._dirty_services.clear()
                    self._dirty_checks.clear()
                    await self.backend.sync_node(self._node_payload())
                    next_full = time.monotonic() + self.config.ae_interval + random.uniform(0, self.config.ae_interval)
                elif self._dirty_services or self._dirty_checks:
                    await self.backend.sync_node(self._partial_payload())
                elif self._pending_updates:
                    updates, self._pending_updates = self._pending_updates, {}
                    await self.backend.check_batch(
                        self.node, [{"CheckID": cid, "Status": s, "Output": o} for cid, (s, o) in updates.items()]
                    )
                self.in_sync = True
                self.last_sync_error = ""
                backoff = 0.5
                await self._persist_states()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # servers unreachable or no leader: keep serving, retry
                if self.in_sync or self.last_sync_error != str(exc):
                    log.warning("sync with servers failed (%s); will retry", exc)
                self.in_sync = False
                self.last_sync_error = str(exc)
                self._full_sync_needed.set()
                # A new local change retries at once; otherwise back off, up to 10 s.
                self._wake_sync.clear()
                try:
                    await asyncio.wait_for(self._wake_sync.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 10.0)
                continue
            timeout = max(0.0, next_full - time.monotonic())
            self._wake_sync.clear()
            if self._pending_updates or self._full_sync_needed.is_set() or self._dirty_services or self._dirty_checks:
                continue
            try:
                await asyncio.wait_for(self._wake_sync.wait(), timeout)
            except TimeoutError:
                pass

    async def _persist_states(self) -> None:
        dirty, self._dirty_states = self._dirty_states, set()
        rows = []
        for cid in dirty:
            check = self.checks.get(cid)
            if check is None or check.static:
                continue
            deadline = self.runner.ttl_deadline(cid) if check.spec.kind == "ttl" else None
            rows.append((cid, check.status, check.output, deadline))
        try:
            await self.store.update_check_states(rows)
        except Exception as exc:  # a full disk must not stop health checking
            log.warning("persisting check states failed: %s", exc)
            self._dirty_states |= dirty

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.backend.heartbeat(self.node)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("heartbeat failed: %s", exc)
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _reap_loop(self) -> None:
        """Deregister services whose check stayed critical past DeregisterCriticalServiceAfter."""
        interval = min(30.0, max(1.0, self.config.check_deregister_min / 2))
        while True:
            await asyncio.sleep(interval)
            for check_id in self.runner.reap_due():
                check = self.checks.get(check_id)
                if check and check.spec.service_id in self.services:
                    log.warning("reaping service %s: check %s critical too long", check.spec.service_id, check_id)
                    try:
                        await self.deregister_service(check.spec.service_id)
                    except APIError:
                        pass

    # -- registration (shared by the API and config files) -----------------------------------

    def _used_ports(self) -> set[int]:
        """Sidecar ports taken: by our registrations, and by anything already listening on them."""
        used = {s.get("Port", 0) for s in self.services.values() if s.get("Kind") == "connect-proxy"}
        for port in range(21000, 21256):
            if port in used:
                continue
            if not _port_is_free(port):
                used.add(port)
                continue
            break  # the lowest free port is found; allocation takes it
        return used

    async def register_service(self, reg: ServiceRegistration, replace_existing_checks: bool = False, source: str = "api") -> None:
        async with self._lock:
            new_services: list[tuple[dict, str]] = []
            new_checks: list[tuple[CheckSpec, str, str, float | None, str]] = []
            remove_checks: list[str] = []
            for item in reg.all():
                service = dict(item.service)
                sid = service["ID"]
                new_services.append((service, source))
                wanted = {c.check_id for c in item.checks}
                for check in item.checks:
                    previous = self.checks.get(check.check_id)
                    # Re-registering keeps a check's previous status (Consul restores its snapshot).
                    status = previous.status if previous else check.status
                    output = previous.output if previous else ""
                    new_checks.append((check, status, output, None, source))
                if replace_existing_checks:
                    remove_checks += [cid for cid, c in self.checks.items()
                                      if c.spec.service_id == sid and cid not in wanted and not c.static]
            await self.store.write(services=new_services, checks=new_checks, delete_checks=remove_checks)
            for cid in remove_checks:
                self.runner.remove(cid)
                self.checks.pop(cid, None)
            for service, src in new_services:
                service["ContentHash"] = _content_hash(service)
                self.services[service["ID"]] = service
                self.service_sources[service["ID"]] = src
            for check, status, output, _deadline, src in new_checks:
                self._start_check_now(check, status, output, src)
        self.runner.alias_changed()
        self.mark_dirty(services=[svc['ID'] for svc, _ in new_services],
                        checks=[c.check_id for c, *_ in new_checks] + remove_checks)
        self._pulse()

    def _start_check_now(self, spec: CheckSpec, status: str, output: str, source: str) -> None:
        self.checks[spec.check_id] = LocalCheck(spec, status, output, source)
        self.runner.add(spec, initial_status=status, initial_output=output)
        current = self.runner.status(spec.check_id)
        if current:
            self.checks[spec.check_id].status, self.checks[spec.check_id].output = current

    async def deregister_service(self, service_id: str) -> None:
        async with self._lock:
            if service_id not in self.services:
                raise NotFound(
                    f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'
                )
            ids = [service_id] + [sid for sid, s in self.services.items()
                                  if (s.get("Proxy") or {}).get("DestinationServiceID") == service_id
                                  and s.get("Kind") == "connect-proxy" and sid.endswith("-sidecar-proxy")]
            check_ids = [cid for cid, c in self.checks.items() if c.spec.service_id in ids]
            await self.store.write(delete_services=ids, delete_checks=check_ids)
            for cid in check_ids:
                self.runner.remove(cid)
                self.checks.pop(cid, None)
            for sid in ids:
                self.services.pop(sid, None)
                self.service_sources.pop(sid, None)
        self.runner.alias_changed()
        self.mark_dirty(services=ids, checks=check_ids)
        self._pulse()

    async def register_check(self, spec: CheckSpec, source: str = "api") -> None:
        async with self._lock:
            if spec.service_id and spec.service_id not in self.services:
                raise NotFound(f'ServiceID "{spec.service_id}" does not exist')
            if spec.kind == "script" and not self.config.enable_script_checks:
                raise BadRequest(
                    "Scripts are disabled on this agent; to enable, start it with -enable-script-checks "
                    "(Consul answers 500 here; a disabled feature is a client error to us)"
                )
            previous = self.checks.get(spec.check_id)
            status = previous.status if previous else spec.status
            output = previous.output if previous else ""
            await self.store.write(checks=[(spec, status, output, None, source)])
            self._start_check_now(spec, status, output, source)
        self.mark_dirty(checks=[spec.check_id])
        self._pulse()

    async def deregister_check(self, check_id: str) -> None:
        async with self._lock:
            if check_id not in self.checks:
                raise NotFound(f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.')
            await self.store.write(delete_checks=[check_id])
            self.runner.remove(check_id)
            self.checks.pop(check_id, None)
        self.mark_dirty(checks=[check_id])
        self._pulse()

    async def set_maintenance(self, check_id: str, service_id: str, enable: bool, reason: str) -> None:
        if not enable:
            if check_id in self.checks:
                await self.deregister_check(check_id)
            return
        is_node = not service_id
        spec = CheckSpec(
            check_id=check_id,
            name="Node Maintenance Mode" if is_node else "Service Maintenance Mode",
            kind="maintenance",
            service_id=service_id,
            notes=reason or (NODE_MAINT_NOTES if is_node else SERVICE_MAINT_NOTES),
            status=CRITICAL,
        )
        async with self._lock:
            await self.store.write(checks=[(spec, CRITICAL, "", None, "api")])
            self.checks[check_id] = LocalCheck(spec, CRITICAL, "", "api", static=True)
        self.runner.alias_changed()
        self.mark_dirty(checks=[check_id])
        self._pulse()

    async def _load_config_dir(self) -> None:
        """Services and checks from -config-dir: added, changed or removed to match the files."""
        items = []
        for path in self.config.config_dir:
            items += await asyncio.to_thread(load_config_dir, path, self._used_ports())
        wanted_services: set[str] = set()
        wanted_checks: set[str] = set()
        for item in items:
            if item.service is not None:
                await self.register_service(item.service, source=item.source)
                wanted_services |= {r.service_id for r in item.service.all()}
                wanted_checks |= {c.check_id for r in item.service.all() for c in r.checks}
            if item.check is not None:
                await self.register_check(item.check, source=item.source)
                wanted_checks.add(item.check.check_id)
        for sid, source in list(self.service_sources.items()):
            if source != "api" and sid not in wanted_services and sid in self.services:
                await self.deregister_service(sid)
        for cid, check in list(self.checks.items()):
            if check.source not in ("api", "internal") and cid not in wanted_checks:
                await self.deregister_check(cid)

    async def reload(self) -> None:
        await self._load_config_dir()

    # -- views ----------------------------------------------------------------------------------

    def agent_service(self, sid: str) -> dict[str, Any]:
        service = dict(self.services[sid])
        service.setdefault("Datacenter", self.config.datacenter)
        if not service.get("Proxy"):
            service.pop("Proxy", None)
        if not service.get("Connect"):
            service.pop("Connect", None)
        return service

    def agent_check(self, cid: str) -> dict[str, Any]:
        check = self.checks[cid]
        service = self.services.get(check.spec.service_id) if check.spec.service_id else None
        hc = check.spec.to_health_check(
            self.node, service["Service"] if service else "", service.get("Tags", []) if service else [],
            check.status, check.output,
        )
        if check.spec.kind == "maintenance":
            hc["Type"] = "maintenance"
            hc["Definition"] = {}
        return hc

    def aggregated(self, sid: str) -> tuple[str, list[dict[str, Any]]]:
        checks = [self.agent_check(cid) for cid, c in sorted(self.checks.items()) if c.spec.service_id in (sid, "")]
        if any(c["CheckID"] in (NODE_MAINT_ID, SERVICE_MAINT_PREFIX + sid) for c in checks):
            return "maintenance", checks
        worst = max((STATUS_ORDER.get(c["Status"], 2) for c in checks), default=0)
        return {0: PASSING, 1: WARNING, 2: CRITICAL}[worst], checks

    async def members(self) -> list[dict[str, Any]]:
        return await self.backend.members()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _content_hash(service: dict[str, Any]) -> str:
    body = {k: v for k, v in service.items() if k != "ContentHash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# -- HTTP --------------------------------------------------------------------------------------------


class AgentAPI:
    """The /v1/agent/* endpoints served by every agent for its own node."""

    def __init__(self, agent: LocalAgent, shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        self.agent = agent

    async def service_register(self, request: Request) -> Response:
        replace = False
        if "replace-existing-checks" in request.query_params:
            replace = parse_bool(request.query_params["replace-existing-checks"], "replace-existing-checks")
        # Sidecar ports are looked up (O(services), and a bind probe) only if the body asks for a sidecar.
        agent = self.agent
        used = _Deferred(lambda: dict.fromkeys(agent._used_ports(), 0))  # iterated: the ports taken
        existing = _Deferred(lambda: {sid: s.get("Port", 0) for sid, s in agent.services.items()
                                      if s.get("Kind") == "connect-proxy"})
        reg = decode_service_registration(await read_body(request), used, existing_ports=existing)
        for warning in reg.warnings:
            log.warning("service %s: %s", reg.service_id, warning)
        for item in reg.all():
            for check in item.checks:
                if check.kind == "script" and not self.agent.config.enable_script_checks:
                    raise BadRequest(
                        "Invalid check: scripts are disabled on this agent; start it with -enable-script-checks"
                    )
        await self.agent.register_service(reg, replace_existing_checks=replace)
        return empty_ok()

    async def service_deregister(self, request: Request) -> Response:
        await self.agent.deregister_service(request.path_params["id"])
        return empty_ok()

    async def services(self, request: Request) -> Response:
        data = {sid: self.agent.agent_service(sid) for sid in sorted(self.agent.services)}
        return json_response(_filter_map(request, data))

    async def service(self, request: Request) -> Response:
        sid = request.path_params["id"]
        wanted_hash = request.query_params.get("hash")
        if wanted_hash and sid in self.agent.services and self.agent.services[sid].get("ContentHash") == wanted_hash:
            from lictor.durations import DurationError, parse_duration

            try:
                wait = min(parse_duration(request.query_params.get("wait") or "5m"), 600.0)
            except DurationError:
                raise BadRequest("Invalid wait time") from None
            deadline = asyncio.get_running_loop().time() + wait
            while sid in self.agent.services and self.agent.services[sid].get("ContentHash") == wanted_hash:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self.agent.changed.wait(), remaining)
                except TimeoutError:
                    break
        if sid not in self.agent.services:
            raise NotFound(f"unknown service ID: {sid}")
        service = self.agent.agent_service(sid)
        return json_response(service, headers={"X-Consul-ContentHash": service.get("ContentHash", "")})

    async def health_by_name(self, request: Request) -> Response:
        name = request.path_params["name"]
        results = []
        worst = None
        for sid in sorted(self.agent.services):
            if self.agent.services[sid]["Service"] != name:
                continue
            status, checks = self.agent.aggregated(sid)
            results.append({"AggregatedStatus": status, "Service": self.agent.agent_service(sid), "Checks": checks})
            order = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 3}
            worst = status if worst is None or order[status] > order[worst] else worst
        if not results:
            return _health_reply(request, "critical", f"ServiceName {name} Not Found", 404)
        return _health_reply(request, worst or "passing", results)

    async def health_by_id(self, request: Request) -> Response:
        sid = request.path_params["id"]
        if sid not in self.agent.services:
            return _health_reply(request, "critical", f"ServiceId {sid} not found", 404)
        status, checks = self.agent.aggregated(sid)
        return _health_reply(request, status, {"AggregatedStatus": status, "Service": self.agent.agent_service(sid), "Checks": checks})

    async def checks(self, request: Request) -> Response:
        data = {cid: self.agent.agent_check(cid) for cid in sorted(self.agent.checks)}
        return json_response(_filter_map(request, data))

    async def check_register(self, request: Request) -> Response:
        spec, warnings = decode_check_registration_with_warnings(await read_body(request))
        for warning in warnings:
            log.warning("check %s: %s", spec.check_id, warning)
        await self.agent.register_check(spec)
        return empty_ok()

    async def check_deregister(self, request: Request) -> Response:
        await self.agent.deregister_check(request.path_params["id"])
        return empty_ok()

    async def _ttl(self, request: Request, status: str, output: str) -> Response:
        cid = request.path_params["id"]
        if cid not in self.agent.checks:
            raise NotFound(f'Unknown check ID "{cid}". Ensure that the check ID is passed, not the check name.')
        self.agent.runner.ttl_update(cid, status, output)
        return empty_ok()

    async def check_pass(self, request: Request) -> Response:
        return await self._ttl(request, PASSING, request.query_params.get("note", ""))

    async def check_warn(self, request: Request) -> Response:
        return await self._ttl(request, WARNING, request.query_params.get("note", ""))

    async def check_fail(self, request: Request) -> Response:
        return await self._ttl(request, CRITICAL, request.query_params.get("note", ""))

    async def check_update(self, request: Request) -> Response:
        body = decode_body(await read_body(request), CHECK_UPDATE)
        status = body.get("Status", "")
        if status not in (PASSING, WARNING, CRITICAL):
            raise BadRequest(f"Invalid check status: '{status}'")
        return await self._ttl(request, status, body.get("Output", ""))

    def _enable(self, request: Request) -> bool:
        if "enable" not in request.query_params:
            raise BadRequest("Missing value for enable")
        value = request.query_params["enable"]
        if value == "":
            raise BadRequest("Missing value for enable")
        try:
            return parse_bool(value, "enable")
        except BadRequest:
            raise BadRequest(f'Invalid value for enable: "{value}"') from None

    async def service_maintenance(self, request: Request) -> Response:
        sid = request.path_params["id"]
        enable = self._enable(request)
        if sid not in self.agent.services:
            raise NotFound(f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the service name.')
        await self.agent.set_maintenance(SERVICE_MAINT_PREFIX + sid, sid, enable, request.query_params.get("reason", ""))
        return empty_ok()

    async def node_maintenance(self, request: Request) -> Response:
        enable = self._enable(request)
        await self.agent.set_maintenance(NODE_MAINT_ID, "", enable, request.query_params.get("reason", ""))
        return empty_ok()

    async def reload(self, request: Request) -> Response:
        await self.agent.reload()
        return empty_ok()

    async def join(self, request: Request) -> Response:
        address = request.path_params["address"]
        if ":" not in address:
            address = f"{address}:8500"
        if address.startswith("http://") and self.agent.config.verify_outgoing:
            raise BadRequest(f"cannot join {address}: -verify-outgoing forbids plain HTTP to servers")
        if self.agent.pool is not None:
            try:
                resp = await self.agent.pool.client.get(self.agent.pool.url(address, "/v1/status/leader"), timeout=3.0)
            except httpx.HTTPError as exc:
                raise APIError(f"cannot join {address}: {exc}", 500) from None
            if resp.status_code != 200:
                raise APIError(f"cannot join {address}: it answered {resp.status_code}", 500)
            self.agent.pool.add(address)
            self.agent.request_full_sync()
        return empty_ok()

    async def token(self, request: Request) -> Response:
        return PlainTextResponse("ACL support disabled", status_code=401)

    def routes(self) -> list[Route]:
        g = guarded
        return [
            Route("/v1/agent/service/register", g(self.service_register), methods=["PUT"]),
            Route("/v1/agent/service/deregister/{id:path}", g(self.service_deregister), methods=["PUT"]),
            Route("/v1/agent/service/maintenance/{id:path}", g(self.service_maintenance), methods=["PUT"]),
            Route("/v1/agent/services", g(self.services), methods=["GET"]),
            Route("/v1/agent/service/{id:path}", g(self.service), methods=["GET"]),
            Route("/v1/agent/health/service/name/{name:path}", g(self.health_by_name), methods=["GET"]),
            Route("/v1/agent/health/service/id/{id:path}", g(self.health_by_id), methods=["GET"]),
            Route("/v1/agent/checks", g(self.checks), methods=["GET"]),
            Route("/v1/agent/check/register", g(self.check_register), methods=["PUT"]),
            Route("/v1/agent/check/deregister/{id:path}", g(self.check_deregister), methods=["PUT"]),
            Route("/v1/agent/check/pass/{id:path}", g(self.check_pass), methods=["PUT"]),
            Route("/v1/agent/check/warn/{id:path}", g(self.check_warn), methods=["PUT"]),
            Route("/v1/agent/check/fail/{id:path}", g(self.check_fail), methods=["PUT"]),
            Route("/v1/agent/check/update/{id:path}", g(self.check_update), methods=["PUT"]),
            Route("/v1/agent/maintenance", g(self.node_maintenance), methods=["PUT"]),
            Route("/v1/agent/reload", g(self.reload), methods=["PUT"]),
            Route("/v1/agent/join/{address:path}", g(self.join), methods=["PUT"]),
            Route("/v1/agent/token/{type:path}", g(self.token), methods=["PUT"]),
        ]


def _filter_map(request: Request, data: dict[str, Any]) -> dict[str, Any]:
    expression = request.query_params.get("filter")
    if not expression:
        return data
    from lictor.bexpr import filter_values

    return filter_values(expression, data)


def _health_reply(request: Request, status: str, body: Any, code: int | None = None) -> Response:
    if code is None:
        code = {"passing": 200, "warning": 429}.get(status, 503)
    if request.query_params.get("format") == "text":
        return PlainTextResponse(status if code != 404 else str(body), status_code=code)
    return json_response(body, status=code)


# -- forwarding (client agents) --------------------------------------------------------------------

# Connect's agent endpoints (leaf certificates, roots, authorize) are served by the servers'
# agents for now: the leaf cache lives there, one per service name, shared by every host.
FORWARDED_PREFIXES = ("/v1/catalog/", "/v1/health/", "/v1/kv/", "/v1/txn", "/v1/status/", "/v1/operator/",
                      "/v1/connect/", "/v1/config", "/v1/internal/snapshot", "/v1/discovery-chain/",
                      "/v1/agent/connect/", "/v1/snapshot")


def forwarding_route(pool: ServerPool) -> Callable[[Request], Awaitable[Response]]:
    """Relay a catalog/health/KV request to a server, blocking queries included.

    Identical blocking queries in flight at once (same target, index and wait, same token) share
    one upstream request, as Consul's agent cache shares a fetch: every watcher of a name re-arms
    with the same index after each change, and relaying each one was a server round per watcher.
    Sharing is safe only for blocking queries: any answer the server gives after the later one
    joined is newer than its index or a timeout that saw no change. Plain reads are not shared (a
    read must not get an answer computed before it arrived), nor `?consistent` ones."""
    shared: dict[tuple[str, tuple[tuple[str, str], ...]], asyncio.Future[ServerResponse]] = {}

    async def forward(request: Request) -> Response:
        body = await read_body(request, 16 * 1024 * 1024)
        wait = 300.0
        index = request.query_params.get("index")
        blocking = bool(index) and index != "0"
        if index:
            from lictor.durations import DurationError, parse_duration

            try:
                wait = min(parse_duration(request.query_params.get("wait") or "5m"), 600.0)
            except DurationError:
                wait = 300.0
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("x-consul-token", "authorization", "content-type")}
        try:
            # Relay the target exactly as it came (percent-escapes in KV keys included).
            raw_path = request.scope.get("raw_path") or request.url.path.encode()
            query = request.scope.get("query_string") or b""
            target = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
            timeout = wait + wait / 16 + 10
            if blocking and request.method == "GET" and "consistent" not in request.query_params:
                resp = await _shared_upstream(shared, pool, target, headers, timeout)
            else:
                resp = await pool.request(request.method, target, content=body, headers=headers, timeout=timeout)
        except APIError as exc:
            return PlainTextResponse(exc.message, status_code=exc.status)
        keep = {k: v for k, v in resp.headers.items() if k.lower().startswith("x-consul") or k.lower() == "content-type"}
        return Response(resp.content, status_code=resp.status_code, headers=keep)

    return forward


async def _shared_upstream(shared: dict[tuple[str, tuple[tuple[str, str], ...]], asyncio.Future[ServerResponse]],
                           pool: ServerPool, target: str, headers: dict[str, str], timeout: float) -> ServerResponse:
    """Join the identical blocking GET already in flight, or start it. The upstream request runs in
    a task of its own: a watcher that disconnects does not cancel it for the others (it ends at its
    wait, so an abandoned one is bounded)."""
    key = (target, tuple(sorted((k.lower(), v) for k, v in headers.items())))
    upstream = shared.get(key)
    if upstream is None:
        upstream = asyncio.ensure_future(pool.request("GET", target, headers=headers, timeout=timeout))
        shared[key] = upstream

        def forget(done: asyncio.Future[ServerResponse], key: Any = key) -> None:
            if shared.get(key) is done:
                del shared[key]
            if not done.cancelled():
                done.exception()  # retrieved here, so a failure nobody awaited any more is not logged as lost

        upstream.add_done_callback(forget)
    return await asyncio.shield(upstream)


async def attach_local_agent(runtime: Any) -> None:
    """Build this process's local agent and mount its endpoints (and, on clients, forwarding)."""
    config: AgentConfig = runtime.config
    pool = None
    if runtime.server is not None:
        backend: ServerBackend = InProcessBackend(runtime.server)
    else:
        pool = ServerPool.from_config(config)
        backend = RemoteBackend(pool)
    local = LocalAgent(config, backend, pool)
    await local.start()
    runtime.local = local
    runtime.app.router.routes.extend(AgentAPI(local).routes())
    if pool is not None:
        forward = guarded(forwarding_route(pool))
        for prefix in FORWARDED_PREFIXES:
            path = prefix + "{rest:path}" if prefix.endswith("/") else prefix
            runtime.app.router.routes.append(Route(path, forward, methods=["GET", "PUT", "POST", "DELETE"]))
            if prefix.endswith("/"):
                continue
            runtime.app.router.routes.append(Route(prefix + "/{rest:path}", forward, methods=["GET", "PUT", "POST", "DELETE"]))
    if config.managed_proxies:
        from lictor.agent.managed import start_managed_proxies

        start_managed_proxies(runtime)
    from lictor.agent.dns_wiring import start_dns

    await start_dns(runtime, pool)
