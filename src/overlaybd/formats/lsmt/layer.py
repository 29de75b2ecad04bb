"""A sealed (read-only) LSMT layer: committed, merged or sealed in place."""

from __future__ import annotations

import numpy as np

from ...errors import BadMagicError, CorruptIndexError, TruncatedError
from ...source.base import BlockSource
from .index import Segments, drop_invalid
from .mapping import Level, MergedIndex
from .spec import (
    HEADER_SIZE,
    INVALID_OFFSET,
    RECORD_SIZE,
    SECTOR,
    LsmtHeader,
    check_sealed_header,
    check_sealed_trailer,
    decode_records,
)
from .view import LsmtView


def read_header(source: BlockSource, offset: int = 0) -> LsmtHeader:
    if source.size < offset + HEADER_SIZE:
        raise TruncatedError(f"file is {source.size} bytes, too short for an LSMT header", path=source.name,
                             offset=offset)
    return LsmtHeader.unpack(source.pread(offset, HEADER_SIZE), path=source.name, offset=offset)


def validate_index(seg: Segments, positions: np.ndarray, lo: int, hi: int | None, *, path: str,
                   index_offset: int) -> None:
    """Order and bounds checks of a read-only index. ``positions`` are record numbers on disk."""
    if not len(seg):
        return
    ends = seg.end
    bad = np.flatnonzero(ends[:-1] > seg.offset[1:])
    if bad.size:
        k = int(bad[0]) + 1
        raise CorruptIndexError(
            f"index record {int(positions[k])} (logical sector {int(seg.offset[k])}) overlaps or precedes the "
            f"record before it", path=path, offset=index_offset + RECORD_SIZE * int(positions[k]))
    if hi is None:
        return
    m = seg.moffset
    mend = m + seg.length
    data_bad = ~seg.zeroed & ((m < lo) | (m >= hi) | (mend <= lo) | (mend > hi))
    zero_bad = seg.zeroed & ((m < lo) | (m > hi))
    bad = np.flatnonzero(data_bad | zero_bad)
    if bad.size:
        k = int(bad[0])
        raise CorruptIndexError(
            f"index record {int(positions[k])} maps to sectors [{int(m[k])}, {int(mend[k])}) outside the data area "
            f"[{lo}, {hi})", path=path, offset=index_offset + RECORD_SIZE * int(positions[k]))


def load_records(source: BlockSource, offset: int, count: int) -> tuple[Segments, np.ndarray]:
    """Read ``count`` records at ``offset``; drop padding; return them with their on-disk record numbers."""
    raw = source.pread(offset, count * RECORD_SIZE)
    rec = decode_records(raw)
    keep = rec["offset"] != INVALID_OFFSET
    return drop_invalid(rec), np.flatnonzero(keep)


class LsmtLayer(LsmtView):
    """One sealed LSMT file seen as a block device of ``virtual_size`` bytes."""

    def __init__(self, data: BlockSource, *, name: str | None = None) -> None:
        self.data = data
        self.name = name or data.name
        path = self.name
        self.header = read_header(data, 0)
        check_sealed_header(self.header, path=path)
        if data.size < 2 * HEADER_SIZE:
            raise TruncatedError("LSMT file has no room for a trailer", path=path, offset=data.size)
        trailer_at = data.size - HEADER_SIZE
        try:
            self.trailer = read_header(data, trailer_at)
        except BadMagicError as exc:
            raise BadMagicError("no LSMT trailer at the end: not a sealed layer (truncated, or a writable data "
                                "file that needs its index file)", path=path, offset=trailer_at) from exc
        t = self.trailer
        check_sealed_trailer(t, at=trailer_at, path=path)
        seg, positions = load_records(data, t.index_offset, t.index_size)
        validate_index(seg, positions, HEADER_SIZE // SECTOR, t.index_offset // SECTOR, path=path,
                       index_offset=t.index_offset)
        self._segments: Segments | None = seg
        self._levels: list[Level] | None = None
        self.size = t.virtual_size
        self.sources = [data]

    def segments(self) -> Segments:
        if self._segments is None:  # released after a stack merged it: read it again
            t = self.trailer
            self._segments = load_records(self.data, t.index_offset, t.index_size)[0]
        return self._segments

    @property
    def levels(self) -> list[Level]:  # type: ignore[override]
        """Built on first use: a layer read on its own needs it, a layer in a stack does not."""
        if self._levels is None:
            self._levels = [MergedIndex(self.segments())]
        return self._levels

    def release_index(self) -> None:
        """Drop the in-memory index (a stack has merged it); ``segments()`` reloads it if asked again."""
        self._segments = None
        self._levels = None

    @property
    def virtual_size(self) -> int:
        return self.trailer.virtual_size

    @property
    def uuid(self) -> bytes:
        return self.trailer.uuid

    @property
    def parent_uuid(self) -> bytes:
        return self.trailer.parent_uuid

    @property
    def sealed_in_place(self) -> bool:
        """Close-sealed (``--seal``): the writable header was kept."""
        return self.header.is_sealed is False
