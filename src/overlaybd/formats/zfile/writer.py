"""Writing ZFiles: fixed-size blocks compressed in parallel, CRC per block, jump table, trailer.

A stored block may never exceed 65,536 bytes, or the reference reader rejects the file (its read buffer is that
size). Only 64 KiB blocks of incompressible data get there: no LZ4 block or zstd frame holds 65,536 such bytes in
fewer (a zstd frame adds at least 8 bytes, an LZ4 block 257), and every block of a ZFile has the one size its
header gives, so no single block can be written differently. The reference writes such a block anyway and its
reader then refuses the file; here the whole file gets 32 KiB blocks instead (where LZ4 and zstd worst cases
fit), and that is decided before anything is written: ``_oversized_block`` screens every block that holds data
(a block of zeros always fits), on every thread, in one C call per 4 MiB (``BlockRuns.screen``): a cheap look
clears the blocks that surely fit, with 512 bytes to spare (zstd: every byte counted, zstd's own tests before it
codes literals with Huffman passed twice over, and Gallager's bound on that code below what zstd keeps; LZ4,
which has no entropy coder: the first 4 KiB compressed plus the worst case of the rest), and the rest are
compressed to see exactly whether they fit. Should the writer still meet a block that does not fit, the file is
written again with 32 KiB blocks: the count cannot see which bytes zstd takes as repeats, and a block built for
it (many short runs of one byte in otherwise even bytes) reaches this net. The result reports the block size
actually used.
"""

from __future__ import annotations

import os
import sys
import threading
from array import array
from collections import deque
from collections.abc import Callable

from ...errors import FormatError, UsageError
from ...frozen import Frozen
from ...source.base import BlockSource, ExtentKind
from ...source.file import write_all
from ..checksum import raw_crc32c
from ..rawout import chunked
from . import blocks
from .spec import (
    ALGO_BY_NAME,
    CRC_SIZE,
    FLAG_DATA,
    FLAG_DIGEST,
    FLAG_HEADER,
    FLAG_HEADER_OVERWRITE,
    FLAG_SEALED,
    MAX_BLOCK_SIZE,
    MAX_STORED_BLOCK,
    MIN_BLOCK_SIZE,
    RECORD_SIZE,
    ZFileHeader,
    check_algo,
    max_stored_length,
)
from .workers import Task, Workers
from .writeback import Writeback, write_out


def _log(level: str, message: str, *args: object) -> None:
    """Log through this module's logger: ``logging`` is loaded only when there is something to say (a block too
    big for 64 KiB), so that ``zfile compress`` starts without it."""
    import logging

    getattr(logging.getLogger(__name__), level)(message, *args)

Progress = Callable[[int, int], None]
BATCH_BYTES = 1 << 20


SCREEN = blocks.Screen(prefix=4096, margin=512)
SCREEN_CHUNK = 4 << 20  # bytes a screening call takes


class _BlockTooLarge(Exception):
    pass


class ZFileResult(Frozen):
    __slots__ = ("header", "length", "block_size", "passes")
    header: ZFileHeader  # the trailer record written
    length: int  # bytes of ZFile written
    block_size: int  # block size actually used
    passes: int  # 2 when a block that did not fit was found only while writing, and the file written again

    def __init__(self, header: ZFileHeader, length: int, block_size: int, passes: int = 1) -> None:
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "passes", passes)

    @property
    def ratio(self) -> float:
        return self.length / self.header.original_file_size if self.header.original_file_size else 0.0


def algo_code(name: str | int) -> int:
    if isinstance(name, int):
        return name
    try:
        return ALGO_BY_NAME[name.lower()]
    except KeyError:
        raise UsageError(f"unknown compression algorithm {name!r} (use lz4 or zstd)") from None


def check_block_size(block_size: int) -> None:
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(f"block size {block_size} must be a power of two from 4 KiB to 64 KiB")


