"""LSMT header and trailer (the 4096-byte record at each end of a sealed file), and the format's constants.

numpy-free: what reads only headers (``overlaybd log``, ``overlaybd info`` of a small layer) loads only this.
``spec`` gives these names too, with the index records.
"""

from __future__ import annotations

import struct

from ...errors import BadMagicError, CorruptIndexError, LimitError, TruncatedError
from ..structs import Record

SECTOR = 512
HEADER_SIZE = 4096
STRUCT_SIZE = 390
MAGIC0 = b"LSMT\x00\x01\x02\x00"
MAGIC1 = bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")

FLAG_HEADER = 0x01
FLAG_DATA = 0x02
FLAG_SEALED = 0x04
FLAG_SPARSE = 0x10

MAX_RECORD_SECTORS = 16383  # 14-bit length
MAX_OFFSET_SECTORS = (1 << 50) - 1  # also the "invalid record" marker
INVALID_OFFSET = MAX_OFFSET_SECTORS
MAX_RO_INDEX_RECORDS = 1_000_000  # reference MAX_LSMT_RO_INDEX_SIZE
MAX_RW_INDEX_RECORDS = 128_000_000
MAX_LAYERS = 255
MAX_VIRTUAL_SIZE = (MAX_OFFSET_SECTORS + 1) * SECTOR  # 512 PiB: all that index records can address
RECORD_SIZE = 16
INDEX_PAD_RECORDS = 256  # committed indexes are padded to 4096-byte multiples
WRITE_SPLIT_SECTORS = 8192  # writes are cut into <= 4 MiB records
COPY_STEP_SECTORS = 64  # compaction copies in 32 KiB steps

NULL_UUID = b"\x00" * 16

# One index record, little-endian: offset | length << 50, moffset | zeroed << 55, in sectors.
RECORD = struct.Struct("<QQ")


def pack_record(offset: int, length: int, moffset: int, zeroed: bool = False) -> bytes:
    """The 16 bytes of one index record (all in sectors)."""
    return RECORD.pack(offset | length << 50, moffset | int(zeroed) << 55)

HEADER_RECORD = Record.declare((
    ("magic0", "8s"), ("magic1", "16s"), ("size", "I"), ("flags", "I"), ("index_offset", "Q"), ("index_size", "Q"),
    ("virtual_size", "Q"), ("uuid", "37s"), ("parent_uuid", "37s"), ("reserved", "H"), ("version", "B"),
    ("sub_version", "B"), ("user_tag", "256s"),
))
FIELD = HEADER_RECORD.offsets
_HEADER = HEADER_RECORD.struct
assert _HEADER.size == STRUCT_SIZE


# UUIDs in the 8-4-4-4-12 form, written out here (the uuid module costs 10 ms to load; only the form is needed)
_DASHES = (8, 13, 18, 23)
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _uuid_bytes(text: bytes) -> bytes | None:
    """36 bytes of text in the 8-4-4-4-12 form (any case) -> 16 bytes; None when not that form."""
    if len(text) != 36 or any(text[i] != 0x2D for i in _DASHES):
        return None
    digits = text.replace(b"-", b"")
    if len(digits) != 32 or not _HEX.issuperset(digits):
        return None
    return bytes.fromhex(digits.decode("ascii"))


def _uuid_str(raw: bytes) -> str:
    if len(raw) != 16:
        raise ValueError(f"a UUID is 16 bytes, not {len(raw)}")
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid_to_text(raw: bytes) -> bytes:
    """16 bytes -> the 37-byte field: uppercase text plus NUL."""
    return _uuid_str(raw).upper().encode() + b"\x00"


def uuid_from_text(field: bytes) -> bytes:
    """The 37-byte field -> 16 bytes; anything unparsable (legacy NULs) is the null UUID."""
    return _uuid_bytes(field[:36]) or NULL_UUID


def parse_uuid(text: str) -> bytes:
    """User input (36 chars, any case) -> 16 bytes."""
    raw = _uuid_bytes(text.encode("ascii", "replace")) if len(text) == 36 else None
    if raw is None:
        raise ValueError(f"not a 36-character UUID: {text!r}")
    return raw


def format_uuid(raw: bytes) -> str:
    return _uuid_str(raw)


