"""A writable layer whose index file holds all the records it may refuses further writes on every path that writes
to it: the /dev/fuse export (in C where built, else in Python) answers ENOSPC, the NBD server answers NBD ENOSPC;
what was written before reads back, and the layer opens again."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from overlaybd.export import fusedev as F
from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd.server import Export, NbdServer
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.formats.lsmt.writable import WritableLayer, create_writable
from tests.nbd_client import Client
from tests.unit.nbd_thread import listening
from tests.unit.test_fusedev import Kernel, _rw

SIZE = 4 << 20


@contextmanager
def _full_soon(tmp_path: Path, records: int) -> Iterator[LsmtStack]:
    """A stack over an empty writable layer whose index file may hold ``records`` records."""
    d, i = str(tmp_path / "u.data"), str(tmp_path / "u.index")
    create_writable(d, i, SIZE)
    upper = WritableLayer(d, i, max_records=records)
    try:
        yield LsmtStack([], upper)
    finally:
        upper.close()


def _data_end(stack: LsmtStack) -> int:
    """Where the upper's next data would go (a refused write must not move it)."""
    assert isinstance(stack.upper, WritableLayer)
    return int(stack.upper.appender.data_end)


def test_the_fuse_export_answers_enospc_once_the_index_is_full(tmp_path: Path) -> None:
    with _full_soon(tmp_path, 2) as stack:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.settimeout(30)
        device = F.DiskDevice(ours.fileno(), stack, readonly=False, threads=2)
        runner = threading.Thread(target=device.serve)
        runner.start()
        try:
            k = Kernel(theirs)
            for n in range(2):
                assert k.ask(F.WRITE, _rw(n * 4096, 4096) + bytes([n + 1]) * 4096)[0] == 0
            size, data_end = os.path.getsize(tmp_path / "u.data"), _data_end(stack)
            err, _ = k.ask(F.WRITE, _rw(8192, 4096) + b"\x03" * 4096)
            assert err == errno.ENOSPC
            if F._fusedev is not None:
                assert device.served_natively == 2  # the refused one went to Python, which answered the error
            for n in range(3):  # neither it nor later ones take space in the data file
                assert k.ask(F.WRITE, _rw(16384 + n * 4096, 4096) + b"\x04" * 4096)[0] == errno.ENOSPC
            assert (os.path.getsize(tmp_path / "u.data"), _data_end(stack)) == (size, data_end)
            err, body = k.ask(F.READ, _rw(0, 12288))
            assert err == 0 and body == b"\x01" * 4096 + b"\x02" * 4096 + bytes(4096)
        finally:
            theirs.close()
            runner.join(10)
            ours.close()
        assert not runner.is_alive()
    again = WritableLayer(str(tmp_path / "u.data"), str(tmp_path / "u.index"), readonly=True)
    try:
        assert again.pread(0, 8192) == b"\x01" * 4096 + b"\x02" * 4096
    finally:
        again.close()


def test_the_nbd_server_answers_enospc_once_the_index_is_full(tmp_path: Path) -> None:
    with _full_soon(tmp_path, 1) as stack:
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([Export("", stack)], workers=2), path):
            c = Client(path)
            c.go("", size=SIZE)
            c.request(nbd.CMD_WRITE, 1, 0, 4096, payload=b"\x01" * 4096)
            assert c.simple() == (1, 0, b"")
            size, data_end = os.path.getsize(tmp_path / "u.data"), _data_end(stack)
            c.request(nbd.CMD_WRITE, 2, 4096, 4096, payload=b"\x02" * 4096)
            assert c.simple() == (2, nbd.ENOSPC, b"")
            for n in range(3):  # neither it nor later ones take space in the data file
                c.request(nbd.CMD_WRITE, 10 + n, 8192 + n * 4096, 4096, payload=b"\x04" * 4096)
            for n in range(3):
                assert c.simple() == (10 + n, nbd.ENOSPC, b"")
            assert (os.path.getsize(tmp_path / "u.data"), _data_end(stack)) == (size, data_end)
            c.request(nbd.CMD_READ, 3, 0, 8192)
            assert c.simple(8192) == (3, 0, b"\x01" * 4096 + bytes(4096))
            c.close()
