"""The sidecar's inbound http listener with tracing and an access log on, in process: spans start
under the caller's context after the intention decision, the app sees the span's context, responses
(pipelined too) end their spans with their status, denials end with 403 (issue #7)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lictor.agent.proxy.authz import Authorizer
from lictor.agent.proxy.balancer import Endpoint
from lictor.agent.proxy.config import ProxySpec, UpstreamSpec
from lictor.agent.proxy.inbound import InboundListener, _InReq, _ObservedApp
from lictor.agent.proxy.observe import Observer, ObserveSettings, settings_from_config
from lictor.agent.proxy.outbound import Upstream
from lictor.agent.proxy.state import ProxyState
from lictor.agent.proxy.tls import TLSMaterial, client_context, server_context
from lictor.registry import ca
from lictor.tracing import SERVER, MemoryExporter, Tracer

TD = "11111111-2222-3333-4444-555555555555.consul"
NOW = datetime.now(UTC)
ROOT = ca.generate_root(TD, now=NOW)


def material(service: str) -> TLSMaterial:
    leaf = ca.sign_leaf(ROOT, service, TD, "dc1", NOW, ttl_seconds=3600)
    return TLSMaterial(leaf.CertPEM, leaf.PrivateKeyPEM, (ROOT.RootCert,), TD)


def _spec(name: str, app_port: int) -> ProxySpec:
    return ProxySpec(f"{name}-sidecar-proxy", name, name, 0, "127.0.0.1", "127.0.0.1", app_port, ())

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"


async def _app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each request with its traceparent as the body; /teapot gets 418, HEAD gets no body."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path = lines[0].split()[:2]
            hdrs = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            length = int(hdrs.get("content-length", "0"))
            if length:
                await reader.readexactly(length)
            body = hdrs.get("traceparent", "-").encode()
            status = b"418" if path == "/teapot" else b"200"
            writer.write(b"HTTP/1.1 %b X\r\ncontent-length: %d\r\n\r\n%b"
                         % (status, len(body), b"" if method == "HEAD" else body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class Env:
    def __init__(self, exporter: MemoryExporter, log: Path, port: int, observer: Observer) -> None:
        self.exporter, self.log, self.port, self.observer = exporter, log, port, observer

    async def request(self, raw: bytes, responses: int = 1, no_body: tuple[int, ...] = ()) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(raw)
        out = []
        for i in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(next(x.split(b": ")[1] for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")))
            body = await asyncio.wait_for(reader.readexactly(length), 10) if i not in no_body else b""
            out.append(head.split(b"\r\n")[0] + b"|" + body)
        writer.close()
        return out

    def lines(self) -> list[dict]:
        assert self.observer.access_log is not None and self.observer.access_log.flush(5)
        return [json.loads(x) for x in self.log.read_text().splitlines()]


@contextlib.asynccontextmanager
async def _env(tmp_path: Path, access_log: bool) -> AsyncIterator[Env]:
    app = await asyncio.start_server(_app, "127.0.0.1", 0)
    srv_mat = material("api")
    observer = Observer("api", ObserveSettings(access_log=str(tmp_path / "access.jsonl") if access_log else ""))
    exporter = MemoryExporter()
    observer.tracer = Tracer("api", exporter, 1.0)
    authz = Authorizer("api")
    authz.replace([{"SourceName": "web", "SourceNS": "default", "DestinationName": "api", "DestinationNS": "default",
                   "Action": "", "Precedence": 9, "Permissions": [
        {"Action": "deny", "HTTP": {"PathPrefix": "/forbidden"}}, {"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}])
    state = ProxyState(_spec("api", app.sockets[0].getsockname()[1]), authz, trust_domain=TD,
                       own_uri=f"spiffe://{TD}/ns/default/dc/dc1/svc/api", l7=True,
                       server_ctx=server_context(srv_mat), client_ctx=client_context(srv_mat), obs=observer)
    inbound = InboundListener(state, "127.0.0.1", 0)
    await inbound.start()
    cli_mat = material("web")
    client_state = ProxyState(_spec("web", 1), Authorizer("web"), trust_domain=TD,
                              server_ctx=server_context(cli_mat), client_ctx=client_context(cli_mat))
    upstream = Upstream(client_state, UpstreamSpec("api", "127.0.0.1", 0, connect_timeout=2.0))
    await upstream.start()
    assert upstream.server is not None
    upstream.set_endpoints([Endpoint("127.0.0.1", inbound.port, "api")])
    try:
        yield Env(exporter, tmp_path / "access.jsonl", upstream.server.sockets[0].getsockname()[1], observer)
    finally:
        await upstream.stop()
        await inbound.stop()
        observer.close()
        app.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with _env(tmp_path, access_log=True) as e:
        yield e


@pytest.fixture
async def env_traced_only(tmp_path: Path) -> AsyncIterator[Env]:
    """Tracing without an access log: unsampled requests take the no-record path (`Tracer.hop`)."""
    async with _env(tmp_path, access_log=False) as e:
        yield e


async def test_inbound_span_continues_the_callers_trace(env: Env) -> None:
    (resp,) = await env.request(f"GET /a?b=1 HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-01\r\n"
                                f"tracestate: k=v\r\n\r\n".encode())
    status, seen = resp.split(b"|")
    assert b" 200 " in status
    (span,) = env.exporter.spans
    assert span.kind == SERVER and span.name == "inbound api" and span.trace_id == TID and span.parent_id == SID
    assert seen.decode() == f"00-{TID}-{span.span_id}-01"  # the app sees our span, not the caller's
    a = span.attrs
    assert a["service"] == "api" and a["lictor.intention"] == "allow" and a["url.path"] == "/a"
    assert a["peer.spiffe_id"].endswith("/svc/web") and a["http.response.status_code"] == 200
    (line,) = env.lines()
    assert line["trace_id"] == TID and line["span_id"] == span.span_id and line["intention"] == "allow"
    assert line["source"] == "web" and line["destination"] == "api" and line["status"] == 200
    assert line["bytes_sent"] == len(seen) and line["path"] == "/a"


async def test_pipelined_requests_pair_with_their_responses(env: Env) -> None:
    raw = (b"GET /one HTTP/1.1\r\nhost: x\r\n\r\n"
           b"POST /teapot HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
           b"HEAD /two HTTP/1.1\r\nhost: x\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(raw)
    statuses = []
    for i in range(3):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        statuses.append(head.split()[1])
        if i < 2:
            await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
    assert statuses == [b"200", b"418", b"200"]
    # after a HEAD (its response has a content-length and no body) the connection is still observed
    writer.write(b"GET /three HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
    writer.close()
    by_path = {s.attrs["url.path"]: s for s in env.exporter.spans}
    assert {p: s.attrs["http.response.status_code"] for p, s in by_path.items()} == {
        "/one": 200, "/two": 200, "/teapot": 418, "/three": 200}
    assert len({s.trace_id for s in by_path.values()}) == 4  # no context: each starts a trace
    lines = {x["path"]: x for x in env.lines()}
    assert lines["/teapot"]["bytes_received"] == 3 and lines["/teapot"]["status"] == 418
    assert lines["/two"]["bytes_sent"] == 0 and lines["/one"]["bytes_sent"] == 55  # the traceparent the app saw


async def test_denied_request_ends_with_403(env: Env) -> None:
    (resp,) = await env.request(f"GET /forbidden HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-01\r\n\r\n"
                                .encode())
    assert b" 403 " in resp
    (span,) = env.exporter.spans
    assert span.attrs["http.response.status_code"] == 403 and span.attrs["lictor.intention"] == "deny"
    assert span.error == "denied by intention"
    (line,) = env.lines()
    assert line["intention"] == "deny" and line["status"] == 403 and line["trace_id"] == TID


async def test_unsampled_caller_is_passed_on_and_not_recorded(env: Env) -> None:
    (resp,) = await env.request(f"GET / HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-00\r\n\r\n".encode())
    seen = resp.split(b"|")[1].decode()
    assert seen.startswith(f"00-{TID}-") and seen.endswith("-00") and SID not in seen
    assert env.exporter.spans == []
    (line,) = env.lines()
    assert line["trace_id"] == TID and line["status"] == 200


def test_settings_from_proxy_config_and_flags() -> None:
    s = settings_from_config({"otlp_endpoint": "http://c:4318", "trace_sample_ratio": "0.25", "access_log": "-"})
    assert s == ObserveSettings("http://c:4318", 0.25, "-")
    assert settings_from_config(None) == ObserveSettings()
    assert settings_from_config({"trace_sample_ratio": "x"}).trace_sample_ratio == 1.0
    assert s.merged(None, None, None) == s
    assert s.merged("", 1.0, None) == ObserveSettings("", 1.0, "-")  # flags win, "" turns it off


async def test_without_access_log_sampled_and_unsampled_pair_on_one_connection(env_traced_only: Env) -> None:
    """Unsampled requests keep no record, yet their responses must not be paired with a sampled one's."""
    env = env_traced_only
    raw = (f"GET /quiet HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-00\r\n\r\n"
           f"HEAD /quiet-head HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-00\r\n\r\n"
           f"POST /teapot HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-01\r\ncontent-length: 2\r\n\r\nhi"
           f"GET /quiet2 HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-00\r\n\r\n"
           f"GET /loud HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-01\r\n\r\n").encode()
    out = await env.request(raw, responses=5, no_body=(1,))
    assert [r.split(b" ")[1] for r in out] == [b"200", b"200", b"418", b"200", b"200"]
    quiet = out[0].split(b"|")[1].decode()
    assert quiet == f"00-{TID}-{SID}-00"  # nothing recorded: the caller's traceparent goes on unchanged
    by_path = {s.attrs["url.path"]: s for s in env.exporter.spans}
    assert set(by_path) == {"/teapot", "/loud"}  # the unsampled ones recorded nothing
    assert by_path["/teapot"].attrs["http.response.status_code"] == 418
    assert by_path["/loud"].attrs["http.response.status_code"] == 200
    assert out[4].split(b"|")[1].decode() == f"00-{TID}-{by_path['/loud'].span_id}-01"
    assert env.observer.access_log is None


