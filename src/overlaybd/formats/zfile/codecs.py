"""Block codecs: raw LZ4 blocks and zstd frames (spec §4.4). All release the GIL while they work."""

from __future__ import annotations

import threading

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


def check_algo(algo: int) -> None:
    if algo not in (ALGO_LZ4, ALGO_ZSTD):
        raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")