class _Slot:
    """One batch's buffers: its input and its output."""

    __slots__ = ("data", "out")

    def __init__(self, data: bytearray, out: bytearray) -> None:
        self.data = data
        self.out = out


_spare: list[_Slot] = []  # slots kept from one write to the next
_spare_lock = threading.Lock()
SPARE_SLOTS = min(8, 2 * (os.cpu_count() or 1))  # at most ~17 MiB kept


def _take_slots(n: int, data_len: int, out_len: int) -> list[_Slot]:
    """``n`` slots at least this big: kept ones first, since fresh memory costs about 1 ms a MiB to fault in."""
    with _spare_lock:
        slots = [s for s in _spare if len(s.data) >= data_len and len(s.out) >= out_len][:n]
        for s in slots:
            _spare.remove(s)
    return slots + [_Slot(bytearray(data_len), bytearray(out_len)) for _ in range(n - len(slots))]


def _keep_slots(slots: list[_Slot]) -> None:
    with _spare_lock:
        _spare[:0] = slots
        del _spare[SPARE_SLOTS:]


class _Compressed:
    __slots__ = ("slot", "used", "lengths")

    def __init__(self, slot: _Slot, used: int, lengths: array[int]) -> None:
        self.slot = slot
        self.used = used  # bytes of slot.out
        self.lengths = lengths  # stored length of each block (uint32)


class _Aborted(Exception):
    """An earlier batch failed, so this one has no place in the file."""


class _Placer:
    """Hands out file positions to batches in order, as their compressed sizes become known, so that workers can
    write their own batches (in parallel, in any order) instead of queueing the writes on one thread."""

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self._next = 0
        self._failed_from = 1 << 62
        self._cond = threading.Condition()

    def place(self, index: int, size: int) -> int:
        with self._cond:
            while self._next != index and index < self._failed_from:
                self._cond.wait()
            if index >= self._failed_from:
                raise _Aborted
            at = self.pos
            self.pos += size
            self._next += 1
            self._cond.notify_all()
            return at

    def fail(self, index: int) -> None:
        """Batch ``index`` failed: the batches after it get no place (those before it still do)."""
        with self._cond:
            self._failed_from = min(self._failed_from, index)
            self._cond.notify_all()


