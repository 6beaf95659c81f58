"""The client agent's lean HTTP/1.1 client to the servers (agent/server_http.py) against small loopback
servers that misbehave on purpose: keep-alive reuse, a server closing idle connections, chunked
bodies, silence, garbage, and header values that would split the request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from lictor.agent.server_http import ServerHTTP, ServerHTTPError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int, list[int]]:
    """A loopback server; the list counts accepted connections."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    for _ in range(1000):
        try:
            line, headers, body = await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        payload = f"{line}|{headers.get('x-consul-token', '')}|".encode() + body
        writer.write(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        await writer.drain()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def test_keep_alive_reuses_one_connection_and_relays_everything() -> None:
    async def main() -> None:
        server, port, accepted = await serve(echo_forever)
        client = ServerHTTP()
        try:
            for i in range(20):
                resp = await client.request("PUT", f"http://127.0.0.1:{port}/v1/kv/a b?flags={i}",
                                            headers={"X-Consul-Token": "t"}, content=b"v%d" % i)
                assert resp.status_code == 200
                assert resp.headers.get("x-consul-index") == "7" and resp.headers["X-Consul-Index"] == "7"
                assert resp.text == f"PUT /v1/kv/a%20b?flags={i} HTTP/1.1|t|v{i}"
            assert len(accepted) == 1
        finally:
            await client.close()
            server.close()

    run(main())


def test_a_server_closing_an_idle_connection_costs_a_retry_not_an_error() -> None:
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # Claims keep-alive, then closes as soon as the answer is out (an idle timeout, compressed).
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def main() -> None:
        server, port, accepted = await serve(one_per_connection)
        client = ServerHTTP()
        try:
            for _ in range(5):
                assert (await client.request("PUT", f"http://127.0.0.1:{port}/x", content=b"1")).content == b"ok"
                await asyncio.sleep(0.05)
            assert len(accepted) == 5
        finally:
            await client.close()
            server.close()

    run(main())


def test_a_request_racing_the_servers_idle_close_is_sent_again_on_a_new_connection() -> None:
    async def closes_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the next request arrives as we decide to close: never answered

    async def main() -> None:
        server, port, accepted = await serve(closes_after_one)
        client = ServerHTTP()
        try:
            for _ in range(3):
                assert (await client.request("GET", f"http://127.0.0.1:{port}/x")).content == b"ok"
            assert len(accepted) == 3  # every reuse hit a closing connection and was retried once
        finally:
            await client.close()
            server.close()

    run(main())


def test_chunked_body_and_connection_close() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server, port, _ = await serve(chunked)
        client = ServerHTTP()
        try:
            resp = await client.request("GET", f"http://127.0.0.1:{port}/v1/snapshot")
            assert resp.content == b"hello world"
            assert not client._idle.get(("http", "127.0.0.1", port))  # Connection: close is honoured
        finally:
            await client.close()
            server.close()

    run(main())


@pytest.mark.parametrize("answer", [b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"])
def test_broken_answers_raise_instead_of_hanging(answer: bytes) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def main() -> None:
        server, port, _ = await serve(broken)
        client = ServerHTTP()
        try:
            with pytest.raises(ServerHTTPError):
                await client.request("GET", f"http://127.0.0.1:{port}/v1/status/leader", timeout=5)
        finally:
            await client.close()
            server.close()

    run(main())


def test_silence_times_out_and_refused_connections_raise() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def main() -> None:
        server, port, _ = await serve(silent)
        client = ServerHTTP()
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(ServerHTTPError, match="no answer"):
                await client.request("GET", f"http://127.0.0.1:{port}/v1/kv/x", timeout=0.3)
            assert asyncio.get_running_loop().time() - started < 2
            server.close()
            await server.wait_closed()
            with pytest.raises(ServerHTTPError, match="cannot connect"):
                await client.request("GET", f"http://127.0.0.1:{port}/v1/kv/x", timeout=1)
        finally:
            await client.close()

    run(main())


def test_header_values_cannot_split_the_request() -> None:
    async def main() -> None:
        client = ServerHTTP()
        with pytest.raises(ServerHTTPError, match="line break"):
            await client.request("GET", "http://127.0.0.1:1/x", headers={"X-Consul-Token": "a\r\nX-Evil: 1"})

    run(main())
