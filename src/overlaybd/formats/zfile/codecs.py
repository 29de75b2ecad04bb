"""Block codecs: raw LZ4 blocks and zstd frames. All release the GIL while they work.

The Python block path's (``blocks.PythonRuns``). lz4, zstandard and ctypes are loaded on first use, so that
``zfile compress`` and ``decompress`` on the C path start without them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ...errors import UnsupportedError
from .spec import ALGO_LZ4, ALGO_NAMES, ALGO_ZSTD, ZSTD_LEVEL
from .spec import check_algo as check_algo  # re-exported: where it lived first

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from types import ModuleType

    import zstandard

_local = threading.local()


def _lz4_block() -> ModuleType:
    import lz4.block

    return lz4.block  # type: ignore[no-any-return]


def _zstandard() -> ModuleType:
    import zstandard

    return zstandard


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = _zstandard().ZstdCompressor(level=ZSTD_LEVEL)
    return c  # type: ignore[no-any-return]


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = _zstandard().ZstdDecompressor()
    return d  # type: ignore[no-any-return]


def _lz4_compress_default() -> Callable[[bytes | memoryview], bytes] | None:
    """``LZ4_compress_default`` from the liblz4 inside python-lz4, called through ctypes (the GIL released):
    the call the reference and the C block path make. python-lz4's own ``compress`` gives other bytes for some
    blocks (same liblz4 1.9.4; tests/unit/test_zfile_blocks.py holds both paths to the same bytes), so the Python
    path would not write the reference's bytes with it."""
    import ctypes

    import lz4.block._block

    try:
        fn = ctypes.CDLL(lz4.block._block.__file__).LZ4_compress_default
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int

    def lz4_block(data: bytes | memoryview) -> bytes:
        src = bytes(data)
        cap = len(src) + len(src) // 255 + 16  # LZ4_COMPRESSBOUND
        dst = ctypes.create_string_buffer(cap)
        n = fn(src, dst, len(src), cap)
        if n <= 0:
            raise lz4.block.LZ4BlockError("LZ4 compression failed")
        return dst.raw[:n]

    return lz4_block


_lz4_default: list[Callable[[bytes | memoryview], bytes] | None] = []  # filled on first use


def _lz4_default_fn() -> Callable[[bytes | memoryview], bytes] | None:
    if not _lz4_default:
        _lz4_default.append(_lz4_compress_default())
    return _lz4_default[0]


def compress(algo: int, data: bytes | memoryview) -> bytes:
    return compressor(algo)(data)


def compressor(algo: int) -> Callable[[bytes | memoryview], bytes]:
    """The compress function for one codec, looked up once for a batch of blocks (this thread's compressor)."""
    if algo == ALGO_LZ4:
        default = _lz4_default_fn()
        if default is not None:
            return default
        lz4_compress = _lz4_block().compress

        def lz4_block(data: bytes | memoryview) -> bytes:
            return lz4_compress(data, mode="default", store_size=False)  # type: ignore[no-any-return]

        return lz4_block
    if algo == ALGO_ZSTD:
        return _zstd_c().compress
    raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")


def decompressor(algo: int) -> Callable[[bytes | memoryview, int], bytes]:
    """A decompress function for one codec, looked up once for a batch of blocks: ``f(block, capacity)`` gives at
    most ``capacity`` bytes or raises one of CODEC_ERRORS; callers check the length they wanted. Both behave as
    the C calls of the reference and of the C block path: ``LZ4_decompress_safe`` into ``capacity`` bytes, and
    ``ZSTD_decompress`` (see :func:`zstd_block`)."""
    if algo == ALGO_LZ4:
        lz4_decompress = _lz4_block().decompress

        def lz4_block(data: bytes | memoryview, size: int) -> bytes:
            return lz4_decompress(data, uncompressed_size=size)  # type: ignore[no-any-return]

        return lz4_block
    if algo == ALGO_ZSTD:
        return zstd_block
    raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")


class ZstdBlockError(ValueError):
    """A zstd block that ``ZSTD_decompress`` would refuse; the message is the name libzstd gives that error."""


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC, _SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0
_UNKNOWN = -1


def zstd_block(data: bytes | memoryview, capacity: int) -> bytes:
    """What ``ZSTD_decompress(dst, capacity, data)`` gives, or ZstdBlockError where it fails: the block is zstd
    frames and skippable frames, back to back, filling it exactly, decompressing to at most ``capacity`` bytes.

    ``ZstdDecompressor.decompress`` alone reads only the first frame and ignores what follows, and trusts a frame's
    declared content size over ``max_output_size``: the frames are walked here, each bounded before it is
    decompressed."""
    view = memoryview(data).cast("B")
    out: list[bytes] = []
    room = capacity
    pos = 0
    while len(view) - pos >= 5:  # ZSTD_FRAMEHEADERSIZE_PREFIX: less than a frame's start is left over
        magic = int.from_bytes(view[pos : pos + 4], "little")
        if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
            if len(view) - pos < 8:
                raise ZstdBlockError("Src size is incorrect")
            pos += 8 + int.from_bytes(view[pos + 4 : pos + 8], "little")
            if pos > len(view):
                raise ZstdBlockError("Src size is incorrect")
            continue
        if magic != _ZSTD_MAGIC:
            raise ZstdBlockError("Unknown frame descriptor")
        end, content_size = _zstd_frame_end(view, pos)
        if content_size > room:
            raise ZstdBlockError("Destination buffer is too small")
        frame = bytes(view[pos:end])
        plain = _zstd_d().decompress(frame, max_output_size=max(room, 1), allow_extra_data=False)
        if len(plain) > room:
            raise ZstdBlockError("Destination buffer is too small")
        out.append(plain)
        room -= len(plain)
        pos = end
    if pos != len(view):
        raise ZstdBlockError("Src size is incorrect")
    return b"".join(out)


def _zstd_frame_end(view: memoryview, pos: int) -> tuple[int, int]:
    """Where the zstd frame at ``pos`` ends (RFC 8878 §3.1.1: header, blocks, optional checksum), and the content
    size its header declares (_UNKNOWN if none); ZstdBlockError where the frame runs past the block."""
    n = len(view)
    fhd = view[pos + 4]
    if fhd & 0x08:
        raise ZstdBlockError("Unsupported frame parameter")
    single = fhd >> 5 & 1
    fcs_size = (single, 2, 4, 8)[fhd >> 6]
    at = pos + 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    if at + fcs_size > n:
        raise ZstdBlockError("Src size is incorrect")
    content_size = int.from_bytes(view[at : at + fcs_size], "little") if fcs_size else _UNKNOWN
    if fcs_size == 2:
        content_size += 256
    at += fcs_size
    while True:
        if at + 3 > n:
            raise ZstdBlockError("Src size is incorrect")
        header = int.from_bytes(view[at : at + 3], "little")
        kind = header >> 1 & 3
        if kind == 3:
            raise ZstdBlockError("Data corruption detected")
        at += 3 + (1 if kind == 1 else header >> 3)
        if header & 1:
            break
    at += 4 if fhd & 0x04 else 0
    if at > n:
        raise ZstdBlockError("Src size is incorrect")
    return at, content_size


def codec_errors() -> tuple[type[Exception], ...]:
    """What the codecs raise for a block they refuse (an ``except`` clause evaluates this only when something was
    raised)."""
    return _lz4_block().LZ4BlockError, _zstandard().ZstdError, ZstdBlockError
