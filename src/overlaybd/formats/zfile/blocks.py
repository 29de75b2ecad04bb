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

import math
import sys
import threading
from array import array
from collections import namedtuple
from itertools import accumulate

from ... import native
from ..checksum import ZFILE_BLOCK_SEED, raw_crc32c
from . import codecs
from .spec import ALGO_LZ4, CRC_SIZE, ZSTD_LEVEL

# How blocks are screened (see ``BlockRuns.screen``): ``prefix``, for LZ4, the bytes at the start of a block
# compressed as written, the rest counted at its worst; ``margin``, the bytes the cheap look must leave to spare.
# Declared without typing (typing.TYPE_CHECKING is read by mypy from the name alone): the zfile commands start
# without loading it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NamedTuple, Protocol

    class Screen(NamedTuple):
        prefix: int
        margin: int
else:
    Protocol = object
    Screen = namedtuple("Screen", ("prefix", "margin"))

OK = 0
CRC = 1  # the block's CRC32C does not match: detail is the computed value
CODEC = 2  # the codec rejects the block: message says why
LENGTH = 3  # the block decompresses to the wrong size: detail is that size
TOO_BIG = 5  # compress: the block's stored length would pass max_stored

RunResult = tuple[int, int, int, str | None]  # decompress: done, status, detail, message
CompressResult = tuple[int, int, int, str | None]  # compress: done, bytes of out used, status, message
ScreenResult = tuple[int, int, int, str | None]  # screen: first block that does not fit (-1: none), blocks
# compressed to find out, status, message



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

    def block_starts(self, lengths: Any, first: int, floor: int, ceiling: int, out: Any) -> int:
        """A ZFile's jump table ``lengths`` (little-endian u32s) as where each block starts, from ``first``, and
        last where the final one ends, into ``out`` (64-bit integers, one more than the blocks). Returns the
        first block whose length is not above ``floor`` and at most ``ceiling`` (``out`` then holds nothing
        useful), or -1."""
        ...

    def screen(self, algo: int, src: Any, block_size: int, verify: bool, scratch: Any, max_stored: int,
               how: Screen) -> ScreenResult:
        """The first block of ``src`` whose stored length, compressed as ``compress`` would, passes
        ``max_stored``. A block is compressed to find out only when a cheap look does not show that it fits with
        ``how.margin`` bytes to spare: for zstd, every byte counted, each of zstd's own tests before it codes
        literals with Huffman passed twice over and Gallager's bound on that Huffman code below what zstd keeps
        (``_zstd_surely_fits``); for LZ4 (which has no entropy coder, and parses a block from its start, a match
        never costing more than the literals it replaces), its first ``how.prefix`` bytes compressed as written
        plus the worst case of the rest. ``scratch`` holds one block's worst case."""
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
            except codecs.codec_errors() as exc:
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

    def block_starts(self, lengths: Any, first: int, floor: int, ceiling: int, out: Any) -> int:
        table = array("I", bytes(lengths))
        if sys.byteorder == "big":
            table.byteswap()
        if len(out) < len(table) + 1:
            raise ValueError("lengths must be u32s and out one 64-bit integer more")
        if table and (min(table) <= floor or max(table) > ceiling):
            return next(k for k, n in enumerate(table) if n <= floor or n > ceiling)
        out[: len(table) + 1] = array("q", accumulate(table, initial=first))
        return -1

    def screen(self, algo: int, src: Any, block_size: int, verify: bool, scratch: Any, max_stored: int,
               how: Screen) -> ScreenResult:
        if not 0 < block_size <= 1 << 16 or not 0 < max_stored <= 0x7FFFFFFF or not 0 <= how.margin <= 0x7FFFFFFF \
                or how.prefix < 0:
            raise ValueError("bad block size, max_stored, margin or prefix")
        if len(scratch) < self.compress_bound(algo, block_size) + CRC_SIZE:
            raise ValueError("scratch is smaller than a block's worst case")
        lengths = array("I", [0])
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


