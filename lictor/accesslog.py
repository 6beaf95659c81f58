"""JSON-lines access logs for the gateway and the sidecars, written off the request path.

A request appends one tuple (`row(...)`, the values of `FIELDS` in order) or one dict to a bounded queue (no encoding, no I/O on the event loop); a daemon
thread turns batches into JSON lines and writes them with one `write` per batch. A full queue drops
the record and counts it (`AccessLog.dropped`) rather than stall the proxy.

    log = AccessLog("/var/log/lictor/gw.jsonl")      # or "-" for stdout
    log.record(time.time(), {"trace_id": ..., "source": "ingress-gw", "destination": "web", ...})
    log.row(time.monotonic(), (trace_id, span_id, "sidecar", ...))  # FIELDS' values: the proxies' hot path

Fields in every line, in this order: `timestamp` (RFC 3339, UTC, ms), then the record's keys.
The proxies use the keys in `FIELDS`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from json.encoder import encode_basestring as _q
from typing import Any, TextIO

from lictor.tracing import BatchWorker

__all__ = ["FIELDS", "WALL_OFFSET", "AccessLog", "format_timestamp"]

_encoder = json.JSONEncoder(separators=(",", ":"), default=str)

# The keys the gateway and the sidecars write (absent or null when a hop does not know one).
FIELDS = ("trace_id", "span_id", "proxy", "source", "destination", "route", "split_target", "upstream_address",
          "method", "path", "status", "duration_ms", "bytes_received", "bytes_sent", "retries", "intention",
          "downstream_address", "peer_spiffe_id")

# `row()` lines. Most fields repeat from request to request (proxy, services, route, split, address,
# method, intention, client, peer), so the writer caches their encoded text per combination and
# formats only the per-request ones (ids, path, status, duration, bytes, retries): no dict per line,
# no json.dumps per line. The layout keeps FIELDS' order.
_STATIC_A = slice(2, 9)  # proxy .. method
_STATIC_B = slice(15, 18)  # intention .. peer_spiffe_id
_FRAGMENTS: dict[tuple[Any, ...], str] = {}


def _fragment(values: tuple[Any, ...], names: tuple[str, ...]) -> str:
    out = _FRAGMENTS.get(values)
    if out is None:
        out = ",".join(f'"{n}":{_json_value(v)}' for n, v in zip(names, values, strict=True))
        if len(_FRAGMENTS) < 16384:  # bounded: addresses and peers vary
            _FRAGMENTS[values] = out
    return out


def _row_line(ts: float, r: tuple[Any, ...]) -> str:
    tid, sid = r[0], r[1]
    return (f'{{"timestamp":"{format_timestamp(ts)}",'
            f'"trace_id":{_q(tid) if tid.__class__ is str else "null"},'
            f'"span_id":{_q(sid) if sid.__class__ is str else "null"},'
            f'{_fragment(r[_STATIC_A], FIELDS[_STATIC_A])},"path":{_json_value(r[9])},'
            f'"status":{_json_value(r[10])},"duration_ms":{_json_value(r[11])},'
            f'"bytes_received":{_json_value(r[12])},"bytes_sent":{_json_value(r[13])},'
            f'"retries":{_json_value(r[14])},{_fragment(r[_STATIC_B], FIELDS[_STATIC_B])}}}')


# time.time() - time.monotonic() at import: rows carry the monotonic start the proxies already have.
WALL_OFFSET = time.time() - time.monotonic()


def _json_value(v: Any) -> str:
    t = type(v)
    if t is str:
        return _q(v)  # type: ignore[no-any-return]
    if v is None:
        return "null"
    if t is int:
        return str(v)
    if t is bool:
        return "true" if v else "false"
    if t is float:
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else "null"
    return _encoder.encode(v)


_last_second: tuple[int, str] = (-1, "")


def format_timestamp(ts: float) -> str:
    global _last_second
    secs = int(ts)
    last, text = _last_second
    if secs != last:  # strftime once per second, not per line
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _last_second = (secs, text)
    return f"{text}.{int((ts - secs) * 1000):03d}Z"


class AccessLog(BatchWorker):
    """`record(ts, fields)` from the event loop; a background thread encodes and writes."""

    def __init__(self, path: str, *, max_queue: int = 65536, batch: int = 1024, interval: float = 0.2) -> None:
        self.path = path
        self._out: TextIO | None = None
        super().__init__("lictor-access-log", max_queue, batch, interval)

    def record(self, ts: float, fields: dict[str, Any]) -> None:
        self.put((ts, fields))

    def row(self, mono: float, values: tuple[Any, ...]) -> None:
        """One line from `FIELDS`' values in order; `mono` is a `time.monotonic()` reading (the timestamp)."""
        self.put((mono + WALL_OFFSET, values))

    def _file(self) -> TextIO:
        if self._out is None:
            if self.path == "-":
                self._out = sys.stdout
            else:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._out = open(self.path, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
        return self._out

    def handle(self, items: list[tuple[float, Any]]) -> None:
        encode = _encoder.encode
        lines = []
        for ts, fields in items:
            if type(fields) is tuple:
                lines.append(_row_line(ts, fields))
            elif fields:  # `{"timestamp":...,` spliced onto the encoded record: no per-line dict copy
                lines.append(f'{{"timestamp":"{format_timestamp(ts)}",{encode(fields)[1:]}')
            else:
                lines.append(f'{{"timestamp":"{format_timestamp(ts)}"}}')
        out = self._file()
        out.write("\n".join(lines) + "\n")
        out.flush()

    def close(self, timeout: float = 2.0) -> None:
        self.flush(timeout)
        super().close(timeout)
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
            self._out = None
