"""Control plane: the local agent's HTTP API, followed with blocking queries.

`follow_index` runs one Consul-style blocking loop (`?index=N&wait=`): it calls `apply` whenever the
answer changes, backs off on errors (never gives up), and resets the index if it goes backwards.
`follow_hash` does the same for `/v1/agent/service/<id>?hash=` (the agent's content-hash blocking).
Each loop sets its `ready` event after the first successful answer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

__all__ = ["AgentClient", "WAIT", "follow_hash", "follow_index"]

log = logging.getLogger("lictor.proxy.watch")

WAIT = 30.0  # seconds per blocking query; changes return at once regardless
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 3.0

Apply = Callable[[Any], Awaitable[None] | None]


class AgentClient:
    """A thin httpx client for the local agent (control plane only, never on the data path)."""

    def __init__(self, http_addr: str, token: str | None = None) -> None:
        base = http_addr if http_addr.startswith(("http://", "https://")) else f"http://{http_addr}"
        headers = {"X-Consul-Token": token} if token else {}
        self.base = base
        # Many blocking queries run at once: one pooled connection each.
        self.http = httpx.AsyncClient(base_url=base, headers=headers,
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
                                      timeout=httpx.Timeout(10.0, read=WAIT + WAIT / 16 + 10.0))

    async def get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        return await self.http.get(path, params=params)

    async def close(self) -> None:
        await self.http.aclose()


async def _call(apply: Apply, value: Any) -> None:
    result = apply(value)
    if inspect.isawaitable(result):
        await result


async def follow_index(client: AgentClient, path: str, params: dict[str, Any], apply: Apply, *,
                       ready: asyncio.Event | None = None, allow_404: bool = False, what: str = "") -> None:
    index = 0
    last: Any = object()
    backoff = _BACKOFF_MIN
    what = what or path
    while True:
        query = dict(params)
        if index:
            query["index"] = str(index)
            query["wait"] = f"{int(WAIT)}s"
        try:
            resp = await client.get(path, query)
            if resp.status_code == 404 and allow_404:
                value: Any = None
            elif resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text.strip()[:200]}")
            else:
                value = resp.json()
            new_index = int(resp.headers.get("X-Consul-Index") or 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep following through agent restarts
            log.warning("watch %s failed (retrying in %.1fs): %s", what, backoff, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            continue
        backoff = _BACKOFF_MIN
        if value != last:
            last = value
            try:
                await _call(apply, value)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("applying %s failed", what)
        if ready is not None and not ready.is_set():
            ready.set()
        if new_index <= 0 or new_index < index:
            index = 0  # Consul's rule: an index going backwards means start over
            await asyncio.sleep(0.05)
        else:
            index = new_index


async def follow_hash(client: AgentClient, path: str, apply: Apply, *, ready: asyncio.Event | None = None,
                      what: str = "") -> None:
    """Blocking on `?hash=` (agent service endpoints). A 404 applies None (deregistered)."""
    content_hash = ""
    last: Any = object()
    backoff = _BACKOFF_MIN
    while True:
        query = {"hash": content_hash, "wait": f"{int(WAIT)}s"} if content_hash else {}
        try:
            resp = await client.get(path, query)
            if resp.status_code == 404:
                value: Any = None
            elif resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.text.strip()[:200]}")
            else:
                value = resp.json()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("watch %s failed (retrying in %.1fs): %s", what or path, backoff, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            continue
        backoff = _BACKOFF_MIN
        new_hash = resp.headers.get("X-Consul-ContentHash") or (value or {}).get("ContentHash") or ""
        if value != last:
            last = value
            try:
                await _call(apply, value)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("applying %s failed", what or path)
        if ready is not None and not ready.is_set():
            ready.set()
        if value is None or not new_hash:
            await asyncio.sleep(1.0)  # nothing to block on: poll gently until it is back
        content_hash = new_hash if value is not None else ""
