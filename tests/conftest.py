"""Shared fixtures: real agent processes on loopback, torn down by pid."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import AgentProc, Cluster, running_dev_agent  # noqa: E402


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 3).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def dev_agent(tmp_path: Path) -> Iterator[AgentProc]:
    with running_dev_agent(tmp_path, "dev") as agent:
        yield agent
