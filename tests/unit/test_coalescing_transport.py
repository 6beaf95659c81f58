"""CoalescingTransport: writes of one loop iteration leave as one writelines call, in order, and
close/abort keep their meaning (no sockets: a recording transport)."""

from __future__ import annotations

import asyncio

from lictor.limits import CoalescingTransport


class Recorder:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.closed = self.aborted = False

    def writelines(self, chunks: list[bytes]) -> None:
        self.sent.append(list(chunks))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def _one_iteration() -> None:
    await asyncio.sleep(0)


def test_one_iteration_is_one_send_in_order() -> None:
    async def scenario() -> Recorder:
        raw = Recorder()
        transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"")
        transport.write(b"body")
        assert raw.sent == []  # held until the iteration ends
        await _one_iteration()
        transport.write(b"next")
        await _one_iteration()
        assert transport.get_extra_info("peername") == "info:peername"
        return raw

    raw = asyncio.run(scenario())
    assert raw.sent == [[b"HTTP/1.1 200 OK\r\n\r\n", b"body"], [b"next"]]


def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    async def scenario() -> tuple[Recorder, Recorder]:
        loop = asyncio.get_running_loop()
        closed, aborted = Recorder(), Recorder()
        first = CoalescingTransport(closed, loop)  # type: ignore[arg-type]
        first.write(b"408 reply")
        first.close()
        second = CoalescingTransport(aborted, loop)  # type: ignore[arg-type]
        second.write(b"dropped")
        second.abort()
        await _one_iteration()
        return closed, aborted

    closed, aborted = asyncio.run(scenario())
    assert closed.sent == [[b"408 reply"]] and closed.closed
    assert aborted.sent == [] and aborted.aborted
