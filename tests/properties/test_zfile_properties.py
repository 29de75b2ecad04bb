"""ZFile round trips over random data and settings, the 64 KiB stored-block limit, and parsers that never crash:
any bytes either parse or raise an OverlaybdError."""

from __future__ import annotations

import functools
import os
import random
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlaybd import operations
from overlaybd.errors import OverlaybdError
from overlaybd.formats import tarwrap
from overlaybd.formats.detect import peel
from overlaybd.formats.lsmt.layer import LsmtLayer
from overlaybd.formats.lsmt.spec import HEADER_SIZE, STRUCT_SIZE, LsmtHeader, is_lsmt
from overlaybd.formats.lsmt.writable import WritableLayer
from overlaybd.formats.output import Compression
from overlaybd.formats.zfile import codecs
from overlaybd.formats.zfile.reader import ZFileSource
from overlaybd.formats.zfile.spec import (
    ALGO_BY_NAME,
    FLAG_DATA,
    FLAG_DIGEST,
    FLAG_HEADER,
    FLAG_SEALED,
    MAX_STORED_BLOCK,
    RECORD_SIZE,
    ZFileHeader,
)
from overlaybd.formats.zfile.writer import ZFileResult, write_zfile
from overlaybd.source.base import BlockSource
from overlaybd.source.file import MemorySource, RangeSource
from overlaybd.testing.strategies import mixed_bytes

ALGOS = st.sampled_from(["lz4", "zstd"])
BLOCK_SIZES = st.sampled_from([4096, 8192, 16384, 32768, 65536])


def zfile_bytes(data: bytes, *, base: int = 0, **options: object) -> tuple[bytes, ZFileResult]:
    """write_zfile into a real file (at ``base``), returned as bytes."""
    with tempfile.TemporaryFile() as f:
        result = write_zfile(MemorySource(data), f.fileno(), base, **options)  # type: ignore[arg-type]
        blob = os.pread(f.fileno(), base + result.length + 1, 0)
    assert len(blob) == base + result.length, "the ZFile is not as long as the result says"
    return blob, result


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mixed_bytes(), algo=ALGOS, block_size=BLOCK_SIZES, verify=st.booleans(), overwrite=st.booleans(),
       threads=st.sampled_from([1, 2]), base=st.sampled_from([0, 0, 1536]), reads=st.data())
