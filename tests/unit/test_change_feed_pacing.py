"""ChangeFeed wakes blocking queries a few per event-loop iteration, in arrival order, and all of them
(no sockets)."""

from __future__ import annotations

import asyncio
import threading

from lictor.registry import raft
from lictor.registry.raft import ChangeFeed


def test_waiters_are_woken_a_few_per_iteration_in_order_and_all_of_them() -> None:
    async def scenario() -> tuple[list[tuple[int, int]], int]:
        feed = ChangeFeed()
        feed.bind(asyncio.get_running_loop())
        iteration = 0
        woken: list[tuple[int, int]] = []  # (waiter, loop iteration it resumed in)

        async def waiter(n: int) -> None:
            await feed.wait(feed.generation, 5.0)
            woken.append((n, iteration))

        tasks = [asyncio.create_task(waiter(n)) for n in range(7)]
        await asyncio.sleep(0)  # every waiter is parked
        feed.notify()
        for _ in range(20):  # count loop iterations while they wake
            await asyncio.sleep(0)
            iteration += 1
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return woken, feed.generation

    woken, generation = asyncio.run(scenario())
    assert generation == 1
    assert [n for n, _ in woken] == list(range(7))
    per_iteration: dict[int, int] = {}
    for _, it in woken:
        per_iteration[it] = per_iteration.get(it, 0) + 1
    assert max(per_iteration.values()) <= raft.WAKE_PER_ITERATION
    assert len(per_iteration) >= 7 // raft.WAKE_PER_ITERATION


def test_close_still_releases_every_waiter() -> None:
    async def scenario() -> int:
        feed = ChangeFeed()
        feed.bind(asyncio.get_running_loop())
        tasks = [asyncio.create_task(feed.wait(0, 30.0)) for _ in range(9)]
        await asyncio.sleep(0)
        feed.close()
        done, _ = await asyncio.wait(tasks, timeout=5)
        return len(done)

    assert asyncio.run(scenario()) == 9


def test_a_waiter_whose_view_is_unchanged_sleeps_through_other_changes() -> None:
    async def scenario() -> tuple[bool, bool, int]:
        feed = ChangeFeed()
        feed.bind(asyncio.get_running_loop())
        stamp = {"web": 5}
        checks = 0

        def unchanged() -> bool:
            nonlocal checks
            checks += 1
            return stamp["web"] == 5

        watcher = asyncio.create_task(feed.wait(feed.generation, 5.0, unchanged))
        plain = asyncio.create_task(feed.wait(feed.generation, 5.0))
        await asyncio.sleep(0)
        feed.notify()  # a write elsewhere (a KV key, another service)
        for _ in range(5):
            await asyncio.sleep(0)
        after_unrelated = watcher.done()
        stamp["web"] = 6  # now a change to what it reads
        feed.notify()
        await asyncio.wait_for(watcher, 5)
        return after_unrelated, plain.done(), checks

    after_unrelated, plain_woken, checks = asyncio.run(scenario())
    assert not after_unrelated and plain_woken
    assert checks == 2


def test_a_parked_waiter_that_timed_out_is_dropped_not_kept() -> None:
    async def scenario() -> int:
        feed = ChangeFeed()
        feed.bind(asyncio.get_running_loop())
        await feed.wait(feed.generation, 0.02, lambda: True)  # times out
        feed.notify()
        for _ in range(3):
            await asyncio.sleep(0)
        return len(feed._waiters)

    assert asyncio.run(scenario()) == 0


def test_close_releases_waiters_whose_view_is_unchanged() -> None:
    async def scenario() -> bool:
        feed = ChangeFeed()
        feed.bind(asyncio.get_running_loop())
        task = asyncio.create_task(feed.wait(feed.generation, 30.0, lambda: True))
        await asyncio.sleep(0)
        feed.close()
        await asyncio.wait_for(task, 5)
        return task.done()

    assert asyncio.run(scenario())


def test_a_failing_change_check_wakes_its_waiter_and_spares_the_others() -> None:
    async def scenario() -> int:
        feed = ChangeFeed()
        feed.bind(asyncio.get_running_loop())

        def broken() -> bool:
            raise KeyError("gone")

        tasks = [asyncio.create_task(feed.wait(feed.generation, 5.0, broken)),
                 asyncio.create_task(feed.wait(feed.generation, 5.0))]
        await asyncio.sleep(0)
        feed.notify()
        done, _ = await asyncio.wait(tasks, timeout=5)
        return len(done)

    assert asyncio.run(scenario()) == 2


def test_a_change_no_parked_waiter_sees_does_not_wake_the_loop() -> None:
    """The checks run on the notifying thread (the Raft tick thread in a server): when every parked
    waiter's view is unchanged, nothing is handed to the loop at all."""

    async def scenario() -> tuple[int, int, int, bool, int]:
        loop = asyncio.get_running_loop()
        feed = ChangeFeed()
        feed.bind(loop)
        stamp = {"web": 5}
        handed: list[object] = []
        real = loop.call_soon_threadsafe

        def counting(callback, *args):  # noqa: ANN001, ANN202 - the loop's own signature
            handed.append(callback)
            return real(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        watcher = asyncio.create_task(feed.wait(feed.generation, 5.0, lambda: stamp["web"] == 5))
        await asyncio.sleep(0)
        unrelated = threading.Thread(target=feed.notify)  # a KV write, applied on another thread
        unrelated.start()
        unrelated.join(5)
        handed_after_unrelated = len(handed)
        stamp["web"] = 6
        related = threading.Thread(target=feed.notify)
        related.start()
        related.join(5)
        await asyncio.wait_for(watcher, 5)
        return handed_after_unrelated, len(handed), feed.wakes_skipped, watcher.done(), feed.generation

    handed_unrelated, handed_total, skipped, woken, generation = asyncio.run(scenario())
    assert (handed_unrelated, handed_total, skipped, woken, generation) == (0, 1, 1, True, 2)


def test_a_query_between_its_read_and_its_wait_sees_a_change_nobody_was_woken_for() -> None:
    """The generation moves with every change, woken or not: a query that read the state before a
    change and parks after it returns at once instead of sleeping through it."""

    async def scenario() -> bool:
        feed = ChangeFeed()
        feed.bind(asyncio.get_running_loop())
        generation = feed.generation  # read ...
        feed.notify()  # ... a change lands, no waiter is parked ...
        task = asyncio.create_task(feed.wait(generation, 5.0, lambda: True))  # ... then it parks
        await asyncio.sleep(0)
        return task.done()

    assert asyncio.run(scenario())


def test_changes_while_a_wake_is_pending_are_checked_when_it_runs() -> None:
    """Several changes in one tick hand over one wake; a waiter whose view changed in a later one
    of them is checked and woken by that same wake."""

    async def scenario() -> tuple[bool, bool, int]:
        feed = ChangeFeed()
        feed.bind(asyncio.get_running_loop())
        stamp = {"web": 5}
        plain = asyncio.create_task(feed.wait(feed.generation, 5.0))
        watcher = asyncio.create_task(feed.wait(feed.generation, 5.0, lambda: stamp["web"] == 5))
        await asyncio.sleep(0)
        feed.notify()  # wakes `plain`; the wake is pending until the loop runs it
        stamp["web"] = 6
        feed.notify()  # pending: only noted
        done, _ = await asyncio.wait([plain, watcher], timeout=5)
        return plain in done, watcher in done, feed.wakes_skipped

    assert asyncio.run(scenario()) == (True, True, 0)