async def test_without_access_log_unsampled_caller_with_tracestate_goes_on_unchanged(env_traced_only: Env) -> None:
    """The slower parse (tracestate beside the traceparent) passes an unsampled caller on as it came too."""
    env = env_traced_only
    (resp,) = await env.request(f"GET /q HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-00\r\n"
                                f"tracestate: k=v\r\n\r\n".encode())
    assert b" 200 " in resp and resp.split(b"|")[1].decode() == f"00-{TID}-{SID}-00"
    assert env.exporter.spans == []


class _FakeConn:
    """What `_ObservedApp` calls on its connection: the awaited responses, in order."""

    def __init__(self, methods: list[str]) -> None:
        self._inflight: collections.deque[object] = collections.deque(
            _InReq(None, None, None, m, "/") for m in methods)  # recorded requests: each response reports
        self._heads = methods.count("HEAD")
        self._pipelined = False
        self._watching = True
        self.done: list[int] = []

    def _response_done(self, status: int, sent: int) -> None:
        rec = self._inflight.popleft()
        assert isinstance(rec, _InReq)
        self._heads -= rec.method == "HEAD"
        self.done.append(status)


@pytest.mark.parametrize("cut", [0, 20, 34, 35, 36, 37, 50])
def test_head_response_then_more_in_one_read_or_split_anywhere(cut: int) -> None:
    """A HEAD response's content-length announces no body: the next response must not be eaten as one."""
    data = (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"  # the HEAD's answer (38 bytes), no body
            b"HTTP/1.1 418 X\r\ncontent-length: 2\r\n\r\nhi"
            b"HTTP/1.1 204 X\r\n\r\n")
    conn = _FakeConn(["HEAD", "GET", "GET"])
    app = _ObservedApp(conn)  # type: ignore[arg-type]
    for chunk in (data[:cut], data[cut:]) if cut else (data,):
        app.data_received(chunk)
    assert conn.done == [200, 418, 204] and not app.broken
    assert app.rparser is None and not conn._watching  # nothing awaited: parsing paused at the boundary


