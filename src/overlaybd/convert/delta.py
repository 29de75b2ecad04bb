"""The blocks a layer changed, from the byte ranges libext2fs wrote, copied into a writable layer.

``write_changed`` is ``importing.write_delta`` limited to the ranges written: each 4 KiB block written there is
compared with the device below (the earlier layers) and only those that differ are written, zero runs as zeroed
records. Blocks the library rewrote unchanged (every block bitmap and group descriptor at each close, say) do not
make the layer bigger; blocks never written are never read.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..importing import BLOCK, DeltaStats, Progress, block_runs
from ..source.base import BlockSource

WINDOW = 4 << 20


def merged_blocks(ranges: Iterable[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Byte ranges widened to whole 4 KiB blocks, clipped to ``limit``, sorted and merged: ``[(start, end)]``
    (pure)."""
    spans = sorted((off - off % BLOCK, min(limit, -(-(off + n) // BLOCK) * BLOCK)) for off, n in ranges if n > 0)
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if start >= end:
            continue
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def write_changed(dev: BlockSource, src: BlockSource, ranges: Iterable[tuple[int, int]], *,
                  progress: Progress | None = None) -> DeltaStats:
    """Make ``dev`` read as ``src`` over ``ranges`` (byte ranges), writing only the 4 KiB blocks that differ."""
    stats = DeltaStats()
    spans = merged_blocks(ranges, min(src.size, dev.size))
    total = sum(end - start for start, end in spans)
    new_buf, old_buf = bytearray(WINDOW), bytearray(WINDOW)
    new64 = np.frombuffer(new_buf, dtype=np.uint64)
    old64 = np.frombuffer(old_buf, dtype=np.uint64)
    words = BLOCK // 8
    done = 0
    for start, end in spans:
        pos = start
        while pos < end:
            n = min(WINDOW, end - pos)
            src.readinto(pos, memoryview(new_buf)[:n])
            dev.readinto(pos, memoryview(old_buf)[:n])
            a = new64[: n // 8].reshape(-1, words)
            changed = np.asarray((a != old64[: n // 8].reshape(-1, words)).any(axis=1))
            if changed.any():
                zero = np.asarray(~a.any(axis=1))
                for first, count, all_zero in block_runs(changed, zero):
                    off = first * BLOCK
                    if all_zero:
                        dev.write_zeroes(pos + off, count * BLOCK)
                        stats.zeroed += count * BLOCK
                    else:
                        dev.pwrite(pos + off, memoryview(new_buf)[off : off + count * BLOCK])
                        stats.written += count * BLOCK
            stats.compared += n
            pos += n
            done += n
            if progress:
                progress(done, total)
    return stats
