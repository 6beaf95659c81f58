"""lictor.tracing and lictor.accesslog: context parsing, sampling, spans, OTLP JSON, batching."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lictor.accesslog import AccessLog, format_timestamp
from lictor.tracing import (
    CLIENT,
    PASS,
    SERVER,
    BatchWorker,
    MemoryExporter,
    OtlpExporter,
    TraceContext,
    Tracer,
    encode_otlp_json,
    format_traceparent,
    inject,
    new_span_id,
    new_trace_id,
    parse_b3_single,
    parse_traceparent,
    span_of_record,
)

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"


# ------------------------------------------------------------------------------ traceparent

def test_traceparent_round_trip() -> None:
    ctx = parse_traceparent(f"00-{TID}-{SID}-01")
    assert ctx == TraceContext(TID, SID, True)
    assert ctx.traceparent == f"00-{TID}-{SID}-01"
    assert parse_traceparent(f"00-{TID}-{SID}-00").sampled is False  # type: ignore[union-attr]
    assert parse_traceparent(f" 00-{TID}-{SID}-03 ").sampled is True  # type: ignore[union-attr]  # other flag bits


@pytest.mark.parametrize("value", [
    "", "garbage", f"00-{TID}-{SID}", f"00-{TID}-{SID}-01-extra", f"ff-{TID}-{SID}-01",
    f"00-{'0' * 32}-{SID}-01", f"00-{TID}-{'0' * 16}-01", f"00-{TID.upper()}-{SID}-01", f"00-{TID}-{SID}-0x",
    f"0-{TID}-{SID}-01", f"00-{TID[:-1]}g-{SID}-01", f"00-{TID},00-{TID}-{SID}-01",
])
def test_invalid_traceparent(value: str) -> None:
    assert parse_traceparent(value) is None


def test_future_version_reads_the_known_fields() -> None:
    assert parse_traceparent(f"01-{TID}-{SID}-01-whatever") == TraceContext(TID, SID, True)
    assert parse_traceparent(f"01-{TID}-{SID}-01x") is None


def test_from_headers_prefers_w3c_and_keeps_tracestate() -> None:
    ctx = TraceContext.from_headers({"traceparent": f"00-{TID}-{SID}-01", "tracestate": "a=1,b=2",
                                     "b3": f"{'1' * 32}-{'2' * 16}-1"})
    assert ctx is not None and ctx.trace_id == TID and ctx.tracestate == "a=1,b=2"
    assert ctx.b3 == "single"  # W3C ids win; B3 is passed on too (in its own form) with them
    assert [k for k, _ in ctx.headers()] == ["traceparent", "tracestate", "b3"]
    assert TraceContext.from_headers({"traceparent": f"00-{TID}-{SID}-01"}).b3 == ""  # type: ignore[union-attr]
    multi = TraceContext.from_headers({"traceparent": f"00-{TID}-{SID}-01", "x-b3-traceid": "1" * 32})
    assert multi is not None and multi.b3 == "multi" and multi.trace_id == TID


def test_from_headers_raw_pairs_bytes_and_str() -> None:
    raw = [(b"Host", b"x"), (b"TraceParent", f"00-{TID}-{SID}-01".encode()), (b"tracestate", b"k=v")]
    assert TraceContext.from_headers(raw) == TraceContext(TID, SID, True, "k=v")
    assert TraceContext.from_headers([("TRACEPARENT", f"00-{TID}-{SID}-00")]) == TraceContext(TID, SID, False)
    assert TraceContext.from_headers([(b"host", b"x")]) is None


def test_repeated_traceparent_is_invalid() -> None:
    tp = f"00-{TID}-{SID}-01".encode()
    assert TraceContext.from_headers([(b"traceparent", tp), (b"traceparent", tp)]) is None


def test_invalid_traceparent_falls_back_to_b3() -> None:
    ctx = TraceContext.from_headers({"traceparent": "bad", "b3": f"{TID}-{SID}-0"})
    assert ctx == TraceContext(TID, SID, False, b3="single")


# ------------------------------------------------------------------------------------- B3

def test_b3_single_forms() -> None:
    assert parse_b3_single(f"{TID}-{SID}-1-{'3' * 16}") == TraceContext(TID, SID, True, b3="single")
    assert parse_b3_single(f"{TID}-{SID}-d") == TraceContext(TID, SID, True, b3="single")
    assert parse_b3_single(f"{TID}-{SID}") == TraceContext(TID, SID, True, b3="single")
    short = parse_b3_single(f"{TID[16:]}-{SID}-0")  # 64-bit trace ids are left-padded
    assert short == TraceContext("0" * 16 + TID[16:], SID, False, b3="single")
    assert parse_b3_single("0") == TraceContext("", "", False, b3="single")  # bare decision
    assert parse_b3_single("1") == TraceContext("", "", True, b3="single")
    for bad in ("", "x", f"{TID}-{SID}-7", f"{TID}-short-1", f"{'0' * 32}-{SID}-1", f"{TID}-{SID}-1-{SID}-x"):
        assert parse_b3_single(bad) is None, bad


def test_b3_multi() -> None:
    h = {"x-b3-traceid": TID.upper(), "x-b3-spanid": SID, "x-b3-sampled": "1", "x-b3-parentspanid": "1" * 16}
    assert TraceContext.from_headers(h) == TraceContext(TID, SID, True, b3="multi")
    assert TraceContext.from_headers({**h, "x-b3-sampled": "0"}).sampled is False  # type: ignore[union-attr]
    assert TraceContext.from_headers({**h, "x-b3-sampled": "0", "x-b3-flags": "1"}).sampled  # type: ignore[union-attr]
    assert TraceContext.from_headers({"x-b3-sampled": "0"}) == TraceContext("", "", False, b3="multi")
    assert TraceContext.from_headers({"x-b3-traceid": TID, "x-b3-spanid": "nope"}) is None


def test_b3_is_reinjected_in_its_own_form() -> None:
    tracer = Tracer("gw", None)
    single = tracer.start("in", SERVER, parse_b3_single(f"{TID}-{SID}-1"))
    hdrs = dict(single.context.headers())
    assert hdrs["b3"] == f"{TID}-{single.span_id}-1" and hdrs["traceparent"] == single.traceparent
    multi = tracer.start("in", SERVER, TraceContext.from_headers({"x-b3-traceid": TID, "x-b3-spanid": SID}))
    hdrs = dict(multi.context.headers())
    assert hdrs["x-b3-traceid"] == TID and hdrs["x-b3-spanid"] == multi.span_id and hdrs["x-b3-sampled"] == "1"


# ----------------------------------------------------------------------------- spans, sampling

def test_ids_are_hex_nonzero_and_distinct() -> None:
    tids = {new_trace_id() for _ in range(1000)}
    sids = {new_span_id() for _ in range(1000)}
    assert len(tids) == 1000 and len(sids) == 1000
    assert all(len(t) == 32 and int(t, 16) for t in tids) and all(len(s) == 16 and int(s, 16) for s in sids)


def test_parent_child_links_and_export() -> None:
    ex = MemoryExporter()
    tracer = Tracer("ingress-gw", ex, sample_ratio=0.0)  # the parent's flag wins over the ratio
    server = tracer.start("inbound web", SERVER, TraceContext(TID, SID, True, "k=v"), {"service": "ingress-gw"})
    client = server.child("outbound web", CLIENT)
    assert (server.trace_id, server.parent_id) == (TID, SID)
    assert (client.trace_id, client.parent_id, client.tracestate) == (TID, server.span_id, "k=v")
    assert client.context.traceparent == format_traceparent(TID, client.span_id, True)
    client.end(status=500)
    server.end(status=200, attrs={"retry.count": 1})
    server.end(status=200)  # once only
    assert [s.name for s in ex.spans] == ["outbound web", "inbound web"]
    assert client.error == "HTTP 500" and server.error == ""
    assert server.attrs["retry.count"] == 1 and server.end_ns >= server.start_ns


def test_unsampled_parent_records_nothing_but_propagates() -> None:
    ex = MemoryExporter()
    tracer = Tracer("gw", ex, sample_ratio=1.0)
    span = tracer.start("in", SERVER, TraceContext(TID, SID, False))
    span.set("a", 1)
    span.event("retry")
    child = span.child("out")
    child.end(status=200)
    span.end(status=200)
    assert ex.spans == [] and span.attrs == {}
    assert child.context.traceparent.endswith("-00") and child.trace_id == TID


def test_new_traces_are_sampled_by_ratio() -> None:
    def share(ratio: float, n: int = 4000) -> float:
        tracer = Tracer("gw", None, ratio)
        return sum(tracer.start("in", SERVER, None).sampled for _ in range(n)) / n

    assert share(0.0) == 0.0 and share(1.0) == 1.0
    assert 0.05 < share(0.1) < 0.15
    bare = Tracer("gw", None, 1.0).start("in", SERVER, parse_b3_single("0"))  # b3: 0 = do not sample
    assert not bare.sampled and len(bare.trace_id) == 32 and bare.parent_id == ""


def test_ratio_decision_is_consistent_for_one_trace_id() -> None:
    tracer = Tracer("gw", None, 0.5)
    assert tracer.sample_new("f" * 16 + "0" * 16) is True
    assert tracer.sample_new("0" * 16 + "f" * 16) is False


def _header(raw: bytes) -> dict[str, str]:
    assert raw.endswith(b"\r\n")
    return dict(line.split(": ", 1) for line in raw.decode().split("\r\n") if line)


def test_hop_unsampled_new_trace_is_only_a_header() -> None:
    tracer = Tracer("gw", None, 0.0)
    raw = tracer.hop(None)
    assert isinstance(raw, bytes)
    ctx = parse_traceparent(_header(raw)["traceparent"])
    assert ctx is not None and not ctx.sampled and ctx.trace_id != "0" * 32 and ctx.span_id != "0" * 16
    assert tracer.sample_new(ctx.trace_id) is False  # the id carries the decision it was made with


def test_hop_new_trace_sampling_matches_the_ratio_rule() -> None:
    tracer = Tracer("gw", None, 0.3)
    hops = [tracer.hop(None) for _ in range(4000)]
    sampled = [h for h in hops if isinstance(h, TraceContext)]
    assert 0.25 < len(sampled) / len(hops) < 0.35
    for h in sampled:
        assert h.sampled and h.span_id == "" and len(h.trace_id) == 32 and tracer.sample_new(h.trace_id)
    for h in hops[:200]:
        if isinstance(h, bytes):
            ctx = parse_traceparent(_header(h)["traceparent"])
            assert ctx is not None and tracer.sample_new(ctx.trace_id) is False
    assert isinstance(Tracer("gw", None, 1.0).hop(None), TraceContext)


def test_hop_continues_a_callers_context() -> None:
    tracer = Tracer("gw", None, 0.0)  # the caller's flag wins over the ratio either way
    sampled = TraceContext(TID, SID, True, "k=v")
    assert tracer.hop(sampled) is sampled
    # unsampled: nothing is recorded, so the caller's headers go on unchanged (no span id of our own)
    assert tracer.hop(TraceContext(TID, SID, False)) == PASS == b""
    assert tracer.hop(TraceContext(TID, SID, False, "k=v", b3="multi")) == PASS
    # headers not fit to forward as they came: re-issued under a fresh span id, the same trace
    raw = tracer.hop(TraceContext(TID, SID, False, "k=v", b3="multi"), passthrough=False)
    assert isinstance(raw, bytes)
    h = _header(raw)
    assert h["tracestate"] == "k=v" and h["x-b3-traceid"] == TID and h["x-b3-sampled"] == "0"
    assert h["x-b3-spanid"] == h["traceparent"].split("-")[2] != SID


def test_hop_honours_a_bare_b3_decision() -> None:
    tracer = Tracer("gw", None, 0.0)
    yes = tracer.hop(parse_b3_single("1"))
    assert isinstance(yes, TraceContext) and yes.sampled and len(yes.trace_id) == 32 and yes.b3 == "single"
    no = Tracer("gw", None, 1.0).hop(parse_b3_single("0"))
    assert isinstance(no, bytes)
    h = _header(no)
    assert h["traceparent"].endswith("-00") and h["b3"].endswith("-0")


def test_hop_from_headers_matches_hop_of_the_parsed_context() -> None:
    tracer = Tracer("gw", None, 0.0)
    assert tracer.hop_from({"traceparent": f"00-{TID}-{SID}-00", "host": "x"}) == PASS  # forwarded unchanged
    assert tracer.hop_from({"traceparent": f"00-{TID}-{SID}-01"}) == TraceContext(TID, SID, True)
    assert tracer.hop_from({"traceparent": f"00-{TID}-{SID}-03"}) == TraceContext(TID, SID, True)  # other flag bits
    assert tracer.hop_from({"traceparent": f"00-{TID}-{SID}-01", "tracestate": "k=v"}) == TraceContext(
        TID, SID, True, "k=v")
    assert tracer.hop_from({"traceparent": f"00-{TID}-{'0' * 16}-01"}) != TraceContext(TID, "0" * 16, True)
    assert tracer.hop_from({"traceparent": f"00-{TID}-{SID}-00", "tracestate": "k=v"}) == PASS
    assert tracer.hop_from({"traceparent": f"00-{TID}-{SID}-00", "b3": f"{TID}-{SID}-0"}) == PASS
    assert tracer.hop_from({"b3": f"{TID}-{SID}-0"}) == PASS  # B3 alone: also as it came
    h = _header(tracer.hop_from({"traceparent": f"00-{'0' * 32}-{SID}-00"}))  # type: ignore[arg-type]
    assert TID not in h["traceparent"] and "0" * 32 not in h["traceparent"]  # invalid: a new trace
    # an invalid traceparent beside valid B3: the B3 context is re-issued, with a valid traceparent
    h = _header(tracer.hop_from({"traceparent": "junk", "b3": f"{TID}-{SID}-0"}))  # type: ignore[arg-type]
    assert h["traceparent"].startswith(f"00-{TID}-") and h["traceparent"].endswith("-00") and SID not in h["b3"]
    h = _header(tracer.hop_from({"x-b3-sampled": "0"}))  # type: ignore[arg-type]
    assert h["x-b3-sampled"] == "0" and h["traceparent"].endswith("-00")
    assert isinstance(Tracer("gw", None, 1.0).hop_from({}), TraceContext)
    # raw (name, value) pairs, as the gateway has them for an unrouted request
    assert tracer.hop_from([(b"Traceparent", f"00-{TID}-{SID}-00".encode()), (b"Host", b"x")]) == PASS
    assert tracer.hop_from([(b"traceparent", f"00-{TID}-{SID}-01".encode())]) == TraceContext(TID, SID, True)


def test_inject_replaces_existing_trace_headers() -> None:
    ctx = TraceContext(TID, SID, True, "k=v")
    pairs = [("host", "x"), ("Traceparent", "old"), ("b3", "old"), ("X-B3-SpanId", "old")]
    inject(pairs, ctx)
    assert pairs == [("host", "x"), ("traceparent", ctx.traceparent), ("tracestate", "k=v")]
    d = {"Host": "x", "TraceParent": "old"}
    inject(d, ctx)
    assert d == {"Host": "x", "traceparent": ctx.traceparent, "tracestate": "k=v"}
    child = ctx.child()
    assert child.trace_id == TID and child.span_id != SID


# ----------------------------------------------------------------------------------- OTLP JSON

def test_otlp_json_encoding() -> None:
    ex = MemoryExporter()
    gw, order = Tracer("ingress-gw", ex), Tracer("order", ex)
    s = gw.start("inbound \"web\"", SERVER, TraceContext(TID, SID, True, "a=b"),
                 {"route": "default", "retry.count": 2, "ok": True, "ratio": 0.5, "none": None})
    s.event("retry", {"retry.attempt": 1, "reason": "status 500"})
    s.end(status=503, error="no healthy upstream")
    o = order.start("inbound order", SERVER, None)
    o.end(status=200)
    doc = json.loads(encode_otlp_json(ex.spans))
    by_svc = {rs["resource"]["attributes"][0]["value"]["stringValue"]: rs["scopeSpans"][0]["spans"]
              for rs in doc["resourceSpans"]}
    assert set(by_svc) == {"ingress-gw", "order"}
    span = by_svc["ingress-gw"][0]
    assert span["traceId"] == TID and span["parentSpanId"] == SID and span["kind"] == SERVER
    assert span["name"] == 'inbound "web"' and span["traceState"] == "a=b"
    assert int(span["endTimeUnixNano"]) >= int(span["startTimeUnixNano"]) > 0
    attrs = {a["key"]: a["value"] for a in span["attributes"]}
    assert attrs["route"] == {"stringValue": "default"} and attrs["retry.count"] == {"intValue": "2"}
    assert attrs["ok"] == {"boolValue": True} and attrs["ratio"] == {"doubleValue": 0.5} and "none" not in attrs
    assert attrs["http.response.status_code"] == {"intValue": "503"}
    assert span["status"] == {"code": 2, "message": "no healthy upstream"}
    assert span["events"][0]["name"] == "retry"
    assert "parentSpanId" not in by_svc["order"][0] and by_svc["order"][0]["status"] == {}


def _records(tracer: Tracer) -> list[tuple[object, ...]]:
    """A retried request's span records as a proxy queues them: two tries, then the inbound span."""
    keys = ("service", "upstream", "retry.attempt", "peer.spiffe_id")
    return [
        (tracer, "outbound web", CLIENT, TID, "1111111111111111", "2222222222222222", "k=v", 10, 20, keys,
         ("gw", "web", 0, None), 503, "", None),
        (tracer, "outbound web", CLIENT, TID, "3333333333333333", "2222222222222222", "k=v", 21, 30, keys,
         ("gw", "web", 1, "spiffe://td/ns/default/dc/dc1/svc/web"), 200, "", None),
        (tracer, "inbound web", SERVER, TID, "2222222222222222", SID, "k=v", 5, 31, ("service", "retry.count"),
         ("gw", 1), 0, "", [(22, "retry", {"retry.attempt": 1, "reason": "status 503"})]),
    ]


