"""Resolving reads against one or more index levels (pure; no I/O).

A *level* answers ``rows(start, end)``: the records intersecting ``[start, end)`` (sectors), sorted, each as
``(offset, length, moffset, zeroed, source)``. :func:`resolve` walks the levels top-first: a level's records win
where they are; its gaps are asked of the next level; what no level covers is a hole.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import numpy as np

from ... import native
from ...errors import LimitError
from .index import MutableIndex, Segments
from .spec import SECTOR

# the one-record read in C (_lookup.c), where built; numpy below gives the same answers without it
_lookup: Any = native.load(native.LOOKUP)


def describe_lookups() -> str:
    """How merged indexes are searched here."""
    return native.describe_lookups()

Row = tuple[int, int, int, bool, int]

# piece kinds
DATA = 0
ZERO = 1
HOLE = 2

Piece = tuple[int, int, int, int, int]  # (start, length, kind, source, moffset at start) in sectors


class Level(Protocol):
    def rows(self, start: int, end: int) -> list[Row]: ...


MOFFSET_BITS = 40
MOFFSET_MASK = (1 << MOFFSET_BITS) - 1  # also the mark of a zeroed record
LENGTH_MASK = 0xFFFF


class MergedIndex:
    """The frozen merged index of a stack, 16 bytes a record: the record ends (i8, searched) and, beside them, one
    u8 word per record holding the rest, so that finding a record touches two cache lines, not four:
    moffset (bits 0-39; all ones = zeroed), length (bits 40-55), source (bits 56-63)."""

    __slots__ = ("ends", "packed", "_native")

    def __init__(self, seg: Segments) -> None:
        self.ends = np.ascontiguousarray(seg.end, dtype=np.int64)
        data = seg.moffset[~seg.zeroed]
        if data.size and int(data.max()) >= MOFFSET_MASK:
            raise LimitError(f"a record points {int(data.max()) * 512} bytes into its layer's data (the limit is "
                             f"{MOFFSET_MASK * 512})")
        if seg.length.size and (int(seg.length.max()) > LENGTH_MASK or int(seg.tag.max()) > 255):
            raise LimitError("a merged record is longer than 65,535 sectors or comes from a 257th source")
        moffset = np.where(seg.zeroed, np.uint64(MOFFSET_MASK), seg.moffset.astype(np.uint64))
        self.packed = (moffset | (seg.length.astype(np.uint64) << np.uint64(MOFFSET_BITS))
                       | (seg.tag.astype(np.uint64) << np.uint64(56)))
        # the common case in C (_lookup.c), over these same arrays
        self._native = _lookup.index(self.ends, self.packed) if _lookup else None

    def __len__(self) -> int:
        return int(self.ends.size)

    @property
    def handle(self) -> Any:
        """The C extension's handle of this index (``_lookup.index``), or None where it is not built."""
        return self._native

    @property
    def nbytes(self) -> int:
        return int(self.ends.nbytes + self.packed.nbytes)

    def rows(self, start: int, end: int) -> list[Row]:
        native = self._native
        if native is not None:
            row = _lookup.one_row(native, start, end)
            if row is not None:
                return [row] if row else []
            # more than one record may meet the read: the general path below
        ends = self.ends
        i = int(ends.searchsorted(start, side="right"))
        if i < ends.size:
            e = ends.item(i)
            if e >= end:  # the common case: the read lies in one record (or in the gap before it)
                p = self.packed.item(i)
                ln = (p >> MOFFSET_BITS) & LENGTH_MASK
                if e - ln >= end:
                    return []
                m = p & MOFFSET_MASK
                return [(e - ln, ln, -1, True, p >> 56) if m == MOFFSET_MASK else (e - ln, ln, m, False, p >> 56)]
        else:
            return []
        i, j = np.searchsorted(ends, np.array((start, end - 1), dtype=np.int64), side="right").tolist()
        j = min(j + 1, self.ends.size)
        if i >= j:
            return []
        out = []
        for e, p in zip(self.ends[i:j].tolist(), self.packed[i:j].tolist(), strict=True):
            ln = (p >> MOFFSET_BITS) & LENGTH_MASK
            o = e - ln
            if o >= end:
                break
            m = p & MOFFSET_MASK
            out.append((o, ln, -1, True, p >> 56) if m == MOFFSET_MASK else (o, ln, m, False, p >> 56))
        return out

    def read(self, fds: array[int], start: int, buf: memoryview | bytearray) -> bool:
        """Fill ``buf`` (whole sectors) with sectors ``start`` on, as this index alone maps them: data read with
        ``pread`` from ``fds[source]``, zeros for zeroed records and for what no record covers. False where that
        is not enough (a source whose descriptor is -1, a short read, an OS error; ``buf`` is then partly
        written): the caller reads the general way, which raises the error that applies."""
        if self._native is not None:
            return bool(_lookup.read(self._native, fds, start, buf))
        return _read_python(self, fds, start, buf)

    def segments(self) -> Segments:
        lengths = ((self.packed >> np.uint64(MOFFSET_BITS)) & np.uint64(LENGTH_MASK)).astype(np.int64)
        moffset = (self.packed & np.uint64(MOFFSET_MASK)).astype(np.int64)
        zeroed = moffset == MOFFSET_MASK
        return Segments(self.ends - lengths, lengths, np.where(zeroed, 0, moffset), zeroed,
                        (self.packed >> np.uint64(56)).astype(np.int32))


