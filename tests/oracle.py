"""An independent reading of the byte-level format (the reference's layouts): small parsers of LSMT,
ZFile and the tar envelope, and predictions of what a correct reader must do with a (possibly damaged) file.

Written apart from the package's own parsing code, so that a test compares two readings of the spec rather than the
package with itself. Nothing here imports the package's parsers; the package is only *observed* elsewhere
(``tests/unit/mutations.py``, ``tests/fuzz``).

Vocabulary:

* an *expectation* is one of :class:`Raises`, :class:`Reads`, :class:`RaisesOrReads`, :class:`NotDetected`;
* an *image* describes the bytes a successful read must return (:class:`BytesImage`, :class:`LsmtImage`).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c as _crc32c
import lz4.block
import numpy as np
import zstandard

from overlaybd.errors import (
    BadMagicError,
    ChecksumError,
    CorruptIndexError,
    FormatError,
    LimitError,
    OverlaybdError,
    TruncatedError,
    UnsupportedError,
    UsageError,
)

SECTOR = 512

# -- LSMT ------------------------------------------------------------------------------------------------

LSMT_HEADER = 4096
LSMT_MAGIC = b"LSMT\x00\x01\x02\x00" + bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")
LSMT_INVALID = (1 << 50) - 1
LSMT_MAX_RO_RECORDS = 1_000_000
LSMT_MAX_VIRTUAL = (1 << 50) * SECTOR  # record offsets are 50 bits of sectors: nothing lies beyond
L_HEADER, L_DATA, L_SEALED, L_SPARSE = 0x01, 0x02, 0x04, 0x10

#: (name, start, end) of the meaningful fields of the 4096-byte LSMT header/trailer record
LSMT_FIELDS = (
    ("magic", 0, 24), ("size", 24, 28), ("flags", 28, 32), ("index_offset", 32, 40), ("index_size", 40, 48),
    ("virtual_size", 48, 56), ("uuid", 56, 93), ("parent_uuid", 93, 130), ("reserved", 130, 132),
    ("version", 132, 133), ("sub_version", 133, 134), ("user_tag", 134, 390), ("padding", 390, 4096),
)


def lsmt_field(rel: int) -> str:
    for name, a, b in LSMT_FIELDS:
        if a <= rel < b:
            return name
    raise ValueError(rel)


@dataclass(frozen=True)
class LsmtRec:
    flags: int
    index_offset: int
    index_size: int
    virtual_size: int


def lsmt_rec(buf: bytes | bytearray, at: int) -> LsmtRec | None:
    """The header/trailer record at ``at``; None when the magics do not match or it does not fit."""
    if at < 0 or len(buf) < at + LSMT_HEADER or bytes(buf[at : at + 24]) != LSMT_MAGIC:
        return None
    flags, ioff, isize, vsize = struct.unpack_from("<IQQQ", buf, at + 28)
    return LsmtRec(flags, ioff, isize, vsize)


@dataclass(frozen=True)
class Rec:
    """One index record, in sectors."""

    offset: int
    length: int
    moffset: int
    zeroed: bool


def decode_records(raw: bytes | bytearray) -> list[Rec | None]:
    """16-byte records; None for the invalid (padding) record."""
    out: list[Rec | None] = []
    for k in range(len(raw) // 16):
        w0, w1 = struct.unpack_from("<QQ", raw, 16 * k)
        off = w0 & ((1 << 50) - 1)
        if off == LSMT_INVALID:
            out.append(None)
            continue
        out.append(Rec(off, w0 >> 50, w1 & ((1 << 55) - 1), bool((w1 >> 55) & 1)))
    return out


def encode_record(offset: int, length: int, moffset: int, zeroed: bool = False, tag: int = 0) -> bytes:
    return struct.pack("<QQ", offset | (length << 50), moffset | (int(zeroed) << 55) | (tag << 56))


# -- images: what a successful read must return ---------------------------------------------------------------------

def _first_diff(got: bytes, want: bytes) -> int:
    step = 4096
    for a in range(0, min(len(got), len(want)), step):
        if got[a : a + step] != want[a : a + step]:
            for k in range(a, min(a + step, len(got), len(want))):
                if got[k] != want[k]:
                    return k
    return min(len(got), len(want))


def _zero_mismatch(got: bytes | memoryview, a: int, b: int) -> int | None:
    """First non-zero byte of ``got[a:b]`` (a numpy view: no copy of a window that may be 64 MiB)."""
    if b <= a:
        return None
    arr = np.frombuffer(got, dtype=np.uint8, count=b - a, offset=a)
    if not arr.any():
        return None
    return a + int(np.flatnonzero(arr)[0])


class BytesImage:
    """A device whose bytes are all known."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def check(self, off: int, got: bytes | memoryview) -> str | None:
        got = bytes(got)
        want = self.data[off : off + len(got)]
        if got == want:
            return None
        k = _first_diff(got, want)
        return f"byte {off + k}: got {got[k:k + 8].hex()} want {want[k:k + 8].hex()}"


