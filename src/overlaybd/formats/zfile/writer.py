"""Writing ZFiles (spec §4.8): fixed-size blocks compressed in parallel, CRC per block, jump table, trailer.

A stored block may never exceed 65,536 bytes, or the reference reader rejects the file. Only 64 KiB blocks of
incompressible data can get there; when a block would, the whole file is written again with 32 KiB blocks
(where LZ4 and zstd worst cases fit) and the result reports the block size actually used.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import crc32c
import numpy as np

from ...errors import UsageError
from ...source.base import BlockSource
from ...source.file import write_all
from ..checksum import ZFILE_BLOCK_SEED, raw_crc32c  # raw_crc32c(x, seed) inlined in the hot loop
from . import codecs
from .spec import (
    ALGO_BY_NAME,
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
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
BATCH_BYTES = 1 << 20


class _BlockTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ZFileResult:
    header: ZFileHeader  # the trailer record written
    length: int  # bytes of ZFile written
    block_size: int  # block size actually used

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


_local = threading.local()


def _input_buffer(n: int) -> memoryview:
    """A per-thread input buffer, reused: fresh memory per batch serialises threads on these VMs (PEERS §0)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = bytearray(n)
    return memoryview(buf)[:n]


def _compress_batch(src: BlockSource, offset: int, length: int, block_size: int, algo: int,
                    verify: bool) -> tuple[bytes, list[int]]:
    data = _input_buffer(length)
    src.readinto(offset, data)
    compress = codecs.compressor(algo)
    parts: list[bytes] = []
    lengths: list[int] = []
    for pos in range(0, length, block_size):
        comp = compress(data[pos : pos + block_size])
        n = len(comp)
        parts.append(comp)
        if verify:
            parts.append((crc32c.crc32c(comp, value=ZFILE_BLOCK_SEED ^ 0xFFFFFFFF) ^ 0xFFFFFFFF).to_bytes(4, "little"))
            n += 4
        if n > MAX_STORED_BLOCK:
            raise _BlockTooLarge
        lengths.append(n)
    return b"".join(parts), lengths


def write_zfile(src: BlockSource, fd: int, base: int = 0, *, algo: str | int = "lz4", block_size: int = 4096,
                verify: bool = True, threads: int | None = None, overwrite_header: bool = False,
                progress: Progress | None = None, name: str = "<zfile>") -> ZFileResult:
    """Compress all of ``src`` into ``fd`` starting at byte ``base``. Returns what was written."""
    code = algo_code(algo)
    codecs.check_algo(code)
    check_block_size(block_size)
    try:
        return _write(src, fd, base, code, block_size, verify, threads, overwrite_header, progress, name)
    except _BlockTooLarge:
        smaller = block_size // 2
        log.warning("%s: a %d-byte block does not compress below %d bytes; writing %d-byte blocks instead",
                    name, block_size, MAX_STORED_BLOCK, smaller)
        return _write(src, fd, base, code, smaller, verify, threads, overwrite_header, progress, name)


def _write(src: BlockSource, fd: int, base: int, algo: int, block_size: int, verify: bool, threads: int | None,
           overwrite_header: bool, progress: Progress | None, name: str) -> ZFileResult:
    threads = max(1, threads or os.cpu_count() or 1)
    header = ZFileHeader(flags=FLAG_HEADER | FLAG_DATA | FLAG_DIGEST, block_size=block_size, algo=algo,
                         verify=verify)
    write_all(fd, header.pack(), base, name)
    pos = base + RECORD_SIZE
    total = src.size
    batch = max(block_size, BATCH_BYTES // block_size * block_size)
    all_lengths: list[int] = []

    def emit(result: tuple[bytes, list[int]], upto: int) -> None:
        nonlocal pos
        blob, lengths = result
        write_all(fd, blob, pos, name)
        pos += len(blob)
        all_lengths.extend(lengths)
        if progress is not None:
            progress(upto, total)

    offsets = range(0, total, batch)
    if threads == 1:
        for off in offsets:
            emit(_compress_batch(src, off, min(batch, total - off), block_size, algo, verify), off + batch)
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zfile") as pool:
            pending: deque[tuple[Future[tuple[bytes, list[int]]], int]] = deque()
            try:
                for off in offsets:
                    pending.append((pool.submit(_compress_batch, src, off, min(batch, total - off), block_size,
                                                algo, verify), min(off + batch, total)))
                    if len(pending) >= 2 * threads:
                        fut, upto = pending.popleft()
                        emit(fut.result(), upto)
                while pending:
                    fut, upto = pending.popleft()
                    emit(fut.result(), upto)
            finally:
                for fut, _ in pending:
                    fut.cancel()
    table = np.asarray(all_lengths, dtype="<u4").tobytes()
    index_offset = pos - base
    write_all(fd, table, pos, name)
    pos += len(table)
    trailer = header.with_(flags=FLAG_DATA | FLAG_SEALED | FLAG_DIGEST, index_offset=index_offset,
                           index_size=len(all_lengths), original_file_size=total, index_crc=raw_crc32c(table))
    write_all(fd, trailer.pack(), pos, name)
    pos += RECORD_SIZE
    if overwrite_header:
        write_all(fd, trailer.with_(flags=FLAG_HEADER | FLAG_DATA | FLAG_HEADER_OVERWRITE | FLAG_DIGEST).pack(),
                  base, name)
    return ZFileResult(trailer, pos - base, block_size)
