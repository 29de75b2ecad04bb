"""Bad input gets a clear error and loses nothing.

Systematic mutations of the reference fixtures (truncation, byte flips, absurd counts, wrong magics) and of
writable layers (torn records, torn data writes, locking, a full disk). Every outcome must be either a typed
:class:`overlaybd.errors.OverlaybdError` naming the file (and, for format errors, the offset), or a successful read
of exactly the bytes an independent reading of the spec predicts (``mutations.py``). Never another exception type,
never wrong bytes where a CRC, a magic or a bound could have told.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import overlaybd
from overlaybd.errors import (
    BadMagicError,
    ChecksumError,
    CorruptIndexError,
    FormatError,
    LayerIOError,
    LimitError,
    LockedError,
    OverlaybdError,
    TruncatedError,
    UnsupportedError,
)
from overlaybd.formats.detect import peel
from overlaybd.source.file import FileSource

from .mutations import (
    LSMT_HEADER,
    SECTOR,
    ZREC,
    BytesImage,
    Expectation,
    Failures,
    LsmtImage,
    NotDetected,
    Raises,
    RaisesOrReads,
    Reads,
    Workbench,
    ZLayout,
    check_error,
    decode_records,
    device_expectation,
    encode_record,
    expect_lsmt_file,
    expect_writable,
    expect_zfile_flip,
    judge,
    lsmt_field,
    lsmt_rec,
    lsmt_record_patch,
    observe_device,
    observe_stream,
    parse_zfile,
    pax_record_span,
    raw_crc32c,
    zfile_decompress,
    zfile_record_patch,
)

pytestmark = pytest.mark.fixtures

RAW_LSMT = ("a/committed.lsmt", "a/sealed.lsmt", "b/layer2.lsmt")
LSMT_ZFILES = ("c/layer1.lz4.bs4k.zfile", "c/layer1.zstd.bs64k.zfile", "c/layer1.lz4.bs4k.nocrc.zfile",
               "d/merged.zfile")
RAW_ZFILE = "c/raw_odd.lz4.bs4k.zfile"
TAR = "c/layer1.lz4.bs4k.zfile.tar"
ZFILES = (*LSMT_ZFILES, RAW_ZFILE)
XORS = (0xFF, 0x01)


# -- baselines: what the unmutated fixtures hold, from the independent parsers, checked against the manifest --------


@dataclass
class Baseline:
    rel: str
    path: Path
    data: bytes
    zlayout: ZLayout | None = None
    stream: BytesImage | None = None  # the decompressed ZFile
    device: LsmtImage | None = None  # the LSMT device (None for the raw ZFile)


def _device_sha(manifest: dict[str, Any], rel: str) -> str:
    for case in manifest["cases"]:
        files = case["files"]
        if files.get("layers") == [rel] or files.get("zfile") == rel:
            return str(case["expected"]["sha256"])
    raise KeyError(rel)


@pytest.fixture(scope="session")
def baselines(reference_dir: Path, manifest: dict[str, Any]) -> dict[str, Baseline]:
    out: dict[str, Baseline] = {}
    for rel in (*RAW_LSMT, *ZFILES, TAR):
        path = reference_dir / rel
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][rel]["sha256"], rel
        b = Baseline(rel, path, data)
        inner = data
        if rel == TAR:
            start, end = pax_record_span(data)
            size = int(data[start:end].split(b"size=")[1])
            b.zlayout = parse_zfile(data, 1536, size)
        elif rel in ZFILES:
            b.zlayout = parse_zfile(data)
        if b.zlayout is not None:
            inner = zfile_decompress(data, b.zlayout)
            b.stream = BytesImage(inner)
        if rel != RAW_ZFILE:
            exp = expect_lsmt_file(inner)
            assert isinstance(exp, Reads) and isinstance(exp.image, LsmtImage), (rel, exp)
            b.device = exp.image
            assert hashlib.sha256(b.device.render()).hexdigest() == _device_sha(manifest, rel), rel
        else:
            assert hashlib.sha256(inner).hexdigest() == _device_sha(manifest, rel)
        out[rel] = b
    return out


@pytest.fixture(scope="session")
def rw_pair(reference_dir: Path, manifest: dict[str, Any]) -> tuple[bytes, bytes]:
    data = (reference_dir / "a/rw.data").read_bytes()
    index = (reference_dir / "a/rw.index").read_bytes()
    exp = expect_writable(data, index)
    assert isinstance(exp, Reads) and isinstance(exp.image, LsmtImage)
    want = next(c["expected"]["sha256"] for c in manifest["cases"] if c["name"] == "a_rw")
    assert hashlib.sha256(exp.image.render()).hexdigest() == want
    return data, index


def _rng(label: str) -> random.Random:
    return random.Random(zlib.crc32(label.encode()))


# -- 1. truncation ---------------------------------------------------------------------------------------------------


def _common_cuts(size: int, label: str) -> set[int]:
    cuts = {0, 1, 23, 511, 512, 4095, 4096, 4097, size - 1, size - 512, size - 4096}
    rng = _rng("cut:" + label)
    cuts |= {rng.randrange(size) for _ in range(30)}
    return cuts


def _lsmt_cuts(buf: bytes, base: int = 0) -> set[int]:
    size = len(buf)
    t = lsmt_rec(buf, size - LSMT_HEADER)
    assert t is not None
    idx, n = t.index_offset, t.index_size
    trailer = size - LSMT_HEADER
    return {base + x for x in (24, 390, 8192, idx - 1, idx, idx + 1, idx + 8 * n, idx + 8 * n + 7, idx + 16 * n,
                               trailer - 1, trailer, trailer + 1, trailer + 24, trailer + 390)}


def _zfile_cuts(lay: ZLayout) -> set[int]:
    s = lay.starts
    rel = {24, 96, ZREC - 1, ZREC, ZREC + 1, s[1] - 1, s[1], s[2], s[len(s) // 2] + 3, lay.index_offset - 1,
           lay.index_offset, lay.index_offset + 2, lay.index_offset + 2 * lay.nblocks, lay.info_at - 1, lay.info_at,
           lay.info_at + 24, lay.info_at + 96, lay.length - 1}
    return {lay.base + x for x in rel}


def _zfile_truncation_expectation(lay: ZLayout, n: int) -> Expectation:
    """A ZFile cut to ``n`` bytes (n < its length): the trailer is gone or cut."""
    if n < 24:
        return NotDetected("ZFile magic cut")
    if n < 2 * ZREC:
        return Raises((TruncatedError,), "no room for the header and a trailer")
    return Raises((FormatError,), "trailer missing")


def _judge_stream_and_device(fails: Failures, what: str, path: Path, stream_exp: Expectation | None,
                             device_exp: Expectation | None) -> None:
    names = (str(path),)
    if stream_exp is not None:
        fails.add(what + " [stream]", judge(stream_exp, observe_stream(path), names))
    if device_exp is not None:
        fails.add(what + " [device]", judge(device_exp, observe_device(path), names))


@pytest.mark.parametrize("rel", RAW_LSMT)
def test_truncated_lsmt(rel: str, baselines: dict[str, Baseline], tmp_path: Path) -> None:
    b = baselines[rel]
    bench = Workbench(b.path, tmp_path / Path(rel).name)
    size = len(b.data)
    fails = Failures(f"truncating {rel}")
    for n in sorted((_common_cuts(size, rel) | _lsmt_cuts(b.data)) - {size}):
        with bench.truncated(n) as buf:
            exp = expect_lsmt_file(buf)
            # a sealed file has nothing optional at its end: every cut must be refused
            assert isinstance(exp, Raises), (n, exp)
            _judge_stream_and_device(fails, f"cut at {n}", bench.path, None, exp)
    assert not fails.items, fails.report()


@pytest.mark.parametrize("rel", ZFILES)
def test_truncated_zfile(rel: str, baselines: dict[str, Baseline], tmp_path: Path) -> None:
    b = baselines[rel]
    assert b.zlayout is not None
    bench = Workbench(b.path, tmp_path / Path(rel).name)
    size = len(b.data)
    fails = Failures(f"truncating {rel}")
    assert b.stream is not None
    # offsets of LSMT structures are in the decompressed stream: cut where the blocks holding them are stored
    inner_cuts = _lsmt_cuts(b.stream.data) if b.device is not None else set()
    bs = b.zlayout.block_size
    cuts = _common_cuts(size, rel) | _zfile_cuts(b.zlayout) | {b.zlayout.starts[c // bs] for c in inner_cuts}
    for n in sorted(c for c in cuts if 0 <= c < size):
        with bench.truncated(n):
            stream_exp = _zfile_truncation_expectation(b.zlayout, n)
            device_exp = None if b.device is None else device_expectation(stream_exp, b.device)
            _judge_stream_and_device(fails, f"cut at {n}", bench.path, stream_exp, device_exp)
    assert not fails.items, fails.report()


def test_truncated_tar(baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """The envelope's end (padding to 512 and the two zero blocks) is optional: the payload is all that counts."""
    b = baselines[TAR]
    lay = b.zlayout
    assert lay is not None and b.stream is not None and b.device is not None
    bench = Workbench(b.path, tmp_path / "layer.tar")
    size = len(b.data)
    payload_end = lay.base + lay.length
    _, pax_end = pax_record_span(b.data)
    envelope = {512, pax_end - 1, pax_end, 1024, 1535, 1536, 1537, payload_end - 1, payload_end, payload_end + 1,
                -(-payload_end // 512) * 512, size - 1024, size - 512, size - 1}
    fails = Failures("truncating the tar envelope")
    for n in sorted(c for c in (_common_cuts(size, TAR) | _zfile_cuts(lay) | envelope) if 0 <= c < size):
        with bench.truncated(n):
            if n < 512:
                stream_exp: Expectation = NotDetected("not a tar (one header block needs 512 bytes), not a ZFile")
                device_exp: Expectation = Raises((BadMagicError,), "raw bytes of a tar header are no LSMT file")
            elif n < payload_end:
                stream_exp = Raises((TruncatedError,), "the tar ends before its member's payload does")
                device_exp = stream_exp
            else:
                stream_exp = Reads(b.stream, "only the envelope's end padding is cut", identical=True)
                device_exp = Reads(b.device, stream_exp.why, identical=True)
            _judge_stream_and_device(fails, f"cut at {n}", bench.path, stream_exp, device_exp)
    assert not fails.items, fails.report()


def _rw_bench(reference_dir: Path, tmp_path: Path) -> tuple[Workbench, Workbench]:
    return (Workbench(reference_dir / "a/rw.data", tmp_path / "rw.data"),
            Workbench(reference_dir / "a/rw.index", tmp_path / "rw.index"))


def test_truncated_writable_index(reference_dir: Path, rw_pair: tuple[bytes, bytes], tmp_path: Path) -> None:
    """An index file cut mid-record loses only the torn record; cut inside its header it is refused."""
    data, index = rw_pair
    dbench, ibench = _rw_bench(reference_dir, tmp_path)
    size = len(index)
    records = (size - LSMT_HEADER) // 16
    cuts = _common_cuts(size, "rw.index") | {LSMT_HEADER + 16 * k + d for k in range(records) for d in (0, 7)}
    cuts |= {24, 390, size - 16, size - 17}
    fails = Failures("truncating a/rw.index")
    for n in sorted(c for c in cuts if 0 <= c < size):
        with ibench.truncated(n) as ibuf:
            exp = expect_writable(data, ibuf)
            if n >= LSMT_HEADER:
                assert isinstance(exp, Reads), (n, exp)
            obs = observe_device(dbench.path, ibench.path)
            fails.add(f"index cut at {n}", judge(exp, obs, (str(dbench.path), str(ibench.path))))
    assert not fails.items, fails.report()


def test_truncated_writable_data(reference_dir: Path, rw_pair: tuple[bytes, bytes], tmp_path: Path) -> None:
    """A data file cut short (an unflushed write lost in a crash): the records pointing past its end and every
    later one are ignored; everything before reads right."""
    data, index = rw_pair
    dbench, ibench = _rw_bench(reference_dir, tmp_path)
    size = len(data)
    recs = [r for r in decode_records(index[LSMT_HEADER:]) if r is not None]
    cuts = _common_cuts(size, "rw.data") | {24, 390}
    cuts |= {SECTOR * (r.moffset + r.length) + d for r in recs[::3] for d in (-1, 0, 1)}
    fails = Failures("truncating a/rw.data")
    for n in sorted(c for c in cuts if 0 <= c < size):
        with dbench.truncated(n) as dbuf:
            exp = expect_writable(dbuf, index)
            obs = observe_device(dbench.path, ibench.path)
            fails.add(f"data cut at {n}", judge(exp, obs, (str(dbench.path), str(ibench.path))))
    assert not fails.items, fails.report()



# -- 2. byte flips ---------------------------------------------------------------------------------------------------


def _lsmt_record_offsets(rng: random.Random) -> list[int]:
    """Every byte of the fields that matter, plus a sample of the rest of the 4096-byte record."""
    offs = list(range(0, 134))
    offs += [134, 135, 200, 389] + [390, 391, 1000, 2048, 4095] + rng.sample(range(390, 4096), 5)
    return offs


def _flip_xors(field: str) -> tuple[int, ...]:
    # every single-bit flip of a flags byte too: each bit has its own meaning
    return XORS + tuple(1 << k for k in range(1, 8)) if field == "flags" else XORS


@pytest.mark.parametrize("rel", RAW_LSMT)
def test_flipped_lsmt(rel: str, baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """LSMT has no CRC: the header and trailer fields, the index records and the data are checked against each
    other. Where a flip still leaves a consistent file (a data byte, a record's zeroed bit or its length within
    bounds) the read must return exactly what the mutated index says -- no stronger assertion is possible there,
    since nothing in the format can tell those bytes from real ones."""
    b = baselines[rel]
    bench = Workbench(b.path, tmp_path / Path(rel).name)
    size = len(b.data)
    trailer_at = size - LSMT_HEADER
    t = lsmt_rec(b.data, trailer_at)
    assert t is not None
    rng = _rng("flip:" + rel)
    targets: list[tuple[str, int]] = []
    for base, what in ((0, "header"), (trailer_at, "trailer")):
        targets += [(f"{what}.{lsmt_field(o)}+{o}", base + o) for o in _lsmt_record_offsets(rng)]
    recs = decode_records(b.data[t.index_offset : t.index_offset + 16 * t.index_size])
    valid = [k for k, r in enumerate(recs) if r is not None]
    sample = sorted({0, 1, 2, valid[len(valid) // 2], valid[-1], valid[-1] + 1, t.index_size - 1} & set(range(
        t.index_size)))
    for k in sample:
        targets += [(f"record {k} byte {j}", t.index_offset + 16 * k + j) for j in range(16)]
    index_end = t.index_offset + 16 * t.index_size
    targets += [(f"after the index +{o - index_end}", o) for o in range(index_end, min(index_end + 8, trailer_at))]
    targets += [(f"data at {o}", o) for o in sorted(rng.sample(range(LSMT_HEADER, t.index_offset), 24))]
    fails = Failures(f"flipping bytes of {rel}")
    for what, off in targets:
        field = what.split("+")[0].split(".")[-1]
        for xor in _flip_xors(field):
            with bench.flipped(off, xor) as buf:
                exp = expect_lsmt_file(buf)
                if field == "magic":
                    assert isinstance(exp, Raises), (what, exp)
                _judge_stream_and_device(fails, f"{what} (offset {off}) ^ 0x{xor:02x}", bench.path, None, exp)
    assert not fails.items, fails.report()


def _zfile_flip_targets(lay: ZLayout, rng: random.Random) -> list[tuple[str, int]]:
    """(label, offset relative to the ZFile) of every byte of the meaningful record fields, sampled padding,
    sampled jump-table entries, and sampled bytes of sampled blocks (first, CRC, last)."""
    out: list[tuple[str, int]] = []
    rec_offs = list(range(0, 96)) + [96, 200, 511] + rng.sample(range(97, 511), 3)
    out += [(f"header+{o}", o) for o in rec_offs]
    if not lay.overwritten:
        out += [(f"trailer+{o}", lay.info_at + o) for o in rec_offs]
    n = lay.nblocks
    blocks = sorted({0, 1, n // 2, n - 1} | set(rng.sample(range(n), min(n, 4))))
    for k in blocks:
        a, z = lay.starts[k], lay.starts[k + 1]
        inside = {a, a + 1, (a + z) // 2, z - 5, z - 4, z - 1, rng.randrange(a, z)}
        out += [(f"block {k} +{o - a} of {z - a}", o) for o in sorted(x for x in inside if a <= x < z)]
    entries = sorted({0, 1, n // 2, n - 1} | set(rng.sample(range(n), min(n, 3))))
    for e in entries:
        out += [(f"jump entry {e} byte {j}", lay.index_offset + 4 * e + j) for j in range(4)]
    return out


@pytest.mark.parametrize("rel", ZFILES)
def test_flipped_zfile(rel: str, baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """With CRCs (verify=1) a flipped stored byte must be a ChecksumError naming its block and offset, never
    other bytes; the jump table is covered by index_crc and the header by its digest (both flag bit 4); trailer
    fields are checked against the blocks. Without per-block CRCs (the nocrc file) a flipped block byte may
    decode to other valid bytes: there only "typed error or success" can be asserted."""
    b = baselines[rel]
    lay = b.zlayout
    assert lay is not None and b.stream is not None
    bench = Workbench(b.path, tmp_path / Path(rel).name)
    fails = Failures(f"flipping bytes of {rel}")
    for what, rel_off in _zfile_flip_targets(lay, _rng("zflip:" + rel)):
        for xor in XORS:
            with bench.flipped(lay.base + rel_off, xor):
                exp = expect_zfile_flip(lay, rel_off, xor, b.stream)
                dev = None if b.device is None else device_expectation(exp, b.device)
                _judge_stream_and_device(fails, f"{what} ^ 0x{xor:02x}", bench.path, exp, dev)
    assert not fails.items, fails.report()


def test_flipped_tar(baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """The envelope's headers carry a checksum; the PAX record does not, but every byte of it but its final
    newline changes what it says; the end padding is ignored; the payload is a ZFile as above."""
    b = baselines[TAR]
    lay = b.zlayout
    assert lay is not None and b.stream is not None and b.device is not None
    bench = Workbench(b.path, tmp_path / "layer.tar")
    size = len(b.data)
    rng = _rng("flip:tar")
    pax_start, pax_end = pax_record_span(b.data)
    payload_end = lay.base + lay.length
    same_stream = Reads(b.stream, "byte not used", identical=True)
    same_device = Reads(b.device, "byte not used", identical=True)
    targets: list[tuple[str, int, int, Expectation | None, Expectation]] = []

    def add(what: str, off: int, stream_exp: Expectation | None, device_exp: Expectation) -> None:
        targets.extend((what, off, xor, stream_exp, device_exp) for xor in XORS)

    not_tar = Raises((BadMagicError,), "checksum fails: not a tar, and raw tar bytes are no LSMT file")
    for o in sorted({0, 1, 99, 100, 124, 135, 148, 150, 155, 156, 257, 262, 263, 264, 300, 511} |
                    set(rng.sample(range(512), 8))):
        add(f"PAX header +{o}", o, None, not_tar)
    for o in range(pax_start, pax_end):
        if o == pax_end - 1:  # the record's closing newline is not part of its text
            add(f"PAX record newline +{o}", o, same_stream, same_device)
        else:
            # the record now says another size (refused one way or another), or no size at all: then the ustar
            # size (0) holds and the payload is empty -- no ZFile to find (stream not checked), no layer either
            add(f"PAX record +{o}", o, None, Raises((FormatError,), "the size record says something else"))
    for o in (pax_end, pax_end + 1, 800, 1023):
        add(f"PAX block padding +{o}", o, same_stream, same_device)
    bad_ustar = Raises((FormatError,), "ustar header checksum fails")
    for o in sorted({1024, 1025, 1024 + 124, 1024 + 135, 1024 + 148, 1024 + 156, 1024 + 257, 1024 + 263, 1535} |
                    set(rng.sample(range(1024, 1536), 6))):
        add(f"ustar header +{o - 1024}", o, bad_ustar, bad_ustar)
    for what, rel_off in _zfile_flip_targets(lay, rng)[::3]:
        # a third of the ZFile targets: the plain ZFile test covers them all
        for xor in XORS:
            exp = expect_zfile_flip(lay, rel_off, xor, b.stream)
            targets.append((f"payload {what}", lay.base + rel_off, xor, exp, device_expectation(exp, b.device)))
    for o in sorted({payload_end, payload_end + 1, size - 1025, size - 1024, size - 512, size - 1}):
        add(f"end padding +{o}", o, same_stream, same_device)
    fails = Failures("flipping bytes of the tar envelope")
    for what, off, xor, stream_exp, device_exp in targets:
        with bench.flipped(off, xor):
            _judge_stream_and_device(fails, f"{what} (offset {off}) ^ 0x{xor:02x}", bench.path, stream_exp,
                                     device_exp)
    assert not fails.items, fails.report()


def test_tar_checksum_error_offset_is_in_the_named_file(baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """The message names the tar file, so its offset must be an offset *in the tar file* (payload + 1536)."""
    b = baselines[TAR]
    lay = b.zlayout
    assert lay is not None
    bench = Workbench(b.path, tmp_path / "layer.tar")
    k = 5
    with bench.flipped(lay.base + lay.starts[k] + 3, 0xFF):
        for obs in (observe_stream(bench.path), observe_device(bench.path)):
            exc = obs.exc
            assert isinstance(exc, ChecksumError), obs.tb or "read silently"
            assert exc.block == k
            assert exc.offset == lay.base + lay.starts[k], str(exc)


def test_flipped_zfile_overwritten_header(reference_dir: Path, tmp_path: Path) -> None:
    """``overlaybd-commit -z`` form (flags 0x1B): the header holds the index info under its digest; the trailer is
    never read, so flips there change nothing."""
    src = tmp_path / "layer2.zfile"
    with overlaybd.open_layer(str(reference_dir / "b/layer2.lsmt")) as layer:
        overlaybd.commit(layer, str(src), compression=overlaybd.Compression("lz4", 4096, overwrite_header=True))
    data = src.read_bytes()
    lay = parse_zfile(data)
    assert lay.overwritten and lay.header_flags & 0x10
    stream = BytesImage(zfile_decompress(data, lay))
    dev = expect_lsmt_file(stream.data)
    assert isinstance(dev, Reads)
    bench = Workbench(src, tmp_path / "copy.zfile")
    rng = _rng("overwritten")
    targets = [(f"header+{o}", o) for o in range(96)] + [(f"trailer+{o}", len(data) - ZREC + o) for o in range(96)]
    targets += [(w, o) for w, o in _zfile_flip_targets(lay, rng) if not w.startswith("header")][::2]
    fails = Failures("flipping bytes of an overwritten-header ZFile")
    for what, off in targets:
        for xor in XORS:
            with bench.flipped(off, xor):
                exp = expect_zfile_flip(lay, off, xor, stream)
                _judge_stream_and_device(fails, f"{what} ^ 0x{xor:02x}", bench.path, exp,
                                         device_expectation(exp, dev.image))
    assert not fails.items, fails.report()


def test_flipped_jump_table_without_digest(baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """A legacy ZFile without the digest flag: the block lengths must still add up to index_offset."""
    b = baselines["c/layer1.lz4.bs4k.zfile"]
    lay = b.zlayout
    assert lay is not None and b.stream is not None and b.device is not None
    data = bytearray(b.data)
    data[0:ZREC] = zfile_record_patch(data, 0, fix_digest=False, flags=lay.header_flags & ~0x10)
    data[28:32] = bytes(4)
    data[lay.info_at : lay.info_at + ZREC] = zfile_record_patch(data, lay.info_at, fix_digest=False,
                                                                flags=lay.info_flags & ~0x10)
    src = tmp_path / "nodigest.zfile"
    src.write_bytes(bytes(data))
    nodig = parse_zfile(data)
    assert not nodig.header_flags & 0x10 and not nodig.info_flags & 0x10
    assert judge(Reads(b.device, "unmutated"), observe_device(src), (str(src),)) is None
    bench = Workbench(src, tmp_path / "copy.zfile")
    fails = Failures("flipping the jump table and header of a ZFile without digest")
    targets = [(f"jump entry {e} byte {j}", nodig.index_offset + 4 * e + j) for e in range(nodig.nblocks)
               for j in (0, 1)]
    targets += [(f"header+{o}", o) for o in range(96)]
    for what, off in targets:
        for xor in XORS:
            with bench.flipped(off, xor):
                exp = expect_zfile_flip(nodig, off, xor, b.stream)
                _judge_stream_and_device(fails, f"{what} ^ 0x{xor:02x}", bench.path, exp,
                                         device_expectation(exp, b.device))
    assert not fails.items, fails.report()


def test_flipped_writable_index_records(reference_dir: Path, rw_pair: tuple[bytes, bytes], tmp_path: Path) -> None:
    """Flips in a writable index log: records are not ordered (it is a log), so a flip that keeps every record
    inside the data file reads as the mutated log says (nothing can tell). A record that points into the header
    cannot come from any write: CorruptIndexError."""
    data, index = rw_pair
    dbench, ibench = _rw_bench(reference_dir, tmp_path)
    records = (len(index) - LSMT_HEADER) // 16
    rng = _rng("rwflip")
    ks = sorted({0, 1, records // 2, records - 1} | set(rng.sample(range(records), 3)))
    fails = Failures("flipping records of a/rw.index")
    for k in ks:
        for j in range(16):
            off = LSMT_HEADER + 16 * k + j
            for xor in XORS:
                with ibench.flipped(off, xor) as ibuf:
                    exp = expect_writable(data, ibuf)
                    obs = observe_device(dbench.path, ibench.path)
                    if isinstance(exp, Reads) and exp.dropped:
                        # the flip sent a record past the end of the data file: taken for a torn write, it and
                        # the later records are ignored (formats/lsmt/writable.py). Records after it that still
                        # point inside the file show it was no torn write, so refusing is right as well.
                        exp = RaisesOrReads((CorruptIndexError,), exp.image, exp.why)
                    fails.add(f"record {k} byte {j} ^ 0x{xor:02x}",
                              judge(exp, obs, (str(dbench.path), str(ibench.path))))
    assert not fails.items, fails.report()


# -- 3. absurd counts -----------------------------------------------------------------------------------------------

_PROBE = r"""
import json, os, resource, sys
import overlaybd
from overlaybd.formats.detect import peel
from overlaybd.source.file import FileSource
vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))
out = []
for label, mode, path, index in json.loads(sys.argv[1]):
    try:
        if mode == 'stream':
            with FileSource(path) as f:
                z = peel(f).zfile
                z.pread(0, z.size)
        elif mode == 'stack':
            with overlaybd.open_stack([path] * 256) as s:
                pass
        else:
            with overlaybd.open_layer(path, index) as layer:
                layer.pread(0, min(layer.size, 1 << 20))
        out.append([label, None, ''])
    except BaseException as exc:
        out.append([label, type(exc).__name__, str(exc)])
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Absurd:
    label: str
    mode: str  # device | stream | stack
    path: Path
    expected: type[OverlaybdError]
    index: Path | None = None


def _absurd_cases(reference_dir: Path, tmp: Path) -> list[Absurd]:
    cases: list[Absurd] = []
    lsmt = (reference_dir / "a/committed.lsmt").read_bytes()
    t_at = len(lsmt) - LSMT_HEADER

    def lsmt_case(label: str, expected: type[OverlaybdError], **fields: int) -> None:
        p = tmp / f"{label}.lsmt"
        p.write_bytes(lsmt[:t_at] + lsmt_record_patch(lsmt, t_at, **fields))
        cases.append(Absurd(label, "device", p, expected))

    lsmt_case("lsmt-index-size-2^40", LimitError, index_size=1 << 40)
    lsmt_case("lsmt-index-size-2^64-1", LimitError, index_size=(1 << 64) - 1)
    lsmt_case("lsmt-index-size-at-limit", CorruptIndexError, index_size=1_000_000)
    lsmt_case("lsmt-index-offset-2^63", CorruptIndexError, index_offset=1 << 63)
    lsmt_case("lsmt-index-offset-0", CorruptIndexError, index_offset=0)

    z = (reference_dir / "c/layer1.lz4.bs4k.zfile").read_bytes()
    lay = parse_zfile(z)

    def zfile_cases(label: str, expected: type[OverlaybdError], **fields: int) -> None:
        # in the trailer (no digest checked there) and in an overwritten header (digest recomputed)
        p = tmp / f"{label}.trailer.zfile"
        p.write_bytes(z[: lay.info_at] + zfile_record_patch(z, lay.info_at, fix_digest=True, **fields))
        cases.append(Absurd(label + " (trailer)", "stream", p, expected))
        hdr_fields = {"flags": 0x1B, "index_offset": lay.index_offset, "index_size": lay.nblocks,
                      "original_file_size": lay.original_size, "index_crc": struct.unpack_from("<I", z,
                                                                                              lay.info_at + 64)[0]}
        hdr_fields.update(fields)
        p = tmp / f"{label}.header.zfile"
        p.write_bytes(zfile_record_patch(z, 0, fix_digest=True, **hdr_fields) + z[ZREC:])
        cases.append(Absurd(label + " (overwritten header)", "stream", p, expected))

    zfile_cases("zfile-index-size-2^40", LimitError, index_size=1 << 40)
    zfile_cases("zfile-index-size-2^32", LimitError, index_size=1 << 32)
    zfile_cases("zfile-index-size-10^9", CorruptIndexError, index_size=10**9, original_file_size=10**9 * 4096)
    zfile_cases("zfile-index-offset-2^63", CorruptIndexError, index_offset=1 << 63)
    zfile_cases("zfile-original-size-2^63", CorruptIndexError, original_file_size=1 << 63)
    for bs in (0, 3, 256, 4095, 131072, 1 << 31, (1 << 32) - 1):
        zfile_cases(f"zfile-block-size-{bs}", UnsupportedError, block_size=bs)
    for algo in (0, 3, 7, 255):
        zfile_cases(f"zfile-algo-{algo}", UnsupportedError, algo=algo)
    zfile_cases("zfile-dict-size-1", UnsupportedError, dict_size=1)
    zfile_cases("zfile-dict-size-2^31", UnsupportedError, dict_size=1 << 31)
    zfile_cases("zfile-use-dict", UnsupportedError, use_dict=1)

    # a jump-table entry of 0xFFFFFFFF, and one of 0, with index_crc made to match
    for label, value in (("zfile-jump-entry-ffffffff", 0xFFFFFFFF), ("zfile-jump-entry-0", 0),
                         ("zfile-jump-entry-crc-only", 4)):
        table = bytearray(z[lay.index_offset : lay.info_at])
        struct.pack_into("<I", table, 4 * 3, value)
        p = tmp / f"{label}.zfile"
        p.write_bytes(z[: lay.index_offset] + bytes(table) +
                      zfile_record_patch(z, lay.info_at, fix_digest=True, index_crc=raw_crc32c(table)))
        cases.append(Absurd(label, "stream", p, CorruptIndexError))

    # writable pair: an index file holding 128,000,001 records (a sparse 2 GB file): refused before reading it
    rw_data = tmp / "big.data"
    rw_index = tmp / "big.index"
    shutil.copyfile(reference_dir / "a/rw.data", rw_data)
    shutil.copyfile(reference_dir / "a/rw.index", rw_index)
    os.truncate(rw_index, LSMT_HEADER + 16 * (128_000_000 + 1))
    cases.append(Absurd("rw-index-128M+1-records", "device", rw_data, LimitError, rw_index))
    idx = (reference_dir / "a/rw.index").read_bytes()
    for label, fields in (("rw-index-header-index-offset-2^40", {"index_offset": 1 << 40}),
                          ("rw-index-header-flags-sealed", {"flags": 0x05})):
        p = tmp / f"{label}.index"
        p.write_bytes(lsmt_record_patch(idx, 0, **fields) + idx[LSMT_HEADER:])
        cases.append(Absurd(label, "device", rw_data, BadMagicError, p))

    # a stack of 256 layers (the limit is 255)
    cases.append(Absurd("stack-256-layers", "stack", reference_dir / "b/layer2.lsmt", LimitError))
    return cases


def test_absurd_counts_refused_before_allocating(reference_dir: Path, tmp_path: Path) -> None:
    """Run in a child whose address space is capped at its start-up size + 512 MiB: honouring any of these
    counts would need gigabytes (or exabytes), so the right typed error must come back first."""
    cases = _absurd_cases(reference_dir, tmp_path)
    arg = json.dumps([[c.label, c.mode, str(c.path), None if c.index is None else str(c.index)] for c in cases])
    proc = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = {label: (exc, msg) for label, exc, msg in json.loads(proc.stdout)}
    problems = []
    for c in cases:
        exc, msg = results[c.label]
        if exc != c.expected.__name__:
            problems.append(f"{c.label}: expected {c.expected.__name__}, got {exc}: {msg}")
        elif c.mode != "stack" and str(c.path) not in msg and (c.index is None or str(c.index) not in msg):
            problems.append(f"{c.label}: message does not name the file: {msg}")
    assert not problems, "\n".join(problems)


def test_absurd_writable_index_header_fields_are_ignored(reference_dir: Path, rw_pair: tuple[bytes, bytes],
                                                         tmp_path: Path) -> None:
    """The record count of a writable index comes from the file's size (spec §3.6), not from its header."""
    data, index = rw_pair
    dbench, ibench = _rw_bench(reference_dir, tmp_path)
    for fields in ({"index_size": 1 << 62}, {"virtual_size": (1 << 64) - 1}):
        patch = lsmt_record_patch(index, 0, **fields)
        with ibench.patched(0, patch) as ibuf:
            exp = expect_writable(data, ibuf)
            problem = judge(exp, observe_device(dbench.path, ibench.path), (str(ibench.path),))
            assert problem is None, (fields, problem)


# -- 4. wrong magics -------------------------------------------------------------------------------------------------


def _gnu_tar(member: Path, out: Path, fmt: int) -> None:
    with tarfile.open(out, "w", format=fmt) as tf:
        tf.add(member, arcname="overlaybd.commit")


@pytest.mark.parametrize("kind", ["empty", "one-byte", "23-bytes", "zeros", "random", "png", "gnu-tar",
                                  "zfile-magic-only", "lsmt-magic-only", "zfile-header-zeros"])
def test_wrong_magic(kind: str, reference_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.bin"
    rng = _rng(kind)
    lsmt_magic = (reference_dir / "a/committed.lsmt").read_bytes()[:24]
    zmagic = (reference_dir / "c/layer1.lz4.bs4k.zfile").read_bytes()[:24]
    content = {
        "empty": b"",
        "one-byte": b"L",
        "23-bytes": lsmt_magic[:23],
        "zeros": bytes(3 * LSMT_HEADER),
        "random": rng.randbytes(65536),
        "png": bytes.fromhex("89504E470D0A1A0A0000000D49484452") + rng.randbytes(8192),
        "zfile-magic-only": zmagic,
        "lsmt-magic-only": lsmt_magic,
        "zfile-header-zeros": zmagic + bytes(ZREC - 24 + 4096),
    }
    expected: dict[str, type[OverlaybdError]] = {"lsmt-magic-only": TruncatedError, "zfile-magic-only":
                                                 TruncatedError, "zfile-header-zeros": FormatError}
    if kind == "gnu-tar":
        _gnu_tar(reference_dir / "a/committed.lsmt", path, tarfile.GNU_FORMAT)
        assert path.read_bytes()[257:265] == b"ustar  \x00"
    else:
        path.write_bytes(content[kind])
    with pytest.raises(OverlaybdError) as info:
        overlaybd.open_layer(str(path))
    exc = info.value
    assert isinstance(exc, expected.get(kind, BadMagicError)), repr(exc)
    assert check_error(exc, "", (str(path),)) is None, exc
    if kind == "gnu-tar":
        # the reference does not recognise GNU tar: the blob is raw, and raw it is no LSMT layer
        assert "raw" in str(exc), exc
        with FileSource(str(path)) as f:
            assert peel(f).wrappers == []


def test_posix_ustar_without_pax_is_read(reference_dir: Path, baselines: dict[str, Baseline],
                                         tmp_path: Path) -> None:
    """Control for the GNU case: a plain POSIX ustar envelope (Go archive/tar style, payload at 512) is read."""
    path = tmp_path / "ustar.tar"
    _gnu_tar(reference_dir / "a/committed.lsmt", path, tarfile.USTAR_FORMAT)
    b = baselines["a/committed.lsmt"]
    assert b.device is not None
    assert judge(Reads(b.device, "ustar envelope"), observe_device(path), (str(path),)) is None


@pytest.mark.parametrize("record, expected", [
    (b"15 size=999999\n", TruncatedError),  # bigger than the file
    (b"23 size=99999999999999\n", TruncatedError),
    (b"15 size=46816x\n", FormatError),
    (b"15 size=000000\n", BadMagicError),  # 0: the ustar size (0) holds, an empty payload is no layer
    (b"0 size=468160\n", FormatError),
    (b"x5 size=468160\n", FormatError),
    (b"15size=468160\n\n", FormatError),
])
def test_bad_pax_record(record: bytes, expected: type[OverlaybdError], baselines: dict[str, Baseline],
                        tmp_path: Path) -> None:
    b = baselines[TAR]
    start, end = pax_record_span(b.data)
    data = bytearray(b.data)
    data[start:end] = bytes(end - start)
    data[start : start + len(record)] = record
    # keep the PAX header's size field in step with the record, as a writer would (its checksum too)
    hdr = bytearray(data[:512])
    hdr[124:136] = b"%11o " % len(record)
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%6o \x00" % sum(hdr)
    data[:512] = hdr
    path = tmp_path / "pax.tar"
    path.write_bytes(bytes(data))
    obs = observe_device(path)
    assert obs.exc is not None, f"read {obs.size} bytes"
    assert check_error(obs.exc, obs.tb, (str(path),)) is None, obs.tb
    assert isinstance(obs.exc, expected), repr(obs.exc)


def test_tar_header_size_beyond_file(baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """A PAX extended header whose own size field is huge (octal and GNU base-256): refused, not read."""
    b = baselines[TAR]
    for field in (b"%11o " % (1 << 32), b"\x80" + (1 << 60).to_bytes(11, "big")):
        hdr = bytearray(b.data[:512])
        hdr[124:136] = field
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%6o \x00" % sum(hdr)
        path = tmp_path / "big.tar"
        path.write_bytes(bytes(hdr) + b.data[512:])
        obs = observe_device(path)
        assert isinstance(obs.exc, TruncatedError), obs.tb or obs.size
        assert check_error(obs.exc, obs.tb, (str(path),)) is None


# -- 5. writable layers ----------------------------------------------------------------------------------------------


def test_torn_last_index_record_is_ignored(reference_dir: Path, rw_pair: tuple[bytes, bytes],
                                           tmp_path: Path) -> None:
    data, index = rw_pair
    dbench, ibench = _rw_bench(reference_dir, tmp_path)
    for extra in (1, 8, 15):
        with open(ibench.path, "ab") as f:
            f.write(b"\xa5" * extra)
        exp = expect_writable(data, index)
        assert judge(exp, observe_device(dbench.path, ibench.path), (str(ibench.path),)) is None
        os.truncate(ibench.path, len(index))


def test_record_past_data_end_is_ignored_with_warning(reference_dir: Path, rw_pair: tuple[bytes, bytes],
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An index record pointing beyond the data file is an unflushed write cut off: it and the later records are
    ignored, with a warning naming the index file; earlier data reads right."""
    data, index = rw_pair
    dbench, ibench = _rw_bench(reference_dir, tmp_path)
    past = len(data) // SECTOR
    extra = encode_record(0, 8, past) + encode_record(4096, 8, past - 8)
    with open(ibench.path, "ab") as f:
        f.write(extra)
    with caplog.at_level(logging.WARNING):
        obs = observe_device(dbench.path, ibench.path)
    assert judge(expect_writable(data, index + extra), obs, (str(ibench.path),)) is None
    assert judge(expect_writable(data, index), obs, (str(ibench.path),)) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(ibench.path) in m and "2 index record" in m for m in warned), warned


def test_record_pointing_into_the_header_is_corrupt(reference_dir: Path, rw_pair: tuple[bytes, bytes],
                                                    tmp_path: Path) -> None:
    """No write can produce a record whose data lies inside the 4096-byte header (spec §3.4: lo = 8 sectors):
    that is a corrupt index, not a torn write, and must not silently drop the records after it."""
    data, index = rw_pair
    dbench, ibench = _rw_bench(reference_dir, tmp_path)
    k = 5
    off = LSMT_HEADER + 16 * k
    rec = decode_records(index[off : off + 16])[0]
    assert rec is not None
    with ibench.patched(off, encode_record(rec.offset, rec.length, 0, rec.zeroed)) as ibuf:
        assert isinstance(expect_writable(data, ibuf), Raises)
        obs = observe_device(dbench.path, ibench.path)
        assert isinstance(obs.exc, CorruptIndexError), obs.tb or f"opened; read {obs.size} bytes"
        assert str(ibench.path) in str(obs.exc) and obs.exc.offset == off, obs.exc


def _pattern(i: int, n: int) -> bytes:
    return bytes([(i * 37 + 11) & 0xFF]) * n


def test_torn_write_recovery_does_not_resurrect_stale_records(tmp_path: Path) -> None:
    """A crash loses the data of two unflushed writes; their index records survive. After reopening, new writes
    are appended, then the layer is reopened: it must read exactly what was flushed plus the new writes. The
    stale records left in the index file beyond the new ones must never come back to life."""
    data, index = tmp_path / "t.data", tmp_path / "t.index"
    overlaybd.create(str(data), str(index), 4 << 20)
    with overlaybd.open_layer(str(data), str(index), writable=True) as rw:
        rw.pwrite(0, _pattern(1, 4096))
        rw.flush()
        flushed_size = data.stat().st_size
        rw.pwrite(65536, _pattern(2, 4096))
        rw.pwrite(131072, _pattern(3, 4096))
        rw.flush()
    os.truncate(data, flushed_size)  # the crash: the data of writes 2 and 3 never reached the disk
    with overlaybd.open_layer(str(data), str(index), writable=True) as rw:
        assert rw.torn_records == 2  # type: ignore[attr-defined]
        rw.pwrite(1 << 20, _pattern(4, 16384))
        rw.flush()
    want = bytearray(4 << 20)
    want[0:4096] = _pattern(1, 4096)
    want[1 << 20 : (1 << 20) + 16384] = _pattern(4, 16384)
    with overlaybd.open_layer(str(data), str(index)) as ro:
        got = ro.pread(0, ro.size)
    assert got == bytes(want), f"first wrong byte at {_first_wrong(got, want)}"


def _first_wrong(got: bytes, want: bytes | bytearray) -> int:
    return next((k for k in range(len(got)) if got[k] != want[k]), -1)


def test_locked_in_process(tmp_path: Path) -> None:
    data, index = tmp_path / "l.data", tmp_path / "l.index"
    overlaybd.create(str(data), str(index), 1 << 20)
    with overlaybd.open_layer(str(data), str(index), writable=True) as rw:
        with pytest.raises(LockedError) as info:
            overlaybd.open_layer(str(data), str(index), writable=True)
        assert str(data) in str(info.value)
        with overlaybd.open_layer(str(data), str(index)) as ro:  # readers are not locked out
            assert ro.pread(0, 512) == bytes(512)
        rw.pwrite(0, b"x" * 512)
    with overlaybd.open_layer(str(data), str(index), writable=True) as rw:  # released on close
        assert rw.pread(0, 1) == b"x"


_LOCK_PROBE = r"""
import sys, overlaybd
try:
    overlaybd.open_layer(sys.argv[1], sys.argv[2], writable=True)
    print('opened')
except BaseException as exc:
    print(type(exc).__name__, exc)
"""


def test_locked_across_processes(tmp_path: Path) -> None:
    data, index = tmp_path / "p.data", tmp_path / "p.index"
    overlaybd.create(str(data), str(index), 1 << 20)
    with overlaybd.open_layer(str(data), str(index), writable=True):
        proc = subprocess.run([sys.executable, "-c", _LOCK_PROBE, str(data), str(index)], capture_output=True,
                              text=True, timeout=60)
    assert proc.stdout.startswith("LockedError ") and str(data) in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-c", _LOCK_PROBE, str(data), str(index)], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "opened", proc.stdout + proc.stderr


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs (needs root)."""
    where = tmp_path / "tiny"
    where.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                              text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if proc.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs on {where}: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_disk_write(tiny_fs: Path) -> None:
    """Writing past the capacity raises LayerIOError naming the file; everything flushed before reads back
    after reopening; once space is freed the same open layer carries on consistently."""
    data, index = tiny_fs / "w.data", tiny_fs / "w.index"
    overlaybd.create(str(data), str(index), 64 << 20)
    chunk = 12288
    written: dict[int, bytes] = {}
    with overlaybd.open_layer(str(data), str(index), writable=True) as rw:
        failure: LayerIOError | None = None
        for i in range(200):
            payload = _pattern(i, chunk)
            try:
                rw.pwrite(i * chunk, payload)
                rw.flush()
            except LayerIOError as exc:
                failure = exc
                break
            written[i] = payload
        assert failure is not None, "1 MiB never filled up"
        assert written, "nothing fitted at all"
        assert failure.path in (str(data), str(index)) and str(failure.path) in str(failure), failure
        assert isinstance(failure.__cause__, OSError) and failure.__cause__.errno == errno.ENOSPC
        failed_at = len(written)
        # still full: another write fails the same way, typed
        with pytest.raises(LayerIOError):
            rw.pwrite((failed_at + 1) * chunk, _pattern(99, chunk))
            rw.flush()
    with overlaybd.open_layer(str(data), str(index)) as ro:
        for i, payload in written.items():
            assert ro.pread(i * chunk, chunk) == payload, f"chunk {i} lost"
        assert ro.pread(failed_at * chunk, chunk) in (bytes(chunk), _pattern(failed_at, chunk))
    # room again: grow the file system, then carry on writing where the failed write left off
    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_fs)], check=True, capture_output=True)
    with overlaybd.open_layer(str(data), str(index), writable=True) as rw:
        rw.pwrite(failed_at * chunk, _pattern(failed_at, chunk))
        rw.flush()
        written[failed_at] = _pattern(failed_at, chunk)
    with overlaybd.open_layer(str(data), str(index)) as ro:
        for i, payload in written.items():
            assert ro.pread(i * chunk, chunk) == payload, f"chunk {i} lost after the disk was full"


def test_full_disk_keeps_failed_writes_out_and_carries_on(tiny_fs: Path, tmp_path: Path) -> None:
    """A write that fails for space in the *same* open layer leaves no trace: once space is back (another file
    deleted) the next writes land where they should and everything reads back after reopening."""
    filler = tiny_fs / "filler"
    data, index = tiny_fs / "c.data", tiny_fs / "c.index"
    overlaybd.create(str(data), str(index), 64 << 20)
    _fill(filler)
    written: dict[int, bytes] = {}
    chunk = 4096
    with overlaybd.open_layer(str(data), str(index), writable=True) as rw:
        failures = 0
        for i in range(6):
            try:
                rw.pwrite(i * chunk, _pattern(i, chunk))
                rw.flush()
                written[i] = _pattern(i, chunk)
            except LayerIOError as exc:
                assert str(exc.path) in str(exc)
                failures += 1
        assert failures, "the filler left room"
        filler.unlink()
        for i in range(6, 12):
            rw.pwrite(i * chunk, _pattern(i, chunk))
            written[i] = _pattern(i, chunk)
        rw.flush()
    with overlaybd.open_layer(str(data), str(index)) as ro:
        for i in range(12):
            want = written.get(i, bytes(chunk))
            assert ro.pread(i * chunk, chunk) == want, f"chunk {i}"


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                if not os.write(fd, bytes(65536)):
                    return
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return
    finally:
        os.close(fd)


def test_full_disk_commit_and_compress_leave_nothing(reference_dir: Path, tiny_fs: Path, tmp_path: Path) -> None:
    """Outputs are written under a temporary name: a full disk leaves neither a half-written output nor a
    temporary file behind."""
    with overlaybd.open_layer(str(reference_dir / "d/merged.lsmt")) as layer:  # 1.1 MB committed
        out = tiny_fs / "out.lsmt"
        with pytest.raises(LayerIOError) as info:
            overlaybd.commit(layer, str(out))
        assert check_error(info.value, "", (str(out), str(tiny_fs))) is None, info.value
    noise = tmp_path / "noise.raw"
    noise.write_bytes(_rng("noise").randbytes(2 << 20))  # incompressible, twice the room
    out = tiny_fs / "out.zfile"
    with pytest.raises(LayerIOError) as info:
        overlaybd.compress(str(noise), str(out), overlaybd.Compression("zstd", 65536))
    assert check_error(info.value, "", (str(out), str(tiny_fs))) is None, info.value
    assert sorted(os.listdir(tiny_fs)) == [], os.listdir(tiny_fs)
