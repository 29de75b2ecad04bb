"""The "raw" CRC32C of the reference (Castagnoli, reflected, no pre/post inversion).

Computed by the C extension ``_blocks`` where it is built and in use (``crc32c_raw``, the raw form directly, the
GIL released); else by ``crc32c`` (hardware-accelerated, takes any buffer without a copy), which computes the
standard form: the raw form with seed ``s`` is the standard continuation from ``~s``, inverted. (``crc32c`` is
not loaded when the extension serves: its import reads its own version through importlib.metadata, 0.1 s.)
"""

from __future__ import annotations

from collections.abc import Callable

from .. import native

ZFILE_BLOCK_SEED = 100007  # per-block CRCs in ZFile

_blocks = native.blocks_module() if not native.switched_off() else None
if _blocks is not None:
    _raw: Callable[[bytes | bytearray | memoryview, int], int] = _blocks.crc32c_raw
else:
    import crc32c

    def _raw(data: bytes | bytearray | memoryview, seed: int) -> int:
        return int(crc32c.crc32c(data, value=seed ^ 0xFFFFFFFF)) ^ 0xFFFFFFFF


def raw_crc32c(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """CRC32C with the register starting at ``seed`` and no final XOR."""
    return _raw(data, seed)
