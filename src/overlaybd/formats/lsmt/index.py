"""Pure index logic over numpy arrays: replay, overlay/merge, lookup, compaction plan. No I/O here.

A :class:`Segments` is a sorted, non-overlapping set of mappings, in sectors: logical ``[offset, offset+length)``
maps to ``moffset`` in the file of source ``tag`` (or reads as zeros when ``zeroed``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from .spec import COPY_STEP_SECTORS, INVALID_OFFSET, MAX_RECORD_SECTORS

_I64 = np.int64
_BIG = np.int64(1 << 62)


@dataclass(frozen=True, slots=True)
class Segments:
    """A sorted, non-overlapping set of mappings held as five parallel numpy columns (one row a record), in sectors:
    logical ``[offset, offset+length)`` reads ``moffset`` onwards in the file of source ``tag``, or zeros when
    ``zeroed``. Immutable; every operation (replay, overlay, merge, compaction plan) returns a new one."""

    offset: np.ndarray  # int64, sectors
    length: np.ndarray  # int64, sectors
    moffset: np.ndarray  # int64, sectors (for zeroed records: where the data cursor stood)
    zeroed: np.ndarray  # bool
    tag: np.ndarray  # int32: source ordinal

    def __len__(self) -> int:
        return int(self.offset.size)

    @property
    def end(self) -> np.ndarray:
        out: np.ndarray = self.offset + self.length
        return out

    @classmethod
    def empty(cls) -> Segments:
        z = np.zeros(0, _I64)
        return cls(z, z, z, np.zeros(0, bool), np.zeros(0, np.int32))

    @classmethod
    def build(cls, offset: object, length: object, moffset: object, zeroed: object, tag: object = 0) -> Segments:
        off = np.asarray(offset, dtype=_I64)
        n = off.size
        return cls(off, np.asarray(length, dtype=_I64).reshape(n), np.asarray(moffset, dtype=_I64).reshape(n),
                   np.broadcast_to(np.asarray(zeroed, dtype=bool), (n,)).copy(),
                   np.broadcast_to(np.asarray(tag, dtype=np.int32), (n,)).copy())

    def take(self, idx: np.ndarray | slice) -> Segments:
        return Segments(self.offset[idx], self.length[idx], self.moffset[idx], self.zeroed[idx], self.tag[idx])

    def with_tag(self, tag: int) -> Segments:
        return Segments(self.offset, self.length, self.moffset, self.zeroed, np.full(len(self), tag, np.int32))

    def rows(self) -> list[tuple[int, int, int, bool, int]]:
        return list(zip(self.offset.tolist(), self.length.tolist(), self.moffset.tolist(),
                        self.zeroed.tolist(), self.tag.tolist(), strict=False))

    def overlapping(self, start: int, end: int) -> tuple[int, int]:
        """Index range ``[i, j)`` of the records that intersect ``[start, end)`` (sectors)."""
        i = int(np.searchsorted(self.end, _I64(start), side="right"))
        j = int(np.searchsorted(self.offset, _I64(end), side="left"))
        return i, max(i, j)


def drop_invalid(records: dict[str, np.ndarray]) -> Segments:
    keep = records["offset"] != INVALID_OFFSET
    return Segments(records["offset"][keep], records["length"][keep], records["moffset"][keep],
                    records["zeroed"][keep], np.zeros(int(keep.sum()), np.int32))


def _concat(parts: list[Segments]) -> Segments:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Segments.empty()
    if len(parts) == 1:
        return parts[0]
    return Segments(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("offset", "length", "moffset",
                                                                                   "zeroed", "tag")))


def _sorted(seg: Segments) -> Segments:
    if len(seg) < 2 or bool(np.all(seg.offset[1:] >= seg.offset[:-1])):
        return seg
    return seg.take(np.argsort(seg.offset, kind="stable"))


def is_sorted_disjoint(seg: Segments) -> bool:
    return len(seg) < 2 or bool(np.all(seg.end[:-1] <= seg.offset[1:]))


def covered(seg: Segments) -> tuple[np.ndarray, np.ndarray]:
    """The union of a sorted disjoint set, as maximal intervals ``(starts, ends)``."""
    if not len(seg):
        return np.zeros(0, _I64), np.zeros(0, _I64)
    ends = seg.end
    new = np.ones(len(seg), bool)
    new[1:] = seg.offset[1:] != ends[:-1]
    starts = seg.offset[new]
    last = np.flatnonzero(np.append(new[1:], True))
    return starts, ends[last]


def subtract(bottom: Segments, starts: np.ndarray, ends: np.ndarray) -> Segments:
    """The parts of ``bottom`` outside the intervals ``[starts, ends)`` (sorted, disjoint), trimmed as the
    reference trims: a fragment that starts later than its record advances ``moffset`` unless zeroed."""
    if not len(bottom) or not starts.size:
        return bottom
    gs = np.concatenate(([_I64(0)], ends))
    ge = np.concatenate((starts, [_BIG]))
    keep = ge > gs
    gs, ge = gs[keep], ge[keep]
    bs, be = bottom.offset, bottom.end
    i0 = np.searchsorted(ge, bs, side="right")
    i1 = np.searchsorted(gs, be, side="left")
    counts = np.maximum(i1 - i0, 0)
    total = int(counts.sum())
    if total == 0:
        return Segments.empty()
    rec = np.repeat(np.arange(len(bottom)), counts)
    first = np.cumsum(counts) - counts
    gap = i0[rec] + (np.arange(total) - first[rec])
    fs = np.maximum(bs[rec], gs[gap])
    fe = np.minimum(be[rec], ge[gap])
    zeroed = bottom.zeroed[rec]
    shift = np.where(zeroed, 0, fs - bs[rec])
    return Segments(fs, fe - fs, bottom.moffset[rec] + shift, zeroed, bottom.tag[rec])


def overlay(top: Segments, bottom: Segments) -> Segments:
    """Records of ``top`` win wherever they are (data or zeroed); ``bottom`` shows through the gaps."""
    if not len(top):
        return bottom
    if not len(bottom):
        return top
    starts, ends = covered(top)
    return _sorted(_concat([top, subtract(bottom, starts, ends)]))


def merge_layers(layers: list[Segments]) -> Segments:
    """Merge layers given top-most first; each record keeps its tag. Pairwise tree: O(N log L)."""
    level = [seg for seg in layers]
    if not level:
        return Segments.empty()
    while len(level) > 1:
        nxt = [overlay(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class _Chunk:
    """Up to a few thousand consecutive records of a :class:`MutableIndex`, as five parallel lists."""

    __slots__ = ("offs", "ends", "moffs", "zeroed", "tags")

    def __init__(self, offs: list[int], ends: list[int], moffs: list[int], zeroed: list[bool],
                 tags: list[int]) -> None:
        self.offs = offs
        self.ends = ends
        self.moffs = moffs
        self.zeroed = zeroed
        self.tags = tags

    def split(self) -> _Chunk:
        """A copy of the second half as a new chunk (this one unchanged: :meth:`cut` drops it once the new one is
        in place)."""
        h = len(self.offs) // 2
        return _Chunk(self.offs[h:], self.ends[h:], self.moffs[h:], self.zeroed[h:], self.tags[h:])

    def cut(self) -> None:
        """Drop the second half (what :meth:`split` copied). Nothing is allocated: it cannot fail."""
        h = len(self.offs) // 2
        for col in (self.offs, self.ends, self.moffs, self.zeroed, self.tags):
            del col[h:]


class MutableIndex:
    """An interval map for a live writable layer: insert with last-write-wins, as the reference ``Index0``.

    Sorted Python lists cut in chunks of at most ``2 * CHUNK`` records, with the end of each chunk's last record
    beside them: a lookup is two ``bisect`` calls, and an insert moves the records of one chunk, not of the whole
    index (a flat list of a million records moves megabytes for every insert: milliseconds each).
    """

    __slots__ = ("_chunks", "_lasts", "_n")
    CHUNK = 1024

    def __init__(self) -> None:
        self._chunks: list[_Chunk] = []
        self._lasts: list[int] = []  # the end of each chunk's last record, ascending
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _locate(self, start: int) -> tuple[int, int]:
        """(chunk, position) of the first record that ends after ``start``; (number of chunks, 0) if none does."""
        c = bisect_right(self._lasts, start)
        if c == len(self._chunks):
            return c, 0
        return c, bisect_right(self._chunks[c].ends, start)

    def rows(self, start: int, end: int, source: int) -> list[tuple[int, int, int, bool, int]]:
        """The records meeting ``[start, end)``, in order, as ``(offset, length, moffset, zeroed, source)``."""
        out: list[tuple[int, int, int, bool, int]] = []
        chunks = self._chunks
        c, i = self._locate(start)
        while c < len(chunks):
            ch = chunks[c]
            offs = ch.offs
            j = bisect_left(offs, end, i)
            ends, moffs, zeroed = ch.ends, ch.moffs, ch.zeroed
            out += [(offs[k], ends[k] - offs[k], moffs[k], zeroed[k], source) for k in range(i, j)]
            if j < len(offs):
                break
            c, i = c + 1, 0
        return out

    def covers(self, start: int, end: int) -> bool:
        """Whether any record meets ``[start, end)``."""
        c, i = self._locate(start)
        return c < len(self._chunks) and self._chunks[c].offs[i] < end

    def insert(self, offset: int, length: int, moffset: int, zeroed: bool, tag: int = 0) -> None:
        self._replace(offset, offset + length, [offset], [offset + length], [moffset], [zeroed], [tag])

    def remove(self, offset: int, length: int) -> None:
        """Unmap a range (what a hole punched in a sparse layer does)."""
        self._replace(offset, offset + length, [], [], [], [], [])

    def _replace(self, offset: int, end: int, new_o: list[int], new_e: list[int], new_m: list[int],
                 new_z: list[bool], new_t: list[int]) -> None:
        chunks = self._chunks
        if not chunks:
            if new_o:  # made whole before any is set: a MemoryError leaves the index as it was
                self._chunks, self._lasts, self._n = [_Chunk(new_o, new_e, new_m, new_z, new_t)], [new_e[-1]], \
                    len(new_o)
            return
        c0, i0 = self._locate(offset)
        if c0 == len(chunks):  # after every record: at the end of the last chunk
            c0 -= 1
            i0 = len(chunks[c0].offs)
        # [(c0, i0), (c1, j1)): the records that meet [offset, end)
        c1 = c0
        j1 = bisect_left(chunks[c1].offs, end, i0)
        while j1 == len(chunks[c1].offs) and c1 + 1 < len(chunks) and chunks[c1 + 1].offs[0] < end:
            c1 += 1
            j1 = bisect_left(chunks[c1].offs, end)
        if c0 < c1 or i0 < j1:
            first = chunks[c0]
            if first.offs[i0] < offset:
                new_o.insert(0, first.offs[i0])
                new_e.insert(0, offset)
                new_m.insert(0, first.moffs[i0])
                new_z.insert(0, first.zeroed[i0])
                new_t.insert(0, first.tags[i0])
            last, k = chunks[c1], j1 - 1
            if last.ends[k] > end:
                zk = last.zeroed[k]
                new_o.append(end)
                new_e.append(last.ends[k])
                new_m.append(last.moffs[k] if zk else last.moffs[k] + (end - last.offs[k]))
                new_z.append(zk)
                new_t.append(last.tags[k])
        news: tuple[list[Any], ...] = (new_o, new_e, new_m, new_z, new_t)
        first = chunks[c0]
        removed = j1 - i0 if c0 == c1 else \
            len(first.offs) - i0 + sum(len(ch.offs) for ch in chunks[c0 + 1 : c1]) + j1
        n = self._n + len(new_o) - removed  # before anything changes: setting it then cannot fail
        self._put(c0, i0, c1, j1, news)
        self._n = n
        self._settle(c0 + 1 if c0 < c1 else c0)
        self._settle(c0)

    def _put(self, c0: int, i0: int, c1: int, j1: int, news: tuple[list[Any], ...]) -> None:
        """Records ``[(c0, i0), (c1, j1))`` replaced by the columns ``news``. A MemoryError leaves the index as it
        was: what is allocated is made before anything changes."""
        chunks = self._chunks
        first = chunks[c0]
        cols: tuple[list[Any], ...] = (first.offs, first.ends, first.moffs, first.zeroed, first.tags)
        if c0 == c1:
            # in place, column by column (a slice assignment is done whole or not at all); if a column fails, those
            # before it are put back (that allocates nothing unless the change freed half the chunk's room)
            done, back = slice(i0, j1), slice(i0, i0 + len(news[0]))
            olds = (first.offs[done], first.ends[done], first.moffs[done], first.zeroed[done], first.tags[done])
            k = 0
            try:
                for k in range(len(cols)):
                    cols[k][done] = news[k]
            except BaseException:
                for m in range(k):
                    cols[m][back] = olds[m]
                raise
            return
        # the first chunk's head and the last chunk's tail made as new lists (rare: a range across chunks)
        last = chunks[c1]
        head: list[list[Any]] = [col[:i0] + new for col, new in zip(cols, news, strict=True)]
        tail: list[list[Any]] = [col[j1:] for col in (last.offs, last.ends, last.moffs, last.zeroed, last.tags)]
        if c1 > c0 + 1:  # the chunks between go
            self._chunks, self._lasts = chunks[: c0 + 1] + chunks[c1:], self._lasts[: c0 + 1] + self._lasts[c1:]
        first.offs, first.ends, first.moffs, first.zeroed, first.tags = head
        last.offs, last.ends, last.moffs, last.zeroed, last.tags = tail

    def _settle(self, c: int) -> None:
        """After chunk ``c`` changed: drop it if empty, note its last end, split it if too large. Its last end is
        noted first, and a split changes nothing until what it allocates is made: a MemoryError there leaves a
        chunk too large, which lookups read right (the next insert there splits it)."""
        chunks, lasts = self._chunks, self._lasts
        if c >= len(chunks):
            return
        ch = chunks[c]
        if not ch.offs:
            del chunks[c]
            del lasts[c]
            return
        lasts[c] = ch.ends[-1]
        if len(ch.offs) > 2 * self.CHUNK:
            tail = ch.split()
            chunks.insert(c + 1, tail)
            try:
                lasts.insert(c + 1, tail.ends[-1])
            except BaseException:
                del chunks[c + 1]
                raise
            ch.cut()
            lasts[c] = ch.ends[-1]

    def apply(self, log: Segments) -> None:
        """Insert records given in time order (a later one wins where they meet), as one insert each would."""
        if len(log) <= _REPLAY_LEAF:
            for o, ln, m, z, t in log.rows():
                self.insert(o, ln, m, z, t)
            return
        merged = overlay(replay(log), self.segments())
        # every chunk made before any is replaced: a MemoryError leaves the index as it was
        chunks, lasts = _chunked(merged, self.CHUNK)
        self._chunks, self._lasts, self._n = chunks, lasts, len(merged)

    def segments(self) -> Segments:
        chunks = self._chunks
        offs = np.fromiter(chain.from_iterable(ch.offs for ch in chunks), dtype=_I64, count=self._n)
        ends = np.fromiter(chain.from_iterable(ch.ends for ch in chunks), dtype=_I64, count=self._n)
        return Segments(offs, ends - offs,
                        np.fromiter(chain.from_iterable(ch.moffs for ch in chunks), dtype=_I64, count=self._n),
                        np.fromiter(chain.from_iterable(ch.zeroed for ch in chunks), dtype=bool, count=self._n),
                        np.fromiter(chain.from_iterable(ch.tags for ch in chunks), dtype=np.int32, count=self._n))

    @classmethod
    def from_segments(cls, seg: Segments) -> MutableIndex:
        idx = cls()
        idx._chunks, idx._lasts = _chunked(seg, idx.CHUNK)
        idx._n = len(seg)
        return idx


def _chunked(seg: Segments, size: int) -> tuple[list[_Chunk], list[int]]:
    """``seg`` as chunks of ``size`` records (the last may hold fewer), and the end of each chunk's last record."""
    offs, ends = seg.offset.tolist(), seg.end.tolist()
    moffs, zeroed, tags = seg.moffset.tolist(), seg.zeroed.tolist(), seg.tag.tolist()
    chunks = [_Chunk(offs[k : k + size], ends[k : k + size], moffs[k : k + size], zeroed[k : k + size],
                     tags[k : k + size]) for k in range(0, len(offs), size)]
    return chunks, [ch.ends[-1] for ch in chunks]


