"""Truncation: every cut of a sealed file is refused; a writable layer loses only what a crash could have torn."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlaybd.errors import (
    BadMagicError,
    FormatError,
    TruncatedError,
)

from ...oracle import (
    LSMT_HEADER,
    SECTOR,
    ZREC,
    Expectation,
    NotDetected,
    Raises,
    Reads,
    ZLayout,
    decode_records,
    device_expectation,
    expect_lsmt_file,
    expect_writable,
    lsmt_rec,
    pax_record_span,
)
from ..mutations import Failures, Workbench, judge, observe_device
from .common import (
    RAW_LSMT,
    TAR,
    ZFILES,
    Baseline,
    judge_stream_and_device,
    rw_bench,
    seeded_rng,
)

pytestmark = pytest.mark.fixtures


# -- 1. truncation ---------------------------------------------------------------------------------------------------


def _common_cuts(size: int, label: str) -> set[int]:
    cuts = {0, 1, 23, 511, 512, 4095, 4096, 4097, size - 1, size - 512, size - 4096}
    rng = seeded_rng("cut:" + label)
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
            judge_stream_and_device(fails, f"cut at {n}", bench.path, None, exp)
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
            judge_stream_and_device(fails, f"cut at {n}", bench.path, stream_exp, device_exp)
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
            judge_stream_and_device(fails, f"cut at {n}", bench.path, stream_exp, device_exp)
    assert not fails.items, fails.report()


def test_truncated_writable_index(reference_dir: Path, rw_pair: tuple[bytes, bytes], tmp_path: Path) -> None:
    """An index file cut mid-record loses only the torn record; cut inside its header it is refused."""
    data, index = rw_pair
    dbench, ibench = rw_bench(reference_dir, tmp_path)
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
    dbench, ibench = rw_bench(reference_dir, tmp_path)
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
