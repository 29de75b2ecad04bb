"""Mutation steps: each a named operation with plain arguments, so that any mutant can be replayed from its
description (``(seed, [(op, file, {args})...])``, the form of the regression table).

Structure-aware steps locate what they edit with the oracle's parsers and repair what would otherwise stop the
damage at the door: a ZFile record's digest, the jump table's CRC, a block's CRC, a tar header's checksum, the
ZFile around an edited LSMT stream (recompressed as the original was). A step that does not apply to the file as
it is by then (an earlier step broke what it looks for) changes nothing.

Each step also says whether it is *neutral*: if the reader accepts the mutant, it must read exactly the bytes of
the unmutated seed (the edit touched nothing that decides content, or something a CRC covers).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..oracle import (
    LSMT_FIELDS,
    LSMT_HEADER,
    Z_DIGEST,
    ZFIELDS,
    ZREC,
    lsmt_rec,
    raw_crc32c,
)
from .locate import TAR_BLOCK, Envelope, Wrapped, rewrap, tar_checksum, tar_payload, unwrap, with_block_crc
from .seeds import Seed

Files = dict[str, bytes]
Step = tuple[str, str, dict[str, Any]]  # (operation, file name, arguments)

LSMT_NEUTRAL = {"header": {"size", "uuid", "parent_uuid", "reserved", "version", "sub_version", "user_tag",
                           "index_offset", "index_size", "virtual_size", "padding"},
                "trailer": {"size", "uuid", "parent_uuid", "reserved", "version", "sub_version", "user_tag",
                            "padding"}}
ZFILE_NEUTRAL = {"size", "reserved_0", "level", "pad", "args", "padding"}
RECORD_FIELDS = {"offset": (0, 0, 50), "length": (0, 50, 14), "moffset": (8, 0, 55), "zeroed": (8, 55, 1),
                 "tag": (8, 56, 8)}  # field -> (word offset, first bit, bits) of a 16-byte index record


@dataclass(frozen=True)
class Applied:
    files: Files
    neutral: bool


def apply(seed: Seed, steps: list[Step]) -> Applied:
    files = dict(seed.files)
    neutral = True
    for op, name, args in steps:
        before = files[name]
        after, is_neutral = OPS[op](before, **args)
        files[name] = before if after is None else after
        neutral = neutral and (after is None or is_neutral)
    return Applied(files, neutral)


# -- plain bytes ------------------------------------------------------------------------------------------------------

Result = tuple[bytes | None, bool]


def flip(buf: bytes, *, at: int, xor: int) -> Result:
    if not 0 <= at < len(buf):
        return None, True
    out = bytearray(buf)
    out[at] ^= xor
    return bytes(out), _unused_byte(buf, at)


def put(buf: bytes, *, at: int, hex: str) -> Result:
    data = bytes.fromhex(hex)
    if not 0 <= at <= len(buf):
        return None, True
    return buf[:at] + data + buf[at + len(data) :], False


def truncate(buf: bytes, *, size: int) -> Result:
    env = tar_payload(buf)
    keeps_payload = env is not None and size >= env.base + env.length  # only the envelope's end padding goes
    return buf[: max(0, size)], keeps_payload


def extend(buf: bytes, *, n: int, fill: int = 0xA5) -> Result:
    return buf + bytes([fill]) * n, tar_payload(buf) is not None  # past a tar member's payload: unused


def _unused_byte(buf: bytes, at: int) -> bool:
    """A byte no reader may use: the padding of a raw LSMT file's header or trailer record, the slack between
    its index and its trailer, the end padding of a tar envelope."""
    env = tar_payload(buf)
    if env is not None:
        return at >= env.base + env.length
    trailer_at = len(buf) - LSMT_HEADER
    t = lsmt_rec(buf, trailer_at)
    if lsmt_rec(buf, 0) is None or t is None or t.flags & 0x01:
        return False
    index_end = t.index_offset + 16 * t.index_size
    return 390 <= at < LSMT_HEADER or trailer_at + 390 <= at or LSMT_HEADER <= index_end <= at < trailer_at


# -- LSMT, raw or inside a ZFile / tar envelope (recompressed) ---------------------------------------------------------


def _lsmt_edit(buf: bytes, edit: Callable[[bytearray], bool]) -> Result:
    """Apply ``edit`` to the LSMT stream of ``buf`` (unwrapped, then wrapped again as it was)."""
    w = unwrap(buf)
    if w is None or not w.is_lsmt:
        return None, True
    stream = bytearray(w.stream)
    neutral = edit(stream)
    return rewrap(buf, w, bytes(stream)), neutral


def _field_span(fields: tuple[tuple[str, int, int], ...], name: str) -> tuple[int, int]:
    return next((a, b) for n, a, b in fields if n == name)


def lsmt_field(buf: bytes, *, record: str, field: str, value: int) -> Result:
    def edit(stream: bytearray) -> bool:
        at = 0 if record == "header" else len(stream) - LSMT_HEADER
        a, b = _field_span(LSMT_FIELDS, field)
        width = min(b - a, 8)
        stream[at + a : at + a + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
        return field in LSMT_NEUTRAL[record]

    return _lsmt_edit(buf, edit)


def _index_at(stream: bytes | bytearray) -> tuple[int, int] | None:
    t = lsmt_rec(stream, len(stream) - LSMT_HEADER)
    return None if t is None else (t.index_offset, t.index_size)


def lsmt_record(buf: bytes, *, k: int, field: str, value: int) -> Result:
    def edit(stream: bytearray) -> bool:
        where = _index_at(stream)
        if where is not None and 0 <= where[0] + 16 * k <= len(stream) - 16:
            _set_record_field(stream, where[0] + 16 * k, field, value)
        return False

    return _lsmt_edit(buf, edit)


def lsmt_records(buf: bytes, *, k: int, how: str) -> Result:
    """Records ``k-1``, ``k`` made to overlap (``overlap``), swapped (``swap``), or ``k`` a copy of ``k-1``."""
    def edit(stream: bytearray) -> bool:
        where = _index_at(stream)
        if where is None or not 1 <= k or where[0] + 16 * (k + 1) > len(stream):
            return True
        a = where[0] + 16 * (k - 1)
        prev, cur = bytes(stream[a : a + 16]), bytes(stream[a + 16 : a + 32])
        if how == "swap":
            stream[a : a + 32] = cur + prev
        elif how == "copy":
            stream[a + 16 : a + 32] = prev
        else:
            offset = struct.unpack_from("<Q", prev)[0] & ((1 << 50) - 1)
            _set_record_field(stream, a + 16, "offset", offset + 1)
        return False

    return _lsmt_edit(buf, edit)


def _set_record_field(buf: bytearray, at: int, field: str, value: int) -> None:
    word_at, bit, bits = RECORD_FIELDS[field]
    (word,) = struct.unpack_from("<Q", buf, at + word_at)
    mask = ((1 << bits) - 1) << bit
    struct.pack_into("<Q", buf, at + word_at, (word & ~mask) | ((value << bit) & mask))


def rw_record(buf: bytes, *, k: int, field: str, value: int) -> Result:
    """A record of a writable index file (records from byte 4096 on, in log order)."""
    at = LSMT_HEADER + 16 * k
    if at + 16 > len(buf):
        return None, True
    out = bytearray(buf)
    _set_record_field(out, at, field, value)
    return bytes(out), False


def rw_append(buf: bytes, *, offset: int, length: int, moffset: int, zeroed: int = 0) -> Result:
    """One more record at the end of a writable index file."""
    return buf + struct.pack("<QQ", offset | length << 50, moffset | zeroed << 55), False


# -- ZFile (raw or inside a tar envelope) ------------------------------------------------------------------------------


def _zfile(buf: bytes) -> Wrapped | None:
    w = unwrap(buf)
    return w if w is not None and w.zlay is not None else None


def _fix_digest(out: bytearray, at: int) -> None:
    if struct.unpack_from("<Q", out, at + 32)[0] & Z_DIGEST:
        out[at + 28 : at + 32] = bytes(4)
        struct.pack_into("<I", out, at + 28, raw_crc32c(out[at : at + ZREC]))


def zfile_field(buf: bytes, *, record: str, field: str, value: int, digest: str = "fix") -> Result:
    """A field of the ZFile header (offset 0) or trailer (last 512 bytes), its digest recomputed (``fix``) or
    not (``keep``)."""
    w = _zfile(buf)
    if w is None:
        return None, True
    lay = w.zlay
    assert lay is not None
    at = lay.base + (0 if record == "header" else lay.length - ZREC)
    a, b = _field_span(ZFIELDS, field)
    width = min(b - a, 8)
    out = bytearray(buf)
    out[at + a : at + a + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
    if digest == "fix":
        _fix_digest(out, at)
    unused = record == "trailer" and lay.overwritten  # never read when the header holds the index info
    return bytes(out), field in ZFILE_NEUTRAL or unused


def _jump_edit(buf: bytes, edit: Callable[[list[int]], None]) -> Result:
    """Edit the jump table's entries; its CRC (in the record holding the index info) is made to match."""
    w = _zfile(buf)
    if w is None:
        return None, True
    lay = w.zlay
    assert lay is not None
    entries = list(struct.unpack_from(f"<{lay.nblocks}I", buf, lay.base + lay.index_offset))
    edit(entries)
    table = struct.pack(f"<{lay.nblocks}I", *(e % (1 << 32) for e in entries))
    out = bytearray(buf)
    out[lay.base + lay.index_offset : lay.base + lay.index_offset + len(table)] = table
    info = lay.base + lay.info_at
    struct.pack_into("<I", out, info + 64, raw_crc32c(table))
    _fix_digest(out, info)
    return bytes(out), bool(lay.verify)  # with per-block CRCs, a block cut elsewhere fails its CRC