def test_span_records_are_the_spans_they_stand_for() -> None:
    """A record (what the proxies queue instead of a Span) encodes exactly like its Span."""
    ex = MemoryExporter()
    tracer = Tracer("gw", ex)
    records = _records(tracer)
    ex.submit(records)  # one request's records: one queue item
    first, second, inbound = ex.spans
    assert (first.span_id, first.parent_id, first.trace_id, first.tracestate) == (
        "1111111111111111", "2222222222222222", TID, "k=v")
    assert first.attrs == {"service": "gw", "upstream": "web", "retry.attempt": 0,
                           "http.response.status_code": 503}  # None: left out
    assert first.error == "HTTP 503" and second.error == "" and inbound.error == "no response"
    assert second.attrs["peer.spiffe_id"].endswith("/svc/web") and inbound.events and inbound.parent_id == SID
    assert (inbound.start_ns, inbound.end_ns) == (5, 31)
    for rec in records:
        assert encode_otlp_json([rec]) == encode_otlp_json([span_of_record(rec)])
    assert encode_otlp_json(records) == encode_otlp_json([span_of_record(r) for r in records])
    doc = json.loads(encode_otlp_json([*records, tracer.start("x", SERVER, None)]))  # records and Spans mixed
    assert len(doc["resourceSpans"][0]["scopeSpans"][0]["spans"]) == 4


