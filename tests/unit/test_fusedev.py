"""The /dev/fuse export's requests and replies, spoken over a SOCK_SEQPACKET pair (one message a request or reply,
as /dev/fuse reads and writes them) by its own serving loop and threads."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from overlaybd.export import fusedev as F
from overlaybd.source.file import MemorySource


class Kernel:
    """The kernel's side: numbered requests out, replies back by number."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unique = 0

    def ask(self, opcode: int, body: bytes = b"", nodeid: int = F.DISK_ID, reply: bool = True
            ) -> tuple[int, bytes]:
        self.unique += 1
        self.sock.send(F.IN_HEADER.pack(F.IN_HEADER.size + len(body), opcode, self.unique, nodeid, 0, 0, 0, 0, 0)
                       + body)
        if not reply:
            return 0, b""
        data = self.sock.recv(F.MAX_REQUEST + 4096)
        length, error, unique = F.OUT_HEADER.unpack_from(data)
        assert unique == self.unique and length == len(data)
        return -error, data[F.OUT_HEADER.size:]


@contextmanager
def serving(data: bytes | bytearray, *, readonly: bool = False, threads: int = 2) -> Iterator[tuple[Kernel,
                                                                                                      MemorySource]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    source = MemorySource(data)
    device = F.DiskDevice(ours.fileno(), source, readonly=readonly, threads=threads)
    runner = threading.Thread(target=device.serve)
    runner.start()
    try:
        yield Kernel(kernel), source
    finally:
        kernel.close()  # every thread then reads the end of the socket and returns
        runner.join(10)
        ours.close()
    assert not runner.is_alive()


def _rw(offset: int, size: int) -> bytes:
    return F.RW_IN.pack(0, offset, size, 0) + bytes(16)


def test_init_asks_for_large_and_asynchronous_requests() -> None:
    with serving(bytearray(4096)) as (k, _):
        err, body = k.ask(F.INIT, F.INIT_IN.pack(7, 40, 131072, F.WANTED | 1 << 30) + bytes(44), nodeid=0)
        assert err == 0
        major, minor, _, flags, background, _, max_write, _, max_pages, *_ = F.INIT_OUT.unpack(body)
        assert (major, minor) == (7, F.MINOR) and flags == F.WANTED  # nothing it was not offered, nor unknown
        assert background == F.BACKGROUND and max_write == F.MAX_REQUEST and max_pages * 4096 == F.MAX_REQUEST
        assert k.ask(F.INIT, F.INIT_IN.pack(8, 0, 0, 0), nodeid=0)[0] == errno.EPROTO


def test_one_file_named_disk_in_the_root() -> None:
    with serving(bytes(10_000)) as (k, _):
        err, body = k.ask(F.LOOKUP, b"disk\0", nodeid=F.ROOT_ID)
        assert err == 0
        nodeid = struct.unpack_from("<Q", body)[0]
        ino, size, blocks = struct.unpack_from("<QQQ", body, F.ENTRY_OUT.size)
        assert nodeid == ino == F.DISK_ID and size == 10_000 and blocks == 20
        assert k.ask(F.LOOKUP, b"other\0", nodeid=F.ROOT_ID)[0] == errno.ENOENT
        err, body = k.ask(F.GETATTR, bytes(16), nodeid=F.ROOT_ID)
        mode = struct.unpack_from("<I", body, F.ATTR_OUT.size + 48 + 12)[0]
        assert err == 0 and stat.S_ISDIR(mode)
        err, body = k.ask(F.GETATTR, bytes(16))
        mode = struct.unpack_from("<I", body, F.ATTR_OUT.size + 48 + 12)[0]
        assert err == 0 and stat.S_ISREG(mode) and mode & 0o777 == 0o444  # read-only bytes
        err, listing = k.ask(F.READDIR, _rw(0, 4096), nodeid=F.ROOT_ID)
        names = []
        while listing:
            _, _, namelen, _ = F.DIRENT.unpack_from(listing)
            names.append(listing[F.DIRENT.size:F.DIRENT.size + namelen])
            listing = listing[F.DIRENT.size + namelen + (-(F.DIRENT.size + namelen) % 8):]
        assert err == 0 and names == [b".", b"..", b"disk"]
        assert k.ask(F.SETATTR, struct.pack("<IIQQ", F.FATTR_SIZE, 0, 0, 5) + bytes(64))[0] == errno.EPERM


def test_reads_writes_fsync_and_discards_pass_through() -> None:
    data = bytearray(os.urandom(1 << 20))
    with serving(data) as (k, source):
        err, body = k.ask(F.OPEN, struct.pack("<II", os.O_RDWR, 0))
        fh, open_flags, _ = F.OPEN_OUT.unpack(body)
        assert err == 0 and open_flags & F.FOPEN_DIRECT_IO and open_flags & F.FOPEN_PARALLEL_DIRECT_WRITES
        assert k.ask(F.READ, _rw(12345, 65536)) == (0, bytes(data[12345:12345 + 65536]))
        assert k.ask(F.READ, _rw(len(data) - 10, 4096)) == (0, bytes(data[-10:]))  # short at the end
        err, body = k.ask(F.WRITE, _rw(8192, 5) + b"hello")
        assert err == 0 and F.WRITE_OUT.unpack(body)[0] == 5 and source.pread(8192, 5) == b"hello"
        assert k.ask(F.WRITE, _rw(len(data) - 2, 4) + b"abcd")[0] == errno.ENOSPC
        assert k.ask(F.FSYNC, bytes(16)) == (0, b"")
        assert k.ask(F.FALLOCATE, F.FALLOCATE_IN.pack(0, 4096, 8192, F.PUNCH_HOLE | 1) + bytes(4)) == (0, b"")
        assert source.pread(4096, 8192) == bytes(8192)
        assert k.ask(F.FALLOCATE, F.FALLOCATE_IN.pack(0, 0, 4096, 0x40) + bytes(4))[0] == errno.EOPNOTSUPP
        assert k.ask(F.RELEASE, bytes(24)) == (0, b"")
        k.ask(F.FORGET, bytes(8), reply=False)  # no reply; the next request is answered as usual
        assert k.ask(99)[0] == errno.ENOSYS


def test_a_read_only_export_refuses_writes() -> None:
    with serving(bytearray(8192), readonly=True) as (k, _):
        assert k.ask(F.OPEN, struct.pack("<II", os.O_WRONLY, 0))[0] == errno.EROFS
        assert k.ask(F.OPEN, struct.pack("<II", os.O_RDONLY, 0))[0] == 0
        assert k.ask(F.WRITE, _rw(0, 4) + b"abcd")[0] == errno.EROFS
        assert k.ask(F.FALLOCATE, F.FALLOCATE_IN.pack(0, 0, 4096, F.PUNCH_HOLE) + bytes(4))[0] == errno.EROFS


def test_a_source_that_cannot_write_refuses_discards_and_goes_on_serving() -> None:
    with serving(bytes(4096)) as (k, _):  # bytes: a source without write capability
        assert k.ask(F.READ, _rw(0, 4096)) == (0, bytes(4096))
        assert k.ask(F.FALLOCATE, F.FALLOCATE_IN.pack(0, 0, 4096, F.PUNCH_HOLE) + bytes(4))[0] == errno.EROFS
        assert k.ask(F.READ, _rw(0, 16)) == (0, bytes(16))


def test_destroy_ends_the_thread_that_takes_it() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        device = F.DiskDevice(ours.fileno(), MemorySource(bytes(512)), readonly=True, threads=1)
        runner = threading.Thread(target=device.serve)
        runner.start()
        assert Kernel(kernel).ask(F.DESTROY, nodeid=0) == (0, b"")
        runner.join(10)
        assert not runner.is_alive()
    finally:
        ours.close()
        kernel.close()


def test_a_stop_aborts_the_connection_and_returns_once_every_thread_has() -> None:
    """A stop (the daemon's SIGINT or SIGTERM) aborts the connection (here: its socket shut down, as an abort makes
    /dev/fuse read as ended), and serve returns only after every serving thread has returned."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    aborted: list[int] = []

    def abort() -> None:
        aborted.append(1)
        ours.shutdown(socket.SHUT_RD)

    stop = F.Stop()
    try:
        device = F.DiskDevice(ours.fileno(), MemorySource(bytearray(4096)), readonly=False, threads=3, abort=abort)
        runner = threading.Thread(target=device.serve, args=(stop,))
        runner.start()
        k = Kernel(kernel)
        assert k.ask(F.WRITE, _rw(0, 512) + b"\x01" * 512)[0] == 0
        stop.request("test")
        runner.join(10)
        assert not runner.is_alive() and aborted == [1]
        assert not any(t.name.startswith("fuse") for t in threading.enumerate())
        assert stop.reason == "test"
    finally:
        stop.close()
        ours.close()
        kernel.close()
