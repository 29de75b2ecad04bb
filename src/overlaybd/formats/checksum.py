"""The "raw" CRC32C of the reference (Castagnoli, reflected, no pre/post inversion).

``crc32c`` (hardware-accelerated, takes any buffer without a copy) computes the standard form; the raw form
with seed ``s`` is the standard continuation from ``~s``, inverted.
"""

from __future__ import annotations

import crc32c

ZFILE_BLOCK_SEED = 100007  # per-block CRCs in ZFile


def raw_crc32c(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """CRC32C with the register starting at ``seed`` and no final XOR."""
    return crc32c.crc32c(data, value=seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