class _Collector(BaseHTTPRequestHandler):
    bodies: list[tuple[str, str, bytes]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).bodies.append((self.path, self.headers["content-type"], body))
        self.send_response(type(self).status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_otlp_exporter_batches_to_v1_traces() -> None:
    _Collector.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ex = OtlpExporter(f"http://127.0.0.1:{server.server_port}", batch=50, interval=0.05)
        tracer = Tracer("gw", ex)
        for _ in range(120):
            tracer.start("in", SERVER, None).end(status=200)
        ex.submit(_records(tracer))  # one request's span records: one queue item, three spans
        assert ex.flush(5.0)
        tracer.close()
        spans = [s for _, _, b in _Collector.bodies
                 for s in json.loads(b)["resourceSpans"][0]["scopeSpans"][0]["spans"]]
        assert len(spans) == 123 and ex.sent == 123 and ex.dropped == 0
        assert {p for p, _, _ in _Collector.bodies} == {"/v1/traces"}
        assert {c for _, c, _ in _Collector.bodies} == {"application/json"}
        assert all(len(json.loads(b)["resourceSpans"][0]["scopeSpans"][0]["spans"]) <= 50
                   for _, _, b in _Collector.bodies)
    finally:
        server.shutdown()


def test_exporter_counts_failures_and_keeps_going() -> None:
    ex = OtlpExporter("http://127.0.0.1:9/custom/path", interval=0.05, timeout=0.5)  # nothing listens on 9
    assert ex.path == "/custom/path" and ex.port == 9
    tracer = Tracer("gw", ex)
    tracer.start("in", SERVER, None).end(status=200)
    ex.flush(5.0)
    assert ex.failed == 1 and ex._thread.is_alive()
    tracer.close()


class _Slow(BatchWorker):
    def handle(self, items: list[object]) -> None:
        time.sleep(0.2)


def test_bounded_queue_drops_and_counts() -> None:
    w = _Slow("slow", max_queue=10, batch=5, interval=10.0)
    for i in range(100):
        w.put(i)
    assert w.dropped >= 85
    w.close(0.1)


# ---------------------------------------------------------------------------------- access log

def test_access_log_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "access.jsonl"
    log = AccessLog(str(path), interval=0.05)
    log.record(1_700_000_000.25, {"trace_id": TID, "status": 200, "route": "default", "intention": None})
    log.record(1_700_000_001.0, {"trace_id": None, "status": 503})
    assert log.flush(5.0)
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"timestamp": "2023-11-14T22:13:20.250Z", "trace_id": TID, "status": 200,
                        "route": "default", "intention": None}
    assert lines[1]["status"] == 503 and list(lines[1])[0] == "timestamp"
    assert format_timestamp(0.0) == "1970-01-01T00:00:00.000Z"


def test_access_log_rows_keep_field_order_and_escape(tmp_path: Path) -> None:
    from lictor.accesslog import FIELDS

    path = tmp_path / "rows.jsonl"
    log = AccessLog(str(path), interval=0.05)
    row = (TID, None, "sidecar", "web", "api", None, None, "127.0.0.1:80", "GET", '/a"b\\c\n', 200, 1.5, 0, 12,
           None, "allow", "127.0.0.1", "spiffe://td/ns/default/dc/dc1/svc/web")
    log.row(100.0, row)
    log.row(101.0, row[:9] + ("/x", 503, 2.0, 3, 0, 1, "deny") + row[16:])  # the cached fragments again
    assert log.flush(5.0)
    log.close()
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert list(first) == ["timestamp", *FIELDS] and [first[f] for f in FIELDS] == list(row)
    assert second["status"] == 503 and second["intention"] == "deny" and second["path"] == "/x"
    assert second["peer_spiffe_id"] == row[17] and first["timestamp"].endswith("Z")
