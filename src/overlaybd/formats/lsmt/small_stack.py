"""A small stack read and merged in plain Python, without numpy: plain sealed LSMT files (``glance`` reads their
headers and indexes) and, on top, a writable data+index pair whose log is short. What ``overlaybd export`` and
``cat`` need of such a stack to copy it out: its size and its data pieces.

The merge gives the records ``index.merge_layers`` and a writable layer's replay give (the same fragments, the same
``moffset`` of each), over lists instead of numpy arrays. Anything else (another form: ZFile, tar, a sparse
writable layer; an index past ``SMALL_STACK_RECORDS``; anything amiss: a check that fails, a torn write, a record
of no length) gives None, and the caller opens the stack with the full readers, which say what is wrong.
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_left, bisect_right

from ...errors import OverlaybdError
from .glance import index_records, read_ends
from .header import (
    HEADER_SIZE,
    INVALID_OFFSET,
    MAX_LAYERS,
    MAX_RW_INDEX_RECORDS,
    RECORD_SIZE,
    SECTOR,
    LsmtHeader,
    check_virtual_size,
    is_lsmt,
)

# Records of every layer together, as their trailers (and the upper's index file) count them, padding included.
# Past this many the full readers take over. Measured (bench_export.py --records; a fresh interpreter each, the
# merge without the copy): 3 layers of 30,000 records 0.21 s here, 0.58 s through numpy; 64 layers of 1,024 0.24
# vs 0.57 s; 64 layers of 4,096 (262,144 records) 1.17 vs 0.98 s, where the log2(64) rounds of Python overlays cost
# more than loading numpy saves. The copy that follows costs either path the same per record, or less here.
SMALL_STACK_RECORDS = 131072
# the merged index's limits (mapping.MergedIndex): a record may point at most this many sectors into its layer
MOFFSET_LIMIT = (1 << 40) - 1

_MASK50 = (1 << 50) - 1
_MASK55 = (1 << 55) - 1
_RECORD = struct.Struct("<QQ")

#: ``(offset, length, moffset, zeroed, source)`` in sectors: logical ``[offset, offset + length)`` reads
#: ``moffset`` onwards in the file of source ``source``, or zeros when ``zeroed``
Row = tuple[int, int, int, bool, int]


class SmallStack:
    """A stack's files (bottom to top, the upper's data file last), its merged records and its size in bytes."""

    __slots__ = ("files", "rows", "size")

    def __init__(self, files: list[str], rows: list[Row], size: int) -> None:
        self.files, self.rows, self.size = files, rows, size

    def pieces(self) -> list[tuple[int, int, int, int]]:
        """The data as ``(start, end, source, byte offset in its file)``, in bytes, sorted, cut at ``size``."""
        out = []
        size = self.size
        for o, ln, m, z, src in self.rows:
            start = o * SECTOR
            if start >= size:
                break
            if not z:
                out.append((start, min((o + ln) * SECTOR, size), src, m * SECTOR))
        return out


def open_small(lowers: list[str], upper: tuple[str, str] | None = None, size: int | None = None
               ) -> SmallStack | None:
    """The stack of ``lowers`` (bottom to top, plain sealed files) and ``upper`` (a writable ``(data, index)``
    pair) when every part is in a form read here and the records are few; else None. ``size``: the device's
    size when its owner knows it (a volume), else the top layer's virtual size."""
    if len(lowers) > MAX_LAYERS or not (lowers or upper):
        return None
    ends = []
    for path in lowers:
        e = read_ends(path)
        if e is None:
            return None
        ends.append(e)
    budget = SMALL_STACK_RECORDS - sum(e.trailer.index_size for e in ends)
    top: tuple[LsmtHeader, list[Row]] | None = None
    if upper is not None:
        top = read_upper(upper[0], upper[1], len(lowers), budget)
        if top is None:
            return None
    elif budget < 0:
        return None
    levels = [top[1]] if top is not None else []
    for n in range(len(lowers) - 1, -1, -1):
        records = index_records(lowers[n], ends[n], SMALL_STACK_RECORDS)
        if records is None or any(ln == 0 or (not z and m >= MOFFSET_LIMIT) for _o, ln, m, z in records):
            return None
        levels.append([(o, ln, m, z, n) for o, ln, m, z in records])
    if size is None:
        sizes = [top[0].virtual_size] if top is not None else []
        sizes += [e.trailer.virtual_size for e in reversed(ends)]
        size = next((s for s in sizes if s), 0)
    return SmallStack([*lowers, *([upper[0]] if upper else [])], merge(levels), size)


def merge(levels: list[list[Row]]) -> list[Row]:
    """Levels given top-most first, merged as a pairwise tree of overlays (``index.merge_layers``): each record
    takes part in about log2(levels) overlays, not one per level below it."""
    while len(levels) > 1:
        paired = [overlay(levels[i], levels[i + 1]) for i in range(0, len(levels) - 1, 2)]
        if len(levels) % 2:
            paired.append(levels[-1])
        levels = paired
    return levels[0] if levels else []


