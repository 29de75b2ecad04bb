"""A plain sealed LSMT file read from its header, trailer and (small) index alone, without numpy: what ``overlaybd
log`` and ``overlaybd info`` need of a layer (and ``small_stack`` of each layer of a small stack), at the cost of a
few reads.

The checks are those ``LsmtLayer`` makes (the same functions for header and trailer; the same order and bounds
rules for index records). Anything else (another form: ZFile, tar, writable; anything amiss; an index too large
to walk in Python faster than numpy is loaded) gives None, and the caller opens the layer with the full reader,
which says what is wrong.
"""

from __future__ import annotations

import os
import struct

from ...errors import OverlaybdError
from .header import (
    HEADER_SIZE,
    INVALID_OFFSET,
    RECORD_SIZE,
    SECTOR,
    LsmtHeader,
    check_sealed_header,
    check_sealed_trailer,
    format_uuid,
    is_lsmt,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from typing import Any

# Walking records in Python costs about 0.5 us each; loading numpy about 0.1 s. Past this many records the full
# reader is the faster one.
SMALL_INDEX_RECORDS = 32768
_MASK50 = (1 << 50) - 1
_MASK55 = (1 << 55) - 1
_RECORD = struct.Struct("<QQ")


# plain classes, not dataclasses: loading dataclasses costs the command line's start 15 ms


class Ends:
    """The header and trailer of a sealed file, checked."""

    __slots__ = ("file_size", "header", "trailer")

    def __init__(self, header: LsmtHeader, trailer: LsmtHeader, file_size: int) -> None:
        self.header, self.trailer, self.file_size = header, trailer, file_size


class IndexTotals:
    """Valid records (padding dropped), zeroed records, sectors mapped by data records, sectors zeroed."""

    __slots__ = ("mapped_sectors", "records", "zeroed_records", "zeroed_sectors")

    def __init__(self, records: int, zeroed_records: int, mapped_sectors: int, zeroed_sectors: int) -> None:
        self.records, self.zeroed_records = records, zeroed_records
        self.mapped_sectors, self.zeroed_sectors = mapped_sectors, zeroed_sectors


def read_ends(path: str) -> Ends | None:
    """Header and trailer of a plain sealed LSMT file; None when ``path`` is not one (or cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < 2 * HEADER_SIZE:
            return None
        head = os.pread(fd, HEADER_SIZE, 0)
        tail = os.pread(fd, HEADER_SIZE, size - HEADER_SIZE)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not is_lsmt(head) or not is_lsmt(tail):
        return None
    try:
        header = LsmtHeader.unpack(head, path=path, offset=0)
        check_sealed_header(header, path=path)
        trailer = LsmtHeader.unpack(tail, path=path, offset=size - HEADER_SIZE)
        check_sealed_trailer(trailer, at=size - HEADER_SIZE, path=path)
    except OverlaybdError:
        return None
    return Ends(header, trailer, size)


def index_records(path: str, ends: Ends, limit: int = SMALL_INDEX_RECORDS) -> list[tuple[int, int, int, bool]] | None:
    """The index records of a file ``read_ends`` accepted, padding dropped, as ``(offset, length, moffset,
    zeroed)`` in sectors, after the order and bounds checks of the full reader; None when the index holds more
    than ``limit`` records (or fails a check, or cannot be read)."""
    t = ends.trailer
    if t.index_size > limit:
        return None
    try:
        with open(path, "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), t.index_size * RECORD_SIZE, t.index_offset)
    except OSError:
        return None
    if len(raw) != t.index_size * RECORD_SIZE:
        return None
    lo, hi = HEADER_SIZE // SECTOR, t.index_offset // SECTOR
    out = []
    prev_end = -1
    for w0, w1 in _RECORD.iter_unpack(raw):
        offset = w0 & _MASK50
        if offset == INVALID_OFFSET:
            continue  # padding
        length, moffset, is_zero = w0 >> 50, w1 & _MASK55, bool((w1 >> 55) & 1)
        if offset < prev_end or not _inside(moffset, length, is_zero, lo, hi):
            return None
        prev_end = offset + length
        out.append((offset, length, moffset, is_zero))
    return out


def index_totals(path: str, ends: Ends) -> IndexTotals | None:
    """Counts over the index of a file ``read_ends`` accepted (``index_records``); None when that is."""
    records = index_records(path, ends)
    if records is None:
        return None
    zeroed = mapped_sectors = zeroed_sectors = 0
    for _offset, length, _moffset, is_zero in records:
        if is_zero:
            zeroed += 1
            zeroed_sectors += length
        else:
            mapped_sectors += length
    return IndexTotals(len(records), zeroed, mapped_sectors, zeroed_sectors)


def _inside(m: int, length: int, is_zero: bool, lo: int, hi: int) -> bool:
    if is_zero:
        return lo <= m <= hi
    return lo <= m < hi and lo < m + length <= hi


def header_info(h: LsmtHeader) -> dict[str, Any]:
    """A header or trailer as ``overlaybd info`` prints it."""
    return {
        "flags": h.flags,
        "virtual_size": h.virtual_size,
        "uuid": format_uuid(h.uuid),
        "parent_uuid": format_uuid(h.parent_uuid),
        "version": f"{h.version}.{h.sub_version}",
        "message": h.message,
    }


def sealed_info(path: str, ends: Ends, totals: IndexTotals) -> dict[str, Any]:
    """What ``overlaybd info`` says of a plain sealed file (``inspection.describe_layer`` for one)."""
    h, t = ends.header, ends.trailer
    return {
        "path": path, "file_size": ends.file_size, "wrappers": [],
        "format": "lsmt-committed" if h.is_sealed else "lsmt-sealed-in-place",
        "virtual_size": t.virtual_size, "header": header_info(h), "trailer": header_info(t),
        "index": {"offset": t.index_offset, "records_on_disk": t.index_size},
        "records": totals.records, "zeroed_records": totals.zeroed_records,
        "mapped_bytes": totals.mapped_sectors * SECTOR, "zeroed_bytes": totals.zeroed_sectors * SECTOR,
    }


def describe_small(path: str) -> dict[str, Any] | None:
    """``sealed_info`` of a plain sealed file with a small index, without numpy; None for anything else."""
    ends = read_ends(path)
    totals = index_totals(path, ends) if ends is not None else None
    return sealed_info(path, ends, totals) if ends is not None and totals is not None else None
