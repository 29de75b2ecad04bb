"""Runs of ZFile blocks: compress a batch into one buffer, or decompress a run straight into the caller's buffer,
checking each block's CRC32C on the way.

Two implementations keep one contract. ``NativeRuns`` is the C extension ``_blocks`` (one call a run, the GIL
released, the system liblz4/libzstd); ``PythonRuns`` does the same with ``lz4``/``zstandard`` one block at a time.
``ACTIVE`` is the native one when it was built, unless ``OVERLAYBD_NATIVE=0`` is set; both give the same bytes
and the same statuses, which the tests check against each other.

Statuses: a run stops at its first failing block and reports how many blocks came out whole before it
(``done``), why it stopped, a number (the computed CRC, or the size the block decompressed to) and a message.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple, Protocol

import lz4.block
import numpy as np

from ... import native
from ..checksum import ZFILE_BLOCK_SEED, raw_crc32c
from . import codecs
from .spec import ALGO_LZ4, CRC_SIZE

OK = 0
CRC = 1  # the block's CRC32C does not match: detail is the computed value
CODEC = 2  # the codec rejects the block: message says why
LENGTH = 3  # the block decompresses to the wrong size: detail is that size
TOO_BIG = 5  # compress: the block's stored length would pass max_stored

RunResult = tuple[int, int, int, str | None]  # decompress: done, status, detail, message
CompressResult = tuple[int, int, int, str | None]  # compress: done, bytes of out used, status, message
ScreenResult = tuple[int, int, int, str | None]  # screen: first block that does not fit (-1: none), blocks
# compressed to find out, status, message


class Screen(NamedTuple):
    """How blocks are screened: see ``BlockRuns.screen``."""

    step: int  # zstd: every step-th byte of a block is counted
    bits: float  # zstd: a block whose counted bytes carry fewer bits a byte than this surely fits
    prefix: int  # LZ4: bytes at the start of a block compressed as written, the rest counted at its worst
    lz4_acceleration: int  # LZ4: failing that, the acceleration of a fast look at the whole block
    margin: int  # LZ4: bytes either look must leave to spare


class BlockRuns(Protocol):
    name: str

    def decompress(self, algo: int, stored: Any, starts: Any, first: int, count: int, base: int, out: Any,
                   block_size: int, last_len: int, verify: bool) -> RunResult:
        """Blocks ``first .. first+count-1``: block k is ``stored[starts[k]-base : starts[k+1]-base]`` (its CRC
        last when ``verify``) and goes to ``out``, ``block_size`` bytes each, ``last_len`` for the last."""
        ...

    def compress(self, algo: int, src: Any, block_size: int, verify: bool, out: Any, lengths: Any,
                 max_stored: int) -> CompressResult:
        """``src`` in blocks of ``block_size``, one after another into ``out`` (each followed by its CRC when
        ``verify``); ``lengths`` (uint32) gets each block's stored length."""
        ...

    def compress_bound(self, algo: int, n: int) -> int:
        """The most bytes a block of ``n`` can compress to, CRC not included."""
        ...

    def byte_counts(self, data: Any, step: int, counts: Any) -> None:
        """Add to ``counts`` (256 int64) how often each byte value occurs at ``data[0], data[step], ...``."""
        ...

    def screen(self, algo: int, src: Any, block_size: int, verify: bool, scratch: Any, max_stored: int,
               how: Screen) -> ScreenResult:
        """The first block of ``src`` whose stored length, compressed as ``compress`` would, passes
        ``max_stored``. A block is compressed to find out only when a cheap look does not show that it fits:
        for zstd (which codes literals with Huffman), the entropy of its counted bytes below ``how.bits``; for
        LZ4 (which has no entropy coder, and parses a block from its start, a match never costing more than the
        literals it replaces), its first ``how.prefix`` bytes compressed as written plus the worst case of the
        rest, or else LZ4 at a fast setting over the whole block, fitting with ``how.margin`` bytes to spare.
        ``scratch`` holds one block's worst case."""
        ...