_ZEROS = memoryview(bytes(1 << 22))


def fill_zero(view: memoryview) -> None:
    """Zeros over all of ``view``."""
    n = len(view)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROS))
        view[pos : pos + step] = _ZEROS[:step]
        pos += step


def _zero(view: memoryview, a: int, b: int) -> None:
    if a < b:
        fill_zero(view[a:b])


def _read_python(index: MergedIndex, fds: array[int], start: int, buf: memoryview | bytearray) -> bool:
    """:meth:`MergedIndex.read` without the C extension (the same steps as ``read_pieces`` in _lookup.c)."""
    view = memoryview(buf).cast("B")
    if start < 0 or len(view) % SECTOR:
        return False
    end = start + len(view) // SECTOR
    pos = start
    for o, ln, m, z, src in index.rows(start, end):
        lo = max(o, start)
        hi = min(o + ln, end)
        _zero(view, (pos - start) * SECTOR, (lo - start) * SECTOR)
        a, b = (lo - start) * SECTOR, (hi - start) * SECTOR
        if z:
            _zero(view, a, b)
        else:
            fd = fds[src] if src < len(fds) else -1
            if fd < 0:
                return False
            at = (m + lo - o) * SECTOR
            while a < b:
                try:
                    got = os.preadv(fd, [view[a:b]], at)
                except OSError:
                    return False
                if got <= 0:
                    return False
                a += got
                at += got
        pos = hi
    _zero(view, (pos - start) * SECTOR, len(view))
    return True


class MutableLevel:
    """A :class:`MutableIndex` seen as a level. ``catch_up``, called under ``lock`` before every lookup, brings the
    index up to date first (a writable layer takes the records its log holds for it)."""

    __slots__ = ("index", "source", "lock", "catch_up")

    def __init__(self, index: MutableIndex, source: int = 0, lock: AbstractContextManager[object] | None = None,
                 catch_up: Callable[[], None] | None = None) -> None:
        self.index = index
        self.source = source
        self.lock = lock if lock is not None else nullcontext()
        self.catch_up = catch_up

    def rows(self, start: int, end: int) -> list[Row]:
        """A consistent snapshot of the records (the data they point to is append-only, so it stays valid)."""
        with self.lock:
            if self.catch_up is not None:
                self.catch_up()
            return self.index.rows(start, end, self.source)

    def segments(self) -> Segments:
        """Every record now, as :class:`Segments` (tagged as the index holds them)."""
        with self.lock:
            if self.catch_up is not None:
                self.catch_up()
            return self.index.segments()

    def covers(self, start: int, end: int) -> bool:
        """Whether any record meets ``[start, end)`` now."""
        with self.lock:
            if self.catch_up is not None:
                self.catch_up()
            return self.index.covers(start, end)


def resolve(levels: Sequence[Level], start: int, end: int, depth: int = 0) -> list[Piece]:
    """Cut ``[start, end)`` into pieces: DATA (source, moffset), ZERO, or HOLE."""
    if depth >= len(levels):
        return [(start, end - start, HOLE, -1, 0)]
    out: list[Piece] = []
    pos = start
    for o, ln, m, z, src in levels[depth].rows(start, end):
        if o > pos:
            out.extend(resolve(levels, pos, o, depth + 1))
        lo = max(o, pos)
        hi = min(o + ln, end)
        if z:
            out.append((lo, hi - lo, ZERO, src, 0))
        else:
            out.append((lo, hi - lo, DATA, src, m + (lo - o)))
        pos = hi
    if pos < end:
        out.extend(resolve(levels, pos, end, depth + 1))
    return out