class LsmtHeader:
    """The 4096-byte header/trailer record. Immutable; equal when every field is. (A plain class, not a dataclass:
    loading dataclasses costs the command line's start 15 ms.)"""

    __slots__ = ("flags", "index_offset", "index_size", "virtual_size", "uuid", "parent_uuid", "version",
                 "sub_version", "user_tag", "size_field")
    flags: int
    index_offset: int
    index_size: int  # number of 16-byte records
    virtual_size: int
    uuid: bytes
    parent_uuid: bytes
    version: int
    sub_version: int
    user_tag: bytes
    size_field: int

    def __init__(self, flags: int, index_offset: int = 0, index_size: int = 0, virtual_size: int = 0,
                 uuid: bytes = NULL_UUID, parent_uuid: bytes = NULL_UUID, version: int = 1, sub_version: int = 1,
                 user_tag: bytes = b"", size_field: int = STRUCT_SIZE) -> None:
        values = (flags, index_offset, index_size, virtual_size, uuid, parent_uuid, version, sub_version, user_tag,
                  size_field)
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} (LsmtHeader is immutable; use with_)")

    def __eq__(self, other: object) -> bool:
        return self._values() == other._values() if isinstance(other, LsmtHeader) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "LsmtHeader(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    @property
    def message(self) -> str:
        return self.user_tag.split(b"\x00", 1)[0].decode("utf-8", "replace")

    def with_(self, **changes: object) -> LsmtHeader:
        unknown = set(changes) - set(self.__slots__)
        if unknown:
            raise TypeError(f"LsmtHeader has no field {sorted(unknown)[0]!r}")
        fields: dict[str, object] = {n: getattr(self, n) for n in self.__slots__}
        return LsmtHeader(**{**fields, **changes})  # type: ignore[arg-type]

    def pack(self) -> bytes:
        rec = _HEADER.pack(
            MAGIC0, MAGIC1, STRUCT_SIZE, self.flags, self.index_offset, self.index_size, self.virtual_size,
            uuid_to_text(self.uuid), uuid_to_text(self.parent_uuid), 0, self.version, self.sub_version,
            self.user_tag[:256],
        )
        return rec + bytes(HEADER_SIZE - STRUCT_SIZE)

    @classmethod
    def unpack(cls, buf: bytes, *, path: str, offset: int) -> LsmtHeader:
        if len(buf) < STRUCT_SIZE:
            raise TruncatedError("LSMT header/trailer is cut short", path=path, offset=offset)
        (m0, m1, size_field, flags, index_offset, index_size, vsize, uuid, parent, _reserved, version, sub_version,
         user_tag) = _HEADER.unpack_from(buf)
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise BadMagicError("not an LSMT header/trailer (bad magic)", path=path, offset=offset)
        return cls(flags=flags, index_offset=index_offset, index_size=index_size, virtual_size=vsize,
                   uuid=uuid_from_text(uuid), parent_uuid=uuid_from_text(parent), version=version,
                   sub_version=sub_version, user_tag=user_tag.rstrip(b"\x00"), size_field=size_field)


def is_lsmt(first_bytes: bytes) -> bool:
    return first_bytes[:8] == MAGIC0 and first_bytes[8:24] == MAGIC1


# -- what a reader demands of a header/trailer before trusting its fields -------------------------------


def check_virtual_size(h: LsmtHeader, *, at: int, path: str) -> None:
    """A device larger than index records can address is not a device: refused before any size is computed."""
    if h.virtual_size > MAX_VIRTUAL_SIZE:
        raise LimitError(f"virtual size {h.virtual_size} is beyond the {MAX_VIRTUAL_SIZE} bytes index records can "
                         f"address", path=path, offset=at + FIELD["virtual_size"])


def check_sealed_header(h: LsmtHeader, *, path: str) -> None:
    """The header (offset 0) of a sealed file: a data-file header of a sane size."""
    if not h.is_header or not h.is_data:
        raise BadMagicError(f"LSMT header flags 0x{h.flags:x} are not a data-file header", path=path,
                            offset=FIELD["flags"])
    check_virtual_size(h, at=0, path=path)


def check_sealed_trailer(t: LsmtHeader, *, at: int, path: str) -> None:
    """The trailer at ``at`` (the last 4096 bytes) of a sealed file: flags, a bounded index that fits between
    header and trailer, a sane virtual size."""
    if t.is_header or not t.is_data or not t.is_sealed:
        raise BadMagicError(f"LSMT trailer flags 0x{t.flags:x} are not a sealed data trailer", path=path,
                            offset=at + FIELD["flags"])
    if t.index_size > MAX_RO_INDEX_RECORDS:
        raise LimitError(f"trailer declares {t.index_size} index records (limit {MAX_RO_INDEX_RECORDS})",
                         path=path, offset=at + FIELD["index_size"])
    if t.index_offset < HEADER_SIZE or t.index_offset + t.index_size * RECORD_SIZE > at:
        raise CorruptIndexError(
            f"index [{t.index_offset}, +{t.index_size} records) does not fit between header and trailer",
            path=path, offset=at + FIELD["index_offset"])
    check_virtual_size(t, at=at, path=path)
