"""Byte flips: a CRC, a magic or a bound tells, or the read returns exactly what the mutated bytes say."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import overlaybd
from overlaybd.errors import (
    BadMagicError,
    ChecksumError,
    CorruptIndexError,
    FormatError,
)

from ...oracle import (
    LSMT_HEADER,
    ZREC,
    BytesImage,
    Expectation,
    Raises,
    RaisesOrReads,
    Reads,
    decode_records,
    device_expectation,
    expect_lsmt_file,
    expect_writable,
    expect_zfile_flip,
    lsmt_field,
    lsmt_rec,
    parse_zfile,
    pax_record_span,
    zfile_decompress,
    zfile_record_patch,
)
from ..mutations import Failures, Workbench, judge, observe_device, observe_stream
from .common import (
    RAW_LSMT,
    TAR,
    XORS,
    ZFILES,
    Baseline,
    judge_stream_and_device,
    rw_bench,
    seeded_rng,
    zfile_flip_targets,
)

pytestmark = pytest.mark.fixtures


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
    rng = seeded_rng("flip:" + rel)
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
                judge_stream_and_device(fails, f"{what} (offset {off}) ^ 0x{xor:02x}", bench.path, None, exp)
    assert not fails.items, fails.report()


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
    for what, rel_off in zfile_flip_targets(lay, seeded_rng("zflip:" + rel)):
        for xor in XORS:
            with bench.flipped(lay.base + rel_off, xor):
                exp = expect_zfile_flip(lay, rel_off, xor, b.stream)
                dev = None if b.device is None else device_expectation(exp, b.device)
                judge_stream_and_device(fails, f"{what} ^ 0x{xor:02x}", bench.path, exp, dev)
    assert not fails.items, fails.report()


def test_flipped_tar(baselines: dict[str, Baseline], tmp_path: Path) -> None:
    """The envelope's headers carry a checksum; the PAX record does not, but every byte of it but its final
    newline changes what it says; the end padding is ignored; the payload is a ZFile as above."""
    b = baselines[TAR]
    lay = b.zlayout
    assert lay is not None and b.stream is not None and b.device is not None
    bench = Workbench(b.path, tmp_path / "layer.tar")
    size = len(b.data)
    rng = seeded_rng("flip:tar")
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
    for what, rel_off in zfile_flip_targets(lay, rng)[::3]:
        # a third of the ZFile targets: the plain ZFile test covers them all
        for xor in XORS:
            exp = expect_zfile_flip(lay, rel_off, xor, b.stream)
            targets.append((f"payload {what}", lay.base + rel_off, xor, exp, device_expectation(exp, b.device)))
    for o in sorted({payload_end, payload_end + 1, size - 1025, size - 1024, size - 512, size - 1}):
        add(f"end padding +{o}", o, same_stream, same_device)
    fails = Failures("flipping bytes of the tar envelope")
    for what, off, xor, stream_exp, device_exp in targets:
        with bench.flipped(off, xor):
            judge_stream_and_device(fails, f"{what} (offset {off}) ^ 0x{xor:02x}", bench.path, stream_exp,
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
    rng = seeded_rng("overwritten")
    targets = [(f"header+{o}", o) for o in range(96)] + [(f"trailer+{o}", len(data) - ZREC + o) for o in range(96)]
    targets += [(w, o) for w, o in zfile_flip_targets(lay, rng) if not w.startswith("header")][::2]
    fails = Failures("flipping bytes of an overwritten-header ZFile")
    for what, off in targets:
        for xor in XORS:
            with bench.flipped(off, xor):
                exp = expect_zfile_flip(lay, off, xor, stream)
                judge_stream_and_device(fails, f"{what} ^ 0x{xor:02x}", bench.path, exp,
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
                judge_stream_and_device(fails, f"{what} ^ 0x{xor:02x}", bench.path, exp,
                                         device_expectation(exp, b.device))
    assert not fails.items, fails.report()


def test_flipped_writable_index_records(reference_dir: Path, rw_pair: tuple[bytes, bytes], tmp_path: Path) -> None:
    """Flips in a writable index log: records are not ordered (it is a log), so a flip that keeps every record
    inside the data file reads as the mutated log says (nothing can tell). A record that points into the header
    cannot come from any write: CorruptIndexError."""
    data, index = rw_pair
    dbench, ibench = rw_bench(reference_dir, tmp_path)
    records = (len(index) - LSMT_HEADER) // 16
    rng = seeded_rng("rwflip")
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
