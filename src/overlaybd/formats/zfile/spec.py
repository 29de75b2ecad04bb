"""ZFile byte layout, declared once: the 512-byte header and trailer records, and the jump table."""

from __future__ import annotations

import struct

from ...errors import (
    BadMagicError,
    ChecksumError,
    CorruptIndexError,
    FormatError,
    LimitError,
    TruncatedError,
    UnsupportedError,
)
from ...frozen import Frozen
from ..checksum import raw_crc32c
from ..structs import Record

RECORD_SIZE = 512
STRUCT_SIZE = 96
MAGIC0 = b"ZFile\x00\x01\x00"
MAGIC1 = b"tuji.yyf@Alibaba"

FLAG_HEADER = 0x01
FLAG_DATA = 0x02
FLAG_SEALED = 0x04
FLAG_HEADER_OVERWRITE = 0x08
FLAG_DIGEST = 0x10
KNOWN_FLAGS = 0x1F  # legacy writers left garbage in the other bits; only these five mean anything

ALGO_LZO = 0
ALGO_LZ4 = 1
ALGO_ZSTD = 2
ALGO_NAMES = {ALGO_LZO: "mini_lzo", ALGO_LZ4: "lz4", ALGO_ZSTD: "zstd"}
ALGO_BY_NAME = {v: k for k, v in ALGO_NAMES.items()}
SUPPORTED_ALGOS = (ALGO_LZ4, ALGO_ZSTD)
ZSTD_LEVEL = 3  # the reference always compresses zstd at level 3

MAX_BLOCK_SIZE = 65536
MIN_BLOCK_SIZE = 4096
MAX_STORED_BLOCK = 65536  # the reference reader cannot read a longer stored block (its read buffer is this size)
MAX_BLOCKS = 1_000_000_000
CRC_SIZE = 4

RECORD = Record.declare((
    ("magic0", "8s"), ("magic1", "16s"), ("size", "I"), ("digest", "I"), ("flags", "Q"), ("index_offset", "Q"),
    ("index_size", "Q"), ("original_file_size", "Q"), ("index_crc", "I"), ("reserved_0", "I"), ("block_size", "I"),
    ("algo", "B"), ("level", "B"), ("use_dict", "B"), ("pad", "B"), ("args", "I"), ("dict_size", "I"),
    ("verify", "B"), ("padding", "7x"),
))
FIELD = RECORD.offsets
_RECORD = RECORD.struct
assert _RECORD.size == STRUCT_SIZE


class ZFileHeader(Frozen):
    __slots__ = ("flags", "index_offset", "index_size", "original_file_size", "index_crc", "block_size", "algo",
                 "level", "use_dict", "dict_size", "verify", "digest", "size_field")
    flags: int
    index_offset: int
    index_size: int  # number of blocks (u32 entries)
    original_file_size: int
    index_crc: int
    block_size: int
    algo: int
    level: int
    use_dict: int
    dict_size: int
    verify: bool
    digest: int
    size_field: int

    def __init__(self, flags: int, index_offset: int = 0, index_size: int = 0, original_file_size: int = 0,
                 index_crc: int = 0, block_size: int = 4096, algo: int = ALGO_LZ4, level: int = 0, use_dict: int = 0,
                 dict_size: int = 0, verify: bool = True, digest: int = 0, size_field: int = STRUCT_SIZE) -> None:
        for name, value in zip(self.__slots__, (flags, index_offset, index_size, original_file_size, index_crc,
                                                block_size, algo, level, use_dict, dict_size, verify, digest,
                                                size_field), strict=True):
            object.__setattr__(self, name, value)

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
        return self.replace(**changes)

    def pack(self) -> bytes:
        """512 bytes with the digest computed over the record with the digest field zero."""
        body = bytearray(RECORD_SIZE)
        _RECORD.pack_into(body, 0, MAGIC0, MAGIC1, STRUCT_SIZE, 0, self.flags, self.index_offset, self.index_size,
                          self.original_file_size, self.index_crc, 0, self.block_size, self.algo, self.level,
                          self.use_dict, 0, 0, self.dict_size, 1 if self.verify else 0)
        if self.flags & FLAG_DIGEST:
            struct.pack_into("<I", body, FIELD["digest"], raw_crc32c(body))
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
            at, end = RECORD.span("digest")
            body[at:end] = bytes(end - at)
            actual = raw_crc32c(body)
            if actual != digest:
                raise ChecksumError(f"ZFile record digest mismatch: stored 0x{digest:08x}, computed 0x{actual:08x}",
                                    path=path, offset=offset + at, expected=digest, actual=actual)
        return hdr


