"""The Raft wire codec (registry/raft_wire.py): sealing, tamper and key checks, and framing."""

from __future__ import annotations

import pickle
import zlib

import pytest
from pysyncobj.encryptor import getEncryptor as fernet_encryptor

from lictor.registry import raft_wire
from lictor.registry.raft_wire import COMPRESS_MIN, AeadEncryptor, FrameCodec


def seal(enc: AeadEncryptor, message: object, at: int = 7) -> bytes:
    return enc.encrypt_at_time(FrameCodec.compress(pickle.dumps(message)), at)


def open_(enc: AeadEncryptor, token: bytes) -> object:
    return pickle.loads(FrameCodec.decompress(enc.decrypt(token)))


def test_round_trip_small_and_large() -> None:
    enc = AeadEncryptor("cluster key")
    small = {"type": "append_entries", "entries": [(b"{}", 5, 2)]}
    large = {"type": "append_entries", "entries": [(b"x" * 3000, i, 2) for i in range(5)]}
    for message in (small, large, b"\x00" * 40):
        token = seal(enc, message)
        assert enc.extract_timestamp(token) == 7
        assert open_(enc, token) == message


def test_small_frames_skip_deflate_large_ones_keep_it() -> None:
    small = pickle.dumps(("k" * 32, {"type": "next_node_idx"}))
    assert FrameCodec.compress(small) == b"\x00" + small
    large = b"a" * (COMPRESS_MIN * 4)
    packed = FrameCodec.compress(large)
    assert packed[:1] == b"\x78" and len(packed) < len(large) // 10
    assert FrameCodec.decompress(packed) == large
    # A zlib stream from pysyncobj's own framing still decodes.
    assert FrameCodec.decompress(zlib.compress(small, 3)) == small


def test_a_flipped_bit_anywhere_is_refused() -> None:
    enc = AeadEncryptor("cluster key")
    token = seal(enc, {"type": "append_entries", "term": 3})
    for position in range(len(token)):
        forged = bytearray(token)
        forged[position] ^= 0x01
        with pytest.raises(Exception):  # noqa: B017,PT011 - InvalidTag or ValueError, both drop the connection
            enc.decrypt(bytes(forged))


def test_a_forged_timestamp_does_not_decrypt() -> None:
    enc = AeadEncryptor("cluster key")
    token = bytearray(seal(enc, "hello", at=100))
    token[1:9] = (10**9).to_bytes(8, "big")
    assert enc.extract_timestamp(bytes(token)) == 10**9  # read before decrypting, as pysyncobj does
    with pytest.raises(Exception):  # noqa: B017,PT011
        enc.decrypt(bytes(token))


def test_another_key_and_the_old_fernet_framing_are_refused() -> None:
    token = seal(AeadEncryptor("cluster key"), "hello")
    with pytest.raises(Exception):  # noqa: B017,PT011
        AeadEncryptor("another key").decrypt(token)
    old = fernet_encryptor("cluster key").encrypt_at_time(zlib.compress(pickle.dumps("hello"), 3), 7)
    with pytest.raises(ValueError, match="not a Lictor Raft frame"):
        AeadEncryptor("cluster key").extract_timestamp(old)
    for short in (b"", b"\x01", token[:30]):
        with pytest.raises(ValueError):
            AeadEncryptor("cluster key").decrypt(short)


def test_nonces_never_repeat_across_a_counter_wrap() -> None:
    enc = AeadEncryptor("cluster key")
    first = [enc._nonce() for _ in range(1000)]
    assert len(set(first)) == 1000
    prefix = first[0][:8]
    enc._counter = iter([0xFFFFFFFF, 0x1_0000_0000])  # type: ignore[assignment]
    assert enc._nonce() == prefix + b"\xff\xff\xff\xff"
    wrapped = enc._nonce()  # past 2^32: a fresh prefix, counter from 0
    assert wrapped[:8] != prefix and wrapped[8:] == b"\x00\x00\x00\x00"


def test_install_is_idempotent_and_replaces_pysyncobjs_codec() -> None:
    from pysyncobj import syncobj, tcp_connection

    raft_wire.install()
    raft_wire.install()
    assert tcp_connection.zlib is FrameCodec
    assert syncobj.getEncryptor is AeadEncryptor