class LsmtImage:
    """A device given by an index replayed in order (last write wins); gaps and zeroed ranges read as zeros.

    ``buf`` is the file the data records point into (``moffset`` sectors from its start).
    """

    def __init__(self, size: int, records: Sequence[Rec], buf: bytes | bytearray) -> None:
        self.size = size
        self.buf = bytes(buf)
        pieces: list[tuple[int, int, int | None]] = []  # (start, end, moffset at start | None) in sectors
        for r in records:
            s, e = r.offset, r.offset + r.length
            if s >= e:
                continue
            kept: list[tuple[int, int, int | None]] = []
            for ps, pe, pm in pieces:
                if pe <= s or ps >= e:
                    kept.append((ps, pe, pm))
                    continue
                if ps < s:
                    kept.append((ps, s, pm))
                if pe > e:
                    kept.append((e, pe, None if pm is None else pm + (e - ps)))
            kept.append((s, e, None if r.zeroed else r.moffset))
            pieces = sorted(kept)
        # bytes, clipped to the device, zeroed pieces dropped (they read as zeros like gaps)
        self.pieces = [(ps * SECTOR, min(pe * SECTOR, size), pm * SECTOR) for ps, pe, pm in pieces
                       if pm is not None and ps * SECTOR < size]
        self.starts = [p[0] for p in self.pieces]

    def render(self) -> bytes:
        out = bytearray(self.size)
        for ps, pe, src in self.pieces:
            out[ps:pe] = self.buf[src : src + pe - ps]
        return bytes(out)

    def check(self, off: int, got: bytes | memoryview) -> str | None:
        end = off + len(got)
        pos = off
        i = max(0, bisect.bisect_right(self.starts, pos) - 1)
        while pos < end:
            while i < len(self.pieces) and self.pieces[i][1] <= pos:
                i += 1
            if i < len(self.pieces) and self.pieces[i][0] <= pos:
                ps, pe, src = self.pieces[i]
                b = min(pe, end)
                want = self.buf[src + pos - ps : src + b - ps]
                have = bytes(got[pos - off : b - off])
                if have != want:
                    k = _first_diff(have, want)
                    return f"device byte {pos + k}: got {have[k:k + 8].hex()} want {want[k:k + 8].hex()} (data)"
                pos = b
            else:
                b = min(end, self.pieces[i][0]) if i < len(self.pieces) else end
                bad = _zero_mismatch(got, pos - off, b - off)
                if bad is not None:
                    return f"device byte {off + bad}: got {bytes(got[bad:bad + 8]).hex()}, want zeros"
                pos = b
        return None


Image = BytesImage | LsmtImage


# -- expectations ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    types: tuple[type[OverlaybdError], ...]
    why: str
    block: int | None = None
    block_offsets: tuple[int, ...] = ()


@dataclass(frozen=True)
class Reads:
    image: Image
    why: str
    identical: bool = False
    dropped: int = 0  # writable logs: trailing records ignored as a torn write


@dataclass(frozen=True)
class RaisesOrReads:
    """Either a typed error or a successful read; ``image`` None means any bytes (nothing could tell)."""

    types: tuple[type[OverlaybdError], ...]
    image: Image | None
    why: str


@dataclass(frozen=True)
class NotDetected:
    """peel() does not take the file for a ZFile (the magics are gone)."""

    why: str


Expectation = Raises | Reads | RaisesOrReads | NotDetected


# -- LSMT oracle ----------------------------------------------------------------------------------------------------