def _compress_batch(slot: _Slot, src: BlockSource | None, offset: int, length: int, block_size: int, algo: int,
                    verify: bool, placer: _Placer | None, index: int, fd: int, name: str,
                    writeback: Writeback) -> _Compressed:
    """Compress ``length`` bytes at ``offset``, read from ``src`` first unless the caller already did; with a
    ``placer``, also write them where it says (batch ``index``)."""
    try:
        if src is not None:
            src.readinto(offset, memoryview(slot.data)[:length])
        lengths = array("I", bytes(4 * -(-length // block_size)))
        done, used, status, message = blocks.ACTIVE.compress(algo, memoryview(slot.data)[:length], block_size,
                                                             verify, slot.out, lengths, MAX_STORED_BLOCK)
        if status == blocks.TOO_BIG:
            raise _BlockTooLarge
        if status != blocks.OK:
            raise FormatError(f"block {offset // block_size + done} does not compress: {message}")
        if placer is not None:
            write_out(fd, memoryview(slot.out)[:used], placer.place(index, used), name, writeback)
    except BaseException:
        if placer is not None:
            placer.fail(index)
        raise
    return _Compressed(slot, used, lengths)


def write_zfile(src: BlockSource, fd: int, base: int = 0, *, algo: str | int = "lz4", block_size: int = 4096,
                verify: bool = True, threads: int | None = None, overwrite_header: bool = False,
                progress: Progress | None = None, name: str = "<zfile>") -> ZFileResult:
    """Compress all of ``src`` into ``fd`` starting at byte ``base``. Returns what was written."""
    code = algo_code(algo)
    check_algo(code)
    check_block_size(block_size)
    if max_stored_length(code, block_size, verify) > MAX_STORED_BLOCK:
        found = _oversized_block(src, code, block_size, verify, threads, name)
        if found is not None:
            _log("info", "%s: block %d does not compress below %d bytes; writing %d-byte blocks", name, found,
                 MAX_STORED_BLOCK, block_size // 2)
            block_size //= 2
    try:
        return _write(src, fd, base, code, block_size, verify, threads, overwrite_header, progress, name)
    except _BlockTooLarge:
        smaller = block_size // 2
        _log("warning", "%s: a %d-byte block found while writing does not compress below %d bytes; writing the "
             "file again with %d-byte blocks", name, block_size, MAX_STORED_BLOCK, smaller)
        res = _write(src, fd, base, code, smaller, verify, threads, overwrite_header, progress, name)
        return res.replace(passes=2)


def _oversized_block(src: BlockSource, algo: int, block_size: int, verify: bool,
                     threads: int | None = None, name: str = "<zfile>") -> int | None:
    """A block of ``src`` that does not compress to MAX_STORED_BLOCK bytes or less (with one thread, the first);
    None if every block fits. The blocks that hold data (``_data_chunks``: a block of zeros always fits) go in
    chunks to ``threads`` workers, each reading its chunk and screening it in one call (``BlockRuns.screen``);
    once a block is found, or a chunk failed (its error is raised), the chunks not yet started are skipped."""
    runs = blocks.ACTIVE
    chunk = max(block_size, SCREEN_CHUNK // block_size * block_size)
    chunks = _data_chunks(src, block_size, chunk)
    scratch_len = runs.compress_bound(algo, block_size) + CRC_SIZE
    local = threading.local()
    found: list[int] = []
    failed = threading.Event()

    def screen(offset: int, length: int) -> None:
        if found or failed.is_set():
            return
        try:
            if not hasattr(local, "buf"):
                local.buf, local.scratch = bytearray(chunk), bytearray(scratch_len)
            view = memoryview(local.buf)[:length]
            src.readinto(offset, view)
            k, _, status, message = runs.screen(algo, view, block_size, verify, local.scratch, MAX_STORED_BLOCK,
                                                SCREEN)
            if status != blocks.OK:
                raise FormatError(f"{name}: block {offset // block_size + k} does not compress: {message}")
        except BaseException:
            failed.set()
            raise
        if k >= 0:
            found.append(offset // block_size + k)

    workers = max(1, min(threads or os.cpu_count() or 1, len(chunks)))
    if workers == 1:
        for offset, length in chunks:
            screen(offset, length)
    else:
        with Workers(workers, "zscreen") as pool:
            for fut in [pool.submit(screen, offset, length) for offset, length in chunks]:
                fut.result()
    return min(found) if found else None


def _data_chunks(src: BlockSource, block_size: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of ``src``, at most ``chunk`` bytes each and starting on a block boundary, that
    cover every block holding data (holes and zeroed ranges skipped, as ``src.extents`` tells them)."""
    runs: list[tuple[int, int]] = []  # [start, end) of blocks holding data, overlapping neighbours joined
    for ext in src.extents():
        if ext.kind is not ExtentKind.DATA:
            continue
        start = ext.offset // block_size * block_size
        end = min(src.size, -(-(ext.offset + ext.length) // block_size) * block_size)
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return list(chunked(runs, chunk))


def _write(src: BlockSource, fd: int, base: int, algo: int, block_size: int, verify: bool, threads: int | None,
           overwrite_header: bool, progress: Progress | None, name: str) -> ZFileResult:
    threads = max(1, threads or os.cpu_count() or 1)
    header = ZFileHeader(flags=FLAG_HEADER | FLAG_DATA | FLAG_DIGEST, block_size=block_size, algo=algo,
                         verify=verify)
    write_all(fd, header.pack(), base, name)
    pos, all_lengths = _write_blocks(src, fd, base + RECORD_SIZE, algo, block_size, verify, threads, progress, name)
    lengths = array("I")
    for part in all_lengths:
        lengths.extend(part)
    return _write_tail(fd, base, pos, header, lengths, src.size, overwrite_header, name)


def _write_blocks(src: BlockSource, fd: int, pos: int, algo: int, block_size: int, verify: bool, threads: int,
                  progress: Progress | None, name: str) -> tuple[int, list[array[int]]]:
    """Every block of ``src``, compressed, from ``pos`` on: where they end, and their stored lengths by batch."""
    total = src.size
    batch = max(block_size, BATCH_BYTES // block_size * block_size)
    all_lengths: list[array[int]] = []

    # With one worker, this thread reads each batch and writes it out once compressed, so both overlap the
    # compression. With more, each worker reads, compresses and writes its own batch (at the place a _Placer
    # gives it), and this thread only hands out work: a third busy thread would take CPU from the workers. At most
    # 2 * threads batches are in flight, and their buffers go round (fresh memory costs about 1 ms a MiB to fault in).
    capacity = batch // block_size * (blocks.ACTIVE.compress_bound(algo, block_size) + CRC_SIZE)
    free = _take_slots(min(2 * threads, -(-total // batch)), batch, capacity)
    owned = list(free)
    placer = _Placer(pos) if threads > 1 else None

    def emit(done: _Compressed, upto: int) -> None:
        nonlocal pos
        if placer is None:
            write_out(fd, memoryview(done.slot.out)[: done.used], pos, name, writeback)
            pos += done.used
        free.append(done.slot)
        all_lengths.append(done.lengths)
        if progress is not None:
            progress(upto, total)

    # The pool is left (its workers done) before the writeback thread is: no range is given to it after its close.
    with Writeback(fd) as writeback, Workers(threads, "zfile") as workers:
        pending: deque[tuple[Task, int]] = deque()
        try:
            for index, off in enumerate(range(0, total, batch)):
                if not free:
                    fut, upto = pending.popleft()
                    emit(fut.result(), upto)
                slot = free.pop()
                length = min(batch, total - off)
                if placer is None:
                    src.readinto(off, memoryview(slot.data)[:length])
                pending.append((workers.submit(_compress_batch, slot, None if placer is None else src, off, length,
                                               block_size, algo, verify, placer, index, fd, name, writeback),
                                 off + length))
            while pending:
                fut, upto = pending.popleft()
                emit(fut.result(), upto)
        except BaseException:
            if placer is not None:
                placer.fail(-1)  # workers waiting for their place stop
            raise
        finally:
            for fut, _ in pending:
                fut.cancel()
    if placer is not None:
        pos = placer.pos
    _keep_slots(owned)  # only once no worker can touch them any more
    return pos, all_lengths


def _write_tail(fd: int, base: int, pos: int, header: ZFileHeader, lengths: array[int], total: int,
                overwrite_header: bool, name: str) -> ZFileResult:
    """The jump table and trailer after the blocks (and the trailer over the header, when asked)."""
    if sys.byteorder == "big":
        lengths = array("I", lengths)
        lengths.byteswap()
    table = lengths.tobytes()  # little-endian u32s
    index_offset = pos - base
    write_all(fd, table, pos, name)
    pos += len(table)
    trailer = header.with_(flags=FLAG_DATA | FLAG_SEALED | FLAG_DIGEST, index_offset=index_offset,
                           index_size=len(lengths), original_file_size=total, index_crc=raw_crc32c(table))
    write_all(fd, trailer.pack(), pos, name)
    pos += RECORD_SIZE
    if overwrite_header:
        write_all(fd, trailer.with_(flags=FLAG_HEADER | FLAG_DATA | FLAG_HEADER_OVERWRITE | FLAG_DIGEST).pack(),
                  base, name)
    return ZFileResult(trailer, pos - base, header.block_size)