_REPLAY_LEAF = 64


def replay(log: Segments) -> Segments:
    """Replay records given in time order (a writable layer's index file) into a sorted disjoint index.

    Same result as inserting one by one: each record survives as the connected pieces of its range that no
    later record covers. Divide and conquer (later half overlaid on the earlier half) keeps it vectorised.
    """
    if len(log) == 0:
        return log
    return _replay(log, np.argsort(log.offset, kind="stable"))


def _replay(log: Segments, order: np.ndarray) -> Segments:
    """:func:`replay`, given ``order``: the positions of ``log``'s records sorted by offset, time order among equal
    offsets. A half of the log in time keeps the order of the whole (filtered): one sort for the whole replay, not
    one at every level of the recursion."""
    n = len(log)
    by_offset = log.take(order)
    if is_sorted_disjoint(by_offset):
        return by_offset
    if n <= _REPLAY_LEAF:
        idx = MutableIndex()
        for o, ln, m, z, t in log.rows():
            idx.insert(o, ln, m, z, t)
        return idx.segments()
    half = n // 2
    later = order[order >= half] - half
    earlier = order[order < half]
    return overlay(_replay(log.take(slice(half, n)), later), _replay(log.take(slice(0, half)), earlier))


# -- compaction (commit / merge output) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    """What a committed file holds: copies (source tag, source sector, sectors) in output order, and the index."""

    copies: list[tuple[int, int, int]]
    index: Segments
    data_sectors: int