def is_zfile(first_bytes: bytes) -> bool:
    return first_bytes[:8] == MAGIC0 and first_bytes[8:24] == MAGIC1


def max_stored_length(algo: int, block_size: int, verify: bool) -> int:
    """The most bytes one block can take on disk: its codec's worst case for ``block_size`` bytes
    (LZ4_COMPRESSBOUND, ZSTD_COMPRESSBOUND), and its CRC."""
    n = block_size
    if algo == ALGO_LZ4:
        bound = n + n // 255 + 16
    else:
        bound = n + (n >> 8) + ((128 << 10) - n >> 11 if n < 128 << 10 else 0)
    return bound + (CRC_SIZE if verify else 0)


# -- what a reader demands before trusting a record --------------------------------------------------------------
# ``at`` is where the record lies in the ZFile, ``base`` where the ZFile lies in the file called ``path`` (the tar
# payload offset): errors point at ``base + at + FIELD[name]``.


def check_header(h: ZFileHeader, *, base: int, path: str) -> None:
    if not h.is_header:
        raise FormatError("ZFile record at offset 0 is not a header", path=path, offset=base + FIELD["flags"])
    if not h.overwritten and not h.known_flags & FLAG_DATA:
        raise FormatError("ZFile header lacks the data-file flag", path=path, offset=base + FIELD["flags"])


def check_trailer(t: ZFileHeader, *, at: int, base: int, path: str) -> None:
    want = FLAG_DATA | FLAG_SEALED
    if t.known_flags & FLAG_HEADER or t.known_flags & want != want:
        raise FormatError(f"ZFile trailer flags 0x{t.flags:x} are not a sealed data trailer", path=path,
                          offset=base + at + FIELD["flags"])


def check_index_info(info: ZFileHeader, *, at: int, base: int, path: str, file_size: int) -> None:
    """The record holding the index info (trailer, or overwritten header), checked before the jump table is read:
    bounded counts and sizes, a supported codec, a table inside the file, and a data area that the declared
    number of blocks can fill (so that nothing is read or allocated for a table that cannot be right)."""

    def where(name: str) -> int:
        return base + at + FIELD[name]

    nblocks = info.index_size
    if nblocks > MAX_BLOCKS:
        raise LimitError(f"declares {nblocks} blocks (limit {MAX_BLOCKS})", path=path, offset=where("index_size"))
    bs = info.block_size
    if bs < 512 or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise UnsupportedError(f"block size {bs} is not a power of two up to {MAX_BLOCK_SIZE}", path=path,
                               offset=where("block_size"))
    if info.algo not in SUPPORTED_ALGOS:
        raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(info.algo, info.algo)} is not supported",
                               path=path, offset=where("algo"))
    if info.use_dict or info.dict_size:
        raise UnsupportedError("ZFile dictionaries are not supported", path=path, offset=where("use_dict"))
    table_end = info.index_offset + 4 * nblocks
    limit = file_size - (0 if info.overwritten else RECORD_SIZE)
    if info.index_offset < RECORD_SIZE or table_end > limit:
        raise CorruptIndexError(f"jump table [{info.index_offset}, {table_end}) lies outside the file "
                                f"({file_size} bytes)", path=path, offset=where("index_offset"))
    if nblocks != -(-info.original_file_size // bs):
        raise CorruptIndexError(f"{nblocks} blocks cannot hold {info.original_file_size} bytes in blocks of {bs}",
                                path=path, offset=where("index_size"))
    data = info.index_offset - RECORD_SIZE
    least = nblocks * ((CRC_SIZE if info.verify else 0) + 1)
    most = nblocks * max_stored_length(info.algo, bs, info.verify)
    if not least <= data <= most:
        raise CorruptIndexError(f"{nblocks} blocks cannot take the {data} bytes before the jump table (from {least} "
                                f"to {most})", path=path, offset=where("index_offset"))


def check_algo(algo: int) -> None:
    """UnsupportedError unless ``algo`` is a codec this package reads and writes (LZ4 or zstd)."""
    if algo not in SUPPORTED_ALGOS:
        raise UnsupportedError(f"compression algorithm {ALGO_NAMES.get(algo, algo)} is not supported")
