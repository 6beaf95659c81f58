"""The agent's DNS follower builds its view lazily: when a query needs a newer catalog, at most once
per REBUILD_MIN_PERIOD, and never while nobody asks (no sockets)."""

from __future__ import annotations

import time

from lictor.agent import dns_wiring
from lictor.agent.dns_wiring import CatalogFollower
from lictor.config import AgentConfig


def _snapshot(port: int) -> dict:
    return {"Nodes": [{"Node": "n1", "Address": "10.0.0.1"}],
            "Services": [{"Node": "n1", "ID": "web", "Service": "web", "Port": port}], "Checks": []}


def _port(follower: CatalogFollower) -> int:
    view = follower.get()
    assert view is not None
    return view.services["web"][0].port


def test_nothing_is_built_until_a_query_and_then_the_newest_catalog() -> None:
    follower = CatalogFollower(AgentConfig())
    assert follower.get() is None  # nothing followed yet: SERVFAIL
    built: list[int] = []
    for port in (1, 2, 3):
        follower._offer(port, lambda port=port: built.append(port) or _snapshot(port))
    assert built == []
    assert _port(follower) == 3 and built == [3]
    assert _port(follower) == 3 and built == [3]  # unchanged: not rebuilt


def test_rebuilds_are_spaced_by_the_minimum_period(monkeypatch) -> None:
    monkeypatch.setattr(dns_wiring, "REBUILD_MIN_PERIOD", 0.2)
    follower = CatalogFollower(AgentConfig())
    follower._offer(1, lambda: _snapshot(1))
    assert _port(follower) == 1
    follower._offer(2, lambda: _snapshot(2))
    assert _port(follower) == 1  # built moments ago: the previous view answers
    deadline = time.monotonic() + 5
    while _port(follower) != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _port(follower) == 2
