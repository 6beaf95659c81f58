"""pysyncobj's journal file with Lictor's write path (registry/raft.py::_journal_writes_without_fstat):
writes land where they should across growths, survive a reopen, and ask the kernel for no file size;
disk blocks are reserved before the mapping is written, and a journal or vote that cannot be stored
stops the server (registry/raft.py::stop_on_storage_failure) instead of a SIGBUS or a forgotten ack."""

from __future__ import annotations

import errno
import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest
from pysyncobj import journal

from lictor.registry import raft
from lictor.registry.raft import _journal_writes_without_fstat


class SizeCountingMap:
    """The real mapping, counting `size()` (an fstat) and forwarding everything else."""

    def __init__(self, real: mmap.mmap) -> None:
        self.real, self.size_calls = real, 0

    def size(self) -> int:
        self.size_calls += 1
        return self.real.size()

    def __len__(self) -> int:
        return len(self.real)

    def __setitem__(self, key: slice, value: bytes) -> None:
        self.real[key] = value

    def __getitem__(self, key: slice) -> bytes:
        return self.real[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_writes_grow_the_file_land_in_place_and_never_stat_it(tmp_path: Path) -> None:
    _journal_writes_without_fstat()
    path = str(tmp_path / "raft.journal")
    rng = random.Random(7)
    model = bytearray(1024)
    f = journal.ResizableFile(path, initialSize=1024, defaultContent=b"\0" * 16)
    counting = SizeCountingMap(f._ResizableFile__mm)
    f._ResizableFile__mm = counting
    offset = 0
    for _ in range(400):  # appends, as the journal does, through several doublings
        chunk = rng.randbytes(rng.randint(1, 700))
        f.write(offset, chunk)
        end = offset + len(chunk)
        if end > len(model):
            model.extend(b"\0" * (end - len(model)))
        model[offset:end] = chunk
        offset = end
    f.write(100, b"rewritten")  # and an overwrite inside, as the journal's header update does
    model[100:109] = b"rewritten"
    assert f._ResizableFile__mm is counting  # grown in place (mremap), not re-mapped
    assert counting.size_calls == 0
    assert f.read(0, offset) == bytes(model[:offset])
    f._destroy()

    reopened = journal.ResizableFile(path, initialSize=1024)
    assert reopened.read(0, offset) == bytes(model[:offset])
    reopened._destroy()


class Stopped(Exception):
    pass


@pytest.fixture
def stops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """`stop_on_storage_failure` raises instead of ending the test process."""
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise Stopped(code)

    monkeypatch.setattr(raft, "_exit", fake_exit)
    return codes


def test_blocks_are_reserved_before_the_mapping_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _journal_writes_without_fstat()
    calls: list[tuple[int, int]] = []
    real = os.posix_fallocate

    def recording(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", recording)
    f = journal.ResizableFile(str(tmp_path / "raft.journal"), initialSize=1024, defaultContent=b"\0" * 16)
    f.write(0, b"a" * 100)
    f.write(5000, b"b" * 100)  # a growth: reserved up to the new end of the mapping
    f.write(raft.RESERVE_STEP + 10, b"c" * 10)  # past the first step: reserved again from where it stopped
    assert calls[0] == (0, 1024)  # the mapping was 1 KiB: reserve what is mapped, up to a step
    assert all(start + length <= len(f._ResizableFile__mm) for start, length in calls)
    assert sum(length for _, length in calls) >= raft.RESERVE_STEP + 20
    assert os.stat(tmp_path / "raft.journal").st_blocks * 512 >= raft.RESERVE_STEP  # real blocks, not a hole
    f._destroy()


def test_a_full_disk_stops_the_server_before_the_entry_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stops: list[int], caplog: pytest.LogCaptureFixture) -> None:
    _journal_writes_without_fstat()
    f = journal.ResizableFile(str(tmp_path / "raft.journal"), initialSize=1024, defaultContent=b"\0" * 16)
    f.write(0, b"kept")

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(Stopped):
        f.write(2_000_000, b"lost")  # would map pages the disk has no blocks for
    assert stops == [raft.STORAGE_FAILED_EXIT]
    assert "No space left on device" in caplog.text and "raft.journal" in caplog.text
    assert f.read(0, 4) == b"kept"
    f._destroy()


def test_a_nearly_full_disk_still_takes_the_write_that_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            stops: list[int]) -> None:
    _journal_writes_without_fstat()
    real = os.posix_fallocate
    room = 64 * 1024

    def nearly_full(fd: int, offset: int, length: int) -> None:
        if offset + length > room:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", nearly_full)
    f = journal.ResizableFile(str(tmp_path / "raft.journal"), initialSize=1024, defaultContent=b"\0" * 16)
    f.write(0, b"x" * 40_000)  # the 4 MiB step does not fit, this write does
    assert stops == []
    assert f.read(0, 40_000) == b"x" * 40_000
    with pytest.raises(Stopped):
        f.write(40_000, b"y" * 40_000)  # past the room: the server stops
    f._destroy()


def test_a_file_system_without_fallocate_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     stops: list[int], caplog: pytest.LogCaptureFixture) -> None:
    _journal_writes_without_fstat()

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    path = tmp_path / "raft.journal"
    f = journal.ResizableFile(str(path), initialSize=1024, defaultContent=b"\0" * 16)
    f.write(0, b"a" * 3000)
    f.write(3000, b"b" * 3000)
    assert stops == [] and f.read(2990, 20) == b"a" * 10 + b"b" * 10
    assert caplog.text.count("cannot reserve disk blocks") == 1  # said once per file
    f._destroy()


def test_a_vote_that_cannot_be_stored_stops_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       stops: list[int]) -> None:
    _journal_writes_without_fstat()
    meta = journal.MetaStorer(str(tmp_path / "raft.journal.meta"))
    meta.storeMeta({"currentTerm": 3, "votedForNodeId": "a"})
    assert meta.getMeta()["currentTerm"] == 3

    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal.shutil, "move", full)
    with pytest.raises(Stopped):
        meta.storeMeta({"currentTerm": 4, "votedForNodeId": "b"})
    assert stops == [raft.STORAGE_FAILED_EXIT]
    assert meta.getMeta()["currentTerm"] == 3  # the old vote stands; the new one was never claimed


def _flusher(tmp_path: Path) -> raft.RaftLog:
    settings = raft.RaftSettings(data_dir=str(tmp_path), self_addr="127.0.0.1:1", peers=[], password="k",
                                 flush_interval=0.005)
    (tmp_path / "raft.journal").write_bytes(b"\0" * 64)
    return raft.RaftLog(settings)


def test_a_failed_fsync_stops_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stops: list[int]) -> None:
    """After a failed fsync Linux may have dropped the pages it could not write: carrying on would
    leave acknowledged entries to the next power loss."""
    log = _flusher(tmp_path)
    failures = []

    def eio(fd: int) -> None:
        failures.append(fd)
        if len(failures) >= 20:
            log._closing.set()  # bound the loop if the failure were only logged
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(Stopped):
        log._flush_loop()
    assert stops == [raft.STORAGE_FAILED_EXIT] and len(failures) == 1


def test_a_file_gone_between_check_and_open_is_not_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             stops: list[int]) -> None:
    log = _flusher(tmp_path)
    calls = []

    def gone(path: str, flags: int) -> int:
        calls.append(path)
        if len(calls) >= 5:
            log._closing.set()
        raise FileNotFoundError(errno.ENOENT, "replaced by compaction", path)

    monkeypatch.setattr(os, "open", gone)
    log._flush_loop()  # returns once closing
    assert stops == [] and len(calls) >= 5
