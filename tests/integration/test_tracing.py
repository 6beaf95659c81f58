"""Traces and access logs across real processes: client → gateway → order → payment (issue #7).

A tiny OTLP/HTTP receiver in this process collects the JSON bodies POSTed to /v1/traces. `order`
and `payment` are plain HTTP apps behind real sidecars (`python -m lictor.agent.proxy -sidecar-for`):
the gateway dials order's sidecar over mTLS, order calls payment through its sidecar's http upstream
(a local port), copying the incoming `traceparent`, `tracestate` and `b3` (apps propagate context, the
mesh records hops). Order's sidecar takes its tracing settings from flags, payment's from its
registration's `Proxy.Config` (what a managed proxy uses). `flaky` is a Connect-native app (the
gateway dials it directly) that fails every other request. Each app echoes the trace headers it saw,
so the tests check both what was exported and what went over the wire.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from procs import AgentProc, free_ports, wait_until

SERVER, CLIENT = 2, 3
GATEWAY = "ingress-gw"

APP = r'''
import asyncio, json, ssl, sys, tempfile
import httptools, httpx

agent, service, port, mode, next_url, scheme = sys.argv[1:7]
leaf = httpx.get(f"{agent}/v1/agent/connect/ca/leaf/{service}", timeout=30).json()
roots = httpx.get(f"{agent}/v1/agent/connect/ca/roots", timeout=30).json()
d = tempfile.mkdtemp()
open(f"{d}/c.pem", "w").write(leaf["CertPEM"]); open(f"{d}/k.pem", "w").write(leaf["PrivateKeyPEM"])
cadata = "\n".join(r["RootCert"] for r in roots["Roots"])
srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
srv.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
srv.verify_mode = ssl.CERT_REQUIRED
srv.load_verify_locations(cadata=cadata)
cli = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
cli.check_hostname = False  # the peer is identified by its SPIFFE URI, as in the mesh
cli.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
cli.load_verify_locations(cadata=cadata)
PROPAGATE = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled")
count = 0
client = None

class App(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t; self.p = httptools.HttpRequestParser(self); self.url = b""; self.h = {}
    def data_received(self, data):
        try:
            self.p.feed_data(data)
        except Exception:
            self.t.close()
    def on_message_begin(self):
        self.url = b""; self.h = {}
    def on_url(self, u): self.url += u
    def on_header(self, k, v): self.h[k.decode().lower()] = v.decode()
    def on_message_complete(self):
        asyncio.get_running_loop().create_task(self.answer(dict(self.h), self.url.decode()))
    async def answer(self, h, url):
        global count, client
        count += 1
        status = 500 if mode == "alternate" and count % 2 == 1 else 200
        out = {"service": service, "headers": {k: v for k, v in h.items() if k in PROPAGATE}}
        if next_url != "-":  # the same path on the next service
            if client is None:
                client = httpx.AsyncClient(verify=cli if scheme == "tls" else False, timeout=10)
            try:
                r = await client.get(next_url + url, headers={k: v for k, v in h.items() if k in PROPAGATE})
                out["next"] = r.json() if r.status_code == 200 else {"status": r.status_code, "text": r.text}
            except Exception as exc:
                out["next"] = {"error": repr(exc)}
        body = json.dumps(out).encode()
        self.t.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                     % (status, len(body)) + body)

async def main():
    await asyncio.get_running_loop().create_server(App, "127.0.0.1", int(port), ssl=srv if scheme == "tls" else None)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


class Receiver:
    """An OTLP/HTTP (JSON) trace receiver: `spans` are the exported spans, each with its `service`."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.bodies = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/json"
                if ok:
                    doc = json.loads(body)
                    with lock:
                        outer.bodies += 1
                        for rs in doc["resourceSpans"]:
                            attrs = {a["key"]: a["value"] for a in rs["resource"]["attributes"]}
                            for ss in rs["scopeSpans"]:
                                for span in ss["spans"]:
                                    span["service"] = attrs["service.name"]["stringValue"]
                                    span["attrs"] = {a["key"]: _value(a["value"]) for a in span["attributes"]}
                                    outer.spans.append(span)
                self.send_response(200 if ok else 400)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in list(self.spans) if s["traceId"] == trace_id]

    def wait_trace(self, trace_id: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.trace(trace_id)) >= count, timeout, 0.1, f"{count} spans of trace {trace_id}")
        time.sleep(0.3)  # anything extra (a duplicate) would show up now
        return self.trace(trace_id)

    def close(self) -> None:
        self.server.shutdown()


