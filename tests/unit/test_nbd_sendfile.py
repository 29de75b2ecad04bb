"""Reads whose bytes sit in sealed layer files go from the page cache to the socket with ``sendfile``: where a
stack places a range (``file_spans``), and the NBD server sending those reads whole, also when the client is slow
to take them and the socket fills part way through a reply."""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd import reads as reads_module
from overlaybd.export.nbd.connection import SENDFILE_MIN
from overlaybd.export.nbd.server import Export, NbdServer
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.source.base import Span
from overlaybd.volume import Volume
from tests.nbd_client import Client
from tests.unit.nbd_thread import listening

KiB, MiB = 1024, 1 << 20
SIZE = 16 * MiB


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    """Two snapshots of data (the second over part of the first), written zeros, and never-written holes."""
    vol = Volume.create(str(tmp_path / "vol"), SIZE)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, pattern(6 * MiB, 1))
        dev.write_zeroes(7 * MiB, MiB)
        dev.pwrite(9 * MiB, pattern(3 * MiB, 2))
        dev.flush()
    vol.snapshot("one")
    with vol.open(writable=True) as dev:
        dev.pwrite(MiB + 12 * KiB, pattern(700 * KiB, 3))
        dev.flush()
    vol.snapshot("two")
    return vol


def read_spans(spans: list[Span]) -> bytes:
    return b"".join(os.pread(fd, n, at) if fd >= 0 else bytes(n) for fd, at, n in spans)


def test_file_spans_place_every_byte_of_a_sealed_stack(volume: Volume) -> None:
    with volume.open() as dev:
        assert isinstance(dev, LsmtStack)
        for offset, length in [(0, SIZE), (MiB, 256 * KiB), (MiB + 12 * KiB - 512, 4096), (6 * MiB - 4096, 2 * MiB),
                               (7 * MiB, MiB), (13 * MiB, 3 * MiB), (SIZE - 512, 512)]:
            spans = dev.file_spans(offset, length)
            assert spans is not None
            assert sum(n for _, _, n in spans) == length
            assert read_spans(spans) == dev.pread(offset, length), (offset, length)
        whole = dev.file_spans(0, SIZE)
        assert whole is not None and any(fd < 0 for fd, _, _ in whole) and any(fd >= 0 for fd, _, _ in whole)
        # neighbours are joined: a range of one file read in one piece, a run of zeros as one
        assert dev.file_spans(13 * MiB, 3 * MiB) == [(-1, 0, 3 * MiB)]
        for offset, length in [(1, 4096), (0, 100), (SIZE - 512, 1024), (-512, 512), (0, 0)]:
            assert dev.file_spans(offset, length) is None


def test_file_spans_leave_out_a_writable_upper(volume: Volume) -> None:
    with volume.open(writable=True) as dev:
        dev.pwrite(2 * MiB, b"\x07" * 4096)
        assert dev.file_spans(2 * MiB, 64 * KiB) is None  # its pages may change while a socket holds them
        spans = dev.file_spans(3 * MiB, 64 * KiB)  # sealed layers only
        assert spans is not None and read_spans(spans) == dev.pread(3 * MiB, 64 * KiB)


@pytest.fixture
def served(volume: Volume, tmp_path: Path) -> Iterator[tuple[str, NbdServer, LsmtStack]]:
    path = str(tmp_path / "s.sock")
    stack = volume.open()
    srv = NbdServer([Export("", stack, readonly=True, inline=True)], workers=2)
    with listening(srv, path):
        yield path, srv, stack
    stack.close()


def test_reads_of_sealed_data_take_no_read_buffer(served: tuple[str, NbdServer, LsmtStack]) -> None:
    """One read at a time, each fits the socket at once: every byte goes by sendfile (or from the zero mapping),
    none through a pooled buffer; a small read goes in C into its reply where that is built (no pooled buffer
    either), else the usual way."""
    path, srv, stack = served
    assert SENDFILE_MIN <= 128 * KiB
    c = Client(path)
    c.go("", size=SIZE)
    for h, offset in enumerate(range(0, SIZE, 128 * KiB)):
        c.request(nbd.CMD_READ, h, offset, 128 * KiB)
        assert c.simple(128 * KiB) == (h, 0, stack.pread(offset, 128 * KiB))
    assert srv.buffers.kept_bytes == 0
    c.request(nbd.CMD_READ, 9998, MiB, 4096)
    assert c.simple(4096) == (9998, 0, stack.pread(MiB, 4096))
    c.request(nbd.CMD_READ, 9999, 0, 128 * KiB)  # once this one is answered, the small read's buffer is back
    assert c.simple(128 * KiB) == (9999, 0, stack.pread(0, 128 * KiB))
    assert (srv.buffers.kept_bytes > 0) == (reads_module._nbdread is None)
    c.close()


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_reads_a_slow_client_takes_arrive_whole(served: tuple[str, NbdServer, LsmtStack],
                                                          structured: bool) -> None:
    """48 pipelined 1 MiB reads (more than the socket holds) and a client that starts taking them only later:
    replies cut by a full socket are finished from the transport, and every reply arrives whole, in order on the
    stream, with the stack's bytes."""
    path, _, stack = served
    c = Client(path, receive_buffer=64 * KiB)
    c.go("", structured=structured, size=SIZE)
    length = MiB
    wanted = {}
    for h in range(48):
        offset = (h * 5 * length + h * 4096) % (SIZE - length)
        wanted[h] = stack.pread(offset, length)
        c.request(nbd.CMD_READ, h, offset, length)
    time.sleep(0.3)  # the server fills the socket and queues the rest
    for _ in range(48):
        if structured:
            handle, kind, flags, data = c.chunk()
            assert kind == nbd.REPLY_TYPE_OFFSET_DATA and flags & nbd.REPLY_FLAG_DONE
            offset = struct.unpack(">Q", data[:8])[0]
            assert data[8:] == wanted.pop(handle) == stack.pread(offset, length)
        else:
            handle, error, data = c.simple(length)
            assert error == 0 and data == wanted.pop(handle)
    assert not wanted
    c.close()


def test_a_client_that_leaves_mid_reply_leaves_the_server_serving(served: tuple[str, NbdServer, LsmtStack]) -> None:
    """Clients that ask for 48 MiB and close their socket while replies are going out (``sendfile`` meets a
    broken pipe part way through a reply): the next client is served as before."""
    path, srv, stack = served
    for _ in range(3):
        c = Client(path, receive_buffer=64 * KiB)
        c.go("", size=SIZE)
        for h in range(48):
            c.request(nbd.CMD_READ, h, (h * MiB) % (SIZE - MiB), MiB)
        c.recv(100 * KiB)  # part of the first reply
        c.close()
    c = Client(path)
    c.go("", structured=True, size=SIZE)
    c.request(nbd.CMD_READ, 7, 5 * MiB, 256 * KiB)
    handle, kind, _, data = c.chunk()
    assert (handle, kind, data[8:]) == (7, nbd.REPLY_TYPE_OFFSET_DATA, stack.pread(5 * MiB, 256 * KiB))
    c.close()
    deadline = time.monotonic() + 10
    while srv.connections and time.monotonic() < deadline:  # the three that left are let go
        time.sleep(0.01)
    assert srv.connections == 0
