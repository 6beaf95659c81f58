"""pysyncobj's journal file with Lictor's write path (registry/raft.py::_journal_writes_without_fstat):
writes land where they should across growths, survive a reopen, and ask the kernel for no file size."""

from __future__ import annotations

import mmap
import random
from pathlib import Path
from typing import Any

from pysyncobj import journal

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
