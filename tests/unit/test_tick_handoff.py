"""TickHandoff: what the Raft tick thread posts reaches the event loop once per tick, in order; posts
from any other thread go at once (no sockets, a plain thread stands in for pysyncobj's)."""

from __future__ import annotations

import asyncio
import threading

from lictor.registry.raft import ChangeFeed, TickHandoff


def test_tick_thread_posts_wait_for_flush_and_keep_their_order() -> None:
    async def scenario() -> tuple[list[int], list[int], list[int]]:
        loop = asyncio.get_running_loop()
        handoff = TickHandoff()
        handoff.bind(loop)
        got: list[int] = []
        before_flush: list[int] = []

        def tick() -> None:
            handoff.flush()  # the first tick's callback: this thread is now the tick thread
            for n in range(5):
                handoff.post(got.append, n)

        thread = threading.Thread(target=tick)
        thread.start()
        thread.join(5)
        for _ in range(5):
            await asyncio.sleep(0)
        before_flush[:] = got  # nothing delivered until the tick ends
        thread = threading.Thread(target=handoff.flush)
        handoff._tick_thread = None  # flush records whichever thread ticks
        thread.start()
        thread.join(5)
        for _ in range(50):
            if len(got) == 5:
                break
            await asyncio.sleep(0.01)
        elsewhere: list[int] = []
        handoff.post(elsewhere.append, 9)  # the loop's own thread is not the tick thread: at once
        for _ in range(50):
            if elsewhere:
                break
            await asyncio.sleep(0.01)
        return before_flush, got, elsewhere

    before_flush, got, elsewhere = asyncio.run(scenario())
    assert before_flush == []
    assert got == [0, 1, 2, 3, 4]
    assert elsewhere == [9]


def test_a_failing_item_does_not_drop_the_rest() -> None:
    async def scenario() -> list[str]:
        handoff = TickHandoff()
        handoff.bind(asyncio.get_running_loop())
        got: list[str] = []

        def boom() -> None:
            raise RuntimeError("bad callback")

        def tick() -> None:
            handoff.flush()
            handoff.post(boom)
            handoff.post(got.append, "after")
            handoff.flush()

        thread = threading.Thread(target=tick)
        thread.start()
        thread.join(5)
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(scenario()) == ["after"]


def test_change_feed_notified_on_the_tick_thread_wakes_after_the_tick() -> None:
    async def scenario() -> tuple[bool, int]:
        loop = asyncio.get_running_loop()
        handoff = TickHandoff()
        handoff.bind(loop)
        feed = ChangeFeed(handoff)
        feed.bind(loop)
        gate = threading.Event()

        def tick() -> None:
            handoff.flush()
            feed.notify()
            gate.wait(5)  # the tick is still running: the waiter must not have been woken
            handoff.flush()

        waiter = asyncio.create_task(feed.wait(feed.generation, 5.0))
        await asyncio.sleep(0)
        thread = threading.Thread(target=tick)
        thread.start()
        await asyncio.sleep(0.1)
        during = waiter.done()  # the change is counted at once (generation), delivered after the tick
        gate.set()
        await asyncio.wait_for(waiter, 5)
        thread.join(5)
        return during, feed.generation

    during, after = asyncio.run(scenario())
    assert (during, after) == (False, 1)


def test_compaction_thresholds_are_drawn_per_server_above_the_minimum() -> None:
    from lictor.registry.raft import compaction_jitter

    drawn = [compaction_jitter(5000) for _ in range(200)]
    assert all(5000 <= d <= 7500 for d in drawn)
    assert len(set(drawn)) > 100  # servers started together do not compact together
