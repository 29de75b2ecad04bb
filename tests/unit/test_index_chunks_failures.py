"""The chunked writable index (``MutableIndex``) when an insert fails for memory half way: the index stays one that
lookups read right, and the insert tried again (what a writable layer's catch-up does with the records it keeps
until the index holds them) maps the record once, as the records replayed from the index file do."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from overlaybd.formats.lsmt import index as idxmod
from overlaybd.formats.lsmt.index import MutableIndex, is_sorted_disjoint
from overlaybd.formats.lsmt.spec import SECTOR
from overlaybd.formats.lsmt.writable import WritableLayer, create_writable


def _check_chunks(idx: MutableIndex) -> None:
    chunks = idx._chunks
    assert all(ch.offs for ch in chunks), "an empty chunk"
    assert idx._lasts == [ch.ends[-1] for ch in chunks], "a chunk's last end noted wrong"
    assert len(idx) == sum(len(ch.offs) for ch in chunks)
    assert is_sorted_disjoint(idx.segments())


class _FailOnce:
    """Makes ``_Chunk.split`` raise MemoryError the first ``times`` calls (as the lists it makes could)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, times: int = 1) -> None:
        self.left = times
        self.split = idxmod._Chunk.split
        monkeypatch.setattr(idxmod._Chunk, "split", self)

    def __get__(self, chunk: idxmod._Chunk, owner: type) -> object:
        def split() -> idxmod._Chunk:
            if self.left:
                self.left -= 1
                raise MemoryError
            return self.split(chunk)

        return split


@pytest.mark.parametrize("where", ["end", "front", "middle"])
def test_a_split_that_fails_leaves_the_index_readable(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    small = type("SmallChunks", (MutableIndex,), {"__slots__": (), "CHUNK": 2})
    idx = small()
    for k in range(4):
        idx.insert(100 + k * 10, 5, k, False, 0)
    _check_chunks(idx)
    at = {"end": 500, "front": 0, "middle": 116}[where]
    _FailOnce(monkeypatch)
    with pytest.raises(MemoryError):
        idx.insert(at, 2, 99, False, 0)  # a chunk of 5 records: its split fails
    _check_chunks(idx)
    assert idx.covers(at, at + 2) and idx.rows(at, at + 2, 0) == [(at, 2, 99, False, 0)]
    before = idx.segments().rows()
    idx.insert(at, 2, 99, False, 0)  # tried again: the same index
    _check_chunks(idx)
    assert idx.segments().rows() == before


def test_a_catch_up_whose_split_fails_maps_every_record_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writable layer (chunks of 2 records) whose index fails to split a chunk while it takes the records
    appended: the lookup fails; the next maps them all, once, and reads what was written, as after reopening."""
    monkeypatch.setattr(MutableIndex, "CHUNK", 2)
    data, index = str(tmp_path / "d"), str(tmp_path / "i")
    size = 1 << 20
    create_writable(data, index, size)
    rng = random.Random(3)
    model = bytearray(size)
    with WritableLayer(data, index) as layer:
        for k in range(12):
            layer.pwrite(k * 4 * SECTOR, bytes([k + 1]) * SECTOR)
            model[k * 4 * SECTOR : (k * 4 + 1) * SECTOR] = bytes([k + 1]) * SECTOR
        assert layer.pread(0, size) == model
        for _ in range(3):
            off = rng.randrange(size // SECTOR - 8) * SECTOR
            blob = rng.randbytes(SECTOR * rng.randrange(1, 8))
            layer.pwrite(off, blob)
            model[off : off + len(blob)] = blob
        layer.pwrite(size - SECTOR, b"e" * SECTOR)  # past every record so far: the last chunk grows
        model[size - SECTOR :] = b"e" * SECTOR
        failing = _FailOnce(monkeypatch, times=2)
        for _ in range(3):
            try:
                got = layer.pread(0, size)
                break
            except MemoryError:
                pass
        assert failing.left == 0
        assert got == model
        _check_chunks(layer.index)
        rows = layer.segments().rows()
        layer.flush()
    with WritableLayer(data, index, readonly=True) as again:
        assert again.pread(0, size) == model
        assert again.segments().rows() == rows


_INSERTS_UNDER_A_MEMORY_LIMIT = """
import random, resource, sys
import numpy as np
from overlaybd.formats.lsmt.index import MutableIndex, Segments, is_sorted_disjoint
rng = random.Random(int(sys.argv[1]))
n = 200_000
o = np.arange(n, dtype=np.int64) * 16
idx = MutableIndex.from_segments(Segments(o, np.full(n, 8, dtype=np.int64), o.copy(), np.zeros(n, bool),
                                          np.zeros(n, np.int32)))
held = []
vm = int([ln for ln in open("/proc/self/status") if ln.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 20), resource.RLIM_INFINITY))
failed = 0
try:
    for k in range(300_000):
        try:
            idx.insert(rng.randrange(n * 16), rng.randint(1, 40), 10**7 + k, False, 0)
            if k % 7 == 0:
                held.append(bytearray(rng.randrange(1, 1 << 16)))  # memory runs out, here or in an insert
        except MemoryError:
            failed += 1
            if failed > 50:
                held.clear()
            if failed > 100:
                break
finally:
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
held.clear()
chunks = idx._chunks
print(failed > 100,
      all(len({len(ch.offs), len(ch.ends), len(ch.moffs), len(ch.zeroed), len(ch.tags)}) == 1 for ch in chunks),
      idx._lasts == [ch.ends[-1] for ch in chunks], len(idx) == sum(len(ch.offs) for ch in chunks),
      is_sorted_disjoint(idx.segments()))
"""


@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_inserts_that_fail_for_memory_leave_the_index_whole(tmp_path: Path, seed: int) -> None:
    """A child process inserting records into an index of 200,000 while memory runs out (the address-space
    limit), a hundred inserts failing wherever they allocate: its chunks' five columns stay of one length, their
    last ends and the record count right, the records sorted and disjoint."""
    out = subprocess.run([sys.executable, "-c", _INSERTS_UNDER_A_MEMORY_LIMIT, str(seed)], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    assert out.split() == ["True"] * 5
