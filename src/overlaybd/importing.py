"""Bringing a disk into a volume as one new snapshot that holds only what changed.

``write_delta`` compares the source with the volume's current device 4 KiB block by block (numpy, 4 MiB at a
time) and writes only the blocks that differ: runs of zeros as zeroed records (``write_zeroes``), never as data.
Where the source says a range is a hole, and the device already reads zeros there, neither is read.
``write_ranges`` copies given ranges as they are (a qcow2 layer's own clusters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .source.base import BlockSource, ExtentKind

BLOCK = 4096
WINDOW = 4 << 20
Progress = Callable[[int, int], None]


@dataclass
class DeltaStats:
    compared: int = 0  # bytes of the source looked at
    written: int = 0  # bytes written as data
    zeroed: int = 0  # bytes written as zeroed records

    def as_json(self) -> dict[str, int]:
        return {"compared": self.compared, "written": self.written, "zeroed": self.zeroed}


def _zero_in(src: BlockSource, offset: int, length: int) -> bool:
    """Does ``src`` say the whole range reads as zeros without being read (a hole, a zeroed record)?"""
    return all(e.kind is not ExtentKind.DATA for e in src.extents(offset, length))


def block_runs(changed: np.ndarray, zero: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """Runs ``(first_block, count, all_zero)`` of changed blocks, split where zero-ness changes (pure)."""
    state = np.where(changed, np.where(zero, 2, 1), 0).astype(np.int8)
    edges = np.flatnonzero(np.diff(state)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(state)]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        if state[s]:
            yield s, e - s, bool(state[s] == 2)


def write_delta(dev: BlockSource, src: BlockSource, *, progress: Progress | None = None) -> DeltaStats:
    """Make ``dev`` read as ``src`` (over ``src.size`` bytes), writing only the 4 KiB blocks that differ."""
    stats = DeltaStats()
    total = src.size
    new_buf, old_buf = bytearray(WINDOW), bytearray(WINDOW)
    new, old = np.frombuffer(new_buf, dtype=np.uint8), np.frombuffer(old_buf, dtype=np.uint8)
    new64, old64 = new.view(np.uint64), old.view(np.uint64)  # compared 8 bytes at a time
    for pos in range(0, total, WINDOW):
        n = min(WINDOW, total - pos)
        stats.compared += n
        src_zero = _zero_in(src, pos, n)
        if src_zero and _zero_in(dev, pos, n):
            if progress:
                progress(pos + n, total)
            continue
        a = new[:n]
        b = old[:n]
        if src_zero:
            a[:] = 0
        else:
            src.readinto(pos, memoryview(new_buf)[:n])
        dev.readinto(pos, memoryview(old_buf)[:n])
        full = n - n % BLOCK
        if full:
            words = BLOCK // 8
            blocks_a = new64[: full // 8].reshape(-1, words)
            changed = np.asarray((blocks_a != old64[: full // 8].reshape(-1, words)).any(axis=1))
            if changed.any():
                zero = np.asarray(~blocks_a.any(axis=1))
                for first, count, all_zero in block_runs(changed, zero):
                    start = first * BLOCK
                    _write_run(dev, pos + start, memoryview(new_buf)[start : start + count * BLOCK], all_zero,
                               stats)
        if full < n and not np.array_equal(a[full:], b[full:]):  # a short last block
            _write_run(dev, pos + full, memoryview(new_buf)[full:n], not a[full:].any(), stats)
        if progress:
            progress(pos + n, total)
    return stats


def _write_run(dev: BlockSource, offset: int, data: memoryview, all_zero: bool, stats: DeltaStats) -> None:
    if all_zero:
        dev.write_zeroes(offset, len(data))
        stats.zeroed += len(data)
    else:
        dev.pwrite(offset, data)
        stats.written += len(data)


def write_ranges(dev: BlockSource, src: BlockSource, ranges: list[tuple[int, int, bool]], *,
                 progress: Progress | None = None) -> DeltaStats:
    """Copy ``(offset, length, zero)`` ranges of ``src`` into ``dev``: data as it is, zero ranges as zeroed
    records (a layer's own clusters, whatever the device below holds)."""
    stats = DeltaStats()
    total = sum(length for _, length, _ in ranges)
    done = 0
    buf = bytearray(WINDOW)
    for offset, length, zero in ranges:
        if zero:
            dev.write_zeroes(offset, length)
            stats.zeroed += length
            done += length
            continue
        pos, end = offset, offset + length
        while pos < end:
            n = min(WINDOW, end - pos)
            view = memoryview(buf)[:n]
            src.readinto(pos, view)
            dev.pwrite(pos, view)
            stats.written += n
            pos += n
            done += n
            if progress:
                progress(done, total)
    stats.compared = total
    return stats