def test_zfile_round_trip(data: bytes, algo: str, block_size: int, verify: bool, overwrite: bool, threads: int,
                          base: int, reads: st.DataObject) -> None:
    blob, result = zfile_bytes(data, base=base, algo=algo, block_size=block_size, verify=verify, threads=threads,
                               overwrite_header=overwrite)
    inner: BlockSource = MemorySource(blob)
    if base:
        inner = RangeSource(inner, base, len(blob) - base)
    z = ZFileSource(inner)
    assert z.size == len(data)
    assert z.algo == ALGO_BY_NAME[algo] and z.verify == verify
    assert z.header.overwritten == overwrite
    # the block size used is the one asked for, or half of 64 KiB when a block would not fit
    assert z.block_size == result.block_size
    assert result.block_size == block_size or (block_size == 65536 and result.block_size == 32768)
    if result.block_size != block_size:  # only when some 64 KiB block really would not fit
        crc = 4 if verify else 0
        assert any(len(codecs.compress(z.algo, data[i : i + block_size])) + crc > MAX_STORED_BLOCK
                   for i in range(0, len(data), block_size)), "fell back to 32 KiB blocks without need"
    assert result.header.original_file_size == len(data)
    stored = z.stored_lengths()
    assert len(stored) == -(-len(data) // z.block_size)
    assert max(stored, default=0) <= MAX_STORED_BLOCK
    assert z.pread(0, len(data)) == data
    for _ in range(4):
        off = reads.draw(st.integers(0, len(data)), label="offset")
        n = reads.draw(st.integers(0, len(data) - off), label="length")
        assert z.pread(off, n) == data[off : off + n], f"pread({off}, {n})"
    if verify:
        assert z.verify_all() == z.nblocks


@settings(max_examples=12, deadline=None)
@given(size=st.integers(65536, 300 * 1024), seed=st.integers(0, 2**32 - 1), algo=ALGOS, verify=st.booleans(),
       overwrite=st.booleans())
def test_incompressible_64k_blocks_never_exceed_64k(size: int, seed: int, algo: str, verify: bool,
                                                     overwrite: bool) -> None:
    data = random.Random(seed).randbytes(size)
    blob, result = zfile_bytes(data, algo=algo, block_size=65536, verify=verify, overwrite_header=overwrite,
                               threads=2)
    z = ZFileSource(MemorySource(blob))
    assert result.block_size < 65536, "a 64 KiB block of random data cannot be stored in 64 KiB"
    assert z.block_size == result.block_size
    assert max(z.stored_lengths()) <= MAX_STORED_BLOCK
    assert z.pread(0, size) == data


# -- parsers never crash ------------------------------------------------------------------------------------------


Edit = tuple[int, str, int]  # (position, "set" | "flip" | "u64" | "cut" | "junk", value)

_EXTREMES = [0, 1, 511, 4096, 2**31, 2**32 - 1, 2**50 - 1, 2**63, 2**64 - 1]


@st.composite
def edits(draw: st.DrawFn, length: int, hot: list[tuple[int, int]]) -> list[Edit]:
    """A few byte changes (mostly inside the ``hot`` ranges), maybe a cut or junk at the end. Drawn as a short
    list so that a failure prints the edits, not the whole blob."""
    out: list[Edit] = []
    ranges = [(max(0, a), min(length, b)) for a, b in hot if max(0, a) < min(length, b)]
    for _ in range(draw(st.integers(0, 6))):
        if not length:
            break
        use_hot = draw(st.integers(0, 3)) != 0
        if ranges and use_hot:
            lo, hi = draw(st.sampled_from(ranges))
        else:
            lo, hi = 0, length
        pos = draw(st.integers(lo, hi - 1))
        kind = draw(st.sampled_from(["set", "flip", "u64", "zero"]))
        if kind == "set":
            value = draw(st.integers(0, 255))
        elif kind == "flip":
            value = 1 << draw(st.integers(0, 7))
        elif kind == "u64":
            value = draw(st.sampled_from(_EXTREMES))
        else:
            value = 0
        out.append((pos, kind, value))
    tail = draw(st.integers(0, 3))
    if tail == 1 and length:
        out.append((draw(st.integers(0, length - 1)), "cut", 0))
    elif tail == 2:
        out.append((length, "junk", draw(st.integers(0, 2**32 - 1))))
    return out


def apply_edits(blob: bytes, changes: list[Edit]) -> bytes:
    out = bytearray(blob)
    for pos, kind, value in changes:
        if kind == "set" or kind == "zero":
            out[pos] = value
        elif kind == "flip":
            out[pos] ^= value
        elif kind == "u64":
            out[pos : pos + 8] = value.to_bytes(8, "little")[: len(out) - pos]
        elif kind == "cut":
            del out[pos:]
        elif kind == "junk":
            out += random.Random(value).randbytes(value % 600)
    return bytes(out)


def mutated(blob: bytes, hot: list[tuple[int, int]]) -> st.SearchStrategy[bytes]:
    return edits(len(blob), hot).map(lambda e: apply_edits(blob, e))


def _ok_or_typed(call: object, *args: object, **kwargs: object) -> object:
    try:
        return call(*args, **kwargs)  # type: ignore[operator]
    except OverlaybdError:
        return None


def _read_some(src: BlockSource) -> None:
    """Read what a parsed source exposes (bounded), and its extents: typed errors only."""
    n = min(src.size, 1 << 20)
    try:
        src.pread(0, n)
        if src.size > n:
            src.pread(src.size - min(src.size, 65536), min(src.size, 65536))
        for i, _ in enumerate(src.extents()):
            if i > 10000:
                break
    except OverlaybdError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=700),
                 mutated(ZFileHeader(flags=FLAG_HEADER | FLAG_DATA | FLAG_DIGEST, index_offset=4096, index_size=3,
                                     original_file_size=9000).pack(), [(0, 96)]),
                 mutated(ZFileHeader(flags=FLAG_DATA | FLAG_SEALED, verify=False).pack(), [(0, 96)])),
       st.booleans())
def test_zfile_header_unpack_never_crashes(raw: bytes, check_digest: bool) -> None:
    hdr = _ok_or_typed(ZFileHeader.unpack, raw, path="fuzz", offset=0, check_digest=check_digest)
    if hdr is not None:
        assert isinstance(hdr, ZFileHeader)
        hdr.pack()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=4200),
                 mutated(LsmtHeader(flags=7, index_offset=8192, index_size=256, virtual_size=1 << 30).pack(),
                         [(0, STRUCT_SIZE)])))
def test_lsmt_header_unpack_never_crashes(raw: bytes) -> None:
    hdr = _ok_or_typed(LsmtHeader.unpack, raw, path="fuzz", offset=0)
    if hdr is not None:
        assert isinstance(hdr, LsmtHeader)


# -- whole blobs: tar, ZFile, LSMT ---------------------------------------------------------------------------------


@functools.cache
def samples() -> dict[str, bytes]:
    """Small valid blobs of every shape, built once: LSMT, ZFile(LSMT), tar(ZFile(LSMT)), tar(LSMT), a sealed-in-place
    layer, and a ZFile of odd raw bytes."""
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as d:
        data, index = os.path.join(d, "w.data"), os.path.join(d, "w.index")
        operations.create(data, index, 64 * 1024)
        rng = random.Random(7)
        with WritableLayer(data, index) as w:
            for _ in range(6):
                off = rng.randrange(0, 60000)
                w.pwrite(off, rng.randbytes(rng.randint(1, 5000)))
            w.trim(30000, 3000)
            w.flush()
            for name, comp, tar in [("lsmt", None, False), ("zfile", Compression("lz4", 4096), False),
                                    ("tar-zfile", Compression("zstd", 4096), True), ("tar-lsmt", None, True)]:
                path = os.path.join(d, name)
                operations.commit(w, path, compression=comp, tar=tar)
                with open(path, "rb") as f:
                    out[name] = f.read()
        operations.seal(data, index)
        with open(data, "rb") as f:
            out["sealed"] = f.read()
    raw = random.Random(8).randbytes(5000) + bytes(7001)
    out["raw-zfile"] = zfile_bytes(raw, algo="zstd", block_size=4096, verify=True)[0]
    return out


