"""The single-file tar envelope around a layer: reading the first member, writing the reference form."""

from __future__ import annotations

from ..errors import FormatError, LimitError, TruncatedError
from ..frozen import Frozen
from ..source.base import BlockSource

BLOCK = 512
MEMBER_NAME = "overlaybd.commit"
SIZE_FIELD = 124  # a header's size field: 12 bytes of octal (or base-256)


def _checksum_ok(hdr: bytes) -> bool:
    field = hdr[148:156]
    try:
        stored = int(field.replace(b"\x00", b" ").strip() or b"0", 8)
    except ValueError:
        return False
    blanked = hdr[:148] + b" " * 8 + hdr[156:BLOCK]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return stored in (unsigned, signed)


def is_tar(first_block: bytes) -> bool:
    """A POSIX ustar header as the reference recognises it (GNU 'ustar  ' headers are not)."""
    return (len(first_block) >= BLOCK and first_block[257:262] == b"ustar" and first_block[263:265] == b"00"
            and _checksum_ok(first_block[:BLOCK]))


def _octal(field: bytes) -> int:
    text = field.replace(b"\x00", b" ").strip()
    if not text:
        return 0
    if field[0] & 0x80:  # base-256 (GNU) for large values
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    return int(text, 8)


def _pax_records(data: bytes, *, path: str, at: int) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records filling ``data`` (the reference's rules: a length of at least 5 that
    counts the whole record, an ``=`` in each)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit() or int(digits) < 5 or pos + int(digits) > len(data):
            raise FormatError("bad PAX record length", path=path, offset=at + pos)
        length = int(digits)
        key, eq, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise FormatError("PAX record without '='", path=path, offset=at + pos)
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


class TarMember(Frozen):
    __slots__ = ("name", "offset", "size")
    name: str
    offset: int  # where the payload starts
    size: int

    def __init__(self, name: str, offset: int, size: int) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "size", size)


EXTENDED = (b"x", b"g", b"L", b"K")  # PAX, PAX global, GNU long name, GNU long link: they describe what follows
MAX_EXTENDED_SIZE = 1 << 20  # an extended header beyond this is refused before it is read
MAX_EXTENDED_HEADERS = 16  # before the first member


def first_member(src: BlockSource) -> TarMember:
    """Parse headers up to the first regular member, honouring PAX ('x', 'g') and GNU long names ('L', 'K').

    What an extended header declares is bounded before anything is read or allocated: a remote blob is read
    through ranges, and a header claiming a gigabyte must not make it fetch one."""
    pos = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    for _ in range(MAX_EXTENDED_HEADERS + 1):
        hdr, size = _read_header(src, pos)
        kind = hdr[156:157]
        data_at = pos + BLOCK
        if kind in EXTENDED:
            body = _extended_body(src, kind, pos, size)
            if kind == b"x":
                pax.update(_pax_records(body, path=src.name, at=data_at))
            elif kind == b"L":
                long_name = body.rstrip(b"\x00").decode("utf-8", "replace")
            pos = data_at + -(-size // BLOCK) * BLOCK
            continue
        name = pax.get("path") or long_name or hdr[:100].rstrip(b"\x00").decode("utf-8", "replace")
        size = _pax_size(pax, size, src.name, pos)
        if data_at + size > src.size:
            raise TruncatedError(f"tar member {name!r} declares {size} bytes but the file ends at {src.size}",
                                 path=src.name, offset=data_at)
        return TarMember(name, data_at, size)
    raise LimitError(f"more than {MAX_EXTENDED_HEADERS} extended headers before the first member", path=src.name,
                     offset=pos)


def _read_header(src: BlockSource, pos: int) -> tuple[bytes, int]:
    """The ustar header block at ``pos``, checked, and the size its field declares."""
    if pos + BLOCK > src.size:
        raise TruncatedError("tar ends inside a header", path=src.name, offset=pos)
    hdr = src.pread(pos, BLOCK)
    if not any(hdr):
        raise FormatError("tar has no member", path=src.name, offset=pos)
    if not (hdr[257:262] == b"ustar" and _checksum_ok(hdr)):
        raise FormatError("bad tar header", path=src.name, offset=pos)
    try:
        return hdr, _octal(hdr[SIZE_FIELD : SIZE_FIELD + 12])
    except ValueError as exc:
        raise FormatError("bad size field in tar header", path=src.name, offset=pos + SIZE_FIELD) from exc


def _extended_body(src: BlockSource, kind: bytes, pos: int, size: int) -> bytes:
    """An extended header's records, refused before reading when it claims more than ``MAX_EXTENDED_SIZE``."""
    if size > MAX_EXTENDED_SIZE:
        raise LimitError(f"extended header '{kind.decode()}' of {size} bytes (limit {MAX_EXTENDED_SIZE})",
                         path=src.name, offset=pos + SIZE_FIELD)
    if pos + BLOCK + size > src.size:
        raise TruncatedError("tar ends inside an extended header", path=src.name, offset=pos + BLOCK)
    return src.pread(pos + BLOCK, size)


def _pax_size(pax: dict[str, str], size: int, path: str, pos: int) -> int:
    """The member's size: a PAX ``size`` record (when not zero) wins over the header's field."""
    text = pax.get("size")
    if text is None:
        return size
    if not (text.isascii() and text.isdigit()):
        raise FormatError(f"bad PAX size record {text[:40]!r}", path=path, offset=pos)
    return int(text) or size


def _header(name: bytes, mode: bytes, size_field: bytes, typeflag: bytes, owner: bytes = b"") -> bytes:
    """One ustar header block laid out as the reference writes it."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    if mode:
        h[100:108] = mode
        h[108:116] = b"     0 \x00"
        h[116:124] = b"     0 \x00"
        h[136:148] = b"          0 "
    h[124:136] = size_field
    h[156:157] = typeflag
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    h[265 : 265 + len(owner)] = owner
    h[297 : 297 + len(owner)] = owner
    h[148:156] = b" " * 8
    h[148:156] = b"%6o \x00" % sum(h)
    return bytes(h)


PAYLOAD_OFFSET = 3 * BLOCK


def pax_size_record(payload_size: int) -> bytes:
    """``"<len> size=<n>\\n"`` where ``<len>`` counts the whole record, itself included."""
    tail = f" size={payload_size}\n"
    length = len(tail)
    while len(str(length)) + len(tail) != length:
        length = len(str(length)) + len(tail)
    return f"{length}{tail}".encode()


def envelope(payload_size: int, file_mode: int) -> tuple[bytes, int, int]:
    """The reference writer's envelope: (the 1536 bytes before the payload, where the two end blocks go,
    total file size)."""
    record = pax_size_record(payload_size)
    pax = _header(b"overlaybd.pax", b"", b"%11o " % len(record), b"x")
    pax_data = record + bytes(BLOCK - len(record))
    ustar = _header(MEMBER_NAME.encode(), b"%6o \x00" % file_mode, b"          0 ", b"0", b"root")
    end_at = -(-(PAYLOAD_OFFSET + payload_size) // BLOCK) * BLOCK
    return pax + pax_data + ustar, end_at, end_at + 2 * BLOCK