def jump_entry(buf: bytes, *, k: int, value: int) -> Result:
    def edit(entries: list[int]) -> None:
        if 0 <= k < len(entries):
            entries[k] = value

    return _jump_edit(buf, edit)


def jump_shift(buf: bytes, *, k: int, delta: int) -> Result:
    """``delta`` bytes move from block ``k+1`` to block ``k`` (the sum, so index_offset, stays right)."""
    def edit(entries: list[int]) -> None:
        if 0 <= k < len(entries) - 1:
            entries[k] += delta
            entries[k + 1] -= delta

    return _jump_edit(buf, edit)


def block(buf: bytes, *, k: int, at: int, xor: int, crc: str = "keep") -> Result:
    """Byte ``at`` of stored block ``k`` flipped; with ``crc="fix"`` the block's CRC is recomputed, so the damage
    reaches the codec."""
    w = _zfile(buf)
    if w is None:
        return None, True
    lay = w.zlay
    assert lay is not None
    if not 0 <= k < lay.nblocks:
        return None, True
    a, b = lay.base + lay.starts[k], lay.base + lay.starts[k + 1]
    payload_end = b - (4 if lay.verify else 0)
    out = bytearray(buf)
    out[a + at % (b - a)] ^= xor
    if lay.verify and crc == "fix":
        out[a:b] = with_block_crc(bytes(out[a:payload_end]))
    return bytes(out), bool(lay.verify) and crc == "keep"


