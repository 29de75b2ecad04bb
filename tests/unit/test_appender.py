"""The appender of a log-structured writable layer (space in the data file, records in the index file, kept until the
index takes them), in C where built and in Python: the same behaviour from both, and a layer that maps what others
appended through it (as the C /dev/fuse writer does) before every lookup."""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from overlaybd.errors import IndexFullError, LayerIOError, errno_of
from overlaybd.formats.lsmt import appender as A
from overlaybd.formats.lsmt import writable
from overlaybd.formats.lsmt.index import MutableIndex, Segments
from overlaybd.formats.lsmt.spec import SECTOR, WRITE_SPLIT_SECTORS
from overlaybd.formats.lsmt.writable import WritableLayer
from overlaybd.volume import Volume
from tests.native import require_extension

Maker = Callable[[int, int, int, int, int, int], A.Appender]
RECORD = struct.Struct("<QQ")


def _c(*args: int) -> A.Appender:
    require_extension(A._appender, A.APPENDER)
    made: A.Appender = A._appender.Appender(*args)
    return made


KINDS: dict[str, Maker] = {"c": _c, "python": A.PyAppender}


def _record(offset: int, length: int, moffset: int) -> bytes:
    return RECORD.pack(offset | length << 50, moffset)


@pytest.fixture(params=sorted(KINDS))
def make(request: pytest.FixtureRequest) -> Maker:
    maker: Maker = KINDS[request.param]
    return maker


def _files(tmp_path: Path) -> tuple[int, int]:
    data = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT)
    index = os.open(tmp_path / "index", os.O_RDWR | os.O_CREAT)
    return data, index


def test_space_records_and_taking_them(tmp_path: Path, make: Maker) -> None:
    data, index = _files(tmp_path)
    app = make(data, 4096, 1 << 20, index, 4096, 4096)
    assert (app.reserve(8192), app.reserve(512), app.data_end) == (4096, 12288, 12800)
    assert app.data_ahead >= 12800  # allocated ahead, the size unchanged
    assert os.fstat(data).st_size == 0
    first, second = _record(0, 16, 8), _record(100, 1, 24)
    assert app.append(first, 12288) == 1
    assert app.append(second + first, 12800) == 3
    assert (app.pending, app.index_end, app.data_high) == (3, 4096 + 48, 12800)
    assert os.pread(index, 48, 4096) == first + second + first
    assert app.take() == first + second + first
    assert (app.pending, app.take()) == (0, b"")
    app.append(second, 0)
    assert app.take() == second and app.data_high == 12800  # the highest end stays
    app.sync(str(tmp_path / "data"), str(tmp_path / "index"))
    with pytest.raises(ValueError):
        app.append(b"x" * 15, 0)
    app.detach()
    for call in (lambda: app.reserve(512), lambda: app.append(first, 0),
                 lambda: app.sync("d", "i")):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EBADF
    os.close(data)
    os.close(index)


def test_a_failed_append_appends_nothing(tmp_path: Path, make: Maker) -> None:
    data, index = _files(tmp_path)
    readonly = os.open(tmp_path / "index", os.O_RDONLY)
    app = make(data, 4096, 4096, readonly, 4096, 4096)
    with pytest.raises(OSError) as exc:
        app.append(_record(0, 1, 8), 4608)
    assert exc.value.errno == errno.EBADF
    assert (app.index_end, app.pending, app.take()) == (4096, 0, b"")
    for fd in (data, index, readonly):
        os.close(fd)


def test_a_failed_sync_names_the_file(tmp_path: Path, make: Maker) -> None:
    r, w = os.pipe()  # fdatasync of a pipe fails (EINVAL)
    data, index = _files(tmp_path)
    app = make(r, 0, 4096, index, 4096, 4096)
    with pytest.raises(OSError) as exc:
        app.sync("the-data", "the-index")
    assert exc.value.filename == "the-data"
    app = make(data, 0, 4096, w, 4096, 4096)
    with pytest.raises(OSError) as exc:
        app.sync("the-data", "the-index")
    assert exc.value.filename == "the-index"
    for fd in (r, w, data, index):
        os.close(fd)


