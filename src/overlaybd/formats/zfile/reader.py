"""Reading a ZFile at random: header or trailer, jump table, per-block CRC."""

from __future__ import annotations

import threading
from array import array

from ...errors import ChecksumError, CorruptIndexError, FormatError, TruncatedError
from ...source.base import BlockSource
from ..checksum import ZFILE_BLOCK_SEED, raw_crc32c
from . import blocks
from .spec import (
    CRC_SIZE,
    RECORD_SIZE,
    ZFileHeader,
    check_header,
    check_index_info,
    check_trailer,
    max_stored_length,
)


def block_starts(raw: bytes, info: ZFileHeader, *, base: int, path: str) -> array[int]:
    """The jump table ``raw`` (one u32 stored length a block) checked against ``info``, as the offset where each
    block starts and, last, where the final one ends (64-bit integers; computed in C where built)."""
    if info.has_digest:
        crc = raw_crc32c(raw)
        if crc != info.index_crc:
            raise ChecksumError(f"jump table CRC mismatch: stored 0x{info.index_crc:08x}, computed 0x{crc:08x}",
                                path=path, offset=base + info.index_offset, expected=info.index_crc, actual=crc)
    floor = CRC_SIZE if info.verify else 0
    ceiling = max_stored_length(info.algo, info.block_size, info.verify)
    starts = array("q", bytes(8 * (len(raw) // 4 + 1)))
    k = blocks.ACTIVE.block_starts(raw, RECORD_SIZE + info.dict_size, floor, ceiling, starts)
    if k >= 0:
        length = int.from_bytes(raw[4 * k : 4 * k + 4], "little")
        raise CorruptIndexError(f"block {k} has stored length {length} (a block takes more than {floor} and at most "
                                f"{ceiling} bytes)", path=path, offset=base + info.index_offset + 4 * k)
    if starts[-1] != info.index_offset:
        raise CorruptIndexError(f"blocks end at {starts[-1]} but the jump table starts at {info.index_offset}",
                                path=path, offset=base + info.index_offset)
    return starts


CRC_RETRIES = 3  # re-reads of a block whose CRC fails before giving up (a remote source may heal)

_local = threading.local()


def _scratch(n: int) -> memoryview:
    """A per-thread buffer for stored bytes, reused: fresh memory costs about 1 ms a MiB to fault in, more than
    decompressing into it does."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = bytearray(max(n, 1 << 20))
    return memoryview(buf)[:n]


class ZFileSource(BlockSource):
    """The decompressed bytes of a ZFile stored in ``inner``."""

    def __init__(self, inner: BlockSource, *, name: str | None = None, base: int = 0) -> None:
        """``base``: where ``inner`` starts in the file called ``name`` (the tar payload offset), so that error
        offsets are offsets in that file."""
        self.inner = inner
        self.base = base
        self.name = path = name or inner.name
        if inner.size < RECORD_SIZE:
            raise TruncatedError(f"file is {inner.size} bytes, too short for a ZFile header", path=path,
                                 offset=self.base)
        header = ZFileHeader.unpack(inner.pread(0, RECORD_SIZE), path=path, offset=self.base)
        check_header(header, base=self.base, path=path)
        self.header = header
        if header.overwritten:
            info, info_at = header, 0
        else:
            info_at = inner.size - RECORD_SIZE
            if info_at < RECORD_SIZE:
                raise TruncatedError("ZFile has no room for a trailer", path=path, offset=self.base + inner.size)
            info = ZFileHeader.unpack(inner.pread(info_at, RECORD_SIZE), path=path, offset=self.base + info_at,
                                      check_digest=False)
            check_trailer(info, at=info_at, base=self.base, path=path)
        check_index_info(info, at=info_at, base=self.base, path=path, file_size=inner.size)
        self.info = info
        self.info_at = info_at
        raw = inner.pread(info.index_offset, 4 * info.index_size)
        starts = block_starts(raw, info, base=self.base, path=path)
        self.block_starts = starts
        self.size = info.original_file_size
        self.block_size = info.block_size
        self.verify = info.verify
        self.algo = info.algo

    @property
    def nblocks(self) -> int:
        return len(self.block_starts) - 1

    def stored_lengths(self) -> list[int]:
        starts = self.block_starts
        return [starts[k + 1] - starts[k] for k in range(len(starts) - 1)]

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        bs = self.block_size
        first = offset // bs
        last = (offset + len(buf) - 1) // bs
        starts = self.block_starts
        c0 = int(starts[first])
        stored: memoryview = _scratch(int(starts[last + 1]) - c0)
        self.inner.readinto(c0, stored)
        last_len = min(bs, self.size - last * bs)
        runs = blocks.ACTIVE
        blk = first
        while True:
            done, status, detail, message = runs.decompress(self.algo, stored, starts, blk, last - blk + 1, c0,
                                                            buf[(blk - first) * bs :], bs, last_len, self.verify)
            if status == blocks.OK:
                return
            blk += done
            at = int(starts[blk])
            out_len = last_len if blk == last else bs
            if status == blocks.CRC:
                # Read the block again (a source below may heal) and go on from it, or raise ChecksumError.
                healed = self._reread_block(blk)
                one = array("q", [0, len(healed)])
                done, status, detail, message = runs.decompress(self.algo, healed, one, 0, 1, 0,
                                                                buf[(blk - first) * bs :], bs, out_len, True)
                if status == blocks.OK:
                    if blk == last:
                        return
                    blk += 1
                    continue
            if status == blocks.LENGTH:
                raise FormatError(f"block {blk} decompresses to {detail} bytes, expected {out_len}", path=self.name,
                                  offset=self.base + at)
            raise FormatError(f"block {blk} does not decompress: {message}", path=self.name, offset=self.base + at)

    def _reread_block(self, blk: int) -> bytes:
        """The stored bytes of a block whose CRC just failed, read again up to CRC_RETRIES times; a cache below
        drops its copy first, so a remote source fetches afresh. ChecksumError if the CRC never matches."""
        a = int(self.block_starts[blk])
        n = int(self.block_starts[blk + 1]) - a
        want = computed = 0
        for _ in range(CRC_RETRIES):
            self.inner.invalidate(a, n)
            stored = self.inner.pread(a, n)
            want = int.from_bytes(stored[-CRC_SIZE:], "little")
            computed = raw_crc32c(memoryview(stored)[:-CRC_SIZE], ZFILE_BLOCK_SEED)
            if computed == want:
                return stored
        raise ChecksumError(f"block {blk} CRC mismatch: stored 0x{want:08x}, computed 0x{computed:08x}",
                            path=self.name, offset=self.base + a, block=blk, expected=want, actual=computed)

    def verify_all(self, progress: object = None) -> int:
        """Check every block's CRC and that it decompresses; return the number of blocks checked."""
        step = max(1, (1 << 22) // self.block_size)
        buf = bytearray(step * self.block_size)
        for first in range(0, self.nblocks, step):
            n = min(step, self.nblocks - first)
            end = min(self.size, (first + n) * self.block_size)
            self._read_aligned(first * self.block_size, memoryview(buf)[: end - first * self.block_size])
            if callable(progress):
                progress(end, self.size)
        return self.nblocks
