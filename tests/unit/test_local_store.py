"""The client agent's SQLite store (agent/local.py::LocalStore): what is written survives a reopen,
a change of several rows is all-or-nothing, and a change of one row costs one hand-off to
aiosqlite's thread (issue #9: BEGIN/statement/COMMIT were three for every registration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from lictor.agent.definitions import CheckSpec
from lictor.agent.local import LocalStore, _in_one_transaction


def _service(sid: str) -> dict[str, Any]:
    return {"ID": sid, "Service": "web", "Port": 8080, "Tags": ["v1"]}


def _check(cid: str, sid: str = "") -> CheckSpec:
    return CheckSpec(check_id=cid, name=cid, kind="ttl", service_id=sid, ttl=30.0)


async def _reopened(path: Path) -> tuple[list, list, dict]:
    store = LocalStore(str(path))
    await store.open()
    try:
        return await store.load()
    finally:
        await store.close()


class CountingConnection:
    """Forwards to a real aiosqlite connection and counts the calls that cross to its thread."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.calls: list[str] = []

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        self.calls.append(sql.split()[0])
        return await self.db.execute(sql, params)

    async def rollback(self) -> None:
        self.calls.append("ROLLBACK")
        await self.db.rollback()


async def test_writes_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    store = LocalStore(str(path))
    await store.open()
    await store.write(services=[(_service("web-1"), "api")])  # one row: the autocommit path
    await store.write(services=[(_service("web-2"), "api")], checks=[(_check("c2", "web-2"), "passing", "ok", None, "api")],
                      meta={"node_id": "n-1"})  # several rows: one transaction
    await store.write(delete_services=["web-1"])
    await store.update_check_states([("c2", "warning", "slow", 12.5)])
    await store.close()

    services, checks, meta = await _reopened(path)
    assert [(s["ID"], src) for s, src in services] == [("web-2", "api")]
    assert [(c.check_id, status, output, deadline) for c, status, output, deadline, _src in checks] == [
        ("c2", "warning", "slow", 12.5)]
    assert meta == {"node_id": "n-1"}


async def test_a_failing_row_leaves_none_of_the_change(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    store = LocalStore(str(path))
    await store.open()
    await store.write(services=[(_service("kept"), "api")])
    with pytest.raises(aiosqlite.Error):
        # The second row's value cannot be bound: the first, already executed, must be rolled back.
        await store.write(services=[(_service("new"), "api")], delete_services=["kept"],
                          meta={"bad": object()})  # type: ignore[dict-item]
    await store.write(services=[(_service("after"), "api")])  # the connection is usable again
    await store.close()

    services, _checks, _meta = await _reopened(path)
    assert sorted(s["ID"] for s, _ in services) == ["after", "kept"]


async def test_one_row_is_one_hand_off_several_are_one_transaction(tmp_path: Path) -> None:
    async with aiosqlite.connect(str(tmp_path / "t.db"), isolation_level=None) as db:
        await db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)")
        counting = CountingConnection(db)

        await _in_one_transaction(counting, [("INSERT INTO t VALUES (?, ?)", ("a", "1"))])  # type: ignore[arg-type]
        assert counting.calls == ["INSERT"]

        counting.calls.clear()
        await _in_one_transaction(counting, [("INSERT INTO t VALUES (?, ?)", ("b", "2")),  # type: ignore[arg-type]
                                             ("DELETE FROM t WHERE k = ?", ("a",))])
        assert counting.calls == ["BEGIN", "INSERT", "DELETE", "COMMIT"]

        counting.calls.clear()
        await _in_one_transaction(counting, [])  # type: ignore[arg-type]
        assert counting.calls == []
        assert await db.execute_fetchall("SELECT k, v FROM t") == [("b", "2")]
