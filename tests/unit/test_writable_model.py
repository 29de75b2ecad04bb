"""A writable layer under random writes, zero-writes and trims (pieces of every size, one record or many,
overlapping and adjacent), with lookups at random points, so that its index takes what was appended one record
at a time or in batches: it reads as a byte model does, and its in-memory index is exactly what replaying its
index file gives once reopened (in C and in Python)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from overlaybd.formats.lsmt import writable
from overlaybd.formats.lsmt.spec import SECTOR
from overlaybd.formats.lsmt.writable import WritableLayer, create_writable


@pytest.mark.parametrize("seed", range(6))
def test_a_layer_reads_as_its_model_and_as_its_index_file(tmp_path: Path, seed: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(writable, "CATCH_UP_AT", rng.choice((1, 7, 1 << 16)))
    size = 64 << 20
    data, index = str(tmp_path / "d"), str(tmp_path / "i")
    create_writable(data, index, size)
    model = bytearray(size)
    with WritableLayer(data, index) as layer:
        for _ in range(400):
            n = rng.choice((1, 8, 64, 2048, 16383, 16384, 40000)) * SECTOR
            off = rng.randrange(0, (size - n) // SECTOR) * SECTOR if rng.random() < 0.5 else \
                rng.randrange(0, 64) * SECTOR  # the low sectors: overlaps and adjacent pieces
            op = rng.random()
            if op < 0.6:
                blob = rng.randbytes(min(n, 1 << 20))
                layer.pwrite(off, blob)
                model[off:off + len(blob)] = blob
            elif op < 0.8:
                layer.trim(off, n)
                model[off:off + n] = bytes(n)
            else:
                layer.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            if rng.random() < 0.1:
                at = rng.randrange(0, size - 65536)
                assert layer.pread(at, 65536) == model[at:at + 65536]
        assert layer.pread(0, size) == model
        rows = layer.segments().rows()
        layer.flush()
    with WritableLayer(data, index, readonly=True) as again:
        assert again.segments().rows() == rows
        assert again.pread(0, size) == model
