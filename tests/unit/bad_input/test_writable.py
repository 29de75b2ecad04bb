"""Writable layers: torn records, torn data, locking, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import overlaybd
from overlaybd.errors import (
    CorruptIndexError,
    LayerIOError,
    LockedError,
)

from ...oracle import (
    LSMT_HEADER,
    SECTOR,
    Raises,
    decode_records,
    encode_record,
    expect_writable,
)
from ..mutations import check_error, judge, observe_device
from .common import (
    rw_bench,
    seeded_rng,
)

pytestmark = pytest.mark.fixtures


# -- 5. writable layers ----------------------------------------------------------------------------------------------


def test_torn_last_index_record_is_ignored(reference_dir: Path, rw_pair: tuple[bytes, bytes],
                                           tmp_path: Path) -> None:
    data, index = rw_pair
    dbench, ibench = rw_bench(reference_dir, tmp_path)
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
    dbench, ibench = rw_bench(reference_dir, tmp_path)
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
    """No write can produce a record whose data lies inside the 4096-byte header:
    that is a corrupt index, not a torn write, and must not silently drop the records after it."""
    data, index = rw_pair
    dbench, ibench = rw_bench(reference_dir, tmp_path)
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
        assert rw.torn_records == 2  # type: ignore[union-attr]
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
    noise.write_bytes(seeded_rng("noise").randbytes(2 << 20))  # incompressible, twice the room
    out = tiny_fs / "out.zfile"
    with pytest.raises(LayerIOError) as info:
        overlaybd.compress(str(noise), str(out), overlaybd.Compression("zstd", 65536))
    assert check_error(info.value, "", (str(out), str(tiny_fs))) is None, info.value
    assert sorted(os.listdir(tiny_fs)) == [], os.listdir(tiny_fs)
