"""Reading a ZFile at random (spec §4.5–§4.9): header or trailer, jump table, per-block CRC."""

from __future__ import annotations

import threading

import numpy as np

from ...errors import ChecksumError, CorruptIndexError, FormatError, LimitError, TruncatedError, UnsupportedError
from ...source.base import BlockSource
from ..checksum import ZFILE_BLOCK_SEED, raw_crc32c
from . import blocks, codecs
from .spec import (
    CRC_SIZE,
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    RECORD_SIZE,
    ZFileHeader,
)

CRC_RETRIES = 3  # re-reads of a block whose CRC fails before giving up (a remote source may heal)

_local = threading.local()


def _scratch(n: int) -> memoryview:
    """A per-thread buffer for stored bytes, reused: fresh memory is expensive on these VMs (PEERS §0)."""
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
        if not header.is_header:
            raise FormatError("ZFile record at offset 0 is not a header", path=path, offset=self.base + 32)
        self.header = header
        if header.overwritten:
            info = header
            info_at = 0
        else:
            if not header.known_flags & FLAG_DATA:
                raise FormatError("ZFile header lacks the data-file flag", path=path, offset=self.base + 32)
            info_at = inner.size - RECORD_SIZE
            if info_at < RECORD_SIZE:
                raise TruncatedError("ZFile has no room for a trailer", path=path, offset=self.base + inner.size)
            info = ZFileHeader.unpack(inner.pread(info_at, RECORD_SIZE), path=path, offset=self.base + info_at,
                                      check_digest=False)
            want = FLAG_DATA | FLAG_SEALED
            if info.known_flags & FLAG_HEADER or info.known_flags & want != want:
                raise FormatError(f"ZFile trailer flags 0x{info.flags:x} are not a sealed data trailer", path=path,
                                  offset=self.base + info_at + 32)
        self.info = info
        self.info_at = info_at
        if info.index_size > MAX_BLOCKS:
            raise LimitError(f"declares {info.index_size} blocks (limit {MAX_BLOCKS})", path=path,
                             offset=self.base + info_at + 48)
        bs = info.block_size
        if bs < 512 or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise UnsupportedError(f"block size {bs} is not a power of two up to {MAX_BLOCK_SIZE}", path=path,
                                   offset=self.base + info_at + 72)
        try:
            codecs.check_algo(info.algo)
        except UnsupportedError as exc:
            raise UnsupportedError(exc.message, path=path, offset=self.base + info_at + 76) from exc
        if info.use_dict or info.dict_size:
            raise UnsupportedError("ZFile dictionaries are not supported", path=path,
                                   offset=self.base + info_at + 78)
        nblocks = info.index_size
        table_end = info.index_offset + 4 * nblocks
        limit = inner.size - (0 if info.overwritten else RECORD_SIZE)
        if info.index_offset < RECORD_SIZE or table_end > limit:
            raise CorruptIndexError(f"jump table [{info.index_offset}, {table_end}) lies outside the file "
                                    f"({inner.size} bytes)", path=path, offset=self.base + info_at + 40)
        expected_blocks = -(-info.original_file_size // bs)
        if nblocks != expected_blocks:
            raise CorruptIndexError(f"{nblocks} blocks cannot hold {info.original_file_size} bytes in blocks of {bs}",
                                    path=path, offset=self.base + info_at + 48)
        raw = inner.pread(info.index_offset, 4 * nblocks)
        if info.has_digest:
            crc = raw_crc32c(raw)
            if crc != info.index_crc:
                raise ChecksumError(f"jump table CRC mismatch: stored 0x{info.index_crc:08x}, computed 0x{crc:08x}",
                                    path=path, offset=self.base + info.index_offset, expected=info.index_crc,
                                    actual=crc)
        lengths = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        floor = CRC_SIZE if info.verify else 0
        bad = np.flatnonzero(lengths <= floor)
        if bad.size:
            k = int(bad[0])
            raise CorruptIndexError(f"block {k} has stored length {int(lengths[k])}", path=path,
                                    offset=self.base + info.index_offset + 4 * k)
        starts = np.empty(nblocks + 1, dtype=np.int64)
        starts[0] = RECORD_SIZE + info.dict_size
        np.cumsum(lengths, out=starts[1:])
        starts[1:] += starts[0]
        if starts[-1] != info.index_offset:
            raise CorruptIndexError(f"blocks end at {int(starts[-1])} but the jump table starts at "
                                    f"{info.index_offset}", path=path, offset=self.base + info.index_offset)
        self.block_starts = starts
        self.size = info.original_file_size
        self.block_size = bs
        self.verify = info.verify
        self.algo = info.algo

    @property
    def nblocks(self) -> int:
        return int(self.block_starts.size - 1)

    def stored_lengths(self) -> np.ndarray:
        return np.diff(self.block_starts)

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
                one = np.array([0, len(healed)], dtype=np.int64)
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
