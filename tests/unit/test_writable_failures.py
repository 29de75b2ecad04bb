"""Writable LSMT layers when a data write fails part-way (the file-size limit, as ENOSPC would): what was
acknowledged before and after it is still there, on reads and once the layer is reopened."""

from __future__ import annotations

import os
import resource
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from overlaybd.errors import LayerIOError
from overlaybd.formats.lsmt.spec import HEADER_SIZE, MAX_RECORD_SECTORS, SECTOR, decode_records
from overlaybd.formats.lsmt.writable import WritableLayer, create_writable
from overlaybd.inspection import check_layer
from overlaybd.operations import commit
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


def _reference_commit() -> Path | None:
    folder = os.environ.get("OVERLAYBD_REFERENCE_TOOLS")
    tool = Path(folder) / "overlaybd-commit" if folder else None
    return tool if tool is not None and tool.exists() else None


def test_a_discard_after_a_failed_write_points_within_the_data_file(tmp_path: Path) -> None:
    """The zeroed record's moffset is within the data file (the reference's tools refuse to open a layer with one
    past its end), and the reference commits the layer to the same bytes as we do."""
    vol = Volume.create(str(tmp_path / "vol"), 1 << 20)
    with vol.open(writable=True) as dev:
        upper = dev.upper
        assert isinstance(upper, WritableLayer)
        dev.pwrite(0, b"a" * 65536)
        with file_size_limit(upper.data.size), pytest.raises(LayerIOError):
            dev.pwrite(65536, b"b" * 4096)
        dev.trim(0, 4096)
        dev.flush()
        data, index = upper.name, upper.index_path
    raw = Path(index).read_bytes()[HEADER_SIZE:]
    rec = decode_records(raw)
    assert bool(rec["zeroed"][-1]) and int(rec["moffset"][-1]) * SECTOR <= os.path.getsize(data)
    tool = _reference_commit()
    if tool is None:
        pytest.skip("set OVERLAYBD_REFERENCE_TOOLS to the reference tools' folder to commit with overlaybd-commit")
    uuid = "11111111-2222-3333-4444-555555555555"
    subprocess.run([str(tool), data, index, str(tmp_path / "ref.commit"), "--uuid", uuid], check=True,
                   capture_output=True)
    ours = tmp_path / "our.commit"
    with WritableLayer(data, index, readonly=True) as layer:
        commit(layer, str(ours), uuid=uuid)
    assert (tmp_path / "ref.commit").read_bytes() == ours.read_bytes()


def test_check_warns_of_zeroed_records_past_the_end(tmp_path: Path) -> None:
    """As earlier versions wrote them (at the data cursor, past the end after a failed write): they read as zeros
    and survive reopening, and ``check`` says the reference's tools would refuse the layer."""
    vol = Volume.create(str(tmp_path / "vol"), 1 << 20)
    with vol.open(writable=True) as dev:
        upper = dev.upper
        assert isinstance(upper, WritableLayer)
        dev.pwrite(0, b"a" * 8192)
        past = os.fstat(upper.data.fd).st_size // SECTOR + 8
        upper.appender.append(struct.pack("<QQ", 0 | 1 << 50, past | 1 << 55), 0)
        dev.flush()
        data, index = upper.name, upper.index_path
    with vol.open() as dev:
        assert dev.pread(0, 8192) == bytes(512) + b"a" * 7680
    report = check_layer(data, index)
    assert not report["errors"] and any("1 zeroed record(s) point past the end" in w for w in report["warnings"])


def test_a_layer_opened_read_only_while_written_finds_no_torn_record(tmp_path: Path) -> None:
    """``check VOL`` / ``info VOL`` / ``export`` of an attached volume: records appended between the opening of the
    data file and the reading of the index point past the size seen at first, but their data is written: they are
    no torn write (none is ignored, nothing is reported)."""
    data, index = str(tmp_path / "d"), str(tmp_path / "i")
    create_writable(data, index, 256 << 20)
    stop = threading.Event()
    with WritableLayer(data, index) as live:
        def writer() -> None:
            k = 0
            while not stop.is_set():
                live.pwrite(k % 60000 * 4096, b"x" * 4096)
                k += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            torn = []
            for _ in range(200):
                with WritableLayer(data, index, readonly=True) as seen:
                    torn.append(seen.torn_records)
        finally:
            stop.set()
            t.join()
    assert not any(torn), torn


_CATCH_UP_UNDER_A_MEMORY_LIMIT = """
import os, resource, struct, sys
from overlaybd.formats.lsmt.writable import WritableLayer, create_writable
d, i = sys.argv[1] + "/d", sys.argv[1] + "/i"
create_writable(d, i, 1 << 40)
with WritableLayer(d, i) as layer:
    app = layer.appender
    layer.pwrite(0, b"z" * 4096)
    at = app.reserve(4096)
    os.pwrite(layer.data.fd, b"q" * 4096, at)
    n = 1_000_000  # records appended as the C writer does, waiting for the index
    app.append(b"".join(struct.pack("<QQ", k * 16 | 8 << 50, at // 512) for k in range(n)), at + 4096)
    vm = int([ln for ln in open("/proc/self/status") if ln.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (24 << 20), resource.RLIM_INFINITY))
    try:
        layer.pread(0, 4096)
        sys.exit("the index took a million records under a 24 MiB limit")
    except MemoryError:
        pass
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    seen = (layer.pread(0, 4096) == b"q" * 4096, layer.pread((n - 1) * 16 * 512, 4096) == b"q" * 4096)
    rows = layer.segments().rows()
    layer.flush()
with WritableLayer(d, i, readonly=True) as again:
    print(*seen, rows == again.segments().rows())
"""


def test_a_catch_up_that_fails_for_memory_loses_no_record(tmp_path: Path) -> None:
    """The index failing to take what waits (MemoryError, under the address-space limit, in a child process):
    the next lookup maps every record after all, as the index file replayed does."""
    out = subprocess.run([sys.executable, "-c", _CATCH_UP_UNDER_A_MEMORY_LIMIT, str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout
    assert out.split() == ["True", "True", "True"]
