"""A server agent: forms (or joins) the Raft cluster, serves the registry API, keeps node liveness.

Cluster formation: every server serves HTTP first, then says hello to each `-retry-join` address
(another agent's HTTP or HTTPS address). Hellos are answered with every server the answerer knows, so the
servers learn each other's Raft, HTTP and HTTPS addresses transitively. A server bootstraps once it knows
`-bootstrap-expect` servers and none of them runs a cluster yet; if one does, it asks that cluster
to add it as a peer instead. The peer list is saved in the data dir, so a restart needs no joins.

Calls between servers follow lictor/tls.py: with -verify-outgoing they go to a peer's HTTPS address
only (verified against -ca-file, our certificate presented); otherwise to its plain HTTP address when
it has one, else to its HTTPS address.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lictor import tls
from lictor.config import AgentConfig
from lictor.decode import Bool, Float, ListOf, MapOf, Str, Struct, check_name, decode_body
from lictor.errors import APIError, BadRequest
from lictor.httpapi import empty_ok, guarded, json_response, read_body
from lictor.registry import views
from lictor.registry.http import (
    CATALOG_CHECK,
    CATALOG_SERVICE,
    RegistryAPI,
    ServerInfo,
    normalize_catalog_check,
    normalize_service,
)
from lictor.registry.raft import ConsensusLog, LocalLog, RaftLog, RaftSettings, new_command
from lictor.registry.state import LIVENESS_CHECK_ID

log = logging.getLogger("lictor.server")

HELLO = Struct(
    "Hello",
    {"Node": Str(), "RaftAddr": Str(), "HTTPAddr": Str(), "HTTPSAddr": Str(), "Datacenter": Str(), "Time": Float(),
     "Proof": Str()},
)
RECORD_KEYS = ("Node", "RaftAddr", "HTTPAddr", "HTTPSAddr")  # what a server record holds (hello, join, meta)
JOIN_PROOF_WINDOW = 300.0  # seconds a join request's proof stays valid


def join_proof(key: str, raft_addr: str, when: float) -> str:
    """Who may join the Raft cluster: only someone holding the cluster key can compute this."""
    message = f"lictor-join|{raft_addr}|{when:.3f}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
HEARTBEAT = Struct("Heartbeat", {"Node": Str()})
AGENT_SYNC = Struct(
    "AgentSync",
    {
        "ID": Str(), "Node": Str(), "Address": Str(), "Datacenter": Str(), "TaggedAddresses": MapOf(Str()),
        "NodeMeta": MapOf(Str()), "Services": ListOf(CATALOG_SERVICE), "Checks": ListOf(CATALOG_CHECK),
        "Partial": Bool(), "DeleteServices": ListOf(Str()), "DeleteChecks": ListOf(Str()),
    },
)
CHECK_UPDATES = Struct(
    "CheckUpdates",
    {"Node": Str(), "Updates": ListOf(Struct("CheckUpdate", {"CheckID": Str(), "Status": Str(), "Output": Str()}))},
)
SERVER_META_PREFIX = "server/"


class ServerAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.known: dict[str, dict[str, str]] = {config.raft_addr: self.self_record()}
        self.log: ConsensusLog | None = None
        self.api: RegistryAPI | None = None
        self.ready = asyncio.Event()
        self.last_seen: dict[str, float] = {}  # node -> monotonic time of its last heartbeat (leader only)
        self._was_leader = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.stopping = asyncio.Event()
        # One client for every call to another server (acl_http.apply_agent_token sets its token header).
        self.http = tls.outgoing_client(config, timeout=httpx.Timeout(5.0))
        self._hello_warned: set[str] = set()

    def self_record(self) -> dict[str, str]:
        """How other servers reach this one; a disabled listener is left out."""
        config = self.config
        record = {"Node": config.node, "RaftAddr": config.raft_addr, "HTTPAddr": config.http_addr if config.http_port > 0 else ""}
        if config.https_port > 0:
            # Only sent when set: a server from before HTTPSAddr existed rejects unknown hello fields.
            record["HTTPSAddr"] = f"{config.client}:{config.https_port}"
        return record

    def _self_urls(self) -> set[str]:
        record = self.self_record()
        return {f"http://{record['HTTPAddr']}", f"https://{record.get('HTTPSAddr', '')}"}

    def peer_url(self, record: dict[str, Any] | None) -> str | None:
        """The base URL to call a server at, or None if our TLS policy allows none of its addresses."""
        if not record:
            return None
        http, https = record.get("HTTPAddr") or "", record.get("HTTPSAddr") or ""
        if https and (self.config.verify_outgoing or not http):
            return f"https://{https}"
        if http and not self.config.verify_outgoing:
            return f"http://{http}"
        return None

    # -- startup --------------------------------------------------------------------------------

    def _peers_file(self) -> str:
        return os.path.join(self.config.data_dir, "raft-peers.json")

    async def start_consensus(self) -> None:
        config = self.config
        if config.dev:
            self.log = LocalLog(config.raft_addr)
        else:
            peers = self._saved_peers()
            if peers is None:
                peers = await self._discover_peers()
                os.makedirs(config.data_dir, exist_ok=True)
                with open(self._peers_file(), "w", encoding="utf-8") as fh:
                    json.dump({"peers": peers, "known": self.known}, fh)
            self.log = RaftLog(
                RaftSettings(
                    data_dir=os.path.join(config.data_dir, "raft"),
                    self_addr=config.raft_addr,
                    peers=peers,
                    password=config.encrypt,
                    min_timeout=config.raft_min_timeout,
                    max_timeout=config.raft_max_timeout,
                    snapshot_threshold=config.raft_snapshot_threshold,
                )
            )
        self.log.feed.coalesce = config.blocking_coalesce
        info = ServerInfo(config.node, config.datacenter, config.http_addr, config.raft_addr)
        self.api = RegistryAPI(self.log, info)
        await self.log.start()
        self.ready.set()
        self._tasks.append(asyncio.create_task(self._leader_duties()))
        self._tasks.append(asyncio.create_task(self._announce_self()))

    def _saved_peers(self) -> list[str] | None:
        try:
            with open(self._peers_file(), encoding="utf-8") as fh:
                saved = json.load(fh)
        except (OSError, ValueError):
            return None
        self.known.update(saved.get("known") or {})
        self.known[self.config.raft_addr] = self.self_record()  # our ports may have changed since
        return list(saved.get("peers") or [])

    async def _discover_peers(self) -> list[str]:
        config = self.config
        expect = max(config.bootstrap_expect, 1)
        if not config.retry_join and expect == 1:
            return [config.raft_addr]
        attempt = 0
        while not self.stopping.is_set():
            attempt += 1
            running: dict[str, Any] | None = None
            targets = [tls.join_url(a, config) for a in config.retry_join] + [self.peer_url(k) for k in self.known.values()]
            for target in dict.fromkeys(t for t in targets if t and t not in self._self_urls()):
                reply = await self._hello(target)
                if reply is None:
                    continue
                for server in reply.get("Known") or []:
                    if server.get("RaftAddr") and server["RaftAddr"] != config.raft_addr:
                        self.known.setdefault(server["RaftAddr"], {k: server[k] for k in RECORD_KEYS if server.get(k)})
                if reply.get("Peers") and reply.get("Leader"):
                    running = reply
            if running is not None and config.raft_addr not in running["Peers"]:
                joined = await self._ask_to_join(running)
                if joined is not None:
                    return joined
            elif running is not None:
                return list(running["Peers"])
            elif len(self.known) >= expect and config.bootstrap_expect > 0:
                peers = sorted(self.known)[: max(expect, len(self.known))]
                log.info("bootstrapping a Raft cluster of %d servers: %s", len(peers), peers)
                return peers
            if attempt % 10 == 1:
                log.info("waiting for servers: know %d of %d expected (%s)", len(self.known), expect, sorted(self.known))
            await asyncio.sleep(config.retry_interval)
        raise asyncio.CancelledError

    async def _hello(self, target: str) -> dict[str, Any] | None:
        me = self.self_record() | {"Datacenter": self.config.datacenter}
        try:
            resp = await self.http.post(f"{target}/v1/internal/cluster/hello", json=me, timeout=2.0)
        except httpx.HTTPError as exc:
            # A refused connection is normal while peers start. Anything else (a certificate we reject,
            # or, under TLS 1.3, a peer dropping us for our client certificate) will not fix itself:
            # say so, once per target (hellos repeat every -retry-interval).
            refused = isinstance(exc, httpx.ConnectError) and "SSL" not in str(exc)
            if not refused and target not in self._hello_warned:
                self._hello_warned.add(target)
                log.warning("hello to %s failed (%s: %s); if it persists, check both sides' TLS settings",
                            target, type(exc).__name__, str(exc) or "connection dropped")
            return None
        if resp.status_code != 200:
            return None
        try:
            return resp.json()
        except ValueError:
            return None

    async def _ask_to_join(self, cluster: dict[str, Any]) -> list[str] | None:
        targets = [self.peer_url(self.known.get(cluster.get("Leader") or ""))] + [self.peer_url(k) for k in self.known.values()]
        for target in dict.fromkeys(t for t in targets if t and t not in self._self_urls()):
            try:
                resp = await self.http.post(
                    f"{target}/v1/internal/cluster/join",
                    json=self._join_request(),
                    timeout=15.0,
                )
            except httpx.HTTPError:
                continue
            if resp.status_code == 200:
                peers = resp.json().get("Peers") or []
                log.info("joined the running cluster; peers %s", peers)
                return sorted(set(peers) | {self.config.raft_addr})
            log.warning("join via %s refused: %s", target, resp.text)
        return None

    def _join_request(self) -> dict[str, Any]:
        now = time.time()
        return self.self_record() | {"Time": now, "Proof": join_proof(self.config.encrypt, self.config.raft_addr, now)}

    async def _announce_self(self) -> None:
        """Record this server (names and HTTP address) and its catalog entry once a leader exists."""
        assert self.log is not None
        config = self.config
        while not self.stopping.is_set():
            if self.log.leader() is None:
                await asyncio.sleep(0.2)
                continue
            try:
                record = self.self_record()
                await self.log.submit(new_command("meta_set", Key=SERVER_META_PREFIX + config.raft_addr, Value=record))
                return
            except APIError as exc:
                log.info("announcing this server failed (%s); retrying", exc.message)
                await asyncio.sleep(0.5)

    # -- node liveness (leader only) ------------------------------------------------------------------

    async def _leader_duties(self) -> None:
        """Mark nodes whose agents stopped heartbeating critical; reap those gone too long."""
        assert self.log is not None
        while not self.stopping.is_set():
            await asyncio.sleep(0.5)
            is_leader = self.log.is_leader()
            if is_leader and not self._was_leader:
                # A new leader has heard nobody yet: give every node a full bound to check in.
                now = time.monotonic()
                self.last_seen = {node: now for node in self.last_seen} | {
                    node: now for node in list(self.log.store.nodes)
                }
            self._was_leader = is_leader
            if not is_leader:
                continue
            try:
                await self._check_liveness()
            except APIError as exc:
                log.info("liveness update failed: %s", exc.message)

    async def _check_liveness(self) -> None:
        assert self.log is not None
        now = time.monotonic()
        servers = {s.get("Node") for s in self.server_records().values()}
        with self.log.store.lock:
            nodes = {
                node: (self.log.store.checks.get(node, {}).get(LIVENESS_CHECK_ID) or {}).get("Status")
                for node in self.log.store.nodes
            }
        for node, status in nodes.items():
            if status is None:
                continue  # external node registered through the catalog: no agent to hear from
            seen = self.last_seen.setdefault(node, now)
            silent = now - seen
            if node in servers and node == self.config.node:
                continue
            if silent > self.config.reconnect_timeout:
                log.warning("reaping node %s: silent for %.0fs", node, silent)
                await self.log.submit(new_command("deregister", Node=node))
                self.last_seen.pop(node, None)
            elif silent > self.config.liveness_timeout and status != "critical":
                log.warning("node %s missed heartbeats for %.1fs: marking it critical", node, silent)
                await self.log.submit(
                    new_command(
                        "check_status", Node=node, CheckID=LIVENESS_CHECK_ID, Status="critical",
                        Output=f"Agent not live or unreachable (no heartbeat for {silent:.0f}s)",
                    )
                )

    async def heartbeat(self, node: str) -> None:
        """Record that `node`'s agent is alive; on a follower, pass it to the leader."""
        assert self.log is not None
        if not self.log.is_leader():
            leader_url = self.leader_url()
            if leader_url is None:
                raise APIError("No cluster leader", 500)
            resp = await self.http.put(f"{leader_url}/v1/internal/heartbeat", json={"Node": node}, timeout=3.0)
            if resp.status_code != 200:
                raise APIError(f"leader refused heartbeat: {resp.text}", resp.status_code)
            return
        self.last_seen[node] = time.monotonic()
        with self.log.store.lock:
            status = (self.log.store.checks.get(node, {}).get(LIVENESS_CHECK_ID) or {}).get("Status")
        if status == "critical":
            await self.log.submit(
                new_command("check_status", Node=node, CheckID=LIVENESS_CHECK_ID, Status="passing", Output="Agent alive and reachable")
            )

    # -- membership views ------------------------------------------------------------------------------

    def server_records(self) -> dict[str, dict[str, Any]]:
        assert self.log is not None
        with self.log.store.lock:
            meta = dict(self.log.store.meta)
        records = {k[len(SERVER_META_PREFIX):]: v for k, v in meta.items() if k.startswith(SERVER_META_PREFIX)}
        for addr, known in self.known.items():
            records.setdefault(addr, known)
        return records

    def leader_http(self) -> str | None:
        assert self.log is not None
        leader = self.log.leader()
        if leader is None:
            return None
        record = self.server_records().get(leader)
        return record.get("HTTPAddr") if record else None

    def leader_url(self) -> str | None:
        """The leader's base URL under our TLS policy (see peer_url)."""
        assert self.log is not None
        leader = self.log.leader()
        return self.peer_url(self.server_records().get(leader)) if leader is not None else None

    def members(self) -> list[dict[str, Any]]:
        assert self.log is not None
        peers = set(self.log.peers())
        out = []
        servers = self.server_records()
        server_nodes = set()
        for addr, record in sorted(servers.items()):
            host, _, port = addr.rpartition(":")
            alive = addr in peers and (addr == self.config.raft_addr or self._connected(addr))
            server_nodes.add(record.get("Node"))
            out.append(member_entry(record.get("Node", addr), host, int(port or 0), "consul", self.config.datacenter, 1 if alive else 4,
                                    {"port": port, "raft_vsn": "3", "http": record.get("HTTPAddr", ""),
                                     "https": record.get("HTTPSAddr", "")}))
        with self.log.store.lock:
            for name, node in sorted(self.log.store.nodes.items()):
                if name in server_nodes:
                    continue
                check = self.log.store.checks.get(name, {}).get(LIVENESS_CHECK_ID)
                if check is None:
                    continue
                status = 1 if check["Status"] != "critical" else 4
                out.append(member_entry(name, node["Address"], 8301, "node", self.config.datacenter, status, {}))
        return out

    def _connected(self, addr: str) -> bool:
        assert self.log is not None
        partners = self.log.status().get("partners") or {}
        return bool(partners.get(addr, addr == self.log.leader()))

    # -- internal endpoints ---------------------------------------------------------------------------

    async def hello_endpoint(self, request: Request) -> Response:
        body = decode_body(await read_body(request), HELLO)
        if body.get("Datacenter") and body["Datacenter"] != self.config.datacenter:
            raise BadRequest(f"datacenter mismatch: this server is in {self.config.datacenter!r}")
        if body.get("RaftAddr") and body["RaftAddr"] != self.config.raft_addr:
            self.known.setdefault(body["RaftAddr"], {k: body[k] for k in RECORD_KEYS if body.get(k)})
        reply: dict[str, Any] = {"Known": list(self.known.values()), "Peers": [], "Leader": None, "LeaderHTTP": None}
        if self.log is not None and self.ready.is_set():
            reply["Known"] = list(self.server_records().values())
            reply["Peers"] = self.log.peers()
            reply["Leader"] = self.log.leader()
            reply["LeaderHTTP"] = self.leader_http()
        return json_response(reply)

    async def join_endpoint(self, request: Request) -> Response:
        body = decode_body(await read_body(request), HELLO)
        if self.log is None:
            raise APIError("this server has not started consensus yet", 503)
        addr = body.get("RaftAddr", "")
        if not addr or ":" not in addr:
            raise BadRequest("RaftAddr must be host:port")
        # Adding a peer changes the quorum: a stranger could add dead peers until the cluster
        # cannot commit. Only a holder of the cluster key may join.
        sent = body.get("Time", 0.0)
        expected = join_proof(self.config.encrypt, addr, sent)
        if abs(time.time() - sent) > JOIN_PROOF_WINDOW or not hmac.compare_digest(expected, body.get("Proof", "")):
            raise APIError("Permission denied: a join must be signed with the cluster key (-encrypt)", 403)
        await self.log.add_peer(addr)
        self.known[addr] = {k: body[k] for k in RECORD_KEYS if body.get(k)}
        return json_response({"Peers": self.log.peers()})

    async def heartbeat_endpoint(self, request: Request) -> Response:
        body = decode_body(await read_body(request), HEARTBEAT)
        if not body.get("Node"):
            raise BadRequest("Missing Node")
        await self.heartbeat(body["Node"])
        return empty_ok()

    async def agent_sync_endpoint(self, request: Request) -> Response:
        """A client agent's full state for its node (anti-entropy)."""
        if self.log is None:
            raise APIError("No cluster leader", 500)
        body = decode_body(await read_body(request, 64 * 1024 * 1024), AGENT_SYNC)
        node = body.get("Node", "")
        if not node or not body.get("Address"):
            raise BadRequest("Missing Node or Address")
        check_name(node, "node name")
        body["Services"] = [normalize_service(s) for s in body.get("Services", [])]
        body["Checks"] = [normalize_catalog_check(c, node) for c in body.get("Checks", [])]
        partial = body.pop("Partial", False)
        if not partial:
            body.pop("DeleteServices", None)
            body.pop("DeleteChecks", None)
        await self.log.submit(new_command("sync_partial" if partial else "sync_node", **body))
        self.last_seen[node] = time.monotonic()
        return empty_ok()

    async def agent_checks_endpoint(self, request: Request) -> Response:
        if self.log is None:
            raise APIError("No cluster leader", 500)
        body = decode_body(await read_body(request, 64 * 1024 * 1024), CHECK_UPDATES)
        if not body.get("Node"):
            raise BadRequest("Missing Node")
        await self.log.submit(new_command("check_batch", Node=body["Node"], Updates=body.get("Updates", [])))
        return empty_ok()

    async def snapshot_endpoint(self, request: Request) -> Response:
        assert self.api is not None
        # Every client agent's DNS follows this: one encoded body shared by all of them per change.
        return await self.api._read_reply(request, views.catalog_snapshot, filterable=False)

    async def leave(self) -> None:
        """Leave gracefully: hand leadership over, take ourselves out of the peer set, stop."""
        assert self.log is not None
        if isinstance(self.log, RaftLog) and len(self.log.peers()) > 1:
            await self.log.transfer_leadership()
            for _ in range(30):
                leader_url = self.leader_url()
                if leader_url and self.log.leader() != self.config.raft_addr:
                    try:
                        resp = await self.http.delete(
                            f"{leader_url}/v1/operator/raft/peer", params={"address": self.config.raft_addr}, timeout=10.0
                        )
                        if resp.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                await asyncio.sleep(0.3)
        self.stopping.set()

    def routes(self) -> list[Route]:
        return [
            Route("/v1/internal/cluster/hello", guarded(self.hello_endpoint), methods=["POST"]),
            Route("/v1/internal/cluster/join", guarded(self.join_endpoint), methods=["POST"]),
            Route("/v1/internal/heartbeat", guarded(self.heartbeat_endpoint), methods=["PUT"]),
            Route("/v1/internal/snapshot", guarded(self.snapshot_endpoint), methods=["GET"]),
            Route("/v1/internal/agent/sync", guarded(self.agent_sync_endpoint), methods=["PUT"]),
            Route("/v1/internal/agent/checks", guarded(self.agent_checks_endpoint), methods=["PUT"]),
        ]

    async def close(self) -> None:
        self.stopping.set()
        for task in self._tasks:
            task.cancel()
        if self.log is not None:
            await self.log.close()
        await self.http.aclose()


def member_entry(name: str, addr: str, port: int, role: str, dc: str, status: int, tags: dict[str, str]) -> dict[str, Any]:
    return {
        "Name": name,
        "Addr": addr,
        "Port": port,
        "Tags": {"role": role, "dc": dc, "vsn": "2", "build": "0.1.0"} | tags,
        "Status": status,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }
