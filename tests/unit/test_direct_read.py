"""Reads of a merged index straight into the caller's buffer (MergedIndex.read: _lookup.c's read, or its Python
twin) give the bytes the general path gives (pieces from ``resolve``, each read from its source), and step aside
(False) where they cannot: a source without a file, a record past the end of its file. A stack takes that path
only while its writable upper has nothing where the read is."""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from overlaybd import operations
from overlaybd.formats.lsmt import mapping
from overlaybd.formats.lsmt.index import Segments
from overlaybd.formats.lsmt.mapping import DATA, MergedIndex, resolve
from overlaybd.formats.lsmt.writable import WritableLayer

from ..native import require_extension

SECTOR = 512
FILE_SECTORS = 4096  # each source file: 2 MiB


def layer_files(tmp_path: Path, count: int, rng: random.Random) -> list[int]:
    fds = []
    for k in range(count):
        path = tmp_path / f"src{k}"
        path.write_bytes(rng.randbytes(FILE_SECTORS * SECTOR))
        fds.append(os.open(path, os.O_RDONLY))
    return fds


def index_over(rng: np.random.Generator, sources: int, span: int) -> MergedIndex:
    """Records with gaps between them, some zeroed, each pointing inside its source's file."""
    starts = np.unique(rng.integers(0, span // 8, 400) * 8)
    lengths = np.minimum(rng.integers(1, 40, starts.size), np.diff(np.append(starts, span)))
    zeroed = rng.random(starts.size) < 0.15
    moffset = rng.integers(0, FILE_SECTORS - 40, starts.size)
    tags = rng.integers(0, sources, starts.size)
    return MergedIndex(Segments(starts.astype(np.int64), lengths.astype(np.int64), np.where(zeroed, 0, moffset),
                                zeroed, tags.astype(np.int32)))


def reference(index: MergedIndex, fds: list[int], start: int, count: int) -> bytes:
    out = bytearray()
    for _s, n, kind, src, moff in resolve([index], start, start + count):
        out += os.pread(fds[src], n * SECTOR, moff * SECTOR) if kind == DATA else bytes(n * SECTOR)
    return bytes(out)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[list[int]]:
    fds = layer_files(tmp_path, 3, random.Random(5))
    yield fds
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("native", [True, False])
def test_read_gives_the_general_paths_bytes(files: list[int], native: bool, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    index = index_over(np.random.default_rng(11), len(files), 20000)
    if native:
        require_extension(index._native, "overlaybd.formats.lsmt._lookup")
    else:
        monkeypatch.setattr(index, "_native", None)
    fds = array("i", files)
    rng = random.Random(3)
    queries = [(rng.randrange(0, 21000), rng.choice([1, 8, 64, 512])) for _ in range(600)]
    queries += [(0, 20008), (19990, 40)]  # all of it; across the last record into what nothing covers
    for start, count in queries:
        buf = bytearray(b"\xaa" * count * SECTOR)
        assert index.read(fds, start, buf), (start, count)
        assert bytes(buf) == reference(index, files, start, count), (start, count)


@pytest.mark.parametrize("native", [True, False])
def test_read_steps_aside_where_it_cannot(files: list[int], native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    one = Segments(np.array([8], np.int64), np.array([8], np.int64), np.array([FILE_SECTORS - 4], np.int64),
                   np.array([False]), np.array([1], np.int32))
    index = MergedIndex(one)
    if native:
        require_extension(index._native, "overlaybd.formats.lsmt._lookup")
    else:
        monkeypatch.setattr(index, "_native", None)
    buf = bytearray(16 * SECTOR)
    assert not index.read(array("i", [files[0]]), 0, buf)  # source 1 has no descriptor
    assert not index.read(array("i", [files[0], -1]), 0, buf)
    assert not index.read(array("i", files), 0, buf)  # its last 4 sectors are past the end of the file
    assert index.read(array("i", files), 0, bytearray(8 * SECTOR))  # before the record: zeros, no file read
    assert not index.read(array("i", files), 0, bytearray(100))  # not whole sectors


def test_a_stack_reads_directly_until_its_upper_has_the_range(tmp_path: Path) -> None:
    rng = random.Random(8)
    size = 1 << 20
    lowers = []
    for k in range(2):
        d, i = str(tmp_path / f"w{k}.data"), str(tmp_path / f"w{k}.index")
        operations.create(d, i, size)
        with WritableLayer(d, i) as w:
            for _ in range(20):
                w.pwrite(rng.randrange(0, size // 4096) * 4096, rng.randbytes(4096 * rng.randint(1, 4)))
            w.flush()
            operations.commit(w, str(tmp_path / f"c{k}.lsmt"))
        lowers.append(str(tmp_path / f"c{k}.lsmt"))
    operations.create(str(tmp_path / "up.data"), str(tmp_path / "up.index"), size)
    with operations.open_stack(lowers, upper=(str(tmp_path / "up.data"), str(tmp_path / "up.index")),
                               writable=True) as st:
        general = bytearray(size)
        direct = bytearray(size)
        st._read_sectors(0, memoryview(general))
        assert st._read_direct(0, size // SECTOR, direct)
        assert direct == general
        st.readinto(0, direct)
        assert direct == general
        st.pwrite(8192, b"\x07" * 4096)
        assert not st._read_direct(16, 8, bytearray(4096))  # the upper has it now: the general path answers
        assert st.pread(8192, 4096) == b"\x07" * 4096
        assert st.pread(0, 8192) == bytes(general[:8192])  # beside it, the direct path again
    assert st._direct_plan is None  # closing dropped the descriptors


def test_python_twin_is_used_without_the_extension(monkeypatch: pytest.MonkeyPatch, files: list[int]) -> None:
    index = index_over(np.random.default_rng(2), len(files), 4000)
    monkeypatch.setattr(index, "_native", None)
    calls: list[int] = []
    real = mapping._read_python

    def counted(*args: Any) -> bool:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(mapping, "_read_python", counted)
    assert index.read(array("i", files), 0, bytearray(64 * SECTOR))
    assert calls == [1]
