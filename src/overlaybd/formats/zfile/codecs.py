"""Block codecs: raw LZ4 blocks and zstd frames (spec §4.4). All release the GIL while they work."""

from __future__ import annotations

import threading
from collections.abc import Callable

import lz4.block
import zstandard

from ...errors import FormatError, UnsupportedError
from .spec import ALGO_LZ4, ALGO_NAMES, ALGO_ZSTD

ZSTD_LEVEL = 3  # the reference always compresses zstd at level 3

_local = threading.local()


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def compress(algo: int, data: bytes | memoryview) -> bytes:
    if algo == ALGO_LZ4:
        return lz4.block.compress(data, mode="default", store_size=False)  # type: ignore[no-any-return]
    if algo == ALGO_ZSTD:
        return _zstd_c().compress(data)
    raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")


def decompress(algo: int, data: bytes | memoryview, size: int) -> bytes:
    """Decompress one block that must yield exactly ``size`` bytes; any failure is a FormatError."""
    try:
        if algo == ALGO_LZ4:
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif algo == ALGO_ZSTD:
            out = _zstd_d().decompress(data, max_output_size=size)
        else:
            raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
        raise FormatError(f"block does not decompress: {exc}") from exc
    if len(out) != size:
        raise FormatError(f"block decompresses to {len(out)} bytes, expected {size}")
    return out  # type: ignore[no-any-return]


def compressor(algo: int) -> Callable[[bytes | memoryview], bytes]:
    """The compress function for one codec, looked up once for a batch of blocks (this thread's compressor)."""
    if algo == ALGO_LZ4:
        lz4_compress = lz4.block.compress

        def lz4_block(data: bytes | memoryview) -> bytes:
            return lz4_compress(data, mode="default", store_size=False)  # type: ignore[no-any-return]

        return lz4_block
    if algo == ALGO_ZSTD:
        return _zstd_c().compress
    raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")


def decompressor(algo: int) -> Callable[[bytes | memoryview, int], bytes]:
    """A decompress function for one codec, looked up once for a batch of blocks. It raises the codec's own
    errors (LZ4BlockError, ZstdError) and does not check the output length: callers do both."""
    if algo == ALGO_LZ4:
        lz4_decompress = lz4.block.decompress

        def lz4_block(data: bytes | memoryview, size: int) -> bytes:
            return lz4_decompress(data, uncompressed_size=size)  # type: ignore[no-any-return]

        return lz4_block
    if algo == ALGO_ZSTD:
        zstd_decompress = _zstd_d().decompress

        def zstd_frame(data: bytes | memoryview, size: int) -> bytes:
            return zstd_decompress(data, max_output_size=size)

        return zstd_frame
    raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")


CODEC_ERRORS = (lz4.block.LZ4BlockError, zstandard.ZstdError)


def check_algo(algo: int) -> None:
    if algo not in (ALGO_LZ4, ALGO_ZSTD):
        raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")
