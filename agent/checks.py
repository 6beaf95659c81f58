"""The health-check engine of a client agent: many checks, one event loop, one scheduler.

Theory of operation
-------------------
* Every check owns exactly one live entry in a single heap of due times `(due, seq, id, gen)`.
  One scheduler task sleeps until the earliest due time, pops everything that is due and acts:
  interval checks start a probe task, TTL checks expire, alias checks recompute. A check that is
  removed or replaced bumps its generation, so its stale heap entry is dropped when popped.
* Interval checks start after a random stagger in [0, interval) (Consul's RandomStagger) and are
  then due at `first + n * interval`: the next due time is computed from the previous due time, not
  from "now", so lateness never accumulates. Ticks missed by more than an interval are skipped
  rather than replayed in a burst, and a probe still running when its next tick comes is not
  started twice.
* Probes run under a semaphore (`max_concurrency`), so 10,000 checks due at once open at most
  that many sockets or processes; the rest wait their turn.
* Probe results go through `StatusHandler` (Consul's success/failure thresholds); TTL and alias
  results do not. `on_change(check_id, status, output)` is called only when status or output
  actually changes.
* Everything uses the loop's monotonic clock, except the TTL deadline handed in and out for
  persistence (`ttl_deadline`), which is wall-clock so it survives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import os
import random
import signal
import socket
import ssl
import struct
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx

from lictor import metrics
from lictor.agent.definitions import CRITICAL, PASSING, VALID_STATUSES, WARNING, CheckSpec
from lictor.durations import format_duration
from lictor.errors import APIError, BadRequest, NotFound

__all__ = [
    "AliasItem",
    "AliasSource",
    "CheckRunner",
    "OnChange",
    "Probe",
    "StatusHandler",
    "DEFAULT_HTTP_TIMEOUT",
    "DEFAULT_SCRIPT_TIMEOUT",
    "DEFAULT_MAX_CONCURRENCY",
    "DEREGISTER_INTERVAL_MIN",
]

log = logging.getLogger(__name__)

DEFAULT_HTTP_TIMEOUT = 10.0
DEFAULT_SCRIPT_TIMEOUT = 30.0
DEFAULT_MAX_CONCURRENCY = 256
DEREGISTER_INTERVAL_MIN = 60.0  # check_deregister_interval_min
_HTTP_USER_AGENT = "Consul Health Check"
_HTTP_ACCEPT = "text/plain, text/*, */*"

OnChange = Callable[[str, str, str], Any]
# An alias source returns the checks of a service as bare statuses or (status, name, output)
# tuples, or None if the service does not exist on this node.
AliasItem = str | tuple[str, str, str]
AliasSource = Callable[[str], Sequence[AliasItem] | None]
Probe = Callable[[CheckSpec], Awaitable[tuple[str, str]]]


class StatusHandler:
    """Consul's StatusHandler: success/failure thresholds in front of a check's reported status.

    Counters start *at* their threshold, so the very first result is reported immediately.
    `update()` returns the status to report, or None while a threshold is not yet reached.
    """

    def __init__(
        self,
        success_before_passing: int = 0,
        failures_before_warning: int = 0,
        failures_before_critical: int = 0,
    ):
        self.success_before_passing = success_before_passing
        self.failures_before_warning = failures_before_warning or failures_before_critical
        self.failures_before_critical = failures_before_critical
        self.success_counter = success_before_passing
        self.failures_counter = failures_before_critical

    def update(self, status: str) -> str | None:
        if status in (PASSING, WARNING):
            self.success_counter += 1
            self.failures_counter = 0
            if self.success_counter >= self.success_before_passing:
                return status
            return None
        self.failures_counter += 1
        self.success_counter = 0
        if self.failures_counter >= self.failures_before_critical:
            return CRITICAL
        if self.failures_counter >= self.failures_before_warning:
            return WARNING
        return None


def _truncate_head(output: str, limit: int) -> str:
    """Consul's TTL truncation: keep the head, say how much was captured."""
    data = output.encode()
    if limit > 0 and len(data) > limit:
        head = data[:limit].decode(errors="ignore")
        return f"{head} ... (captured {limit} of {len(data)} bytes)"
    return output


