"""Writable LSMT layers when a data write fails part-way (the file-size limit, as ENOSPC would): what was
acknowledged before and after it is still there, on reads and once the layer is reopened."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from overlaybd.errors import LayerIOError
from overlaybd.formats.lsmt.spec import MAX_RECORD_SECTORS, SECTOR
from overlaybd.formats.lsmt.writable import WritableLayer
from overlaybd.volume import Volume


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail (EFBIG) while this holds."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("kind", ["trim", "zeroes"])
def test_a_discard_after_a_failed_write_survives_reopening(tmp_path: Path, kind: str) -> None:
    size = 1 << 20
    vol = Volume.create(str(tmp_path / "vol"), size)
    with vol.open(writable=True) as dev:
        upper = dev.upper
        assert isinstance(upper, WritableLayer)
        dev.pwrite(0, b"a" * 65536)
        dev.flush()
        with file_size_limit(upper.data.size), pytest.raises(LayerIOError):
            dev.pwrite(65536, b"b" * 4096)  # its data write fails: nothing of it is acknowledged
        if kind == "trim":
            dev.trim(0, 4096)
        else:
            dev.write_zeroes(0, 4096)
        dev.flush()
        expect = bytes(4096) + b"a" * 61440 + bytes(size - 65536)
        assert dev.pread(0, size) == expect
    with vol.open(writable=True) as dev:
        assert dev.pread(0, size) == expect


def test_records_a_failed_append_left_in_the_index_file_never_come_back(tmp_path: Path) -> None:
    """A trim of 3 records whose append stops after 2 (the index file may not grow further): the next append
    writes over the first only; the second must not be replayed on reopen over a write acknowledged after it."""
    size = 64 << 20
    vol = Volume.create(str(tmp_path / "vol"), size)
    span = MAX_RECORD_SECTORS * SECTOR  # one record at most
    with vol.open(writable=True) as dev:
        upper = dev.upper
        assert isinstance(upper, WritableLayer)
        dev.pwrite(0, b"a" * 4096)
        dev.flush()
        end = upper.appender.index_end
        with file_size_limit(end + 32), pytest.raises(LayerIOError):
            dev.trim(0, 3 * span)  # 48 bytes of records: 32 written, then EFBIG
        dev.pwrite(span, b"b" * 4096)  # acknowledged after the failed trim, inside its second record
        dev.flush()
        assert dev.pread(span, 4096) == b"b" * 4096
    with vol.open(writable=True) as dev:
        assert dev.pread(span, 4096) == b"b" * 4096
