"""Writing sealed LSMT files: commit/merge by compaction and sealing in place."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from ...source.base import BlockSource
from ...source.file import write_all
from .index import Segments, plan_compaction
from .spec import (
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    FLAG_SPARSE,
    HEADER_SIZE,
    INDEX_PAD_RECORDS,
    INVALID_RECORD,
    SECTOR,
    LsmtHeader,
    encode_records,
)

Progress = Callable[[int, int], None]
COPY_CHUNK = 4 << 20


def write_compacted(fd: int, base: int, seg: Segments, sources: Sequence[BlockSource], *, virtual_size: int,
                    uuid: bytes, parent_uuid: bytes, message: bytes = b"", progress: Progress | None = None,
                    name: str = "<output>") -> tuple[LsmtHeader, int]:
    """Write ``[header][data][index, padded to 256 records][trailer]`` at ``base``; return (trailer, length).

    ``seg`` is sorted and disjoint; ``seg.tag`` selects the source each record's data is read from and is written
    to disk as is (the reference stores source ordinals there).
    """
    plan = plan_compaction(seg)
    header = LsmtHeader(flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED, virtual_size=virtual_size, uuid=uuid,
                        parent_uuid=parent_uuid, user_tag=message[:256])
    write_all(fd, header.pack(), base, name)
    pos = base + HEADER_SIZE
    total = plan.data_sectors * SECTOR
    done = 0
    buf = bytearray(COPY_CHUNK)
    for tag, moffset, nsect in plan.copies:
        src = sources[tag]
        left = nsect * SECTOR
        at = moffset * SECTOR
        while left:
            n = min(left, COPY_CHUNK)
            view = memoryview(buf)[:n]
            src.readinto(at, view)
            write_all(fd, view, pos, name)
            pos += n
            at += n
            left -= n
            done += n
            if progress is not None:
                progress(done, total)
    idx = plan.index
    body = encode_records(idx.offset, idx.length, idx.moffset, idx.zeroed, idx.tag)
    nrec = len(idx)
    pad = -nrec % INDEX_PAD_RECORDS
    body += INVALID_RECORD * pad
    index_offset = pos - base
    write_all(fd, body, pos, name)
    pos += len(body)
    trailer = header.with_(flags=FLAG_DATA | FLAG_SEALED, index_offset=index_offset, index_size=nrec + pad)
    write_all(fd, trailer.pack(), pos, name)
    pos += HEADER_SIZE
    return trailer, pos - base


def seal_in_place(fd: int, data_size: int, header: LsmtHeader, seg: Segments, *, name: str) -> LsmtHeader:
    """Append the index and a trailer to a writable data file (``overlaybd-commit --seal``).

    The index is the replayed, uncoalesced one with tags 0; it is padded with zero bytes to a whole sector.
    """
    at = -(-data_size // SECTOR) * SECTOR
    body = encode_records(seg.offset, seg.length, seg.moffset, seg.zeroed, np.zeros(len(seg), np.uint8))
    body += bytes(-len(body) % SECTOR)
    flags = FLAG_DATA | FLAG_SEALED | (FLAG_SPARSE if header.is_sparse else 0)
    trailer = header.with_(flags=flags, index_offset=at, index_size=len(seg))
    write_all(fd, body + trailer.pack(), at, name)
    os.fsync(fd)
    return trailer
