"""Blocking-query coalescing (httpapi.blocking with a feed's `coalesce`): a query woken soon after it
arrived answers at the coalescing mark with everything that changed meanwhile; a change after the
mark, a query already behind, and the `wait` deadline are not delayed. Real ChangeFeed, no sockets.

Timing: only lower bounds are tight (an answer never comes before its mark, which the loop's clock
guarantees); upper bounds have hundreds of milliseconds of slack for a busy CI machine."""

from __future__ import annotations

import asyncio
from typing import Any

from lictor.httpapi import QueryOptions, blocking
from lictor.registry.raft import ChangeFeed


class Resource:
    """A resource with an index; `change` bumps it and notifies the feed, as an applied write does."""

    def __init__(self, feed: ChangeFeed, index: int = 10) -> None:
        self.feed, self.index, self.reads = feed, index, 0

    def read(self) -> tuple[int, Any]:
        self.reads += 1
        return self.index, {"index": self.index}

    def change(self) -> None:
        self.index += 1
        self.feed.notify()


def new_feed(coalesce: float) -> ChangeFeed:
    feed = ChangeFeed()
    feed.bind(asyncio.get_running_loop())
    feed.coalesce = coalesce
    return feed


def opts(index: int, wait: float = 30.0) -> QueryOptions:
    return QueryOptions(index=index, wait=wait, consistent=False, stale=False)


def test_changes_soon_after_arrival_are_answered_together_at_the_mark() -> None:
    async def scenario() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        feed = new_feed(0.3)
        res = Resource(feed)
        start = loop.time()
        query = asyncio.create_task(blocking(opts(res.index), feed, res.read))
        await asyncio.sleep(0.02)
        res.change()  # wakes the query 20 ms after it arrived: held to the 300 ms mark
        await asyncio.sleep(0.1)
        res.change()  # during the hold: goes out in the same answer
        index, _ = await asyncio.wait_for(query, 5)
        return loop.time() - start, index

    elapsed, index = asyncio.run(scenario())
    assert elapsed >= 0.3
    assert elapsed < 1.5
    assert index == 12  # both changes, one answer


def delay_after_one_change(coalesce: float, quiet: float) -> tuple[float, int]:
    """Park a query, change the resource `quiet` seconds later: (seconds from the change to the
    answer, the index answered)."""

    async def scenario() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        feed = new_feed(coalesce)
        res = Resource(feed)
        query = asyncio.create_task(blocking(opts(res.index), feed, res.read))
        await asyncio.sleep(quiet)
        changed_at = loop.time()
        res.change()
        index, _ = await asyncio.wait_for(query, 5)
        return loop.time() - changed_at, index

    return asyncio.run(scenario())


def test_a_change_after_the_mark_is_answered_at_once() -> None:
    delay, index = delay_after_one_change(0.05, quiet=0.3)  # quiet past the mark
    assert index == 11
    assert delay < 0.5  # not held (a hold would not apply at all; this only bounds a slow machine)


def test_an_index_already_behind_returns_without_waiting() -> None:
    async def scenario() -> tuple[float, int, int]:
        loop = asyncio.get_running_loop()
        feed = new_feed(5.0)
        res = Resource(feed, index=20)
        start = loop.time()
        index, _ = await asyncio.wait_for(blocking(opts(15), feed, res.read), 5)
        return loop.time() - start, index, res.reads

    elapsed, index, reads = asyncio.run(scenario())
    assert (index, reads) == (20, 1)
    assert elapsed < 1.0


def test_the_hold_never_passes_the_wait_deadline() -> None:
    async def scenario() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        feed = new_feed(5.0)
        res = Resource(feed)
        start = loop.time()
        query = asyncio.create_task(blocking(opts(res.index, wait=0.2), feed, res.read))
        await asyncio.sleep(0.05)
        res.change()
        index, _ = await asyncio.wait_for(query, 5)
        return loop.time() - start, index

    elapsed, index = asyncio.run(scenario())
    assert index == 11
    assert 0.05 <= elapsed < 0.2 * (1 + 1 / 16) + 1.0  # the deadline (with its jitter), not the 5 s mark


def test_off_answers_as_soon_as_the_change_is_seen() -> None:
    delay, index = delay_after_one_change(0.0, quiet=0.02)
    assert index == 11
    assert delay < 0.5

