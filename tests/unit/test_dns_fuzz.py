"""Hypothesis fuzzing of the wire entry points: never raise, answer FORMERR or stay silent."""

from __future__ import annotations

import os
import random
import struct
import time

from dnslib import RCODE, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from lictor.dns.resolver import FORWARD, DnsConfig, resolve_wire
from lictor.dns.server import DnsServer
from lictor.dns.view import CatalogView


def _examples(default: int) -> int:
    """LICTOR_FUZZ_EXAMPLES=20000 for a long run (docs/fuzzing.md); the small default keeps CI fast."""
    return int(os.environ.get("LICTOR_FUZZ_EXAMPLES") or default)


VIEW = CatalogView.from_snapshot(
    {
        "Nodes": [{"Node": "n1", "Address": "10.0.0.1"}],
        "Services": [{"Node": "n1", "ID": "web", "Service": "web", "Port": 80}],
        "Checks": [],
    },
    "dc1",
)
CFG = DnsConfig()
SERVER = DnsServer(lambda: VIEW, CFG)  # never started: only its sync handle() is exercised


def _check(out: object, data: bytes) -> None:
    assert out is None or out is FORWARD or isinstance(out, bytes)
    if isinstance(out, bytes):
        assert len(out) >= 12
        assert out[:2] == data[:2]  # ID echoed
        assert out[2] & 0x80  # QR set: it is a response


def _run(data: bytes) -> None:
    start = time.perf_counter()
    for transport in ("udp", "tcp"):
        _check(resolve_wire(data, VIEW, CFG, random.Random(0), transport), data)
        _check(SERVER.handle(data, transport), data)
    assert time.perf_counter() - start < 1.0  # bounded time per packet


@settings(max_examples=_examples(400), deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _run(data)


@settings(max_examples=_examples(200), deadline=None)
@given(st.binary(min_size=0, max_size=11))
def test_truncated_header_is_silent(data: bytes) -> None:
    assert resolve_wire(data, VIEW, CFG, random.Random(0)) is None
    assert SERVER.handle(data, "udp") is None


def _header(qd: int, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0xBEEF, flags, qd, an, ns, ar)


@settings(max_examples=_examples(200), deadline=None)
@given(st.integers(min_value=12, max_value=600), st.binary(max_size=40))
def test_compression_pointer_loops(ptr: int, tail: bytes) -> None:
    # Name that is a pointer to itself / to later garbage.
    data = _header(1) + struct.pack("!H", 0xC000 | ptr) + tail
    _run(data)
    loop = _header(1) + b"\x01a\xc0\x0c\x00\x01\x00\x01"
    out = resolve_wire(loop, VIEW, CFG, random.Random(0))
    assert isinstance(out, bytes) and out[3] & 0x0F == RCODE.FORMERR


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([0, 2, 50]), st.booleans())
def test_question_counts(count: int, real: bool) -> None:
    if real:
        q = DNSRecord()
        for i in range(count):
            q.add_question(DNSRecord.question(f"s{i}.service.consul").q)
        data = bytes(q.pack())
    else:
        data = _header(count) + b"\x03web\x07service\x06consul\x00\x00\x01\x00\x01"
    for transport in ("udp", "tcp"):
        out = resolve_wire(data, VIEW, CFG, random.Random(0), transport)
        assert isinstance(out, bytes)
        assert out[3] & 0x0F == RCODE.FORMERR
        out2 = SERVER.handle(data, transport)
        assert isinstance(out2, bytes) and out2[3] & 0x0F == RCODE.FORMERR


@settings(max_examples=_examples(200), deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=70), min_size=0, max_size=8),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 3),
)
def test_mutated_questions(labels: list[bytes], qtype: int, flags: int, ar: int) -> None:
    name = b"".join(bytes([min(len(x), 63)]) + x[:63] for x in labels) + b"\x00"
    data = _header(1, ar=ar, flags=flags) + name + struct.pack("!HH", qtype, 1)
    _run(data)


def test_responses_are_ignored() -> None:
    data = _header(1, flags=0x8100) + b"\x03web\x07service\x06consul\x00\x00\x01\x00\x01"
    assert resolve_wire(data, VIEW, CFG, random.Random(0)) is None
    assert SERVER.handle(data, "udp") is None
