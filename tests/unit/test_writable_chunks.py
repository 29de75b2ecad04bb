"""A writable layer whose index is cut in chunks of a few records (so that inserts split chunks, trims and writes
span many of them, and catch-ups take records one by one or replay them), under random writes, zero-writes and
trims: it reads as a byte model does, its index is what its index file replays to once reopened, and the reference's
``overlaybd-commit`` commits it to the same bytes as ours."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from overlaybd.formats.lsmt import writable
from overlaybd.formats.lsmt.index import MutableIndex, is_sorted_disjoint
from overlaybd.formats.lsmt.spec import SECTOR
from overlaybd.formats.lsmt.writable import WritableLayer, create_writable
from overlaybd.operations import commit

UUID = "11111111-2222-3333-4444-555555555555"


def _reference_commit() -> Path | None:
    folder = os.environ.get("OVERLAYBD_REFERENCE_TOOLS")
    tool = Path(folder) / "overlaybd-commit" if folder else None
    return tool if tool is not None and tool.exists() else None


def _check_chunks(idx: MutableIndex) -> None:
    assert all(ch.offs and len(ch.offs) <= 2 * idx.CHUNK for ch in idx._chunks)
    assert idx._lasts == [ch.ends[-1] for ch in idx._chunks]
    assert len(idx) == sum(len(ch.offs) for ch in idx._chunks)
    assert is_sorted_disjoint(idx.segments())


@pytest.mark.parametrize("seed", range(4))
def test_a_layer_in_small_chunks_reads_as_its_model_and_commits_as_the_reference(
        tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(MutableIndex, "CHUNK", rng.choice((1, 2, 3, 8)))
    monkeypatch.setattr(writable, "CATCH_UP_AT", rng.choice((1, 5, 1 << 16)))
    monkeypatch.setattr(writable, "_FEW", rng.choice((1, 4, 64)))
    size = 8 << 20
    data, index = str(tmp_path / "d"), str(tmp_path / "i")
    create_writable(data, index, size)
    model = bytearray(size)
    with WritableLayer(data, index) as layer:
        for step in range(600):
            n = rng.choice((1, 1, 3, 8, 64, 700)) * SECTOR
            if rng.random() < 0.3:
                # at a record's edge: one sector before, on or after where earlier writes began
                off = min(max(rng.choice((0, 8, 64, 4096)) * SECTOR + rng.choice((-SECTOR, 0, SECTOR)), 0), size - n)
            else:
                off = rng.randrange(0, (size - n) // SECTOR) * SECTOR
            op = rng.random()
            if op < 0.6:
                blob = rng.randbytes(n)
                layer.pwrite(off, blob)
                model[off : off + n] = blob
            elif op < 0.8:
                layer.trim(off, n)
                model[off : off + n] = bytes(n)
            else:
                layer.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            if step % 25 == 0:
                at = rng.randrange(0, size - 65536)
                assert layer.pread(at, 65536) == model[at : at + 65536]
                _check_chunks(layer.index)
            if step % 150 == 149:  # a trim across many chunks
                off = rng.randrange(0, size // 2 // SECTOR) * SECTOR
                layer.trim(off, size // 4)
                model[off : off + size // 4] = bytes(size // 4)
        assert layer.pread(0, size) == model
        _check_chunks(layer.index)
        rows = layer.segments().rows()
        layer.flush()
    with WritableLayer(data, index, readonly=True) as again:
        assert again.segments().rows() == rows
        assert again.pread(0, size) == model
        ours = tmp_path / "our.commit"
        commit(again, str(ours), uuid=UUID)
    tool = _reference_commit()
    if tool is None:
        pytest.skip("set OVERLAYBD_REFERENCE_TOOLS to the reference tools' folder to commit with overlaybd-commit")
    subprocess.run([str(tool), data, index, str(tmp_path / "ref.commit"), "--uuid", UUID], check=True,
                   capture_output=True)
    assert (tmp_path / "ref.commit").read_bytes() == ours.read_bytes()