@dataclass(eq=False)
class _Check:
    spec: CheckSpec
    status: str
    output: str
    gen: int
    handler: StatusHandler | None = None
    ttl_deadline: float = 0.0  # loop time
    scheduled: bool = False  # has a live heap entry
    task: asyncio.Task[None] | None = None
    critical_since: float | None = None
    runs: int = 0


@dataclass
class SchedulerStats:
    """Scheduling lateness (dispatch time minus due time), for tests and metrics."""

    dispatched: int = 0
    skipped_busy: int = 0
    skipped_late: int = 0
    max_lag: float = 0.0
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))


class CheckRunner:
    """Runs every check of an agent on the current event loop.

    >>> runner = CheckRunner(on_change=lambda cid, status, output: print(cid, status))
    >>> runner.add(spec)             # inside a running loop
    >>> runner.ttl_update("mem", "passing", "ok")
    >>> await runner.close()
    """

    def __init__(
        self,
        on_change: OnChange,
        *,
        alias_source: AliasSource | None = None,
        node_name: str = "",
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        deregister_min: float = DEREGISTER_INTERVAL_MIN,
        alias_interval: float = 1.0,
        rng: random.Random | None = None,
        probes: dict[str, Probe] | None = None,
    ) -> None:
        self._on_change = on_change
        self._alias_source = alias_source
        self.node_name = node_name
        self.deregister_min = deregister_min
        self.alias_interval = alias_interval
        self._rng = rng or random.Random()
        self._sem = asyncio.Semaphore(max_concurrency)
        self._checks: dict[str, _Check] = {}
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = 0
        self._gen = 0
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self._raw_tls_contexts: dict[tuple[str, bool], ssl.SSLContext] = {}
        self._closed = False
        self.stats = SchedulerStats()
        self._probes: dict[str, Probe] = {
            "http": self._probe_http,
            "tcp": _probe_tcp,
            "udp": _probe_udp,
            "script": _probe_script,
            "grpc": _probe_grpc,
            "h2ping": _probe_h2ping,
            "docker": _unsupported("Docker"),
            "os_service": _unsupported("OSService"),
        }
        self._probes.update(probes or {})

    # --- public API ------------------------------------------------------------------------

    def add(
        self,
        spec: CheckSpec,
        *,
        initial_status: str | None = None,
        initial_output: str = "",
        ttl_deadline: float | None = None,
    ) -> None:
        """Start running `spec` (replacing a check with the same ID). Must be called in the loop.

        `initial_status`/`initial_output` carry over a previous state (re-registration, restore);
        `ttl_deadline` is a wall-clock (time.time()) expiry persisted for a TTL check: if it has
        already passed, the restored status is dropped as Consul does.
        """
        if self._closed:
            raise RuntimeError("CheckRunner is closed")
        loop = asyncio.get_running_loop()
        self._ensure_scheduler()
        self.remove(spec.check_id)
        now = loop.time()
        status = initial_status or spec.status
        if status not in VALID_STATUSES:
            raise BadRequest(f"Invalid check status: '{status}'")
        output = initial_output
        self._gen += 1
        chk = _Check(spec=spec, status=status, output=output, gen=self._gen)
        if spec.kind == "ttl":
            chk.ttl_deadline = now + spec.ttl
            if ttl_deadline is not None:
                left = ttl_deadline - time.time()
                if left > 0:
                    chk.ttl_deadline = now + left
                else:
                    chk.status, chk.output = spec.status, ""
            self._push(chk, chk.ttl_deadline)
        elif spec.kind == "alias":
            self._push(chk, now)
        else:
            chk.handler = StatusHandler(
                spec.success_before_passing, spec.failures_before_warning, spec.failures_before_critical
            )
            # Consul staggers the first run over a whole interval, so a new instance can sit
            # critical (out of DNS and load balancing) for up to 10 s; a user complaint (#2314).
            # Spread first runs over at most 1 s: fast to healthy, still no thundering herd.
            stagger = self._rng.uniform(0, min(spec.interval, 1.0)) if spec.interval > 0 else 0.0
            self._push(chk, now + stagger)
        if chk.status == CRITICAL:
            chk.critical_since = now
        self._checks[spec.check_id] = chk

    def remove(self, check_id: str) -> bool:
        """Stop a check; an in-flight probe is cancelled (its process killed). False if unknown."""
        chk = self._checks.pop(check_id, None)
        if chk is None:
            return False
        chk.gen = -1  # stale heap entry and in-flight result are both ignored
        if chk.task is not None and not chk.task.done():
            chk.task.cancel()
        return True

    def ttl_update(self, check_id: str, status: str, output: str = "") -> None:
        """/v1/agent/check/{pass,warn,fail,update}: set status and reset the TTL timer."""
        chk = self._checks.get(check_id)
        if chk is None:
            raise NotFound(
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if chk.spec.kind != "ttl":
            raise APIError(f'CheckID "{check_id}" does not have associated TTL', status=500)
        if status not in VALID_STATUSES:
            raise BadRequest(f"Invalid check status: '{status}'")
        loop = asyncio.get_running_loop()
        chk.ttl_deadline = loop.time() + chk.spec.ttl
        if not chk.scheduled:
            self._push(chk, chk.ttl_deadline)
        metrics.count_check_run("ttl")  # an application's TTL report is this check's "run"
        self._set(chk, status, _truncate_head(output, chk.spec.output_max_size))

    def status(self, check_id: str) -> tuple[str, str] | None:
        chk = self._checks.get(check_id)
        return None if chk is None else (chk.status, chk.output)

    def __contains__(self, check_id: object) -> bool:
        return check_id in self._checks

    def check_ids(self) -> list[str]:
        return list(self._checks)

    def runs(self, check_id: str) -> int:
        """How many probes/evaluations this check has completed (for tests and metrics)."""
        chk = self._checks.get(check_id)
        return 0 if chk is None else chk.runs

    def ttl_deadline(self, check_id: str) -> float | None:
        """Wall-clock expiry of a TTL check, to persist with its status."""
        chk = self._checks.get(check_id)
        if chk is None or chk.spec.kind != "ttl":
            return None
        return time.time() + (chk.ttl_deadline - asyncio.get_running_loop().time())

    def critical_since(self, check_id: str) -> float | None:
        """Loop time (monotonic) at which the check became critical, or None if it is not."""
        chk = self._checks.get(check_id)
        return None if chk is None else chk.critical_since

    def reap_due(self, now: float | None = None) -> list[str]:
        """Service checks critical for longer than max(DeregisterCriticalServiceAfter, deregister_min).

        The agent deregisters their services (Consul's reapServicesInternal, every 30 s).
        """
        now = asyncio.get_running_loop().time() if now is None else now
        due = []
        for cid, chk in self._checks.items():
            after = chk.spec.deregister_after
            if after <= 0 or not chk.spec.service_id or chk.critical_since is None:
                continue
            if now - chk.critical_since > max(after, self.deregister_min):
                due.append(cid)
        return due

    def alias_changed(self, service_id: str | None = None) -> None:
        """Recompute alias checks (of `service_id`, or all) now: call when local health changes."""
        for chk in list(self._checks.values()):
            if chk.spec.kind == "alias" and (
                service_id is None or chk.spec.get("AliasService") == service_id
            ):
                self._eval_alias(chk)

    async def close(self) -> None:
        self._closed = True
        tasks = [c.task for c in self._checks.values() if c.task is not None and not c.task.done()]
        for cid in list(self._checks):
            self.remove(cid)
        if self._scheduler is not None:
            self._scheduler.cancel()
            tasks.append(self._scheduler)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    # --- scheduling ------------------------------------------------------------------------

    def _ensure_scheduler(self) -> None:
        if self._scheduler is None or self._scheduler.done():
            self._wake = asyncio.Event()
            self._scheduler = asyncio.get_running_loop().create_task(
                self._run_scheduler(), name="check-scheduler"
            )

    def _push(self, chk: _Check, due: float) -> None:
        self._seq += 1
        chk.scheduled = True
        first = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, self._seq, chk.spec.check_id, chk.gen))
        if first and self._wake is not None:
            self._wake.set()  # the scheduler sleeps until the old head; wake it for the new one

    async def _run_scheduler(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            self._wake.clear()
            now = loop.time()
            while self._heap and self._heap[0][0] <= now:
                due, _, cid, gen = heapq.heappop(self._heap)
                chk = self._checks.get(cid)
                if chk is None or chk.gen != gen:
                    continue
                chk.scheduled = False
                try:
                    self._fire(chk, due, now)
                except Exception:  # one broken check must not stop all the others
                    log.exception("check %s: scheduling failed", cid)
            if self._heap:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._heap[0][0] - loop.time())
            else:
                await self._wake.wait()

    def _fire(self, chk: _Check, due: float, now: float) -> None:
        kind = chk.spec.kind
        if kind == "ttl":
            if chk.ttl_deadline > now:  # updated since this entry was pushed
                self._push(chk, chk.ttl_deadline)
                return
            expired = "TTL expired"
            if chk.output and not chk.output.startswith(expired):
                expired = f"TTL expired (last output before timeout follows): {chk.output}"
            elif chk.output.startswith(expired):
                expired = chk.output
            chk.runs += 1
            metrics.count_check_run(chk.spec.kind)
            self._set(chk, CRITICAL, expired)
            return  # re-armed by the next ttl_update
        if kind == "alias":
            self._eval_alias(chk)
            self._push(chk, now + self.alias_interval)
            return
        lag = now - due
        st = self.stats
        st.dispatched += 1
        st.lags.append(lag)
        st.max_lag = max(st.max_lag, lag)
        interval = chk.spec.interval
        nxt = due + interval
        if chk.runs == 0 and interval > 1.0:
            # The first run came early (within 1 s of registration); move the second to a random
            # phase of the interval so that thousands of checks don't probe in one burst forever.
            nxt = now + max(0.5, self._rng.uniform(0, interval))
        if nxt <= now:  # fell behind by more than an interval: skip, don't burst
            missed = math.floor((now - nxt) / interval) + 1
            st.skipped_late += missed
            nxt += missed * interval
        self._push(chk, nxt)
        if chk.task is not None and not chk.task.done():
            st.skipped_busy += 1  # previous probe still running: never overlap a check with itself
            return
        chk.task = asyncio.get_running_loop().create_task(self._probe(chk, chk.gen))

    async def _probe(self, chk: _Check, gen: int) -> None:
        probe = self._probes.get(chk.spec.kind)
        async with self._sem:
            if chk.gen != gen:
                return
            if probe is None:
                status, output = CRITICAL, f"unsupported check type {chk.spec.kind!r}"
            else:
                try:
                    status, output = await probe(chk.spec)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a probe bug is a critical check, not a dead runner
                    log.exception("check %s: probe failed", chk.spec.check_id)
                    status, output = CRITICAL, f"check failed: {exc!r}"
        if chk.gen != gen:
            return
        chk.runs += 1
        metrics.count_check_run(chk.spec.kind)
        assert chk.handler is not None
        reported = chk.handler.update(status)
        if reported is not None:
            self._set(chk, reported, output)

    def _eval_alias(self, chk: _Check) -> None:
        target = chk.spec.get("AliasService", "")
        items = self._alias_source(target) if self._alias_source is not None else None
        chk.runs += 1
        metrics.count_check_run(chk.spec.kind)
        if items is None:
            self._set(chk, CRITICAL, f"Service {target} could not be found on node {self.node_name}")
            return
        health, msg = PASSING, "No checks found."
        for item in items:
            st, name, out = (item, "", "") if isinstance(item, str) else item
            if st in (CRITICAL, WARNING):
                health = st
                msg = f"Aliased check {name!r} failing: {out}" if name else f"Aliased check failing ({st})"
                if st == CRITICAL:
                    break
            elif health == PASSING:
                msg = "All checks passing."
        self._set(chk, health, msg)

    def _set(self, chk: _Check, status: str, output: str) -> None:
        if chk.status == status and chk.output == output:
            return
        if status == CRITICAL and chk.status != CRITICAL:
            chk.critical_since = asyncio.get_running_loop().time()
        elif status != CRITICAL:
            chk.critical_since = None
        if status != chk.status:
            metrics.count_check_state_change(status)
        chk.status, chk.output = status, output
        try:
            self._on_change(chk.spec.check_id, status, output)
        except Exception:
            log.exception("check %s: on_change callback failed", chk.spec.check_id)

    # --- HTTP (needs the runner's shared clients) ------------------------------------------

    def _client(self, verify: bool) -> httpx.AsyncClient:
        client = self._clients.get(verify)
        if client is None:
            # Consul disables keep-alive for checks; trust_env=False keeps proxy env vars out.
            client = httpx.AsyncClient(
                verify=verify,
                trust_env=False,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            )
            self._clients[verify] = client
        return client

    async def _probe_http(self, spec: CheckSpec) -> tuple[str, str]:
        url = spec.definition["HTTP"]
        method = (spec.get("Method") or "GET").upper()
        headers: list[tuple[str, str]] = []
        given = {k.lower() for k in spec.get("Header", {})}
        for name, value in (
            ("User-Agent", _HTTP_USER_AGENT),
            ("Accept", _HTTP_ACCEPT),
            ("Connection", "close"),
        ):
            if name.lower() not in given:
                headers.append((name, value))
        for name, values in spec.get("Header", {}).items():
            headers.extend((name, v) for v in values)
        timeout = spec.timeout or DEFAULT_HTTP_TIMEOUT
        extensions = {"sni_hostname": spec.get("TLSServerName")} if spec.get("TLSServerName") else None
        limit = spec.output_max_size
        if not extensions:
            # The common case goes over a bare connection: httpx costs ~2.7 ms of CPU per probe
            # (measured), which would make 5,000 checks at 10 s take more than a core.
            fast = await self._probe_http_raw(spec, url, method, headers, timeout, limit)
            if fast is not None:
                return fast
        body = bytearray()
        try:
            async with asyncio.timeout(timeout):
                async with self._client(not spec.get("TLSSkipVerify", False)).stream(
                    method,
                    url,
                    headers=headers,
                    content=(spec.get("Body") or "").encode() or None,
                    timeout=timeout,
                    follow_redirects=not spec.get("DisableRedirects", False),
                    extensions=extensions,
                ) as resp:
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) >= limit:  # stop reading: only OutputMaxSize bytes are kept
                            break
        except (TimeoutError, httpx.TimeoutException):
            return CRITICAL, (
                f'{method.title()} "{url}": context deadline exceeded '
                f"(Client.Timeout exceeded while awaiting headers) after {format_duration(timeout)}"
            )
        except (httpx.HTTPError, OSError, ssl.SSLError, ValueError) as exc:
            return CRITICAL, f'{method.title()} "{url}": {_describe(exc)}'
        text = bytes(body[:limit]).decode(errors="replace")
        output = f"HTTP {method} {url}: {resp.status_code} {resp.reason_phrase} Output: {text}"
        if 200 <= resp.status_code <= 299:
            return PASSING, output
        if resp.status_code == 429:
            return WARNING, output
        return CRITICAL, output


    def _raw_tls(self, verify: bool) -> ssl.SSLContext:
        key = ("raw-tls", verify)
        ctx = self._raw_tls_contexts.get(key)
        if ctx is None:
            ctx = _tls_context(not verify)
            self._raw_tls_contexts[key] = ctx
        return ctx

    async def _probe_http_raw(
        self, spec: CheckSpec, url: str, method: str, headers: list[tuple[str, str]], timeout: float, limit: int
    ) -> tuple[str, str] | None:
        """One HTTP/1.1 request on a fresh connection, read no further than `limit` body bytes.

        Returns None when the answer needs what only the full client does (following a redirect).
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
            return None
        tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            return None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        payload = (spec.get("Body") or "").encode()
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if payload or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(payload)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace") + payload
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        follow = not spec.get("DisableRedirects", False)
        exchange = _HTTPExchange(request, limit, done, stop_at_redirect=follow, head=method == "HEAD")
        transport = None
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(
                    lambda: exchange, parts.hostname, port,
                    ssl=self._raw_tls(not spec.get("TLSSkipVerify", False)) if tls else None,
                )
                await done
        except TimeoutError:
            return CRITICAL, (
                f'{method.title()} "{url}": context deadline exceeded '
                f"(Client.Timeout exceeded while awaiting headers) after {format_duration(timeout)}"
            )
        except (OSError, ssl.SSLError, ValueError, httptools.HttpParserError) as exc:
            return CRITICAL, f'{method.title()} "{url}": {_describe(exc)}'
        finally:
            if transport is not None:
                transport.close()
        if exchange.redirect:
            return None  # following redirects is the full client's job
        code, reason, body = exchange.code, exchange.reason, bytes(exchange.body)
        text = body[:limit].decode(errors="replace")
        output = f"HTTP {method} {url}: {code} {reason or _REASONS.get(code, '')} Output: {text}"
        if 200 <= code <= 299:
            return PASSING, output
        if code == 429:
            return WARNING, output
        return CRITICAL, output


class _HTTPExchange(asyncio.Protocol):
    """One request, one response, parsed by httptools straight from the transport.

    Cheaper than asyncio streams by a wide margin: no StreamReader buffering, no readline loop,
    one C parser. Stops as soon as the status, headers and `limit` body bytes are in.
    """

    def __init__(self, request: bytes, limit: int, done: asyncio.Future[None], *, stop_at_redirect: bool,
                 head: bool) -> None:
        self.request = request
        self.limit = limit
        self.done = done
        self.stop_at_redirect = stop_at_redirect
        self.parser = httptools.HttpResponseParser(self)
        self.code = 0
        self.reason = ""
        self.body = bytearray()
        self.redirect = False
        self.headers_done = False
        self.head = head
        self.transport: asyncio.Transport | None = None

    def _finish(self, exc: BaseException | None = None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish()
        except httptools.HttpParserError as exc:
            if self.headers_done:  # trailing garbage after what we needed: we have our answer
                self._finish()
            else:
                self._finish(ValueError(f"malformed HTTP response: {exc}"))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.headers_done:
            self._finish()  # body ended with the connection (no length): what we have is the body
        else:
            self._finish(exc or ConnectionResetError("connection closed before a response"))

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.stop_at_redirect and name.lower() == b"location":
            code = self.parser.get_status_code()
            if 300 <= code < 400:
                self.redirect = True

    def on_headers_complete(self) -> None:
        self.code = self.parser.get_status_code()
        self.headers_done = True
        if self.redirect or self.head:
            self._finish()

    def on_body(self, body: bytes) -> None:
        room = self.limit - len(self.body)
        if room > 0:
            self.body += body[:room]
        if len(self.body) >= self.limit:
            self._finish()

    def on_message_complete(self) -> None:
        self._finish()


_REASONS = {200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found", 400: "Bad Request",
            404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def _describe(exc: BaseException) -> str:
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    while not text and cause is not None:
        text = str(cause)
        cause = cause.__cause__ or cause.__context__
    return text or type(exc).__name__


def _split_host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {addr}: missing port in address")
    return host.strip("[]"), int(port)


def _unsupported(what: str) -> Probe:
    async def probe(spec: CheckSpec) -> tuple[str, str]:
        return CRITICAL, f"{what} checks are not supported by this agent"

    return probe


def _tls_context(skip_verify: bool, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


# --- TCP / UDP -------------------------------------------------------------------------------


async def _probe_tcp(spec: CheckSpec) -> tuple[str, str]:
    addr = spec.definition["TCP"]
    timeout = spec.timeout or DEFAULT_HTTP_TIMEOUT
    try:
        host, port = _split_host_port(addr)
        tls = None
        if spec.get("TCPUseTLS"):
            tls = _tls_context(bool(spec.get("TLSSkipVerify")))
        server_hostname = (spec.get("TLSServerName") or host) if tls else None
        async with asyncio.timeout(timeout):
            if tls is None:
                await _tcp_connect(host, port)
            else:
                _, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=server_hostname
                )
                writer.close()
    except TimeoutError:
        return CRITICAL, f"dial tcp {addr}: i/o timeout"
    except (OSError, ValueError) as exc:
        return CRITICAL, f"dial tcp {addr}: {getattr(exc, 'strerror', None) or exc}"
    return PASSING, f"TCP connect {addr}: Success"


async def _tcp_connect(host: str, port: int) -> None:
    """A bare non-blocking connect: far cheaper than open_connection (no transport, no streams),
    which matters with thousands of TCP checks per second on one loop."""
    loop = asyncio.get_running_loop()
    try:
        infos = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
        socket.inet_pton(infos[0][0], host)
    except OSError:  # a name, not an IP literal: resolve off-loop
        resolved = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        infos = [(fam, sa) for fam, _, _, _, sa in resolved]
    error: OSError | None = None
    for family, sockaddr in infos:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sockaddr)
            return
        except OSError as exc:
            error = exc
        finally:
            sock.close()
    raise error or OSError(f"no addresses for {host}")


class _UDPProbe(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.result: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.result.done():
            self.result.set_result(None)

    def error_received(self, exc: Exception) -> None:
        if not self.result.done():
            self.result.set_result(exc)


async def _probe_udp(spec: CheckSpec) -> tuple[str, str]:
    """Consul's UDP check: send a byte; an echo or silence until the timeout is success,
    an error (ICMP port unreachable) is critical."""
    addr = spec.definition["UDP"]
    timeout = spec.timeout or DEFAULT_HTTP_TIMEOUT
    loop = asyncio.get_running_loop()
    try:
        host, port = _split_host_port(addr)
        transport, proto = await loop.create_datagram_endpoint(_UDPProbe, remote_addr=(host, port))
    except (OSError, ValueError) as exc:
        return CRITICAL, f"dial udp {addr}: {getattr(exc, 'strerror', None) or exc}"
    try:
        transport.sendto(b"h")
        try:
            err = await asyncio.wait_for(asyncio.shield(proto.result), timeout)
        except TimeoutError:
            err = None
    finally:
        transport.close()
    if err is not None:
        return CRITICAL, f"read udp {addr}: {getattr(err, 'strerror', None) or err}"
    return PASSING, f"UDP connect {addr}: Success"


# --- script ----------------------------------------------------------------------------------


async def _probe_script(spec: CheckSpec) -> tuple[str, str]:
    args = spec.args
    timeout = spec.timeout or DEFAULT_SCRIPT_TIMEOUT
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout kills `sh -c` children too
        )
    except OSError as exc:
        return CRITICAL, f"Failed to start check: {exc}"
    try:
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            return CRITICAL, f"Timed out ({format_duration(timeout)}) running check"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
    limit = spec.output_max_size
    text = out[-limit:].decode(errors="replace")  # Consul keeps the tail (circular buffer)
    if len(out) > limit:
        text = f"Captured {limit} of {len(out)} bytes\n...\n{text}"
    code = proc.returncode
    return (PASSING if code == 0 else WARNING if code == 1 else CRITICAL), text


# --- HTTP/2: just enough for gRPC health and H2PING, without grpcio or h2 -------------------

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_GRPC_HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _h2_frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


async def _h2_read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    head = await reader.readexactly(9)
    length = int.from_bytes(head[:3], "big")
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    return head[3], head[4], stream, await reader.readexactly(length)


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_literal(headers: Iterable[tuple[str, str]]) -> bytes:
    """HPACK 'literal without indexing, new name', no Huffman: valid for any decoder."""
    block = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        block += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return bytes(block)


def _grpc_target(target: str) -> tuple[str, int, str]:
    addr, _, service = target.partition("/")
    host, port = _split_host_port(addr)
    return host, port, service


def _pb_health_status(msg: bytes) -> int | None:
    """Field 1 (varint) of grpc.health.v1.HealthCheckResponse; absent means UNKNOWN (0)."""
    i, status = 0, 0
    while i < len(msg):
        key, i = _pb_varint(msg, i)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _pb_varint(msg, i)
            if field_no == 1:
                status = value
        elif wire == 2:
            n, i = _pb_varint(msg, i)
            i += n
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        else:
            return None
    return status


def _pb_encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pb_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


async def _h2_open(
    host: str, port: int, use_tls: bool, skip_verify: bool, server_name: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    tls = _tls_context(skip_verify, alpn=["h2"]) if use_tls else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls, server_hostname=(server_name or host) if tls else None
    )
    writer.write(_H2_PREFACE + _h2_frame(_SETTINGS, 0, 0))
    return reader, writer


async def _h2_control(writer: asyncio.StreamWriter, ftype: int, flags: int, payload: bytes) -> None:
    """Answer the connection-level frames a peer expects answered (SETTINGS, PING)."""
    if ftype == _SETTINGS and not flags & _ACK:
        writer.write(_h2_frame(_SETTINGS, _ACK, 0))
    elif ftype == _PING and not flags & _ACK:
        writer.write(_h2_frame(_PING, _ACK, 0, payload))


async def grpc_health_check(
    target: str, *, timeout: float, use_tls: bool = False, skip_verify: bool = False, server_name: str = ""
) -> tuple[str, str]:
    """grpc.health.v1.Health/Check over one HTTP/2 stream. SERVING → passing, else critical."""
    host, port, service = _grpc_target(target)
    svc = service.encode()
    request = (b"\x0a" + _pb_encode_varint(len(svc)) + svc) if svc else b""  # field 1: service name
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _h2_open(host, port, use_tls, skip_verify, server_name)
            headers = _hpack_literal(
                [
                    (":method", "POST"),
                    (":scheme", "https" if use_tls else "http"),
                    (":path", "/grpc.health.v1.Health/Check"),
                    (":authority", f"{host}:{port}"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    ("user-agent", _HTTP_USER_AGENT),
                ]
            )
            writer.write(_h2_frame(_HEADERS, _END_HEADERS, 1, headers))
            writer.write(
                _h2_frame(_DATA, _END_STREAM, 1, b"\x00" + struct.pack(">I", len(request)) + request)
            )
            data = bytearray()
            while True:
                ftype, flags, stream, payload = await _h2_read_frame(reader)
                if stream == 0:
                    if ftype == _GOAWAY:
                        return CRITICAL, f"gRPC check {target}: connection closed by server (GOAWAY)"
                    await _h2_control(writer, ftype, flags, payload)
                    continue
                if stream != 1:
                    continue
                if ftype == _RST_STREAM:
                    code = int.from_bytes(payload[:4], "big")
                    return CRITICAL, f"gRPC check {target}: stream reset by server (code {code})"
                if ftype == _DATA:
                    if flags & _PADDED:
                        payload = payload[1 : len(payload) - payload[0]]
                    data += payload
                if flags & _END_STREAM:
                    break
    except TimeoutError:
        return CRITICAL, f"gRPC check {target}: context deadline exceeded after {format_duration(timeout)}"
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        return CRITICAL, f"gRPC check {target}: {_describe(exc)}"
    finally:
        if writer is not None:
            writer.close()
    if len(data) < 5:
        # A trailers-only answer carries grpc-status in HPACK we do not decode: report it plainly.
        return CRITICAL, f"gRPC check {target}: rpc error: no response message"
    length = int.from_bytes(data[1:5], "big")
    status = _pb_health_status(bytes(data[5 : 5 + length]))
    if status == 1:
        return PASSING, f"gRPC check {target}: success"
    name = _GRPC_HEALTH.get(status if status is not None else -1, str(status))
    return CRITICAL, f"gRPC check {target}: gRPC application didn't report service healthy ({name})"


async def _probe_grpc(spec: CheckSpec) -> tuple[str, str]:
    return await grpc_health_check(
        spec.definition["GRPC"],
        timeout=spec.timeout or DEFAULT_HTTP_TIMEOUT,
        use_tls=bool(spec.get("GRPCUseTLS")),
        skip_verify=bool(spec.get("TLSSkipVerify")),
        server_name=spec.get("TLSServerName", ""),
    )


async def _probe_h2ping(spec: CheckSpec) -> tuple[str, str]:
    target = spec.definition["H2PING"]
    timeout = spec.timeout or DEFAULT_HTTP_TIMEOUT
    use_tls = spec.definition.get("H2PingUseTLS", True)  # Consul's default is TLS
    writer: asyncio.StreamWriter | None = None
    try:
        host, port = _split_host_port(target)
        async with asyncio.timeout(timeout):
            reader, writer = await _h2_open(
                host, port, use_tls, bool(spec.get("TLSSkipVerify")), spec.get("TLSServerName", "")
            )
            opaque = os.urandom(8)
            writer.write(_h2_frame(_PING, 0, 0, opaque))
            while True:
                ftype, flags, stream, payload = await _h2_read_frame(reader)
                if ftype == _PING and flags & _ACK and payload == opaque:
                    return PASSING, "HTTP2 ping was successful"
                if ftype == _GOAWAY:
                    return CRITICAL, f"Failed to ping {target}: connection closed by server"
                if stream == 0:
                    await _h2_control(writer, ftype, flags, payload)
    except TimeoutError:
        return CRITICAL, f"Failed to ping {target}: context deadline exceeded"
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        return CRITICAL, f"Failed to ping {target}: {_describe(exc)}"
    finally:
        if writer is not None:
            writer.close()
