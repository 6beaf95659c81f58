"""Shared fixtures: real agent processes on loopback, torn down by pid."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import AgentProc, Cluster, free_ports  # noqa: E402


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 3).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def dev_agent(tmp_path: Path) -> Iterator[AgentProc]:
    http_port, dns_port = free_ports(2)
    agent = AgentProc(
        "dev", http_port, ["-dev", "-node", "dev", "-http-port", str(http_port), "-dns-port", str(dns_port)],
        tmp_path / "dev.log", dns_port=dns_port,
    )
    agent.start()
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.kill()
