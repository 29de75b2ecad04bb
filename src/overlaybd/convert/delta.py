"""The blocks a layer changed, from the byte ranges libext2fs wrote, as the records of a layer.

Each 4 KiB block written is compared with the device below (the earlier layers); only blocks that differ become
records: data records pointing into the raw image itself (commit copies them from there, so the layer's data is
never written twice), zero runs as zeroed records. Blocks the library rewrote unchanged (every block bitmap and
group descriptor at each close, say) do not make the layer bigger; blocks never written are never read.
This is ``importing.write_delta`` limited to the ranges written, producing an index instead of writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..formats.lsmt.index import Segments
from ..formats.lsmt.spec import MAX_RECORD_SECTORS, SECTOR
from ..importing import BLOCK, block_runs
from ..source.base import BlockSource, ExtentKind

WINDOW = 4 << 20
Ranges = np.ndarray | Iterable[tuple[int, int]]


def merged_blocks(ranges: Ranges, limit: int) -> list[tuple[int, int]]:
    """Byte ranges ``(offset, length)`` widened to whole 4 KiB blocks, clipped to ``limit``, sorted and merged:
    ``[(start, end)]`` (pure)."""
    arr = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    arr = arr[arr[:, 1] > 0]
    if not len(arr):
        return []
    starts = arr[:, 0] // BLOCK * BLOCK
    ends = np.minimum(-(-(arr[:, 0] + arr[:, 1]) // BLOCK) * BLOCK, limit)
    keep = starts < ends
    starts, ends = starts[keep], ends[keep]
    if not len(starts):
        return []
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    new = np.concatenate(([True], starts[1:] > ends[:-1]))
    first = np.flatnonzero(new)
    last = np.concatenate((first[1:] - 1, [len(starts) - 1]))
    return list(zip(starts[first].tolist(), ends[last].tolist(), strict=True))


@dataclass
class Changes:
    """What a layer changed: runs ``(offset, length, zero)`` in bytes, ascending, and how much was compared."""

    runs: list[tuple[int, int, bool]]
    compared: int = 0

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n, z in self.runs if not z)

    @property
    def zero_bytes(self) -> int:
        return sum(n for _, n, z in self.runs if z)

    def segments(self) -> Segments:
        """The runs as records: data at the same place in the raw image (source 0), zero runs as zeroed records
        (cut to what a record can hold)."""
        off: list[int] = []
        length: list[int] = []
        zeroed: list[bool] = []
        for start, n, zero in self.runs:
            s, left = start // SECTOR, n // SECTOR
            while left:
                step = min(left, MAX_RECORD_SECTORS) if zero else left
                off.append(s)
                length.append(step)
                zeroed.append(zero)
                s += step
                left -= step
        return Segments.build(off, length, off, zeroed, 0)


def _reads_zero(src: BlockSource, offset: int, length: int) -> bool:
    return all(e.kind is not ExtentKind.DATA for e in src.extents(offset, length))


def changed_runs(src: BlockSource, below: BlockSource | None, ranges: Ranges) -> Changes:
    """The 4 KiB blocks of ``src`` (the raw image) inside ``ranges`` that differ from ``below`` (None: a device
    of zeros), as runs of data and runs of zeros."""
    limit = src.size if below is None else min(src.size, below.size)
    spans = merged_blocks(ranges, limit)
    new_buf, old_buf = bytearray(WINDOW), bytearray(WINDOW)
    new64 = np.frombuffer(new_buf, dtype=np.uint64)
    old64 = np.frombuffer(old_buf, dtype=np.uint64)
    words = BLOCK // 8
    out = Changes([])
    for start, end in spans:
        pos = start
        while pos < end:
            n = min(WINDOW, end - pos)
            src.readinto(pos, memoryview(new_buf)[:n])
            a = new64[: n // 8].reshape(-1, words)
            if below is None or _reads_zero(below, pos, n):
                zero = np.asarray(~a.any(axis=1))
                changed = ~zero
            else:
                below.readinto(pos, memoryview(old_buf)[:n])
                changed = np.asarray((a != old64[: n // 8].reshape(-1, words)).any(axis=1))
                zero = np.asarray(~a.any(axis=1))
            for first, count, all_zero in block_runs(changed, zero):
                run = (pos + first * BLOCK, count * BLOCK, all_zero)
                prev = out.runs[-1] if out.runs else None
                if prev is not None and prev[2] == all_zero and prev[0] + prev[1] == run[0]:
                    out.runs[-1] = (prev[0], prev[1] + run[1], all_zero)
                else:
                    out.runs.append(run)
            out.compared += n
            pos += n
    return out
