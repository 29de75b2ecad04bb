"""Hypothesis strategies for pyoverlaybd's property tests.

Hypothesis is a test extra: import this module from test code only (nothing in ``overlaybd`` imports it).

Index records are plain tuples ``(offset, length, moffset, zeroed, tag)`` in sectors, as
:meth:`overlaybd.formats.lsmt.index.Segments.rows` returns them; :func:`to_segments` builds the numpy form.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from hypothesis import strategies as st

from ..formats.lsmt.index import Segments
from ..formats.lsmt.spec import MAX_RECORD_SECTORS

Row = tuple[int, int, int, bool, int]

__all__ = [
    "Row",
    "big_logs",
    "compaction_inputs",
    "disjoint_rows",
    "layer_stacks",
    "log_rows",
    "mixed_bytes",
    "to_segments",
    "writable_logs",
]


def to_segments(rows: Sequence[Row]) -> Segments:
    if not rows:
        return Segments.empty()
    o, ln, m, z, t = zip(*rows, strict=True)
    return Segments.build(list(o), list(ln), list(m), list(z), list(t))


@st.composite
def log_rows(draw: st.DrawFn, *, min_size: int = 0, max_size: int = 40, max_sector: int = 200, max_length: int = 48,
             tags: bool = True) -> list[Row]:
    """A time-ordered log of possibly overlapping records over ``[0, max_sector)``; moffsets arbitrary.

    With ``tags`` every record is tagged with its position in the log (so a result can be traced back to the
    record it came from); otherwise all tags are 0, as in a real writable layer.
    """
    n = draw(st.integers(min_size, max_size))
    out: list[Row] = []
    for i in range(n):
        length = draw(st.integers(1, max_length))
        offset = draw(st.integers(0, max(0, max_sector - length)))
        zeroed = draw(st.booleans())
        moffset = draw(st.integers(8, 1 << 20))
        out.append((offset, length, moffset, zeroed, i if tags else 0))
    return out


@st.composite
def writable_logs(draw: st.DrawFn, *, min_size: int = 0, max_size: int = 40, max_sector: int = 200,
                  max_length: int = 48) -> list[Row]:
    """A log as a writable layer appends it: data records take the data cursor and advance it; zeroed records
    (discards) carry the cursor without advancing it. Tags are the record numbers."""
    n = draw(st.integers(min_size, max_size))
    cursor = 8
    out: list[Row] = []
    for i in range(n):
        length = draw(st.integers(1, max_length))
        offset = draw(st.integers(0, max(0, max_sector - length)))
        zeroed = draw(st.integers(0, 3)) == 0
        out.append((offset, length, cursor, zeroed, i))
        if not zeroed:
            cursor += length
    return out


@st.composite
def big_logs(draw: st.DrawFn, *, min_size: int = 100, max_size: int = 600, max_sector: int = 1500,
             max_length: int = 64) -> list[Row]:
    """Hundreds of records (beyond the replay leaf size), cheap to draw: built from one random seed, plus an
    optional sorted-disjoint run so the already-disjoint shortcut meets overlapping halves too."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(min_size, max_size))
    rng = random.Random(seed)
    out: list[Row] = []
    cursor = 8
    pos = 0
    disjoint_prefix = draw(st.integers(0, n // 2))
    for i in range(n):
        length = rng.randint(1, max_length)
        if i < disjoint_prefix:
            offset = pos + rng.randint(0, 3)
            pos = offset + length
        else:
            offset = rng.randint(0, max(0, max_sector - length))
        zeroed = rng.random() < 0.25
        out.append((offset, length, cursor, zeroed, i))
        if not zeroed:
            cursor += length
    return out


@st.composite
def disjoint_rows(draw: st.DrawFn, *, max_records: int = 10, max_gap: int = 30, max_length: int = 40,
                  start: int = 0, max_tag: int = 3) -> list[Row]:
    """A sorted, disjoint index (gaps may be 0: records may touch)."""
    n = draw(st.integers(0, max_records))
    pos = start + draw(st.integers(0, max_gap))
    out: list[Row] = []
    for _ in range(n):
        length = draw(st.integers(1, max_length))
        zeroed = draw(st.booleans())
        moffset = draw(st.integers(8, 1 << 20))
        tag = draw(st.integers(0, max_tag))
        out.append((pos, length, moffset, zeroed, tag))
        pos += length + draw(st.integers(0, max_gap))
    return out


def layer_stacks(*, min_layers: int = 1, max_layers: int = 6, max_records: int = 10, max_gap: int = 30,
                 max_length: int = 40) -> st.SearchStrategy[list[list[Row]]]:
    """Several sorted disjoint layers over the same small sector range (so they overlap a lot)."""
    return st.lists(disjoint_rows(max_records=max_records, max_gap=max_gap, max_length=max_length),
                    min_size=min_layers, max_size=max_layers)


@st.composite
def compaction_inputs(draw: st.DrawFn, *, max_records: int = 30) -> list[Row]:
    """A sorted disjoint index as compaction sees it: lengths up to the record limit (mostly small, some near
    and at the limit, some contiguous runs), few distinct tags, data and zeroed records."""
    n = draw(st.integers(0, max_records))
    pos = draw(st.integers(0, 5))
    out: list[Row] = []
    length_st = st.one_of(st.integers(1, 200), st.integers(1, MAX_RECORD_SECTORS),
                          st.sampled_from([63, 64, 65, 128, 8192, 16319, 16320, 16321, 16382, MAX_RECORD_SECTORS]))
    for _ in range(n):
        length = draw(length_st)
        zeroed = draw(st.integers(0, 3)) == 0
        tag = draw(st.integers(0, 2))
        moffset = draw(st.integers(8, 1 << 30))
        out.append((pos, length, moffset, zeroed, tag))
        pos += length + draw(st.sampled_from([0, 0, 0, 1, 7, 100]))
    return out


@st.composite
def mixed_bytes(draw: st.DrawFn, *, max_size: int = 300 * 1024) -> bytes:
    """Mixtures of random and repeated bytes, sizes 0..max_size (odd sizes included); cheap to draw."""
    size = draw(st.one_of(st.integers(0, max_size), st.sampled_from([0, 1, 511, 4095, 4096, 4097, 65535, 65536,
                                                                      65537, 131073, max_size])))
    seed = draw(st.integers(0, 2**32 - 1))
    random_share = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        n = min(size - len(out), rng.randint(1, 40000))
        if rng.random() < random_share:
            out += rng.randbytes(n)
        else:
            out += bytes([rng.randrange(256)]) * n
    return bytes(out)