def plan_compaction(seg: Segments, first_sector: int = 8) -> CompactionPlan:
    """Byte-exact model of the reference ``compact()``: 32 KiB pieces, greedy coalescing."""
    out_o: list[int] = []
    out_l: list[int] = []
    out_m: list[int] = []
    out_z: list[bool] = []
    out_t: list[int] = []
    copies: list[tuple[int, int, int]] = []
    cur = first_sector
    # accumulator
    a_o = a_l = a_m = -1
    a_z = False
    a_t = -1
    limit = MAX_RECORD_SECTORS

    def flush() -> None:
        if a_l >= 0:
            out_o.append(a_o)
            out_l.append(a_l)
            out_m.append(a_m)
            out_z.append(a_z)
            out_t.append(a_t)

    for o, ln, m, z, t in seg.rows():
        if z:
            pieces = [(o, ln, cur)]
        else:
            copies.append((t, m, ln))
            pieces = []
            done = 0
            while done < ln:
                step = min(COPY_STEP_SECTORS, ln - done)
                pieces.append((o + done, step, cur + done))
                done += step
            cur += ln
        for po, pl, pm in pieces:
            a_mend = a_m if a_z else a_m + a_l
            if a_l >= 0 and a_o + a_l == po and a_mend == pm and a_z == z and a_t == t and a_l + pl < limit:
                a_l += pl
            else:
                flush()
                a_o, a_l, a_m, a_z, a_t = po, pl, pm, z, t
    flush()
    index = Segments.build(out_o, out_l, out_m, out_z, out_t)
    return CompactionPlan(copies, index, cur - first_sector)
