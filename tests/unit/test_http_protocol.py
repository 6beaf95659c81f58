"""The HTTP/1.1 protocol every agent serves with (lictor.limits.GuardedHttpTools + LeanCycle), on a
real uvicorn server on loopback with raw sockets: response framing as uvicorn's, header names and
values still refused when they could split a response, and the one re-armed keep-alive timer closes
idle connections, never one whose request is still running."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from lictor.limits import GuardedHttpTools

KEEP_ALIVE = 0.4


async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    path = scope["path"]
    if path == "/slow":
        await asyncio.sleep(KEEP_ALIVE * 3)
    if path == "/chunked":  # no Content-Length: uvicorn's framing chooses chunked
        await send({"type": "http.response.start", "status": 200, "headers": [(b"Content-Type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b"def"})
        return
    if path == "/bad-value":
        headers = [(b"content-length", b"2"), (b"x-echo", b"a\r\nset-cookie: injected=1")]
    elif path == "/bad-name":
        headers = [(b"content-length", b"2"), (b"x bad", b"1")]
    elif path == "/close":
        headers = [(b"content-length", b"2"), (b"Connection", b"close")]
    else:
        headers = [(b"Content-Length", b"2"), (b"X-Consul-Index", b"7"), (b"X-Tab", b"a\tb")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def serving() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=GuardedHttpTools, lifespan="off", log_level="critical",
                            timeout_keep_alive=KEEP_ALIVE, loop="none", access_log=False)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(100):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 5)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bytes:
    """One request; the answer's head and body, or what arrived before the server closed."""
    writer.write(request)
    head = b""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    if request.startswith(b"HEAD "):
        return head  # its Content-Length describes the GET's body, which a HEAD answer leaves out
    if b"transfer-encoding: chunked" in head:
        return head + await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 3)
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0]) if b"content-length: " in head else 0
    return head + await asyncio.wait_for(reader.readexactly(length), 3)


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def run(scenario: Callable[[int], Any]) -> Any:
    async def main() -> Any:
        async with serving() as port:
            return await scenario(port)

    return asyncio.run(main())


def test_framing_and_headers_as_uvicorn_writes_them() -> None:
    async def scenario(port: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = [await exchange(reader, writer, get(p)) for p in ("/", "/chunked")]
        answers.append(await exchange(reader, writer, get("/", "HEAD")))
        writer.close()
        return answers

    plain, chunked, head = run(scenario)
    assert plain.startswith(b"HTTP/1.1 200 OK\r\n") and plain.endswith(b"\r\n\r\nok")
    assert b"content-length: 2\r\n" in plain and b"x-consul-index: 7\r\n" in plain  # names lower-cased
    assert b"x-tab: a\tb\r\n" in plain  # a tab inside a value is legal
    assert b"transfer-encoding: chunked\r\n" in chunked and chunked.endswith(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")


def test_header_that_could_split_the_response_is_never_sent() -> None:
    async def scenario(port: int) -> list[bytes]:
        out = []
        for path in ("/bad-value", "/bad-name"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            out.append(await exchange(reader, writer, get(path)))
            writer.close()
        return out

    for answer in run(scenario):
        assert b"injected" not in answer and b"x bad" not in answer
        assert not answer.startswith(b"HTTP/1.1 200"), answer


def test_connection_close_from_the_app_closes_after_the_answer() -> None:
    async def scenario(port: int) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await exchange(reader, writer, get("/close"))
        rest = await asyncio.wait_for(reader.read(), 3)
        writer.close()
        return answer, rest

    answer, rest = run(scenario)
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower() and rest == b""


def test_idle_keep_alive_connection_is_closed_and_busy_one_is_not() -> None:
    async def scenario(port: int) -> tuple[int, float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Requests for longer than the timeout, each pause shorter than it: the connection stays.
        served, until = 0, time.monotonic() + KEEP_ALIVE * 2.5
        while time.monotonic() < until and served < 200:
            assert (await exchange(reader, writer, get("/"))).endswith(b"ok")
            idle_from = time.monotonic()
            served += 1
            await asyncio.sleep(KEEP_ALIVE / 4)
        # Then idle: closed about KEEP_ALIVE after the last answer.
        assert await asyncio.wait_for(reader.read(), KEEP_ALIVE * 10) == b""
        idle_for = time.monotonic() - idle_from
        writer.close()
        # A request running for three times the timeout still gets its answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await exchange(reader, writer, get("/"))).endswith(b"ok")
        slow = await exchange(reader, writer, get("/slow"))
        writer.close()
        return served, idle_for, slow

    served, idle_for, slow = run(scenario)
    assert served >= 5
    assert KEEP_ALIVE * 0.8 <= idle_for <= KEEP_ALIVE * 5, idle_for
    assert slow.startswith(b"HTTP/1.1 200") and slow.endswith(b"ok")
