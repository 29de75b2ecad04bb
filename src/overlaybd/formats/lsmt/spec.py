"""LSMT byte layouts, declared once.

Inside this package offsets and lengths of index records are in 512-byte *sectors* (names end in ``_sectors``
or live in record arrays); header fields are bytes.
"""

from __future__ import annotations

import numpy as np

from .header import (  # re-exported: spec is where the whole format is declared
    COPY_STEP_SECTORS as COPY_STEP_SECTORS,
)
from .header import (
    FIELD as FIELD,
)
from .header import (
    FLAG_DATA as FLAG_DATA,
)
from .header import (
    FLAG_HEADER as FLAG_HEADER,
)
from .header import (
    FLAG_SEALED as FLAG_SEALED,
)
from .header import (
    FLAG_SPARSE as FLAG_SPARSE,
)
from .header import (
    HEADER_RECORD as HEADER_RECORD,
)
from .header import (
    HEADER_SIZE as HEADER_SIZE,
)
from .header import (
    INDEX_PAD_RECORDS as INDEX_PAD_RECORDS,
)
from .header import (
    INVALID_OFFSET as INVALID_OFFSET,
)
from .header import (
    MAGIC0 as MAGIC0,
)
from .header import (
    MAGIC1 as MAGIC1,
)
from .header import (
    MAX_LAYERS as MAX_LAYERS,
)
from .header import (
    MAX_OFFSET_SECTORS as MAX_OFFSET_SECTORS,
)
from .header import (
    MAX_RECORD_SECTORS as MAX_RECORD_SECTORS,
)
from .header import (
    MAX_RO_INDEX_RECORDS as MAX_RO_INDEX_RECORDS,
)
from .header import (
    MAX_RW_INDEX_RECORDS as MAX_RW_INDEX_RECORDS,
)
from .header import (
    MAX_VIRTUAL_SIZE as MAX_VIRTUAL_SIZE,
)
from .header import (
    NULL_UUID as NULL_UUID,
)
from .header import (
    RECORD_SIZE as RECORD_SIZE,
)
from .header import (
    SECTOR as SECTOR,
)
from .header import (
    STRUCT_SIZE as STRUCT_SIZE,
)
from .header import (
    WRITE_SPLIT_SECTORS as WRITE_SPLIT_SECTORS,
)
from .header import (
    LsmtHeader as LsmtHeader,
)
from .header import (
    check_sealed_header as check_sealed_header,
)
from .header import (
    check_sealed_trailer as check_sealed_trailer,
)
from .header import (
    check_virtual_size as check_virtual_size,
)
from .header import (
    format_uuid as format_uuid,
)
from .header import (
    is_lsmt as is_lsmt,
)
from .header import (
    parse_uuid as parse_uuid,
)
from .header import (
    uuid_from_text as uuid_from_text,
)
from .header import (
    uuid_to_text as uuid_to_text,
)

# -- 16-byte index records --------------------------------------------------------------------------------

_MASK50 = np.uint64((1 << 50) - 1)
_MASK55 = np.uint64((1 << 55) - 1)


def decode_records(buf: bytes | memoryview) -> dict[str, np.ndarray]:
    """Raw little-endian records -> arrays (sectors). Invalid (padding) records are kept; see ``valid``."""
    words = np.frombuffer(buf, dtype="<u8")
    if words.size % 2:
        words = words[:-1]
    w0 = words[0::2]
    w1 = words[1::2]
    return {
        "offset": (w0 & _MASK50).astype(np.int64),
        "length": (w0 >> np.uint64(50)).astype(np.int64),
        "moffset": (w1 & _MASK55).astype(np.int64),
        "zeroed": ((w1 >> np.uint64(55)) & np.uint64(1)).astype(bool),
        "tag": (w1 >> np.uint64(56)).astype(np.uint8),
    }


def encode_records(offset: np.ndarray, length: np.ndarray, moffset: np.ndarray, zeroed: np.ndarray,
                   tag: np.ndarray | int = 0) -> bytes:
    n = len(offset)
    out = np.empty(2 * n, dtype="<u8")
    out[0::2] = offset.astype(np.uint64) | (length.astype(np.uint64) << np.uint64(50))
    out[1::2] = (moffset.astype(np.uint64) | (np.asarray(zeroed).astype(np.uint64) << np.uint64(55))
                 | (np.asarray(tag).astype(np.uint64) << np.uint64(56)))
    return out.tobytes()


INVALID_RECORD = encode_records(np.array([INVALID_OFFSET]), np.array([0]), np.array([0]), np.array([False]))
