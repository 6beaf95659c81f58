"""Threshold state machine and runner bookkeeping with fake probes (no sockets)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from lictor.agent.checks import CheckRunner, StatusHandler
from lictor.agent.definitions import CheckSpec, decode_check_registration
from lictor.errors import APIError, BadRequest, NotFound

P, W, C = "passing", "warning", "critical"


def feed(handler: StatusHandler, results: str) -> list[str | None]:
    names = {"p": P, "w": W, "c": C}
    return [handler.update(names[r]) for r in results]


def test_no_thresholds_reports_everything() -> None:
    assert feed(StatusHandler(), "pcwp") == [P, C, W, P]


def test_first_result_applies_immediately() -> None:
    assert feed(StatusHandler(3, 0, 3), "p") == [P]
    assert feed(StatusHandler(3, 0, 3), "c") == [C]


def test_success_before_passing() -> None:
    # After a failure the success counter restarts from 0: three successes needed.
    assert feed(StatusHandler(success_before_passing=3), "pcppp") == [P, C, None, None, P]


def test_failures_before_critical_and_warning() -> None:
    h = StatusHandler(failures_before_warning=2, failures_before_critical=4)
    assert feed(h, "pc") == [P, None]
    assert feed(h, "ccc") == [W, W, C]
    assert feed(h, "pc") == [P, None]


def test_failures_before_warning_defaults_to_critical() -> None:
    h = StatusHandler(failures_before_critical=2)
    assert h.failures_before_warning == 2
    assert feed(h, "pccc") == [P, None, C, C]


def test_warning_counts_as_success() -> None:
    h = StatusHandler(success_before_passing=2, failures_before_critical=2)
    assert feed(h, "cwcw") == [C, None, None, None]
    assert feed(h, "w") == [W]


# --- runner with fake probes ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, cid: str, status: str, output: str) -> None:
        self.events.append((cid, status, output))


async def wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def fast(spec: CheckSpec, interval: float) -> CheckSpec:
    spec.interval = interval  # below the 1 s API minimum: only for tests
    return spec


async def test_on_change_only_on_change_and_thresholds() -> None:
    results = iter([P, P, P, C, C, C, P])
    rec = Recorder()

    async def probe(spec: CheckSpec) -> tuple[str, str]:
        return next(results, P), "out"

    runner = CheckRunner(rec, probes={"tcp": probe}, rng=random.Random(1))
    spec = decode_check_registration(
        {"name": "t", "tcp": "127.0.0.1:1", "interval": "1s", "failures_before_critical": 2}
    )
    runner.add(fast(spec, 0.02))
    try:
        await wait_for(lambda: runner.runs("t") >= 7)
    finally:
        await runner.close()
    # P (change), P, P (no change), C (withheld), C (critical), C (same), P
    assert [e[1] for e in rec.events[:3]] == [P, C, P]


async def test_ttl_update_errors_and_status() -> None:
    rec = Recorder()
    runner = CheckRunner(rec)

    async def never(spec: CheckSpec) -> tuple[str, str]:
        return P, ""

    runner._probes["tcp"] = never
    try:
        runner.add(decode_check_registration({"name": "ttl", "ttl": "30s"}))
        runner.add(decode_check_registration({"name": "tcp", "tcp": "h:1", "interval": "30s"}))
        assert runner.status("ttl") == (C, "")
        with pytest.raises(NotFound):
            runner.ttl_update("nope", P, "")
        with pytest.raises(APIError) as info:
            runner.ttl_update("tcp", P, "")
        assert info.value.status == 500 and info.value.message == 'CheckID "tcp" does not have associated TTL'
        with pytest.raises(BadRequest):
            runner.ttl_update("ttl", "up", "")
        runner.ttl_update("ttl", P, "fine")
        runner.ttl_update("ttl", P, "fine")  # unchanged: no second event
        assert runner.status("ttl") == (P, "fine")
        assert rec.events == [("ttl", P, "fine")]
        assert runner.critical_since("ttl") is None
        assert 29 < (runner.ttl_deadline("ttl") or 0) - time.time() <= 30
        assert runner.remove("ttl") and not runner.remove("ttl")
        assert runner.status("ttl") is None
    finally:
        await runner.close()


async def test_ttl_restore() -> None:
    rec = Recorder()
    runner = CheckRunner(rec)
    spec = decode_check_registration({"name": "t", "ttl": "10s"})
    try:
        runner.add(spec, initial_status=P, initial_output="kept", ttl_deadline=time.time() + 5)
        assert runner.status("t") == (P, "kept")
        assert 4 < (runner.ttl_deadline("t") or 0) - time.time() <= 5
        # An expired persisted deadline is not restored (Consul drops expired TTL state).
        runner.add(spec, initial_status=P, initial_output="old", ttl_deadline=time.time() - 1)
        assert runner.status("t") == (C, "")
    finally:
        await runner.close()


async def test_alias_worst_status_and_missing_service() -> None:
    health: dict[str, list[object] | None] = {"web": [P, P]}
    rec = Recorder()
    runner = CheckRunner(rec, alias_source=lambda sid: health.get(sid), node_name="n1", alias_interval=0.05)
    try:
        runner.add(decode_check_registration({"name": "a", "alias_service": "web"}))
        await wait_for(lambda: runner.status("a") == (P, "All checks passing."))
        health["web"] = [P, (W, "mem", "high"), P]
        runner.alias_changed("web")
        assert runner.status("a") == (W, "Aliased check 'mem' failing: high")
        health["web"] = [W, C]
        runner.alias_changed()
        assert runner.status("a") == (C, "Aliased check failing (critical)")
        health["web"] = []
        runner.alias_changed("web")
        assert runner.status("a") == (P, "No checks found.")
        del health["web"]
        await wait_for(lambda: runner.status("a") == (C, "Service web could not be found on node n1"))
    finally:
        await runner.close()


async def test_reap_due_respects_minimum() -> None:
    runner = CheckRunner(Recorder(), deregister_min=0.0)
    try:
        spec = decode_check_registration(
            {"name": "t", "ttl": "10s", "serviceid": "web", "deregister_critical_service_after": "100ms"}
        )
        runner.add(spec)
        node = decode_check_registration(
            {"name": "n", "ttl": "10s", "deregister_critical_service_after": "1ms"}
        )
        runner.add(node)
        since = runner.critical_since("t")
        assert since is not None
        assert runner.reap_due(since + 0.05) == []
        assert runner.reap_due(since + 0.2) == ["t"]  # node checks are never reaped
        runner.deregister_min = 60.0
        assert runner.reap_due(since + 0.2) == []
        runner.ttl_update("t", P, "")
        runner.deregister_min = 0.0
        assert runner.reap_due(since + 100) == []
    finally:
        await runner.close()


async def test_probe_exception_is_critical_not_fatal() -> None:
    rec = Recorder()

    async def boom(spec: CheckSpec) -> tuple[str, str]:
        raise RuntimeError("bug")

    runner = CheckRunner(rec, probes={"tcp": boom})
    try:
        runner.add(
            decode_check_registration({"name": "t", "tcp": "h:1", "interval": "1s", "status": "passing"})
        )
        await wait_for(lambda: runner.status("t") is not None and runner.status("t")[0] == C, timeout=3)  # type: ignore[index]
    finally:
        await runner.close()
    assert "bug" in rec.events[0][2]


async def test_concurrency_is_bounded() -> None:
    active = 0
    peak = 0

    async def slow(spec: CheckSpec) -> tuple[str, str]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        return P, ""

    runner = CheckRunner(Recorder(), probes={"tcp": slow}, max_concurrency=8)
    try:
        for i in range(100):
            runner.add(
                fast(decode_check_registration({"name": f"c{i}", "tcp": "h:1", "interval": "1s"}), 0.05)
            )
        await wait_for(lambda: all(runner.runs(f"c{i}") >= 1 for i in range(100)))
    finally:
        await runner.close()
    assert peak == 8