def _value(v: dict[str, Any]) -> Any:
    if "intValue" in v:
        return int(v["intValue"])
    return next(iter(v.values()))


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        http_port, self.gw_port = free_ports(2)
        self.agent = AgentProc("dev", http_port, ["-dev", "-node", "dev", "-http-port", str(http_port),
                                                  "-dns-port", "-1"], root / "agent.log")
        self.receiver = Receiver()
        self.access_log = root / "access.jsonl"
        self.sidecar_logs: dict[str, Path] = {}
        (root / "app.py").write_text(APP)

    def put_config(self, entry: dict) -> None:
        resp = self.agent.put("/v1/config", json=entry)
        assert resp.status_code == 200 and resp.json() is True, resp.text

    def _start_app(self, service: str, mode: str, next_url: str, scheme: str) -> int:
        port = free_ports(1)[0]
        log = open(self.root / f"{service}.log", "wb")  # noqa: SIM115 - the child owns it
        self.procs[service] = subprocess.Popen([sys.executable, str(self.root / "app.py"), self.agent.url, service,
                                                str(port), mode, next_url, scheme],
                                               stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: b"ready" in (self.root / f"{service}.log").read_bytes(), 30, what=f"app {service}")
        return port

    def app(self, service: str, mode: str = "ok", next_url: str = "-") -> int:
        """A Connect-native app (mTLS itself, no sidecar)."""
        port = self._start_app(service, mode, next_url, "tls")
        reg = {"ID": service, "Name": service, "Port": port, "Address": "127.0.0.1", "Connect": {"Native": True},
               "Check": {"Name": "tcp", "TCP": f"127.0.0.1:{port}", "Interval": "500ms", "Timeout": "500ms"}}
        assert self.agent.put("/v1/agent/service/register", json=reg).status_code == 200
        return port

    def sidecar_app(self, service: str, *, upstream: str = "", config_in_registration: bool = False) -> None:
        """A plain HTTP app behind a real sidecar; with `upstream`, the app calls it through the sidecar.

        Tracing and the access log are set by flags, or with `config_in_registration` by Proxy.Config.
        """
        up_port, sidecar_port = free_ports(2)
        app_port = self._start_app(service, "ok", f"http://127.0.0.1:{up_port}" if upstream else "-", "plain")
        access_log = self.root / f"{service}-sidecar-access.jsonl"
        self.sidecar_logs[service] = access_log
        otlp = f"http://127.0.0.1:{self.receiver.port}"
        proxy: dict[str, Any] = {}
        if upstream:
            proxy["Upstreams"] = [{"DestinationName": upstream, "LocalBindPort": up_port}]
        if config_in_registration:
            proxy["Config"] = {"otlp_endpoint": otlp, "trace_sample_ratio": 1.0, "access_log": str(access_log)}
        reg = {"ID": service, "Name": service, "Port": app_port, "Address": "127.0.0.1", "Connect": {"SidecarService": {
            "Port": sidecar_port, "Proxy": proxy, "Checks": [
                {"Name": "sidecar listening", "TCP": f"127.0.0.1:{sidecar_port}", "Interval": "500ms"}]}}}
        assert self.agent.put("/v1/agent/service/register", json=reg).status_code == 200
        flags = [] if config_in_registration else ["-otlp-endpoint", otlp, "-trace-sample-ratio", "1.0",
                                                  "-access-log", str(access_log)]
        log = open(self.root / f"{service}-sidecar.log", "wb")  # noqa: SIM115
        self.procs[f"{service}-sidecar"] = subprocess.Popen(
            [sys.executable, "-m", "lictor.agent.proxy", "-sidecar-for", service, "-http-addr", self.agent.http_addr,
             *flags], stdout=log, stderr=subprocess.STDOUT)

    def start_gateway(self) -> None:
        log = open(self.root / "gateway.log", "wb")  # noqa: SIM115
        self.procs["gateway"] = subprocess.Popen(
            [sys.executable, "-m", "lictor.gateway", "-service", GATEWAY, "-http-addr", self.agent.http_addr,
             "-otlp-endpoint", f"http://127.0.0.1:{self.receiver.port}", "-trace-sample-ratio", "1.0",
             "-access-log", str(self.access_log)], stdout=log, stderr=subprocess.STDOUT)

    def get(self, host: str, path: str = "/", **headers: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.gw_port}{path}", headers={"host": host, **headers}, timeout=10)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.agent.kill()
        self.receiver.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("tracing"))
    try:
        e.agent.start()
        e.agent.wait_ready()
        for svc in ("order", "payment", "flaky"):
            e.put_config({"Kind": "service-defaults", "Name": svc, "Protocol": "http"})
        # payment refuses /forbidden from order (an L7 intention): its sidecar logs the decision
        assert e.agent.put("/v1/connect/intentions/exact?source=order&destination=payment", json={"Permissions": [
            {"Action": "deny", "HTTP": {"PathPrefix": "/forbidden"}},
            {"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}).status_code == 200
        e.put_config({"Kind": "service-router", "Name": "flaky", "Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"NumRetries": 3, "RetryOnStatusCodes": [500]}}]})
        e.put_config({"Kind": "ingress-gateway", "Name": GATEWAY, "Listeners": [
            {"Port": e.gw_port, "Protocol": "http", "Services": [
                {"Name": "order", "Hosts": ["order.example.com"]},
                {"Name": "flaky", "Hosts": ["flaky.example.com"]}]}]})
        e.sidecar_app("payment", config_in_registration=True)
        e.sidecar_app("order", upstream="payment")
        e.app("flaky", mode="alternate")
        assert e.agent.put("/v1/agent/service/register", json={
            "ID": GATEWAY, "Name": GATEWAY, "Kind": "ingress-gateway", "Port": e.gw_port,
            "Address": "127.0.0.1"}).status_code == 200
        e.start_gateway()

        def serving() -> bool:
            for name, proc in e.procs.items():
                log = e.root / (f"{name}.log" if name != "gateway" else "gateway.log")
                assert proc.poll() is None, (name, log.read_text() if log.exists() else "")
            # flags 00: warming up exports nothing and leaves flaky's alternation alone
            r = e.get("order.example.com", traceparent=f"00-{'e' * 32}-{'f' * 16}-00")
            return r.status_code == 200 and r.json().get("next", {}).get("service") == "payment"
        wait_until(serving, 60, 0.3, "the gateway serving order, order's sidecar serving payment")
        yield e
    finally:
        e.close()


def _tp(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def _ids(n: int) -> tuple[str, str]:
    return f"{n:032x}", f"{n + 0xabc:016x}"


def _parse_tp(value: str) -> tuple[str, str, str]:
    _, trace_id, parent, flags = value.split("-")
    return trace_id, parent, flags


# Each entry: (service whose proxy records it, kind, name); each span is the parent of the next.
CHAIN: list[tuple[str, int, str]] = [
    (GATEWAY, SERVER, "inbound order"), (GATEWAY, CLIENT, "outbound order"),  # the gateway
    ("order", SERVER, "inbound order"), ("order", CLIENT, "outbound payment"),  # order's sidecar
    ("payment", SERVER, "inbound payment"),  # payment's sidecar
]


def assert_chain(spans: list[dict[str, Any]], root_parent: str | None,
                 expected: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
    """One trace whose spans link into `expected`'s order, the first under `root_parent`; returns them in order."""
    assert len({s["traceId"] for s in spans}) == 1
    assert len(spans) == len(expected), [(s["service"], s["name"]) for s in spans]
    ids = {s["spanId"] for s in spans}
    assert len(ids) == len(spans), "span ids must be unique"
    ordered = []
    parent = root_parent
    for service, kind, name in expected:
        found = [s for s in spans if s.get("parentSpanId") == parent and s["service"] == service
                 and s["kind"] == kind and s["name"] == name]
        assert len(found) == 1, (service, kind, name, parent, spans)
        ordered.append(found[0])
        parent = found[0]["spanId"]
        assert int(found[0]["endTimeUnixNano"]) >= int(found[0]["startTimeUnixNano"])
    return ordered


def test_gateway_order_payment_is_one_trace(env: Env) -> None:
    trace_id, client_span = _ids(0x1001)
    r = env.get("order.example.com", "/checkout?x=1", traceparent=_tp(trace_id, client_span), tracestate="vendor=a")
    assert r.status_code == 200, r.text
    body = r.json()
    spans = env.receiver.wait_trace(trace_id, len(CHAIN))
    gw_in, gw_out, order_in, order_out, payment_in = assert_chain(spans, client_span, CHAIN)

    # each app got the context of its sidecar's inbound span (order propagates it to its sidecar)
    seen_by_order = body["headers"]
    seen_by_payment = body["next"]["headers"]
    assert _parse_tp(seen_by_order["traceparent"]) == (trace_id, order_in["spanId"], "01")
    assert _parse_tp(seen_by_payment["traceparent"]) == (trace_id, payment_in["spanId"], "01")
    assert seen_by_order["tracestate"] == seen_by_payment["tracestate"] == "vendor=a"
    assert gw_in["traceState"] == order_in["traceState"] == payment_in["traceState"] == "vendor=a"

    a = gw_in["attrs"]
    assert a["service"] == GATEWAY and a["upstream"] == "order" and a["route"] == "default"
    assert a["split.target"].startswith("order.") and a["retry.count"] == 0
    assert a["http.response.status_code"] == 200 and a["url.path"] == "/checkout"
    assert a["peer.spiffe_id"].endswith("/svc/order")
    o = gw_out["attrs"]
    assert o["upstream"] == "order" and o["retry.attempt"] == 0 and o["http.response.status_code"] == 200
    assert o["peer.spiffe_id"].startswith("spiffe://") and o["peer.spiffe_id"].endswith("/svc/order")
    assert o["upstream.target"].startswith("order.") and o["server.address"].startswith("127.0.0.1:")
    assert gw_in["status"] == {} and gw_out["status"] == {}

    # the sidecars: service, upstream, route, split target, retries, status, the peer's SPIFFE id
    i = order_in["attrs"]
    assert i["service"] == "order" and i["lictor.proxy"] == "sidecar" and i["lictor.intention"] == "allow"
    assert i["peer.spiffe_id"].endswith(f"/svc/{GATEWAY}") and i["http.response.status_code"] == 200
    assert i["url.path"] == "/checkout" and i["http.request.method"] == "GET"
    u = order_out["attrs"]
    assert u["service"] == "order" and u["upstream"] == "payment" and u["route"] == "default"
    assert u["split.target"].startswith("payment.") and u["upstream.target"].startswith("payment.")
    assert u["retry.attempt"] == 0 and u["retry.count"] == 0 and u["http.response.status_code"] == 200
    assert u["peer.spiffe_id"].endswith("/svc/payment")
    p = payment_in["attrs"]
    assert p["service"] == "payment" and p["peer.spiffe_id"].endswith("/svc/order")
    assert p["http.response.status_code"] == 200 and p["url.path"] == "/checkout"
    assert order_in["status"] == order_out["status"] == payment_in["status"] == {}
    # a child starts no earlier than its parent
    for parent, child in zip((gw_in, gw_out, order_in, order_out), (gw_out, order_in, order_out, payment_in),
                             strict=True):
        assert int(child["startTimeUnixNano"]) >= int(parent["startTimeUnixNano"]) - 5_000_000  # clock jitter


def test_gateway_starts_a_trace_when_there_is_none(env: Env) -> None:
    r = env.get("order.example.com", "/new")
    assert r.status_code == 200
    trace_id, parent, flags = _parse_tp(r.json()["headers"]["traceparent"])
    assert flags == "01"  # ratio 1.0
    spans = env.receiver.wait_trace(trace_id, len(CHAIN))
    gw_in, gw_out, order_in, _, _ = assert_chain(spans, None, CHAIN)
    assert "parentSpanId" not in gw_in and order_in["spanId"] == parent


def test_retried_call_shows_its_retries(env: Env) -> None:
    trace_id, client_span = _ids(0x2002)
    r = env.get("flaky.example.com", "/op", traceparent=_tp(trace_id, client_span))
    assert r.status_code == 200, r.text
    spans = env.receiver.wait_trace(trace_id, 3)
    assert len(spans) == 3
    (gw_in,) = [s for s in spans if s["kind"] == SERVER]
    tries = sorted((s for s in spans if s["kind"] == CLIENT), key=lambda s: s["attrs"]["retry.attempt"])
    assert gw_in["parentSpanId"] == client_span and gw_in["name"] == "inbound flaky"
    assert gw_in["attrs"]["retry.count"] == 1 and gw_in["attrs"]["http.response.status_code"] == 200
    assert [e["name"] for e in gw_in["events"]] == ["retry"]
    assert [t["parentSpanId"] for t in tries] == [gw_in["spanId"]] * 2
    assert [t["attrs"]["retry.attempt"] for t in tries] == [0, 1]
    assert [t["attrs"]["http.response.status_code"] for t in tries] == [500, 200]
    assert tries[0]["status"]["code"] == 2 and tries[1]["status"] == {}
    # the app saw the context of the try that it answered
    assert _parse_tp(r.json()["headers"]["traceparent"]) == (trace_id, tries[1]["spanId"], "01")


def test_b3_single_and_multi_are_accepted(env: Env) -> None:
    trace_id, client_span = _ids(0x3003)
    r = env.get("order.example.com", "/b3", b3=f"{trace_id}-{client_span}-1")
    assert r.status_code == 200
    _, _, order_in, _, payment_in = assert_chain(env.receiver.wait_trace(trace_id, len(CHAIN)), client_span, CHAIN)
    seen = r.json()["headers"]
    assert seen["b3"] == f"{trace_id}-{order_in['spanId']}-1"
    assert _parse_tp(seen["traceparent"]) == (trace_id, order_in["spanId"], "01")
    assert r.json()["next"]["headers"]["b3"] == f"{trace_id}-{payment_in['spanId']}-1"  # kept in its form

    trace_id, client_span = _ids(0x3004)
    r = env.get("order.example.com", "/b3multi", **{"X-B3-TraceId": trace_id[16:], "X-B3-SpanId": client_span,
                                                     "X-B3-Sampled": "1"})
    assert r.status_code == 200
    _, _, order_in, _, _ = assert_chain(env.receiver.wait_trace(trace_id, len(CHAIN)), client_span,
                                        CHAIN)  # 64-bit id padded
    seen = r.json()["headers"]
    assert seen["x-b3-traceid"] == trace_id and seen["x-b3-spanid"] == order_in["spanId"]


def test_unsampled_parent_is_propagated_not_exported(env: Env) -> None:
    trace_id, client_span = _ids(0x4004)
    r = env.get("order.example.com", "/quiet", traceparent=_tp(trace_id, client_span, sampled=False))
    assert r.status_code == 200
    got_trace, parent, flags = _parse_tp(r.json()["headers"]["traceparent"])
    assert (got_trace, flags) == (trace_id, "00") and parent != client_span
    # spans leave in order: once a later sampled request's spans are in, the quiet one had its chance
    marker, marker_span = _ids(0x4005)
    assert env.get("order.example.com", "/loud", traceparent=_tp(marker, marker_span)).status_code == 200
    env.receiver.wait_trace(marker, len(CHAIN))
    assert env.receiver.trace(trace_id) == []
    assert r.json()["next"]["headers"]["traceparent"].endswith("-00")  # passed on through both sidecars


def test_access_log_lines(env: Env) -> None:
    trace_id, client_span = _ids(0x5005)
    r = env.get("flaky.example.com", "/logged?q=1", traceparent=_tp(trace_id, client_span))
    assert r.status_code == 200
    assert env.get("nowhere.example.com").status_code == 404

    def lines() -> list[dict[str, Any]]:
        return [json.loads(x) for x in env.access_log.read_text().splitlines() if x.strip()]

    mine = wait_until(lambda: [x for x in lines() if x["trace_id"] == trace_id], 10, 0.1, "the access log line")
    (line,) = mine
    assert line["proxy"] == "gateway" and line["source"] == GATEWAY and line["destination"] == "flaky"
    assert line["route"] == "prefix:/" and line["status"] == 200 and line["retries"] == 1
    assert line["method"] == "GET" and line["path"] == "/logged" and line["bytes_sent"] == len(r.content)
    assert line["bytes_received"] == 0 and line["duration_ms"] > 0 and line["intention"] is None
    assert line["peer_spiffe_id"].endswith("/svc/flaky") and line["timestamp"].endswith("Z")
    assert line["span_id"] and line["split_target"].startswith("flaky.")
    wait_until(lambda: any(x["status"] == 404 and x["destination"] is None for x in lines()), 10, 0.1, "404 line")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def test_sidecar_access_log_lines(env: Env) -> None:
    trace_id, client_span = _ids(0x6006)
    r = env.get("order.example.com", "/logged?q=1", traceparent=_tp(trace_id, client_span))
    assert r.status_code == 200
    order_log, payment_log = env.sidecar_logs["order"], env.sidecar_logs["payment"]
    mine = wait_until(lambda: [x for x in _lines(order_log) if x["trace_id"] == trace_id] if len(
        [x for x in _lines(order_log) if x["trace_id"] == trace_id]) == 2 else None, 10, 0.1, "order's two lines")
    inbound = next(x for x in mine if x["destination"] == "order")
    outbound = next(x for x in mine if x["destination"] == "payment")
    assert inbound["proxy"] == "sidecar" and inbound["source"] == GATEWAY and inbound["intention"] == "allow"
    assert inbound["status"] == 200 and inbound["method"] == "GET" and inbound["path"] == "/logged"
    assert inbound["peer_spiffe_id"].endswith(f"/svc/{GATEWAY}") and inbound["bytes_sent"] == len(r.content)
    assert inbound["duration_ms"] > 0 and inbound["timestamp"].endswith("Z") and inbound["span_id"]
    assert outbound["source"] == "order" and outbound["route"] == "default" and outbound["retries"] == 0
    assert outbound["split_target"].startswith("payment.") and outbound["status"] == 200
    assert outbound["peer_spiffe_id"].endswith("/svc/payment") and outbound["intention"] is None
    # payment's sidecar (settings from Proxy.Config): the decision, and the trace id of the same request
    (line,) = wait_until(lambda: [x for x in _lines(payment_log) if x["trace_id"] == trace_id], 10, 0.1,
                         "payment's line")
    assert line["source"] == "order" and line["destination"] == "payment" and line["intention"] == "allow"
    assert line["status"] == 200 and line["peer_spiffe_id"].endswith("/svc/order")


def test_intention_denial_is_traced_and_logged(env: Env) -> None:
    trace_id, client_span = _ids(0x7007)
    r = env.get("order.example.com", "/forbidden/x", traceparent=_tp(trace_id, client_span))
    assert r.status_code == 200 and r.json()["next"]["status"] == 403, r.text
    _, _, _, order_out, payment_in = assert_chain(env.receiver.wait_trace(trace_id, len(CHAIN)), client_span, CHAIN)
    assert payment_in["attrs"]["http.response.status_code"] == 403
    assert payment_in["attrs"]["lictor.intention"] == "deny"
    assert payment_in["status"] == {"code": 2, "message": "denied by intention"}
    assert order_out["attrs"]["http.response.status_code"] == 403
    (line,) = wait_until(lambda: [x for x in _lines(env.sidecar_logs["payment"]) if x["trace_id"] == trace_id],
                         10, 0.1, "payment's deny line")
    assert line["intention"] == "deny" and line["status"] == 403 and line["source"] == "order"
    assert line["path"] == "/forbidden/x"