def _check_ro_index(recs: list[Rec | None], lo: int, hi: int) -> str | None:
    """A read-only index: strictly ascending, non-overlapping; data records inside [lo, hi); zeroed moffset in
    [lo, hi]."""
    valid = [r for r in recs if r is not None]
    for a, b in zip(valid, valid[1:], strict=False):
        if a.offset + a.length > b.offset:
            return "records overlap or are out of order"
    for r in valid:
        if r.zeroed:
            if not lo <= r.moffset <= hi:
                return "zeroed record outside the data area"
        else:
            mend = r.moffset + r.length
            if not (lo <= r.moffset < hi and lo < mend <= hi):
                return "data record outside the data area"
    return None


def expect_lsmt_file(buf: bytes | bytearray, *, index_sibling: bool = False) -> Expectation:
    """What opening ``buf`` (a raw file, no index given) with ``open_layer`` and reading it must do.

    ``index_sibling``: the file's name would let the reader find a writable index beside it (never so here).
    """
    size = len(buf)
    if size < 24 or bytes(buf[:24]) != LSMT_MAGIC:
        return Raises((BadMagicError,), "no LSMT magic at offset 0")
    if size < LSMT_HEADER:
        return Raises((TruncatedError,), "LSMT header cut short")
    h = lsmt_rec(buf, 0)
    assert h is not None
    if not h.flags & L_DATA:
        # the header says "index file": the reader says so (UsageError) -- nothing else in the bytes tells a
        # corrupt data-file header from an index file given by mistake
        return Raises((UsageError, BadMagicError), "header flags say index file")
    trailer = lsmt_rec(buf, size - LSMT_HEADER) if size >= 2 * LSMT_HEADER else None
    has_trailer = trailer is not None and not trailer.flags & L_HEADER and bool(trailer.flags & L_SEALED)
    if not (h.flags & L_SEALED or has_trailer):
        # no sealed header and no trailer: exactly what a writable data file looks like. With no index file
        # beside it, the reader can only say so (UsageError); a corrupt *sealed-in-place* file lands here too,
        # and nothing in its bytes distinguishes it from a writable data file.
        if h.flags & L_SPARSE:
            return RaisesOrReads((OverlaybdError,), None, "looks like a sparse writable layer")
        if index_sibling:
            return RaisesOrReads((OverlaybdError,), None, "looks like a writable data file")
        return Raises((UsageError, FormatError), "looks like a writable data file without its index file")
    if not (h.flags & L_HEADER and h.flags & L_DATA):
        return Raises((BadMagicError,), "header flags are not a data-file header")
    if h.virtual_size > LSMT_MAX_VIRTUAL:
        return Raises((LimitError,), "header virtual size beyond what records can address")
    if size < 2 * LSMT_HEADER:
        return Raises((TruncatedError,), "no room for a trailer")
    if trailer is None:
        return Raises((BadMagicError,), "no trailer magic")
    t = trailer
    if t.flags & L_HEADER or not t.flags & L_DATA or not t.flags & L_SEALED:
        return Raises((BadMagicError,), "trailer flags are not a sealed data trailer")
    if t.index_size > LSMT_MAX_RO_RECORDS:
        return Raises((LimitError,), "index_size over the limit")
    trailer_at = size - LSMT_HEADER
    if t.index_offset < LSMT_HEADER or t.index_offset + 16 * t.index_size > trailer_at:
        return Raises((CorruptIndexError,), "index does not fit between header and trailer")
    if t.virtual_size > LSMT_MAX_VIRTUAL:
        return Raises((LimitError,), "trailer virtual size beyond what records can address")
    recs = decode_records(buf[t.index_offset : t.index_offset + 16 * t.index_size])
    bad = _check_ro_index(recs, LSMT_HEADER // SECTOR, t.index_offset // SECTOR)
    if bad:
        return Raises((CorruptIndexError,), bad)
    return Reads(LsmtImage(t.virtual_size, [r for r in recs if r is not None], buf), "valid sealed layer")


def expect_writable(data: bytes | bytearray, index: bytes | bytearray) -> Expectation:
    """A writable data+index pair opened read-only (and formats/lsmt/writable.py for torn writes).

    Records are replayed in file order; a torn trailing partial record is ignored; a data record pointing past the
    end of the data file is an unflushed write cut off by a crash: it and every later record are ignored (a zeroed
    record points at no data, wherever its moffset is: it is never torn). A record
    pointing *into the header* cannot come from any write: the index is corrupt.
    """
    if len(data) < 24 or bytes(data[:24]) != LSMT_MAGIC:
        return Raises((BadMagicError,), "data file has no LSMT magic")
    if len(data) < LSMT_HEADER:
        return Raises((TruncatedError,), "data-file header cut short")
    h = lsmt_rec(data, 0)
    assert h is not None
    if not h.flags & L_DATA:
        return Raises((UsageError, BadMagicError), "data-file header flags say index file")
    if h.flags & L_SEALED:
        return Raises((BadMagicError, TruncatedError), "data-file header says sealed: opened as a sealed layer")
    if not (h.flags & L_HEADER and h.flags & L_DATA):
        return Raises((BadMagicError,), "data-file header flags are not a writable data file")
    if h.virtual_size > LSMT_MAX_VIRTUAL:
        return Raises((LimitError,), "virtual size beyond what records can address")
    if h.flags & L_SPARSE:
        return RaisesOrReads((OverlaybdError,), None, "data-file header says sparse: the index file is not used")
    if len(index) < LSMT_HEADER:
        return Raises((TruncatedError, BadMagicError), "index-file header cut short")
    ih = lsmt_rec(index, 0)
    if ih is None:
        return Raises((BadMagicError,), "index file has no LSMT magic")
    if not ih.flags & L_HEADER or ih.flags & L_DATA or ih.flags & L_SEALED or ih.index_offset != LSMT_HEADER:
        return Raises((BadMagicError,), "index-file header is not a writable index header")
    recs = [r for r in decode_records(index[LSMT_HEADER:]) if r is not None]
    if any(r.moffset < LSMT_HEADER // SECTOR for r in recs):
        return Raises((CorruptIndexError,), "a record points into the data file's header")
    sectors = len(data) // SECTOR
    kept: list[Rec] = []
    for r in recs:
        if not r.zeroed and r.moffset + r.length > sectors:  # a zeroed record points at no data: never torn
            break
        kept.append(r)
    return Reads(LsmtImage(h.virtual_size, kept, data), f"{len(kept)} of {len(recs)} records replayed",
                 dropped=len(recs) - len(kept))


# -- ZFile oracle ---------------------------------------------------------------------------------------------------

ZREC = 512
ZFILE_MAGIC = b"ZFile\x00\x01\x00" + b"tuji.yyf@Alibaba"
Z_HEADER, Z_DATA, Z_SEALED, Z_OVERWRITE, Z_DIGEST = 0x01, 0x02, 0x04, 0x08, 0x10
ZFIELDS = (
    ("magic", 0, 24), ("size", 24, 28), ("digest", 28, 32), ("flags", 32, 40), ("index_offset", 40, 48),
    ("index_size", 48, 56), ("original_file_size", 56, 64), ("index_crc", 64, 68), ("reserved_0", 68, 72),
    ("block_size", 72, 76), ("algo", 76, 77), ("level", 77, 78), ("use_dict", 78, 79), ("pad", 79, 80),
    ("args", 80, 84), ("dict_size", 84, 88), ("verify", 88, 89), ("padding", 89, 512),
)


def zfield(rel: int) -> str:
    for name, a, b in ZFIELDS:
        if a <= rel < b:
            return name
    raise ValueError(rel)


def raw_crc32c(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """The reference's CRC32C: register starts at ``seed``, no final XOR."""
    return int(_crc32c.crc32c(data, value=seed ^ 0xFFFFFFFF)) ^ 0xFFFFFFFF


@dataclass(frozen=True)
class ZLayout:
    base: int  # where the ZFile starts in the file (1536 inside the reference tar envelope)
    length: int
    header_flags: int
    overwritten: bool
    info_at: int  # the record holding the index info, relative to base (0 when the header was overwritten)
    info_flags: int
    index_offset: int
    nblocks: int
    original_size: int
    block_size: int
    algo: int
    verify: int
    starts: tuple[int, ...]  # block k is [starts[k], starts[k+1]) relative to base

    def block_at(self, rel: int) -> int:
        return bisect.bisect_right(self.starts, rel) - 1


def parse_zfile(buf: bytes | bytearray, base: int = 0, length: int | None = None) -> ZLayout:
    """Layout of a well-formed ZFile (the unmutated fixtures)."""
    length = len(buf) - base if length is None else length
    z = bytes(buf[base : base + length])
    assert z[:24] == ZFILE_MAGIC
    (hflags,) = struct.unpack_from("<Q", z, 32)
    over = bool(hflags & Z_OVERWRITE)
    info_at = 0 if over else length - ZREC
    iflags, ioff, n, osize = struct.unpack_from("<QQQQ", z, info_at + 32)
    (bs,) = struct.unpack_from("<I", z, info_at + 72)
    algo = z[info_at + 76]
    verify = z[info_at + 88]
    lens = struct.unpack_from(f"<{n}I", z, ioff)
    starts = [ZREC]
    for ln in lens:
        starts.append(starts[-1] + ln)
    assert starts[-1] == ioff
    return ZLayout(base, length, hflags, over, info_at, iflags, ioff, n, osize, bs, algo, verify, tuple(starts))


def zfile_decompress(buf: bytes | bytearray, lay: ZLayout) -> bytes:
    """Independent decoder (the baseline every mutation is compared with)."""
    z = bytes(buf[lay.base : lay.base + lay.length])
    out = []
    for k in range(lay.nblocks):
        blk = z[lay.starts[k] : lay.starts[k + 1]]
        if lay.verify:
            blk, crc = blk[:-4], int.from_bytes(blk[-4:], "little")
            assert raw_crc32c(blk, 100007) == crc, k
        n = min(lay.block_size, lay.original_size - k * lay.block_size)
        if lay.algo == 1:
            out.append(lz4.block.decompress(blk, uncompressed_size=n))
        else:
            out.append(zstandard.ZstdDecompressor().decompress(blk, max_output_size=n))
    return b"".join(out)


def expect_zfile_flip(lay: ZLayout, rel: int, xor: int, stream: BytesImage) -> Expectation:
    """What reading the whole ZFile stream must do after ``byte[base + rel] ^= xor``."""
    same = Reads(stream, "the byte is not used by the reader", identical=True)
    if rel < ZREC:
        return _expect_header_flip(lay, rel, xor, same)
    if rel < lay.index_offset:
        k = lay.block_at(rel)
        if lay.verify:
            start = lay.starts[k]
            return Raises((ChecksumError,), f"block {k} has a CRC", block=k,
                          block_offsets=(start, start + lay.base))
        return RaisesOrReads((FormatError,), None,
                             f"block {k} has no CRC: a flipped literal decodes to other, equally valid bytes")
    if rel < lay.index_offset + 4 * lay.nblocks:
        if lay.info_flags & Z_DIGEST:
            return Raises((ChecksumError,), "jump table with index_crc (digest flag)")
        return Raises((CorruptIndexError,), "block lengths no longer add up to index_offset")
    if lay.overwritten:
        return Reads(stream, "trailer is never read when the header was overwritten", identical=True)
    return _expect_trailer_flip(lay, rel - lay.info_at, xor, same)


def _expect_header_flip(lay: ZLayout, rel: int, xor: int, same: Reads) -> Expectation:
    if rel < 24:
        return NotDetected("ZFile magic destroyed")
    digest = bool(lay.header_flags & Z_DIGEST)
    flags = lay.header_flags ^ (xor if rel == 32 else 0)
    if rel == 32 and not flags & Z_DIGEST:
        # the flip cleared the digest flag itself, so no digest can be checked: the flags must still make sense
        if not flags & Z_HEADER:
            return Raises((FormatError,), "record at 0 is no longer a header")
        if flags & Z_OVERWRITE and not lay.overwritten:
            return Raises((FormatError,), "header now claims the index info it does not hold")
        if not flags & Z_OVERWRITE and lay.overwritten:
            return Raises((FormatError,), "header no longer holds the index info; the trailer is not sealed")
        if not flags & Z_OVERWRITE and not flags & Z_DATA:
            return Raises((FormatError,), "header lost the data flag")
        return same
    if digest:
        return Raises((ChecksumError,), "header digest covers all 512 bytes")
    if lay.overwritten:
        return RaisesOrReads((FormatError,), same.image, "header without digest holds the index info")
    if rel == 32:
        return same if flags & Z_HEADER and flags & Z_DATA else Raises((FormatError,), "header flags broken")
    return same


def _expect_trailer_flip(lay: ZLayout, rel: int, xor: int, same: Reads) -> Expectation:
    name = zfield(rel)
    if name == "magic":
        return Raises((BadMagicError,), "trailer magic destroyed")
    if name in ("size", "digest", "reserved_0", "level", "pad", "args", "padding"):
        return same  # the trailer digest is not verified, nor are these fields used
    if name == "flags":
        if rel != 32:
            return same  # only bits 0-4 mean anything
        f = lay.info_flags ^ xor
        if f & Z_HEADER or (f & (Z_DATA | Z_SEALED)) != (Z_DATA | Z_SEALED):
            return Raises((FormatError,), "trailer flags no longer a sealed data trailer")
        return same
    if name == "index_offset":
        return Raises((CorruptIndexError, ChecksumError), "jump table moved")
    if name == "index_size":
        return Raises((CorruptIndexError, LimitError), "block count changed")
    if name == "original_file_size":
        return Raises((FormatError,), "blocks cannot decompress to the new size")
    if name == "index_crc":
        return Raises((ChecksumError,), "index_crc no longer matches")
    if name == "block_size":
        return Raises((UnsupportedError, CorruptIndexError), "block size changed")
    if name == "algo":
        return Raises((FormatError,), "algorithm changed")
    if name in ("use_dict", "dict_size"):
        return Raises((UnsupportedError,), "dictionary fields set")
    if name == "verify":
        v = lay.verify ^ xor
        if bool(v) == bool(lay.verify):
            return same
        if lay.verify:
            return RaisesOrReads((FormatError,), same.image,
                                 "CRC bytes now fed to the decompressor: LZ4 rejects them, zstd ignores trailing "
                                 "bytes; either way never other bytes")
        return Raises((FormatError,), "last 4 bytes of each block now taken for a CRC")
    raise AssertionError(name)


def device_expectation(stream_exp: Expectation, device: Image) -> Expectation:
    """An LSMT layer inside a ZFile: what ``open_layer`` + reading the device must do, given the stream's fate.

    Every block of a committed LSMT file is read by open + a full read (header, data, whole index, trailer)."""
    if isinstance(stream_exp, Raises):
        return stream_exp
    if isinstance(stream_exp, NotDetected):
        return Raises((BadMagicError,), "not a ZFile any more, and the raw bytes are not an LSMT file")
    if isinstance(stream_exp, Reads):
        assert stream_exp.identical
        return Reads(device, stream_exp.why, identical=True)
    if stream_exp.image is None:
        return RaisesOrReads((OverlaybdError,), None, stream_exp.why)
    return RaisesOrReads(stream_exp.types, device, stream_exp.why)


# -- tar envelope ----------------------------------------------------------------------------------------------------


def pax_record_span(buf: bytes | bytearray) -> tuple[int, int]:
    """[start, end) of the PAX ``"<len> size=<n>\\n"`` record in the reference envelope."""
    start = 512
    length = int(bytes(buf[start : start + 12]).split(b" ", 1)[0])
    return start, start + length


# -- crafting records ------------------------------------------------------------------------------------------------


def zfile_record_patch(buf: bytes | bytearray, at: int, *, fix_digest: bool, **fields: int) -> bytes:
    """The 512-byte ZFile record at ``at`` with fields replaced (and its digest recomputed when asked)."""
    rec = bytearray(buf[at : at + ZREC])
    layout = {"flags": ("<Q", 32), "index_offset": ("<Q", 40), "index_size": ("<Q", 48),
              "original_file_size": ("<Q", 56), "index_crc": ("<I", 64), "block_size": ("<I", 72),
              "algo": ("<B", 76), "use_dict": ("<B", 78), "dict_size": ("<I", 84), "verify": ("<B", 88)}
    for name, value in fields.items():
        fmt, off = layout[name]
        struct.pack_into(fmt, rec, off, value)
    if fix_digest:
        rec[28:32] = bytes(4)
        struct.pack_into("<I", rec, 28, raw_crc32c(rec))
    return bytes(rec)


def lsmt_record_patch(buf: bytes | bytearray, at: int, **fields: int) -> bytes:
    rec = bytearray(buf[at : at + LSMT_HEADER])
    layout = {"flags": ("<I", 28), "index_offset": ("<Q", 32), "index_size": ("<Q", 40),
              "virtual_size": ("<Q", 48)}
    for name, value in fields.items():
        fmt, off = layout[name]
        struct.pack_into(fmt, rec, off, value)
    return bytes(rec)
