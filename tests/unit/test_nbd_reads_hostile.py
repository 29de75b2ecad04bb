"""Plain NBD reads in C (``export.nbd.reads``) under a careless or hostile caller, client or operator."""

from __future__ import annotations

import os
import struct
import threading
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd import reads as R
from overlaybd.export.nbd.server import NbdServer
from overlaybd.export.served import ServedVolume
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.volume import Volume
from tests.native import require_extension
from tests.nbd_client import Client
from tests.unit.nbd_thread import listening

KiB = 1024
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _c_reader() -> None:
    require_extension(R._nbdread, R.NBDREAD)


def req(cmd: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


def filled(tmp_path: Path, size: int, name: str = "vol") -> tuple[Volume, bytes]:
    """A volume of ``size`` bytes of one snapshot, every byte written (a pattern that differs at every sector)."""
    vol = Volume.create(str(tmp_path / name), size)
    image = b"".join(struct.pack(">Q", k) * 64 for k in range(size // 512))
    with vol.open(writable=True) as dev:
        dev.pwrite(0, image)
    vol.snapshot("all")
    return vol, image


def chunks(replies: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The structured replies of serve(): (handle, offset, data) of each OFFSET_DATA chunk, all of them DONE."""
    at = 0
    while at < len(replies):
        magic, flags, kind, handle, length = struct.unpack_from(">IHHQI", replies, at)
        assert (magic, flags, kind) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_OFFSET_DATA)
        offset = int.from_bytes(replies[at + 20 : at + 28], "big")
        yield handle, offset, replies[at + 28 : at + 20 + length]
        at += 20 + length
    assert at == len(replies)


def test_requests_rewritten_while_the_reads_run_never_overrun_the_replies(tmp_path: Path) -> None:
    """serve() sizes the replies of the requests it takes, then reads their data without the GIL, parsing the
    requests again: a buffer that another thread rewrites meanwhile (a bytearray) must not make it write past the
    replies (it did: a heap overflow, the interpreter aborted). Whatever it serves is what the replies say."""
    vol, image = filled(tmp_path, 24 * MiB)
    first = req(nbd.CMD_READ, 1, 0, 16 * MiB)
    small = first + b"".join(req(nbd.CMD_READ, h, h * 4096, 512) for h in range(2, 40))
    grown = first + b"".join(req(nbd.CMD_READ, h, h * 4096, 8 * MiB) for h in range(2, 40))
    data = bytearray(small)
    go, done, stop = threading.Event(), threading.Event(), threading.Event()

    def rewrite() -> None:  # once a round, as soon as it gets the GIL (serve() lets it go to read)
        while go.wait() and not stop.is_set():
            go.clear()
            data[:] = grown
            done.set()

    t = threading.Thread(target=rewrite)
    t.start()
    try:
        with vol.open() as dev:
            reads = R.reads_for(dev)
            assert reads is not None
            for _ in range(20):
                data[:] = small
                go.set()
                pos, replies, count = reads.reader.serve(data, 0, True, 32 * MiB, 1 << 30)  # any buffer
                assert done.wait(10)
                done.clear()
                served = list(chunks(replies))
                assert (pos, count) == (count * nbd.REQUEST.size, len(served)) and count >= 1
                for k, (handle, offset, got) in enumerate(served):
                    assert handle == k + 1 and got == image[offset : offset + len(got)]
    finally:
        stop.set()
        go.set()
        t.join(10)


def test_a_source_closed_in_place_is_not_read_through_stale_descriptors(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot of a served volume closes the source, snapshots, reopens it; when the reopen fails, the export
    keeps the closed source, whose reads fail (EIO). The C reads made for it must fail too: they read through
    the descriptors it had, which the process hands out again to the next files it opens (here a file of 0xEE:
    its bytes came back as the volume's)."""
    vol, image = filled(tmp_path, 4 * MiB)
    filler = tmp_path / "filler"
    filler.write_bytes(b"\xee" * (8 * MiB))
    served = ServedVolume(vol)
    held: list[int] = []
    try:
        path = str(tmp_path / "s.sock")
        with listening(NbdServer(served.exports, workers=2), path):
            c = Client(path)
            c.go("")
            c.request(nbd.CMD_READ, 1, 8192, 4096)
            assert c.simple(4096) == (1, 0, image[8192:12288])
            reads = served.main.reads()
            assert reads is not None and reads.reader.served == 1

            def cannot_open(**kwargs: object) -> LsmtStack:
                raise OSError(24, "Too many open files")

            with monkeypatch.context() as m:
                m.setattr(vol, "open", cannot_open)
                with pytest.raises(OSError):
                    served._snapshot_now("s", None)  # as the server runs it between requests
            held += [os.open(filler, os.O_RDONLY) for _ in range(64)]  # the lowest numbers free: the closed ones
            c.request(nbd.CMD_READ, 2, 8192, 4096)
            assert c.simple(4096)[:2] == (2, nbd.EIO)  # it was (2, 0) and the filler's 0xEE bytes
            assert reads.reader.served == 1
            c.close()
    finally:
        for fd in held:
            os.close(fd)
        served._owned.close()  # not close(): it would flush the closed source


def test_a_negative_size_is_refused(tmp_path: Path) -> None:
    vol, _ = filled(tmp_path, 1 * MiB)
    with vol.open() as dev:
        plan = dev.direct_plan()
        assert plan is not None
        _, index, fds = plan
        with pytest.raises(ValueError):
            R._nbdread.Reader(index.handle, fds, -1)  # it was taken as 2**64 - 1: reads past the end were served
        reader = R._nbdread.Reader(index.handle, array("i", list(fds)), dev.size)
        assert reader.serve(req(nbd.CMD_READ, 1, 1 << 30, 4096), 0, False, MiB, MiB) == (0, b"", 0)