# -- the tar envelope -------------------------------------------------------------------------------------------------

TAR_FIELDS = {"name": (0, 100), "mode": (100, 108), "size": (124, 136), "chksum": (148, 156), "typeflag": (156, 157),
              "magic": (257, 263), "version": (263, 265)}


def tar_field(buf: bytes, *, header: int, field: str, text: str, checksum: str = "fix") -> Result:
    """A field of the tar header at block ``header`` (0, or 2 for the ustar header after a PAX one) set to
    ``text`` (NUL-padded), its checksum recomputed (``fix``) or not."""
    at = TAR_BLOCK * header
    if tar_payload(buf) is None or at + TAR_BLOCK > len(buf):
        return None, True
    a, b = TAR_FIELDS[field]
    out = bytearray(buf)
    out[at + a : at + b] = text.encode("latin-1")[: b - a].ljust(b - a, b"\x00")
    if checksum == "fix":
        hdr = out[at : at + TAR_BLOCK]
        tar_checksum(hdr)
        out[at : at + TAR_BLOCK] = hdr
    return bytes(out), False


def pax(buf: bytes, *, record: str) -> Result:
    """The PAX data block replaced by ``record`` (the PAX header's size field and checksum made to match)."""
    env = tar_payload(buf)
    data = record.encode("latin-1")
    if env is None or not env.pax or len(data) > TAR_BLOCK:
        return None, True
    out = bytearray(buf)
    out[TAR_BLOCK : 2 * TAR_BLOCK] = data.ljust(TAR_BLOCK, b"\x00")
    hdr = out[:TAR_BLOCK]
    hdr[124:136] = b"%11o " % len(data)
    tar_checksum(hdr)
    out[:TAR_BLOCK] = hdr
    return bytes(out), False