def overlay(top: list[Row], bottom: list[Row]) -> list[Row]:
    """Records of ``top`` win wherever they are (data or zeroed); ``bottom`` shows through the gaps, each piece
    of a bottom record that starts later than the record advancing its ``moffset`` (unless zeroed), as
    ``index.overlay`` does. Both sorted and disjoint; so is the result."""
    if not top:
        return bottom
    if not bottom:
        return top
    starts: list[int] = []  # the union of top, as maximal intervals
    ends: list[int] = []
    for o, ln, _m, _z, _s in top:
        if ends and ends[-1] == o:
            ends[-1] = o + ln
        else:
            starts.append(o)
            ends.append(o + ln)
    out = list(top)
    n = len(starts)
    i = 0
    for o, ln, m, z, s in bottom:
        end = o + ln
        while i < n and ends[i] <= o:
            i += 1
        pos, j = o, i
        while pos < end:
            if j < n and starts[j] < end:
                if starts[j] > pos:
                    out.append((pos, starts[j] - pos, m if z else m + (pos - o), z, s))
                pos = max(pos, ends[j])
                j += 1
            else:
                out.append((pos, end - pos, m if z else m + (pos - o), z, s))
                break
    out.sort()
    return out


def replay(log: list[Row]) -> list[Row]:
    """Records in the order they were written (a writable layer's index file) as a sorted disjoint set: each
    record survives as the pieces of its range no later record covers (``index.MutableIndex`` inserted one by
    one)."""
    offs: list[int] = []
    ends: list[int] = []
    rest: list[tuple[int, bool, int]] = []  # (moffset, zeroed, source)
    for o, ln, m, z, s in log:
        end = o + ln
        i = bisect_right(ends, o)
        j = bisect_left(offs, end, i)
        new_o, new_e, new_r = [o], [end], [(m, z, s)]
        if i < j:
            if offs[i] < o:
                new_o.insert(0, offs[i])
                new_e.insert(0, o)
                new_r.insert(0, rest[i])
            if ends[j - 1] > end:
                mk, zk, sk = rest[j - 1]
                new_o.append(end)
                new_e.append(ends[j - 1])
                new_r.append((mk if zk else mk + (end - offs[j - 1]), zk, sk))
        offs[i:j] = new_o
        ends[i:j] = new_e
        rest[i:j] = new_r
    return [(o, e - o, m, z, s) for o, e, (m, z, s) in zip(offs, ends, rest, strict=True)]


def read_upper(data: str, index: str, source: int, budget: int) -> tuple[LsmtHeader, list[Row]] | None:
    """A writable data+index pair opened read-only (``writable.WritableLayer``'s checks): its data file's header
    and its records replayed, as source ``source``; None for another form, more than ``budget`` records, a
    check that fails, or a torn write (the full reader warns of it)."""
    header = _read_header(data)
    if header is None or not header.is_header or not header.is_data or header.is_sealed or header.is_sparse:
        return None
    ih = _read_header(index)
    if ih is None or not ih.is_header or ih.is_data or ih.is_sealed or ih.index_offset != HEADER_SIZE:
        return None
    try:
        check_virtual_size(header, at=0, path=data)
        data_sectors = os.path.getsize(data) // SECTOR
        with open(index, "rb", buffering=0) as f:
            count = (os.fstat(f.fileno()).st_size - HEADER_SIZE) // RECORD_SIZE
            if count > min(budget, MAX_RW_INDEX_RECORDS):
                return None
            raw = os.pread(f.fileno(), count * RECORD_SIZE, HEADER_SIZE)
    except (OSError, OverlaybdError):
        return None
    if len(raw) != count * RECORD_SIZE:
        return None
    log: list[Row] = []
    for w0, w1 in _RECORD.iter_unpack(raw):
        offset = w0 & _MASK50
        if offset == INVALID_OFFSET:
            continue  # padding
        length, moffset, zeroed = w0 >> 50, w1 & _MASK55, bool((w1 >> 55) & 1)
        if length == 0 or moffset < HEADER_SIZE // SECTOR or moffset + (0 if zeroed else length) > data_sectors \
                or (not zeroed and moffset >= MOFFSET_LIMIT):
            return None
        log.append((offset, length, moffset, zeroed, source))
    return header, replay(log)


def _read_header(path: str) -> LsmtHeader | None:
    try:
        with open(path, "rb", buffering=0) as f:
            head = os.pread(f.fileno(), HEADER_SIZE, 0)
    except OSError:
        return None
    if len(head) < HEADER_SIZE or not is_lsmt(head):
        return None
    try:
        return LsmtHeader.unpack(head, path=path, offset=0)
    except OverlaybdError:
        return None