def _hot(name: str, blob: bytes) -> list[tuple[int, int]]:
    """Where the structure is: headers, trailers, index/jump table, tar headers."""
    hot = [(0, 1024), (len(blob) - 4096, len(blob) - 4096 + STRUCT_SIZE), (len(blob) - RECORD_SIZE, len(blob))]
    if name.startswith("tar"):
        hot += [(1536, 1536 + 600), (124, 136), (512, 560)]
    if is_lsmt(blob[:24]):
        try:
            t = LsmtHeader.unpack(blob[-HEADER_SIZE:], path="x", offset=0)
            hot.append((t.index_offset, t.index_offset + 16 * min(t.index_size, 64)))
        except OverlaybdError:
            pass
    return hot


@st.composite
def blob_edits(draw: st.DrawFn) -> tuple[str, list[Edit]]:
    name = draw(st.sampled_from(sorted(samples())))
    blob = samples()[name]
    return name, draw(edits(len(blob), _hot(name, blob)))


def _open_all(blob: bytes) -> None:
    """What a reader does with an unknown blob: peel, read, open as LSMT if it is one, read that."""
    src = MemorySource(blob, name="fuzz")
    try:
        peeled = peel(src)
        is_lsmt = peeled.is_lsmt  # reads the first bytes: through a ZFile, that may fail a CRC
    except OverlaybdError:
        return
    _read_some(peeled.source)
    if is_lsmt:
        layer = _ok_or_typed(LsmtLayer, peeled.source, name="fuzz")
        if layer is not None:
            assert isinstance(layer, LsmtLayer)
            _read_some(layer)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob_edits())
def test_blobs_peel_and_open_never_crash(case: tuple[str, list[Edit]]) -> None:
    name, changes = case
    _open_all(apply_edits(samples()[name], changes))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes_never_crash(blob: bytes) -> None:
    _open_all(blob)
    _ok_or_typed(tarwrap.first_member, MemorySource(blob))


def tar_blob(payload_size: int, seed: int) -> bytes:
    """The reference envelope around a small random payload."""
    payload = random.Random(seed).randbytes(payload_size)
    head, _end_at, total = tarwrap.envelope(len(payload), 0o100644)
    blob = bytearray(total)
    blob[: len(head)] = head
    blob[tarwrap.PAYLOAD_OFFSET : tarwrap.PAYLOAD_OFFSET + len(payload)] = payload
    return bytes(blob)


_TAR_HOT = [(0, 512), (512, 600), (1024, 1536), (124, 136), (148, 156), (156, 157), (1024 + 124, 1024 + 136),
            (1024 + 156, 1024 + 157)]


@st.composite
def tar_cases(draw: st.DrawFn) -> tuple[int, int, bool, list[Edit]]:
    size = draw(st.integers(0, 2000))
    seed = draw(st.integers(0, 2**16))
    return size, seed, draw(st.booleans()), draw(edits(len(tar_blob(size, seed)), _TAR_HOT))


def build_tar_case(size: int, seed: int, fix_checksums: bool, changes: list[Edit]) -> bytes:
    """Mutated; with ``fix_checksums`` the header checksums are recomputed so the parser gets past them."""
    out = bytearray(apply_edits(tar_blob(size, seed), changes))
    if fix_checksums:
        for at in (0, 1024):
            if len(out) >= at + 512:
                out[at + 148 : at + 156] = b" " * 8
                out[at + 148 : at + 156] = (b"%6o \x00" % sum(out[at : at + 512]))[:8]
    return bytes(out)


@settings(max_examples=250, deadline=None)
@given(tar_cases())
def test_tar_first_member_never_crashes(case: tuple[int, int, bool, list[Edit]]) -> None:
    blob = build_tar_case(*case)
    member = _ok_or_typed(tarwrap.first_member, MemorySource(blob))
    if member is not None:
        assert isinstance(member, tarwrap.TarMember)
        assert 0 <= member.offset and member.offset + member.size <= len(blob)
    _open_all(blob)


def test_samples_are_valid() -> None:
    for name, blob in samples().items():
        peeled = peel(MemorySource(blob))
        assert peeled.is_lsmt or name == "raw-zfile", name
        if peeled.is_lsmt:
            layer = LsmtLayer(peeled.source)
            assert layer.size == 64 * 1024
            assert np.all(layer.segments().length > 0)
