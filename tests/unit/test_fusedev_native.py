"""The /dev/fuse export over a real volume (a sealed snapshot below a writable upper), spoken over a SOCK_SEQPACKET
pair: the same answers whether the C extension ``_fusedev`` serves the reads and writes it can (checked to have
served them) or Python serves everything (``OVERLAYBD_NATIVE=0``, or counting requests)."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from overlaybd.export import fusedev as F
from overlaybd.formats.lsmt import appender
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.formats.lsmt.writable import WritableLayer
from overlaybd.metrics import Recorder
from overlaybd.source.file import FileSource
from overlaybd.volume import Volume
from tests.native import require_extension
from tests.unit.test_fusedev import Kernel, _rw

SIZE = 4 << 20


def _volume(path: Path) -> tuple[Volume, bytearray]:
    """A volume: random data, a zero-write and holes in one sealed snapshot, then a few writes in the upper. Also
    the bytes it holds."""
    rng = random.Random(7)
    model = bytearray(SIZE)
    vol = Volume.create(str(path), SIZE)
    with vol.open(writable=True) as dev:
        for _ in range(40):
            off = rng.randrange(0, SIZE // 512 - 300) * 512
            data = rng.randbytes(rng.randrange(1, 300) * 512)
            dev.pwrite(off, data)
            model[off:off + len(data)] = data
        dev.write_zeroes(65536, 131072)
        model[65536:65536 + 131072] = bytes(131072)
    vol.snapshot("base")
    with vol.open(writable=True) as dev:
        for off in (0, 1 << 20, 3 << 20):
            data = rng.randbytes(8192)
            dev.pwrite(off + 512, data)
            model[off + 512:off + 512 + len(data)] = data
    return vol, model


@contextmanager
def serving(dev: LsmtStack, *, readonly: bool = False, metrics: Recorder | None = None
            ) -> Iterator[tuple[Kernel, F.DiskDevice]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.settimeout(30)  # a reply that never comes fails the test
    device = F.DiskDevice(ours.fileno(), dev, readonly=readonly, threads=3, metrics=metrics)
    runner = threading.Thread(target=device.serve)
    runner.start()
    try:
        yield Kernel(kernel), device
    finally:
        kernel.close()
        runner.join(10)
        ours.close()
    assert not runner.is_alive()


def _write(offset: int, data: bytes) -> bytes:
    return _rw(offset, len(data)) + data


def _reads(rng: random.Random, k: Kernel, model: bytearray, count: int) -> None:
    for _ in range(count):
        size = rng.choice((512, 4096, 20_000, 65536))  # a socket's message holds ~200 KiB
        off = rng.randrange(0, SIZE - 512) // 512 * 512 if rng.random() < 0.8 else rng.randrange(0, SIZE)
        err, body = k.ask(F.READ, _rw(off, size))
        assert err == 0 and body == bytes(model[off:off + size]), (off, size)


def _native_loaded() -> bool:
    return F._fusedev is not None


def test_reads_and_writes_match_the_volume_and_survive_reopening(tmp_path: Path) -> None:
    vol, model = _volume(tmp_path / "vol")
    rng = random.Random(1)
    with vol.open(writable=True) as dev, serving(dev) as (k, device):
        _reads(rng, k, model, 200)
        assert k.ask(F.READ, _rw(SIZE, 4096)) == (0, b"")  # at the end: nothing
        for _ in range(200):  # whole sectors (C where built), odd ones (Python), and reads of what they wrote
            if rng.random() < 0.7:
                off, data = rng.randrange(0, SIZE // 512 - 16) * 512, rng.randbytes(rng.choice((512, 4096, 8192)))
            else:
                off, data = rng.randrange(0, SIZE - 5000), rng.randbytes(rng.randrange(1, 5000))
            err, body = k.ask(F.WRITE, _write(off, data))
            assert err == 0 and F.WRITE_OUT.unpack(body)[0] == len(data)
            model[off:off + len(data)] = data
            err, body = k.ask(F.READ, _rw(off - off % 4096, 16384))
            assert err == 0 and body == bytes(model[off - off % 4096:off - off % 4096 + 16384])
        assert k.ask(F.FALLOCATE, F.FALLOCATE_IN.pack(0, 8192, 16384, F.PUNCH_HOLE | 1) + bytes(4)) == (0, b"")
        model[8192:8192 + 16384] = bytes(16384)
        assert k.ask(F.WRITE, _write(SIZE - 512, bytes(1024)))[0] == errno.ENOSPC  # past the end: Python says so
        assert k.ask(F.FSYNC, bytes(16)) == (0, b"")
        _reads(rng, k, model, 200)
        if _native_loaded():
            assert device.served_natively > 200
        else:
            assert device.served_natively == 0
    with vol.open() as dev:  # the log the C writes took part in replays to the same bytes
        assert dev.pread(0, SIZE) == bytes(model)


def test_the_c_side_is_in_use_where_built(tmp_path: Path) -> None:
    require_extension(F._fusedev, F.FUSEDEV)
    vol, model = _volume(tmp_path / "vol")
    with vol.open() as dev, serving(dev, readonly=True) as (k, device):
        # a read of the snapshot alone is served in C; one meeting the upper's writes goes to Python
        assert k.ask(F.READ, _rw(2 << 20, 4096)) == (0, bytes(model[2 << 20:(2 << 20) + 4096]))
        assert device.served_natively == 1
        assert k.ask(F.READ, _rw(1 << 20, 4096)) == (0, bytes(model[1 << 20:(1 << 20) + 4096]))
        assert device.served_natively == 1
        assert k.ask(F.WRITE, _write(0, bytes(512)))[0] == errno.EROFS  # read-only: writes are Python's


def test_concurrent_writes_through_c_keep_every_write(tmp_path: Path) -> None:
    """Several clients at once: the writes' data goes in in parallel, their records one at a time, and the log
    read back after a flush holds each of them."""
    vol, model = _volume(tmp_path / "vol")
    lock = threading.Lock()
    with vol.open(writable=True) as dev:
        ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        device = F.DiskDevice(ours.fileno(), dev, readonly=False, threads=4)
        runner = threading.Thread(target=device.serve)
        runner.start()
        unique = iter(range(1, 1 << 30))
        replies: dict[int, tuple[int, bytes]] = {}
        done = threading.Condition()

        def receiver() -> None:
            while True:
                data = kernel.recv(F.MAX_REQUEST + 4096)
                if not data:
                    return
                _, error, u = F.OUT_HEADER.unpack_from(data)
                with done:
                    replies[u] = (-error, data[F.OUT_HEADER.size:])
                    done.notify_all()

        recv = threading.Thread(target=receiver)
        recv.start()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(100):
                # each client writes its own sectors: the outcome does not depend on the order of the clients
                off = (rng.randrange(0, SIZE // 4096 // 4) * 4 + seed) * 4096
                data = rng.randbytes(4096)
                with lock:
                    u = next(unique)
                    body = _write(off, data)
                    kernel.send(F.IN_HEADER.pack(F.IN_HEADER.size + len(body), F.WRITE, u, F.DISK_ID, 0, 0, 0, 0, 0)
                                + body)
                with done:
                    done.wait_for(lambda u=u: u in replies, 10)  # type: ignore[misc]
                    assert replies[u][0] == 0
                    model[off:off + 4096] = data

        clients = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        with lock:
            body = bytes(16)
            flush = next(unique)
            kernel.send(F.IN_HEADER.pack(F.IN_HEADER.size + len(body), F.FSYNC, flush, F.DISK_ID, 0, 0, 0, 0,
                                         0) + body)
        with done:
            assert done.wait_for(lambda: flush in replies, 10) and replies[flush][0] == 0
        kernel.shutdown(socket.SHUT_WR)
        runner.join(10)
        ours.close()  # the receiver sees the end, then the socket it reads is closed
        recv.join(10)
        kernel.close()
        assert dev.pread(0, SIZE) == bytes(model)
    with vol.open() as dev:
        assert dev.pread(0, SIZE) == bytes(model)


def test_an_fsync_is_served_in_c_and_one_that_fails_is_answered_by_python(tmp_path: Path) -> None:
    require_extension(F._fusedev, F.FUSEDEV)
    require_extension(appender._appender, appender.APPENDER)
    vol, model = _volume(tmp_path / "vol")
    with vol.open(writable=True) as dev, serving(dev) as (k, device):
        assert k.ask(F.WRITE, _write(4096, b"a" * 4096))[0] == 0
        before = device.served_natively
        assert before == 1  # the write
        assert k.ask(F.FSYNC, bytes(16)) == (0, b"")
        assert device.served_natively == 2
        upper = dev.upper
        assert isinstance(upper, WritableLayer)
        upper.appender.detach()  # every sync and append fails from now on
        err, _ = k.ask(F.FSYNC, bytes(16))
        assert err == errno.EBADF and device.served_natively == 2  # the OS error, passed on
        err, _ = k.ask(F.WRITE, _write(8192, b"b" * 4096))
        assert err == errno.EBADF and device.served_natively == 2  # the OS error, passed on
        err, body = k.ask(F.READ, _rw(4096, 4096))
        assert err == 0 and body == b"a" * 4096
    with vol.open() as dev:  # the write flushed before is there; the failed one is not
        model[4096:8192] = b"a" * 4096
        assert dev.pread(0, SIZE) == bytes(model)


def test_counting_requests_keeps_them_in_python(tmp_path: Path) -> None:
    vol, model = _volume(tmp_path / "vol")
    with vol.open() as dev, serving(dev, readonly=True, metrics=Recorder()) as (k, device):
        assert k.ask(F.READ, _rw(2 << 20, 4096)) == (0, bytes(model[2 << 20:(2 << 20) + 4096]))
        assert device.served_natively == 0


def test_a_layer_cut_short_is_answered_by_python_with_its_error(tmp_path: Path) -> None:
    """A read the C side cannot finish (the layer file ends early) goes to Python, which answers EIO-like
    errors as it does without the extension."""
    vol, model = _volume(tmp_path / "vol")
    with vol.open() as dev:
        layer_file = dev.lowers[0].data
        assert isinstance(layer_file, FileSource)
        with serving(dev, readonly=True) as (k, _):
            os.truncate(layer_file.name, 4096 + 512)  # the data past the layer's header is gone
            err, _body = k.ask(F.READ, _rw(2 << 20, 4096))
            assert err != 0


def test_in_header_is_what_the_c_side_reads() -> None:
    """The offsets the C code reads the request at (header 40 bytes, then fuse_read_in / fuse_write_in)."""
    assert F.IN_HEADER.size == 40 and F.RW_IN.size + 16 == 40
    assert struct.calcsize("<IiQ") == F.OUT_HEADER.size == 16


@pytest.mark.parametrize("size", [SIZE - 1000, SIZE])
def test_an_odd_sized_device_reads_to_its_end(tmp_path: Path, size: int) -> None:
    vol, model = _volume(tmp_path / "vol")
    with vol.open() as dev:
        dev.size = size  # the device as a volume of this size sees it
        with serving(dev, readonly=True) as (k, _):
            off = size - 4096
            assert k.ask(F.READ, _rw(off, 8192)) == (0, bytes(model[off:size]))


def test_space_allocated_ahead_is_given_back_at_close(tmp_path: Path) -> None:
    """The writable layer allocates blocks ahead of its appends without changing its files' sizes (the size is
    where the data ends, which opening relies on), and frees them when it closes."""
    vol = Volume.create(str(tmp_path / "vol"), SIZE)
    data_path, index_path = vol.upper
    with vol.open(writable=True) as dev:
        dev.pwrite(0, os.urandom(1 << 20))
        dev.flush()
        assert os.stat(data_path).st_size == 4096 + (1 << 20) and os.stat(index_path).st_size == 4096 + 16
    for path in (data_path, index_path):
        st = os.stat(path)
        assert st.st_blocks * 512 <= st.st_size + 4096, path
    with vol.open() as dev:
        assert dev.pread(0, 1 << 20) != bytes(1 << 20)