class PythonRuns:
    name = "python"

    def decompress(self, algo: int, stored: Any, starts: Any, first: int, count: int, base: int, out: Any,
                   block_size: int, last_len: int, verify: bool) -> RunResult:
        decompress = codecs.decompressor(algo)  # once per run, not per block
        bounds = starts[first : first + count + 1].tolist()
        pos = 0
        for i in range(count):
            a = bounds[i] - base
            b = bounds[i + 1] - base
            want = last_len if i == count - 1 else block_size
            if verify:
                b -= CRC_SIZE
                crc = raw_crc32c(stored[a:b], ZFILE_BLOCK_SEED)
                if crc != int.from_bytes(stored[b : b + CRC_SIZE], "little"):
                    return i, CRC, crc, None
            try:
                plain = decompress(stored[a:b], want)
            except codecs.CODEC_ERRORS as exc:
                return i, CODEC, 0, str(exc)
            if len(plain) != want:
                return i, LENGTH, len(plain), None
            out[pos : pos + want] = plain
            pos += want
        return count, OK, 0, None

    def compress(self, algo: int, src: Any, block_size: int, verify: bool, out: Any, lengths: Any,
                 max_stored: int) -> CompressResult:
        compress = codecs.compressor(algo)
        pos = 0
        for i, at in enumerate(range(0, len(src), block_size)):
            comp = compress(src[at : at + block_size])
            n = len(comp)
            if verify:
                n += CRC_SIZE
            if n > max_stored:
                return i, pos, TOO_BIG, None
            out[pos : pos + len(comp)] = comp
            if verify:
                out[pos + len(comp) : pos + n] = raw_crc32c(comp, ZFILE_BLOCK_SEED).to_bytes(4, "little")
            lengths[i] = n
            pos += n
        return -(-len(src) // block_size), pos, OK, None

    def compress_bound(self, algo: int, n: int) -> int:
        if algo == ALGO_LZ4:
            return n + n // 255 + 16  # LZ4_COMPRESSBOUND
        return n + (n >> 8) + ((128 << 10) - n >> 11 if n < 128 << 10 else 0) + 64  # ZSTD_COMPRESSBOUND, rounded up

    def byte_counts(self, data: Any, step: int, counts: Any) -> None:
        counts += np.bincount(np.frombuffer(data, dtype=np.uint8)[::step], minlength=256)

    def screen(self, algo: int, src: Any, block_size: int, verify: bool, scratch: Any, max_stored: int,
               how: Screen) -> ScreenResult:
        lengths = np.empty(1, dtype="<u4")
        tested = 0
        for i, at in enumerate(range(0, len(src), block_size)):
            block = src[at : at + block_size]
            if _surely_fits(algo, block, verify, max_stored, how):
                continue
            tested += 1
            _, _, status, message = self.compress(algo, block, block_size, verify, scratch, lengths, max_stored)
            if status == TOO_BIG:
                return i, tested, OK, None
            if status != OK:
                return i, tested, status, message
        return -1, tested, OK, None


def _surely_fits(algo: int, block: Any, verify: bool, max_stored: int, how: Screen) -> bool:
    if algo != ALGO_LZ4:
        if not how.step:
            return False
        counts = np.bincount(np.frombuffer(block, dtype=np.uint8)[:: how.step], minlength=256)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum()) < how.bits
    room = max_stored - (CRC_SIZE if verify else 0) - how.margin
    rest = len(block) - how.prefix
    if how.prefix and rest > 0:
        head = len(codecs.compressor(ALGO_LZ4)(block[: how.prefix]))
        if head + rest + rest // 255 + 16 <= room:  # the rest at its worst: LZ4_COMPRESSBOUND
            return True
    fast = lz4.block.compress(block, mode="fast", acceleration=how.lz4_acceleration, store_size=False)
    return len(fast) <= room


class NativeRuns:
    name = "native"

    def __init__(self, module: Any) -> None:
        self.module = module
        self._local = threading.local()

    def _context(self) -> Any:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = self.module.new_context()
        return ctx

    def decompress(self, algo: int, stored: Any, starts: Any, first: int, count: int, base: int, out: Any,
                   block_size: int, last_len: int, verify: bool) -> RunResult:
        return self.module.decompress_blocks(self._context(), algo, stored, starts, first, count, base,  # type: ignore[no-any-return]
                                             out, block_size, last_len, verify)

    def compress(self, algo: int, src: Any, block_size: int, verify: bool, out: Any, lengths: Any,
                 max_stored: int) -> CompressResult:
        return self.module.compress_blocks(self._context(), algo, codecs.ZSTD_LEVEL, src, block_size,  # type: ignore[no-any-return]
                                           verify, out, lengths, max_stored)

    def compress_bound(self, algo: int, n: int) -> int:
        return self.module.compress_bound(algo, n)  # type: ignore[no-any-return]

    def byte_counts(self, data: Any, step: int, counts: Any) -> None:
        self.module.byte_counts(data, step, counts)

    def screen(self, algo: int, src: Any, block_size: int, verify: bool, scratch: Any, max_stored: int,
               how: Screen) -> ScreenResult:
        return self.module.screen_blocks(self._context(), algo, codecs.ZSTD_LEVEL, src, block_size,  # type: ignore[no-any-return]
                                         verify, scratch, max_stored, how.step, how.bits, how.lz4_acceleration,
                                         how.margin, how.prefix)


def _native() -> NativeRuns | None:
    module = native.blocks_module()
    return NativeRuns(module) if module is not None else None


def describe() -> str:
    """Which block path is in use, and its codec versions."""
    return native.describe_blocks()


NATIVE = _native()
PYTHON = PythonRuns()
ACTIVE: BlockRuns = NATIVE if NATIVE is not None and not native.switched_off() else PYTHON