async def test_unpipelined_requests_parse_only_what_is_recorded(env_traced_only: Env,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One request at a time (what the proxies' pools do): parsing pauses while only unsampled requests
    are awaited, and a sampled one restarts it at the next response, which is its own."""
    env = env_traced_only
    restarts: list[int] = []
    restart = _ObservedApp.restart
    monkeypatch.setattr(_ObservedApp, "restart", lambda self: (restarts.append(1), restart(self))[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    flags = ["00", "00", "01", "00", "00", "01", "01", "00"]
    paths = [f"/{i}" if flag == "00" else "/teapot" if i == 2 else f"/s{i}" for i, flag in enumerate(flags)]
    for flag, path in zip(flags, paths, strict=True):
        method = "HEAD" if path == "/1" else "GET"
        writer.write(f"{method} {path} HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{TID}-{SID}-{flag}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        if method != "HEAD":
            body = await asyncio.wait_for(reader.readexactly(length), 10)
            assert body.endswith(b"-01" if flag == "01" else b"-00")
    writer.close()
    statuses = {s.attrs["url.path"]: s.attrs["http.response.status_code"] for s in env.exporter.spans}
    assert statuses == {"/teapot": 418, "/s5": 200, "/s6": 200}
    assert len(restarts) == 3  # paused after /0 (and after each sampled one), restarted per sampled request
