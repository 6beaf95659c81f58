"""Managed sidecars: with `-managed-proxies`, the agent runs a proxy for each sidecar registration.

Each proxy is a child process (`python -m lictor.agent.proxy -proxy-id <id>`), started when its
connect-proxy service is registered, stopped when it is deregistered, restarted (with backoff)
if it exits, and terminated when the agent stops.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("lictor.managed")


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the agent dies, even by SIGKILL (Linux).

    Without it a killed agent leaves its proxies running, holding their ports, serving stale
    certificates to whoever connects.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux/glibc: the agent's own shutdown still stops its children
        pass


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    started: float
    failures: int = 0
    log_path: str = ""


@dataclass
class ManagedProxies:
    local: Any  # LocalAgent
    http_addr: str
    log_dir: str
    children: dict[str, Child] = field(default_factory=dict)
    restart_after: dict[str, float] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def desired(self) -> set[str]:
        services = self.local.services
        return {
            sid for sid, s in services.items()
            if s.get("Kind") == "connect-proxy" and (s.get("Proxy") or {}).get("DestinationServiceID") in services
        }

    async def _spawn(self, sid: str, failures: int = 0) -> None:
        path = os.path.join(self.log_dir, f"proxy-{sid}.log")
        with open(path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lictor.agent.proxy", "-proxy-id", sid, "-http-addr", self.http_addr,
                stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )
        self.children[sid] = Child(proc, time.monotonic(), failures, path)
        log.info("started managed proxy %s (pid %d, log %s)", sid, proc.pid, path)

    async def _stop(self, sid: str) -> None:
        child = self.children.pop(sid, None)
        if child is None or child.proc.returncode is not None:
            return
        child.proc.terminate()
        try:
            await asyncio.wait_for(child.proc.wait(), 5)
        except TimeoutError:
            child.proc.kill()
            await child.proc.wait()
        log.info("stopped managed proxy %s", sid)

    async def reconcile(self) -> None:
        wanted = self.desired()
        for sid in list(self.children):
            if sid not in wanted:
                await self._stop(sid)
        now = time.monotonic()
        for sid in wanted:
            child = self.children.get(sid)
            if child is not None and child.proc.returncode is None:
                continue
            failures = 0
            if child is not None:
                # It exited: restart with exponential backoff (a proxy that ran 60 s is forgiven).
                failures = 0 if now - child.started > 60 else child.failures + 1
                self.children.pop(sid)
                self.restart_after[sid] = now + min(30.0, 0.5 * 2**failures)
                log.warning("managed proxy %s exited with %s; restarting", sid, child.proc.returncode)
            if now < self.restart_after.get(sid, 0):
                continue
            await self._spawn(sid, failures)

    async def run(self) -> None:
        while True:
            changed = self.local.changed
            try:
                await self.reconcile()
            except Exception:  # keep managing the others
                log.exception("managing proxies failed")
            try:
                await asyncio.wait_for(changed.wait(), 1.0)
            except TimeoutError:
                pass

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for sid in list(self.children):
            await self._stop(sid)


def start_managed_proxies(runtime: Any) -> ManagedProxies:
    config = runtime.config
    log_dir = config.data_dir or tempfile.mkdtemp(prefix="lictor-proxies-")
    os.makedirs(log_dir, exist_ok=True)
    managed = ManagedProxies(runtime.local, config.http_addr, log_dir)
    managed.start()
    runtime.extras.append(managed)
    return managed