# zstd's tests before it codes literals with Huffman (lib/compress/huf_compress.c and zstd_compress_literals.c,
# 1.5.x): with few matches, the commonest byte of the first and of the last 4 KiB of the literals, added, must
# occur more than (2 * 4096 >> 7) + 4 times; the commonest byte of all more than (n >> 7) + 4 times; and the
# Huffman literals must save (n >> 6) + 2 bytes. Otherwise the block is stored raw, and a raw block does not fit.
ZSTD_SAMPLE = 4096
ZSTD_EDGE_TOP = 2 * ((ZSTD_SAMPLE >> 7) + 4)  # each edge on its own, as if zstd took it for a block
ZSTD_FRAME_OVERHEAD = 32  # frame header, block header, literals header, jump table: at most
ZSTD_TABLE_BYTES = 256  # a Huffman table description of 256 weights: at most
HUFFMAN_REDUNDANCY = 0.0861  # Gallager: Huffman codes at most p_max + this many bits a byte over entropy


def _counts(data: memoryview) -> list[int]:
    """How often each byte value occurs in ``data`` (``bytes.count`` per value: no numpy on this path)."""
    raw = data.tobytes()
    return [raw.count(value) for value in range(256)]


def _clog2c(c: int) -> float:
    return c * math.log2(c) if c else 0.0


def _zstd_surely_fits(block: Any, room: int, margin: int) -> bool:
    """zstd surely codes ``block`` with Huffman literals even if it finds no match: every byte counted, each of
    zstd's tests passed with twice what it asks, Gallager's bound below what zstd keeps with ``margin`` to spare.
    The same sums in the same order as the C path, so both decide alike."""
    n = len(block)
    if n < 2 * ZSTD_SAMPLE or n > 1 << 16:
        return False
    data = memoryview(block).cast("B")
    head = _counts(data[:ZSTD_SAMPLE])
    tail = _counts(data[n - ZSTD_SAMPLE :])
    if max(head) <= ZSTD_EDGE_TOP or max(tail) <= ZSTD_EDGE_TOP:
        return False
    counts = [a + b + c for a, b, c in zip(head, tail, _counts(data[ZSTD_SAMPLE : n - ZSTD_SAMPLE]), strict=True)]
    top = max(counts)
    if top <= 2 * ((n >> 7) + 4):
        return False
    total = 0.0
    for c in counts:
        total += _clog2c(c)
    bits = _clog2c(n) - total
    bits += n * min(top / n + HUFFMAN_REDUNDANCY, 1.0)
    need = bits / 8.0 + ZSTD_TABLE_BYTES + margin
    return need < n - (n >> 6) - 2 and need + ZSTD_FRAME_OVERHEAD <= room


def _surely_fits(algo: int, block: Any, verify: bool, max_stored: int, how: Screen) -> bool:
    crc = CRC_SIZE if verify else 0
    if max_stored < crc + how.margin:
        return False
    room = max_stored - crc
    if algo != ALGO_LZ4:
        return _zstd_surely_fits(block, room, how.margin)
    if not how.prefix or how.prefix >= len(block):
        return False
    rest = len(block) - how.prefix
    head = len(codecs.compressor(ALGO_LZ4)(block[: how.prefix]))
    return head + rest + rest // 255 + 16 + how.margin <= room  # the rest at its worst: LZ4_COMPRESSBOUND


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
        return self.module.compress_blocks(self._context(), algo, ZSTD_LEVEL, src, block_size,  # type: ignore[no-any-return]
                                           verify, out, lengths, max_stored)

    def compress_bound(self, algo: int, n: int) -> int:
        return self.module.compress_bound(algo, n)  # type: ignore[no-any-return]

    def block_starts(self, lengths: Any, first: int, floor: int, ceiling: int, out: Any) -> int:
        return self.module.block_starts(lengths, first, floor, ceiling, out)  # type: ignore[no-any-return]

    def screen(self, algo: int, src: Any, block_size: int, verify: bool, scratch: Any, max_stored: int,
               how: Screen) -> ScreenResult:
        return self.module.screen_blocks(self._context(), algo, ZSTD_LEVEL, src, block_size,  # type: ignore[no-any-return]
                                         verify, scratch, max_stored, how.margin, how.prefix)


def _native() -> NativeRuns | None:
    module = native.blocks_module()
    return NativeRuns(module) if module is not None else None


def describe() -> str:
    """Which block path is in use, and its codec versions."""
    return native.describe_blocks()


NATIVE = _native()
PYTHON = PythonRuns()
ACTIVE: BlockRuns = NATIVE if NATIVE is not None and not native.switched_off() else PYTHON