def tar_prefix(buf: bytes, *, kind: str, size: int, body: int) -> Result:
    """An extended header of type ``kind`` claiming ``size`` bytes, followed by ``body`` bytes (rounded up to
    blocks) of ``a=b`` PAX text, put before the envelope's first header."""
    if tar_payload(buf) is None:
        return None, True
    hdr = bytearray(TAR_BLOCK)
    hdr[0:13] = b"././@LongLink"
    hdr[124:136] = b"%11o " % size if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    hdr[156:157] = kind.encode()
    hdr[257:265] = b"ustar\x0000"
    tar_checksum(hdr)
    text = (b"%d a=b\n" % 8 * (body // 8 + 1))[:body]
    padded = text + bytes(-len(text) % TAR_BLOCK)
    return bytes(hdr) + padded + buf, False


OPS: dict[str, Callable[..., Result]] = {
    "flip": flip, "put": put, "truncate": truncate, "extend": extend, "lsmt_field": lsmt_field,
    "lsmt_record": lsmt_record, "lsmt_records": lsmt_records, "rw_record": rw_record, "rw_append": rw_append,
    "zfile_field": zfile_field, "jump_entry": jump_entry, "jump_shift": jump_shift, "block": block,
    "tar_field": tar_field, "pax": pax, "tar_prefix": tar_prefix,
}


# -- random mutants --------------------------------------------------------------------------------------------------


def interesting(rng: random.Random, width: int, current: int, near: tuple[int, ...]) -> int:
    """A value for a ``width``-byte field: edges of the type, powers of two around the format's limits, neighbours
    of the current value and of the file's own sizes and offsets, or anything."""
    top = 1 << 8 * width
    picks = [0, 1, 2, 5, 255, 511, 512, 513, 4095, 4096, 4097, 16383, 16384, 65535, 65536, 65537, (1 << 31) - 1,
             1 << 31, (1 << 32) - 1, 1 << 32, (1 << 50) - 1, 1 << 50, 1 << 55, 1 << 59, (1 << 59) + 512,
             (1 << 63) - 1, 1 << 63, top - 1, top >> 1, current + 1, current - 1, current * 2, current // 2,
             current + 512, current - 512, current + 4096, current - 4096, rng.getrandbits(8 * width)]
    picks += [n + d for n in near for d in (-4096, -512, -16, -1, 0, 1, 16, 512)]
    return rng.choice(picks) % top


def random_steps(seed: Seed, rng: random.Random, structure: dict[str, Wrapped | None]) -> list[Step]:
    """One to three random steps for ``seed``; ``structure`` holds each file's unwrapped form (computed once)."""
    count = rng.choices((1, 2, 3), weights=(70, 20, 10))[0]
    return [_one_step(seed, rng, structure) for _ in range(count)]


def _one_step(seed: Seed, rng: random.Random, structure: dict[str, Wrapped | None]) -> Step:
    name = rng.choice(seed.names)
    buf = seed.file(name)
    w = structure[name]
    size = len(buf)
    choices: list[tuple[float, Callable[[], dict[str, Any]], str]] = [
        (3, lambda: {"at": _hot_offset(rng, buf, w), "xor": rng.choice((0x01, 0x80, 0xFF, rng.randrange(1, 256)))},
         "flip"),
        (1, lambda: {"size": rng.choice((rng.randrange(size), size - 1, size - 512, size - 4096, 4096, 512,
                                         rng.randrange(size - min(size, 8192), size)))}, "truncate"),
        (0.3, lambda: {"n": rng.choice((1, 16, 512, 4096))}, "extend"),
    ]
    if name.endswith(".index"):
        records = (size - LSMT_HEADER) // 16
        choices += [
            (3, lambda: _record_args(rng, rng.randrange(max(records, 1)), ()), "rw_record"),
            (1, lambda: {"offset": rng.randrange(1 << 15), "length": rng.choice((1, 8, 16383)),
                         "moffset": rng.choice((8, size // 16, 1 << 40)), "zeroed": rng.randrange(2)}, "rw_append"),
        ]
    if w is not None and w.is_lsmt and len(w.stream) < 100 << 20:
        t = lsmt_rec(w.stream, len(w.stream) - LSMT_HEADER)
        assert t is not None
        near: tuple[int, ...] = (len(w.stream), t.index_offset, t.index_size, t.virtual_size)
        records = max(t.index_size, 1)
        choices += [
            (3, lambda: _lsmt_field_args(rng, w.stream, near), "lsmt_field"),
            (3, lambda: _record_args(rng, rng.randrange(records + 2), near), "lsmt_record"),
            (2, lambda: {"k": rng.randrange(1, records + 1), "how": rng.choice(("overlap", "swap", "copy"))},
             "lsmt_records"),
        ]
    if w is not None and w.zlay is not None:
        lay = w.zlay
        near = (lay.length, lay.index_offset, lay.nblocks, lay.original_size, lay.block_size)
        choices += [
            (4, lambda: _zfile_field_args(rng, buf, lay.base, lay.length, near), "zfile_field"),
            (2, lambda: {"k": rng.randrange(lay.nblocks), "value": interesting(
                rng, 4, lay.starts[1] - lay.starts[0], (lay.block_size, 4, 5))}, "jump_entry"),
            (2, lambda: {"k": rng.randrange(max(lay.nblocks - 1, 1)), "delta": rng.choice((1, 2, 3, 4, 5, 8, -1,
                                                                                          -2, -4, -5, 100))},
             "jump_shift"),
            (3, lambda: {"k": rng.randrange(lay.nblocks), "at": rng.randrange(1 << 16),
                         "xor": rng.choice((0x01, 0x80, 0xFF)), "crc": rng.choice(("fix", "keep"))}, "block"),
        ]
    if w is not None and w.env is not None:
        env = w.env
        choices += [
            (2, lambda: _tar_field_args(rng, env), "tar_field"),
            (2, lambda: {"record": _pax_text(rng, env)}, "pax"),
            (1, lambda: {"kind": rng.choice("xgLK"), "size": rng.choice((5, 20, 512, 1 << 20, (1 << 20) + 1,
                                                                       size, 3 << 29, 1 << 62)),
                         "body": rng.choice((0, 20, 512, 1024))}, "tar_prefix"),
        ]
    weights = [c[0] for c in choices]
    _, make, op = rng.choices(choices, weights=weights)[0]
    return (op, name, make())


def _hot_offset(rng: random.Random, buf: bytes, w: Wrapped | None) -> int:
    """Mostly bytes of headers, trailers and tables, sometimes anywhere."""
    size = len(buf)
    hot = [rng.randrange(min(size, 1536)), size - 1 - rng.randrange(min(size, 4096))]
    if w is not None and w.zlay is not None:
        lay = w.zlay
        hot += [lay.base + rng.randrange(96), lay.base + lay.index_offset + rng.randrange(4 * lay.nblocks),
                lay.base + lay.length - ZREC + rng.randrange(96)]
    return rng.choice(hot + [rng.randrange(size)])


def _lsmt_field_args(rng: random.Random, stream: bytes, near: tuple[int, ...]) -> dict[str, Any]:
    record = rng.choice(("header", "trailer"))
    field = rng.choice([n for n, _, _ in LSMT_FIELDS if n not in ("magic", "padding")])
    a, b = _field_span(LSMT_FIELDS, field)
    width = min(b - a, 8)
    at = (0 if record == "header" else len(stream) - LSMT_HEADER) + a
    current = int.from_bytes(stream[at : at + width], "little")
    if field == "flags":
        value = current ^ (1 << rng.randrange(8))
    else:
        value = interesting(rng, width, current, near)
    return {"record": record, "field": field, "value": value}


def _record_args(rng: random.Random, k: int, near: tuple[int, ...]) -> dict[str, Any]:
    field = rng.choice(tuple(RECORD_FIELDS))
    bits = RECORD_FIELDS[field][2]
    sectors = tuple(n // 512 for n in near)
    value = rng.choice((0, 1, (1 << bits) - 1, (1 << bits) - 2, rng.getrandbits(bits)) + sectors)
    return {"k": k, "field": field, "value": value % (1 << bits)}


def _zfile_field_args(rng: random.Random, buf: bytes, base: int, length: int, near: tuple[int, ...]
                      ) -> dict[str, Any]:
    record = rng.choice(("header", "trailer"))
    field = rng.choice([n for n, _, _ in ZFIELDS if n not in ("magic", "padding", "digest")])
    a, b = _field_span(ZFIELDS, field)
    width = min(b - a, 8)
    at = base + (0 if record == "header" else length - ZREC) + a
    current = int.from_bytes(buf[at : at + width], "little")
    if field == "flags":
        value = current ^ (1 << rng.randrange(8))
    elif field in ("algo", "verify", "use_dict"):
        value = rng.choice((0, 1, 2, 3, 255))
    else:
        value = interesting(rng, width, current, near)
    return {"record": record, "field": field, "value": value, "digest": rng.choice(("fix", "fix", "keep"))}


def _tar_field_args(rng: random.Random, env: Envelope) -> dict[str, Any]:
    field = rng.choice(tuple(TAR_FIELDS))
    header = rng.choice((0, 2)) if env.pax else 0
    texts = {"size": (f"{rng.choice((0, 1, 511, 512, env.length, env.length + 1, 1 << 33)):11o} ",
                      "77777777777 ", "0", "zz", "\x80" + "\x00" * 10 + "\x10"),
             "typeflag": ("0", "x", "g", "L", "K", "5", "\x00"), "magic": ("ustar ", "xxtar", "ustar\x00"),
             "version": (" \x00", "xx", "00"), "name": ("", "overlaybd.commit", "x" * 100),
             "mode": ("100644 ", "zz"), "chksum": ("0", "1234567")}
    return {"header": header, "field": field, "text": rng.choice(texts[field]),
            "checksum": rng.choice(("fix", "fix", "fix", "keep"))}


def _pax_text(rng: random.Random, env: Envelope) -> str:
    n = env.length
    return rng.choice((f"15 size={n}\n", f"99 size={n}\n", f"4 size={n}\n", f"15 size={n + 1}\n",
                       f"16 size={n}\n\n", "13 size=-512\n", f"{len(str(n)) + 10} nosize{n}\n",
                       f"20 path=x\n15 size={n}\n", f"15 size={n}\n17 size=1048576\n", "9 size=\n", "",
                       f"15 size={n:x}\n", f"20 size=000000{n}\n"))
