"""ZFile byte layout, declared once (spec §4.2, §4.3)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from ...errors import BadMagicError, ChecksumError, TruncatedError
from ..checksum import raw_crc32c

RECORD_SIZE = 512
STRUCT_SIZE = 96
MAGIC0 = b"ZFile\x00\x01\x00"
MAGIC1 = b"tuji.yyf@Alibaba"

FLAG_HEADER = 0x01
FLAG_DATA = 0x02
FLAG_SEALED = 0x04
FLAG_HEADER_OVERWRITE = 0x08
FLAG_DIGEST = 0x10
KNOWN_FLAGS = 0x1F  # legacy writers left garbage in the other bits (spec §4.11)

ALGO_LZO = 0
ALGO_LZ4 = 1
ALGO_ZSTD = 2
ALGO_NAMES = {ALGO_LZO: "mini_lzo", ALGO_LZ4: "lz4", ALGO_ZSTD: "zstd"}
ALGO_BY_NAME = {v: k for k, v in ALGO_NAMES.items()}

MAX_BLOCK_SIZE = 65536
MIN_BLOCK_SIZE = 4096
MAX_STORED_BLOCK = 65536  # the reference reader cannot read a longer stored block (spec §4.5)
MAX_BLOCKS = 1_000_000_000
CRC_SIZE = 4

# magic0, magic1, size, digest, flags, index_offset, index_size, original_file_size, index_crc, reserved_0,
# block_size, algo, level, use_dict, pad, args, dict_size, verify
_RECORD = struct.Struct("<8s16sIIQQQQIIIBBBBIIB7x")
assert _RECORD.size == STRUCT_SIZE


@dataclass(frozen=True, slots=True)
class ZFileHeader:
    flags: int
    index_offset: int = 0
    index_size: int = 0  # number of blocks (u32 entries)
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = 4096
    algo: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: bool = True
    digest: int = 0
    size_field: int = STRUCT_SIZE

    @property
    def known_flags(self) -> int:
        return self.flags & KNOWN_FLAGS

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def has_digest(self) -> bool:
        return bool(self.flags & FLAG_DIGEST)

    @property
    def overwritten(self) -> bool:
        return bool(self.flags & FLAG_HEADER_OVERWRITE)

    @property
    def algo_name(self) -> str:
        return ALGO_NAMES.get(self.algo, f"unknown({self.algo})")

    def with_(self, **changes: object) -> ZFileHeader:
        return replace(self, **changes)  # type: ignore[arg-type]

    def pack(self) -> bytes:
        """512 bytes with the digest computed over the record with the digest field zero (spec §4.7)."""
        body = bytearray(RECORD_SIZE)
        _RECORD.pack_into(body, 0, MAGIC0, MAGIC1, STRUCT_SIZE, 0, self.flags, self.index_offset, self.index_size,
                          self.original_file_size, self.index_crc, 0, self.block_size, self.algo, self.level,
                          self.use_dict, 0, 0, self.dict_size, 1 if self.verify else 0)
        if self.flags & FLAG_DIGEST:
            struct.pack_into("<I", body, 28, raw_crc32c(body))
        return bytes(body)

    @classmethod
    def unpack(cls, buf: bytes, *, path: str, offset: int, check_digest: bool = True) -> ZFileHeader:
        if len(buf) < RECORD_SIZE:
            raise TruncatedError("ZFile header/trailer is cut short", path=path, offset=offset)
        (m0, m1, size_field, digest, flags, index_offset, index_size, original_size, index_crc, _r0, block_size,
         algo, level, use_dict, _pad, _args, dict_size, verify) = _RECORD.unpack_from(buf)
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise BadMagicError("not a ZFile header/trailer (bad magic)", path=path, offset=offset)
        hdr = cls(flags=flags, index_offset=index_offset, index_size=index_size, original_file_size=original_size,
                  index_crc=index_crc, block_size=block_size, algo=algo, level=level, use_dict=use_dict,
                  dict_size=dict_size, verify=bool(verify), digest=digest, size_field=size_field)
        if check_digest and hdr.has_digest:
            body = bytearray(buf[:RECORD_SIZE])
            body[28:32] = b"\x00\x00\x00\x00"
            actual = raw_crc32c(body)
            if actual != digest:
                raise ChecksumError(f"ZFile record digest mismatch: stored 0x{digest:08x}, computed 0x{actual:08x}",
                                    path=path, offset=offset + 28, expected=digest, actual=actual)
        return hdr


def is_zfile(first_bytes: bytes) -> bool:
    return first_bytes[:8] == MAGIC0 and first_bytes[8:24] == MAGIC1