def test_threads_at_once_keep_every_record_in_the_order_taken(tmp_path: Path, make: Maker) -> None:
    data, index = _files(tmp_path)
    app = make(data, 0, 1 << 16, index, 0, 1 << 10)

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(500):
            size = rng.choice((512, 4096))
            at = app.reserve(size)
            os.pwrite(data, bytes([seed]) * size, at)
            app.append(_record(seed, size // SECTOR, at // SECTOR), at + size)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = app.take()
    assert len(taken) == 2000 * 16 and os.pread(index, len(taken), 0) == taken
    spans = []
    for w0, w1 in RECORD.iter_unpack(taken):  # each record's data is its writer's, and no two overlap
        seed, length, at = w0 & 0xFF, w0 >> 50, w1 * SECTOR
        assert os.pread(data, length * SECTOR, at) == bytes([seed]) * (length * SECTOR)
        spans.append((at, at + length * SECTOR))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] == app.data_end == app.data_high
    os.close(data)
    os.close(index)


def test_apply_is_one_insert_after_another() -> None:
    rng = random.Random(3)
    for n in (10, 64, 65, 3000):
        base = MutableIndex()
        for _ in range(200):
            base.insert(rng.randrange(0, 5000), rng.randrange(1, 64), rng.randrange(8, 10**6), rng.random() < 0.1)
        rows = [(rng.randrange(0, 5000), rng.randrange(1, 64), rng.randrange(8, 10**6), rng.random() < 0.1, 0)
                for _ in range(n)]
        one_by_one = MutableIndex.from_segments(base.segments())
        for row in rows:
            one_by_one.insert(*row)
        batched = MutableIndex.from_segments(base.segments())
        o, ln, m, z, t = (list(c) for c in zip(*rows, strict=True))
        batched.apply(Segments.build(np.array(o), ln, m, z, t))
        assert batched.segments().rows() == one_by_one.segments().rows(), n


@pytest.mark.parametrize("count", [3, 2000])
def test_a_layer_maps_what_was_appended_through_it_before_its_next_lookup(tmp_path: Path, count: int) -> None:
    """What the C writer does, done here by hand: space, data, record, with no call into the layer; the layer's
    reads, its segments and the volume reopened all see the writes, the later one winning where they meet."""
    size = 8 << 20
    vol = Volume.create(str(tmp_path / "vol"), size)
    model = bytearray(size)
    rng = random.Random(count)
    with vol.open(writable=True) as dev:
        upper = dev.upper
        assert isinstance(upper, WritableLayer)
        app = upper.appender
        for _ in range(count):
            off = rng.randrange(0, size // 4096 - 4) * 4096
            data = rng.randbytes(rng.choice((4096, 8192)))
            at = app.reserve(len(data))
            os.pwrite(upper.data.fd, data, at)
            app.append(_record(off // SECTOR, len(data) // SECTOR, at // SECTOR), at + len(data))
            model[off:off + len(data)] = data
        assert app.pending == count
        assert dev.pread(0, size) == bytes(model)
        assert app.pending == 0
        dev.pwrite(4096, b"z" * 4096)  # a write through the layer lands after them
        model[4096:8192] = b"z" * 4096
        dev.flush()
        assert dev.pread(0, size) == bytes(model)
    with vol.open() as dev:
        assert dev.pread(0, size) == bytes(model)


def test_a_write_through_a_closed_appender_fails_with_the_file_named(tmp_path: Path) -> None:
    vol = Volume.create(str(tmp_path / "vol"), 1 << 20)
    with vol.open(writable=True) as dev:
        upper = dev.upper
        assert isinstance(upper, WritableLayer)
        upper.appender.detach()
        with pytest.raises(LayerIOError) as exc:
            dev.pwrite(0, bytes(4096))
        assert exc.value.path == upper.data.name
        with pytest.raises(LayerIOError) as exc:
            dev.flush()
        assert exc.value.path == upper.data.name


def test_writes_wait_for_the_next_lookup_or_until_many_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write appends its record only; the index maps it at its next lookup, or once CATCH_UP_AT records wait."""
    monkeypatch.setattr(writable, "CATCH_UP_AT", 8)
    vol = Volume.create(str(tmp_path / "vol"), 1 << 20)
    with vol.open(writable=True) as dev:
        upper = dev.upper
        assert isinstance(upper, WritableLayer)
        for k in range(7):
            dev.pwrite(k * 4096, bytes([k + 1]) * 4096)
        assert upper.appender.pending == 7 and len(upper.index) == 0
        assert dev.pread(4096, 4096) == b"\x02" * 4096  # the lookup maps them first
        assert upper.appender.pending == 0 and len(upper.index) == 7
        for k in range(8):
            dev.pwrite(k * 4096, bytes([k + 9]) * 4096)
        assert upper.appender.pending == 0 and len(upper.index) == 8  # the eighth write mapped them all
        assert upper.records() == 8


def test_a_short_append_is_cut_back_from_the_index_file(tmp_path: Path, make: Maker) -> None:
    """Records a failed append wrote in part (the file-size limit stops it after one) are cut off the file: a
    shorter next append would otherwise leave them behind, to be replayed on open after it."""
    data, index = _files(tmp_path)
    app = make(data, 4096, 4096, index, 4096, 4096)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096 + 16, hard))
    try:
        with pytest.raises(OSError) as exc:
            app.append(_record(0, 1, 8) + _record(1, 1, 9), 5120)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert exc.value.errno == errno.EFBIG
    assert (app.index_end, app.pending, os.fstat(index).st_size) == (4096, 0, 4096)
    assert app.append(_record(2, 1, 10), 5120) == 1
    assert os.fstat(index).st_size == 4096 + 16
    for fd in (data, index):
        os.close(fd)


def test_an_append_that_cannot_be_cut_back_breaks_the_appender(tmp_path: Path, make: Maker) -> None:
    r, w = os.pipe()  # pwrite fails (ESPIPE), and so does ftruncate: later appends fail rather than risk it
    data, _ = _files(tmp_path)
    app = make(data, 4096, 4096, w, 4096, 4096)
    with pytest.raises(OSError) as exc:
        app.append(_record(0, 1, 8), 4608)
    assert exc.value.errno == errno.ESPIPE
    with pytest.raises(OSError) as exc:
        app.append(_record(0, 1, 8), 4608)
    assert exc.value.errno == errno.EIO
    for fd in (r, w, data):
        os.close(fd)


_TAKE_UNDER_A_MEMORY_LIMIT = """
import os, resource, sys
from overlaybd.formats.lsmt import appender as A
make = A._appender.Appender if sys.argv[1] == "c" else A.PyAppender
data = os.open(sys.argv[2] + "/data", os.O_RDWR | os.O_CREAT)
index = os.open(sys.argv[2] + "/index", os.O_RDWR | os.O_CREAT)
app = make(data, 0, 4096, index, 0, 4096)
recs = (b"\\x01" * 8 + bytes(8)) * (4 << 20)  # 64 MiB of records, in two appends
app.append(recs[:len(recs) // 2], 0)
app.append(recs[len(recs) // 2:], 0)
vm = int([ln for ln in open("/proc/self/status") if ln.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), resource.RLIM_INFINITY))
try:
    app.take()
    sys.exit("take() found the memory for 64 MiB under a 16 MiB limit")
except MemoryError:
    pass
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(app.pending, app.take() == recs)
"""


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_take_that_fails_for_memory_loses_no_record(tmp_path: Path, kind: str) -> None:
    """take() raising MemoryError (the address-space limit, in a child process) leaves every record pending: the
    next take() returns them all (else the index would never map writes the index file holds)."""
    if kind == "c":
        require_extension(A._appender, A.APPENDER)
    out = subprocess.run([sys.executable, "-c", _TAKE_UNDER_A_MEMORY_LIMIT, kind, str(tmp_path)], check=True,
                         capture_output=True, text=True).stdout
    assert out.split() == [str(4 << 20), "True"]


def test_an_appender_never_initialised_has_no_files() -> None:
    """``Appender.__new__`` without ``__init__`` (as a careless caller, or set_writer, may get one): every call
    fails with EBADF, none writes to descriptor 0."""
    require_extension(A._appender, A.APPENDER)
    kind: Any = A._appender.Appender
    app: A.Appender = kind.__new__(kind)
    for call in (lambda: app.reserve(512), lambda: app.write(b"x" * 512, 4096),
                 lambda: app.append(_record(0, 1, 8), 4608), lambda: app.sync("d", "i")):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EBADF
    assert (app.take(), app.pending) == (b"", 0)
    app.detach()


def test_data_goes_through_the_appender_until_it_is_detached(tmp_path: Path, make: Maker) -> None:
    """The appender writes the data too: once detached (the layer closes its files next), a write fails with
    EBADF and reaches no descriptor, even one the process reuses for another file."""
    data, index = _files(tmp_path)
    app = make(data, 4096, 4096, index, 4096, 4096)
    at = app.reserve(1024)
    app.write(b"\x5a" * 1024, at)
    assert os.pread(data, 1024, at) == b"\x5a" * 1024
    app.detach()
    os.close(data)
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)  # most likely the data file's number, reused
    with pytest.raises(OSError) as exc:
        app.write(b"\xa5" * 1024, at)
    assert exc.value.errno == errno.EBADF
    assert os.fstat(other).st_size == 0
    for fd in (index, other):
        os.close(fd)


def test_an_append_past_the_index_limit_fails_with_enospc_and_changes_nothing(tmp_path: Path, make: Maker) -> None:
    data, index = _files(tmp_path)
    limit = 4096 + 3 * 16
    app = A.open_appender(data, 4096, 4096, index, 4096, 4096, limit) if make is _c else \
        A.PyAppender(data, 4096, 4096, index, 4096, 4096, limit)
    assert app.append(_record(0, 1, 8) * 2, 4608) == 2
    with pytest.raises(OSError) as exc:
        app.append(_record(1, 1, 9) * 2, 4608)
    assert exc.value.errno == errno.ENOSPC
    assert (app.index_end, app.pending) == (4096 + 32, 2)
    assert app.append(_record(2, 1, 10), 4608) == 3  # the last one that fits
    assert app.index_end == limit
    for fd in (data, index):
        os.close(fd)


def test_a_full_index_refuses_writes_with_a_typed_error_and_stays_readable(tmp_path: Path) -> None:
    """Writes that would take the index file past its records refused (IndexFullError: ENOSPC to FUSE and NBD
    clients) before any data is written; the layer reads what it held, and opens again."""
    d, i = str(tmp_path / "u.data"), str(tmp_path / "u.index")
    writable.create_writable(d, i, 16 << 20)
    layer = WritableLayer(d, i, max_records=3)
    try:
        layer.pwrite(0, b"\x01" * 4096)
        layer.pwrite(8192, b"\x02" * 4096)
        size = os.path.getsize(d)
        with pytest.raises(IndexFullError) as exc:
            layer.pwrite(16384, b"\x03" * (4096 + WRITE_SPLIT_SECTORS * SECTOR))  # two records
        assert errno_of(exc.value) == errno.ENOSPC
        assert os.path.getsize(d) == size  # no data written for it
        layer.write_zeroes(65536, 4096)  # one record: the last that fits
        with pytest.raises(IndexFullError):
            layer.trim(0, 512)
        layer.flush()
        assert layer.pread(0, 12288) == b"\x01" * 4096 + bytes(4096) + b"\x02" * 4096
    finally:
        layer.close()
    again = WritableLayer(d, i, readonly=True)
    try:
        assert again.records() == 3 and again.pread(8192, 4096) == b"\x02" * 4096
    finally:
        again.close()
