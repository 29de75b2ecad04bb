"""A single-file FUSE export of a BlockSource spoken directly on ``/dev/fuse`` (root only), for ``attach``.

``MOUNTPOINT/disk`` holds the source's bytes; ``losetup`` turns it into /dev/loopN. Reads, writes, fsync
(→ ``flush()``) and fallocate punch-hole / zero-range (→ ``trim`` / ``write_zeroes``) pass through, as in
:mod:`.fuse` (the libfuse binding, which rootless mounts keep using).

Why not libfuse: through mfusepy every request is several ctypes calls and Python callbacks under one GIL, and
random 4 KiB reads stayed at the same rate from queue depth 1 to 16. Here several threads each read a request
from the device, serve it, and write the reply with one ``writev``: a read goes from the layer files straight
into a page-aligned buffer owned by the thread, and the GIL is let go in every ``read``, ``preadv`` and ``writev``.
The connection asks for 1 MiB requests and up to ``BACKGROUND`` asynchronous ones at a time, so a loop device
with direct I/O passes its queue depth through. A recorder (:mod:`overlaybd.metrics`) counts the requests that
carry the disk's I/O as ``read``, ``write``, ``fsync``, ``discard`` and ``write_zeroes``.

Where the C extension ``_fusedev`` is built (and ``OVERLAYBD_NATIVE`` is not 0), the threads take requests in C and
answer two kinds there, the GIL let go: reads that the merged index of local, uncompressed layer files answers and
that meet nothing the writable upper maps (every write, trim and zero-write marks its range first), and writes of
whole sectors, and fsyncs, to a log-structured upper (through the upper's appender, in C: its index takes the records
before its next lookup). Every other request comes back to the Python code here, which serves them all where
the extension is not built. Counting requests (``metrics``) keeps every request in Python. See :func:`native_disk`.

Stopping: the threads serve until the connection ends (``detach`` unmounts it) or a :class:`Stop` is requested
(the daemon's SIGINT and SIGTERM). Then the connection is aborted first (every request not answered yet fails, and
no more come), and :meth:`DiskDevice.serve` returns only once every thread has returned: C threads included, so no
write or read is under way when the caller flushes and closes the volume (a descriptor the volume closed could
otherwise be reused, and written, by another file).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import re
import select
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import native
from ..errors import LayerIOError, OverlaybdError, errno_of
from ..formats.lsmt.appender import is_native
from ..formats.lsmt.mapping import MergedIndex
from ..formats.lsmt.spec import SECTOR, WRITE_SPLIT_SECTORS
from ..formats.lsmt.stack import LsmtStack
from ..formats.lsmt.writable import CATCH_UP_AT, WritableLayer
from ..metrics import Recorder
from ..source.base import BlockSource, Capability
from ..source.file import FileSource

log = logging.getLogger(__name__)
FUSEDEV = native.FUSEDEV
_fusedev: Any = native.load(FUSEDEV)

DISK = b"disk"
ROOT_ID, DISK_ID = 1, 2
MAX_REQUEST = 1 << 20  # bytes of data in one READ or WRITE
BACKGROUND = 64  # asynchronous requests the kernel may have outstanding
THREADS = 4

# opcodes (linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, INIT = 14, 15, 16, 17, 18, 20, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, INTERRUPT, DESTROY = 27, 28, 29, 30, 36, 38
BATCH_FORGET, FALLOCATE = 42, 43
_NO_REPLY = (FORGET, BATCH_FORGET, INTERRUPT)
_GONE = (errno.ENOENT, errno.ENODEV)  # a reply nobody waits for: the request was interrupted, or the connection ended
_COUNTED = {READ: "read", WRITE: "write", FSYNC: "fsync", FALLOCATE: "discard"}  # the disk's I/O, for metrics

# INIT flags asked for, when the kernel offers them
ASYNC_READ, BIG_WRITES, ASYNC_DIO, MAX_PAGES = 1 << 0, 1 << 5, 1 << 15, 1 << 22
WANTED = ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES
FOPEN_DIRECT_IO, FOPEN_PARALLEL_DIRECT_WRITES = 1 << 0, 1 << 6
FATTR_SIZE = 1 << 3
PUNCH_HOLE, ZERO_RANGE = 0x02, 0x10
MINOR = 31  # protocol minor version spoken (7.31: the structures below)

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
# ino size blocks atime mtime ctime, their nanoseconds, mode nlink uid gid rdev blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then ATTR
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, nsecs; then ATTR
OPEN_OUT = struct.Struct("<QII")
RW_IN = struct.Struct("<QQII")  # fh, offset, size, flags (READ and WRITE)
WRITE_OUT = struct.Struct("<II")
SETATTR_IN = struct.Struct("<IIQQ")  # valid, padding, fh, size
FALLOCATE_IN = struct.Struct("<QQQI")  # fh, offset, length, mode
STATFS_OUT = struct.Struct("<QQQQQIIII6I")
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type
VALID = 3600  # seconds the kernel may keep names and attributes: nothing here changes


#: tests only: a folder; while FOLDER/hold exists, each write creates FOLDER/held-ID once it is under way and waits
#: for FOLDER/hold to be gone before it writes its data (a test thus stops the daemon with a write in flight)
HOLD_WRITES = "OVERLAYBD_TEST_HOLD_WRITES"


class Stop:
    """A request to stop serving, from a signal handler or another thread; :meth:`DiskDevice.serve` waits on it."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def request(self, reason: str) -> None:
        """Stop serving (safe in a signal handler: one write to a pipe); the first reason is kept."""
        if self.reason is None:
            self.reason = reason
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._w, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def wait(self) -> None:
        """Until woken (a stop, or a serving thread that returned)."""
        select.select([self._r], [], [])
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            os.close(fd)


class FuseError(Exception):
    """A request answered with this errno."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


class DiskDevice:
    """Serves one FUSE connection (``fd`` of /dev/fuse, already mounted) until it is unmounted."""

    def __init__(self, fd: int, source: BlockSource, *, readonly: bool, threads: int = THREADS,
                 metrics: Recorder | None = None, abort: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self.abort = abort  # ends the connection: every thread then reads its end
        self.metrics = metrics
        self.source = source
        self.writable = not readonly and Capability.WRITE in source.capabilities
        self.threads = threads
        self.started = time.time_ns()
        self._ops: dict[int, Callable[[int, memoryview, memoryview], int | bytes]] = {
            LOOKUP: self._lookup, GETATTR: self._getattr, SETATTR: self._setattr, OPEN: self._open,
            OPENDIR: self._opendir, READDIR: self._readdir, STATFS: self._statfs, WRITE: self._write,
            FSYNC: self._fsync, FALLOCATE: self._fallocate, INIT: self._init,
            RELEASE: _nothing, RELEASEDIR: _nothing, FLUSH: _nothing, FSYNCDIR: _nothing, DESTROY: _nothing,
        }
        self._hold = os.environ.get(HOLD_WRITES) or None
        self._native = native_disk(fd, source, writable=self.writable, hold=self._hold) if metrics is None else None

    @property
    def served_natively(self) -> int:
        """Requests answered in C so far (0 without the extension)."""
        return int(self._native.served) if self._native is not None else 0

    def serve(self, stop: Stop | None = None) -> None:
        """Serve with ``threads`` threads until the file system is unmounted, or ``stop`` is requested: then the
        connection is aborted (``abort``). Returns once every thread has returned."""
        own = stop is None
        wake = stop if stop is not None else Stop()
        ended: list[int] = []  # one entry a thread that has served its last request (it wakes ``wake`` then)
        workers = [threading.Thread(target=self._loop, args=(wake, ended), name=f"fuse{i}", daemon=True)
                   for i in range(self.threads)]
        try:
            for t in workers:
                t.start()
            while wake.reason is None and len(ended) < len(workers):
                wake.wait()
            if wake.reason is not None and len(ended) < len(workers):
                log.warning("stopping (%s): the FUSE connection is aborted, requests not answered yet fail",
                            wake.reason)
                if self.abort is not None:
                    self.abort()
        finally:
            for t in workers:
                if t.ident is not None:
                    t.join()
            if own:
                wake.close()

    def _loop(self, wake: Stop, ended: list[int]) -> None:
        try:
            self._serve_requests()
        finally:
            ended.append(1)
            wake.wake()

    def _serve_requests(self) -> None:
        inbuf = bytearray(MAX_REQUEST + 4096)
        inview = memoryview(inbuf)
        out = memoryview(mmap.mmap(-1, MAX_REQUEST))  # page-aligned: reads land here, then go out after the header
        disk = self._native
        while True:
            n = disk.serve(inbuf, out) if disk is not None else self._take(inbuf)
            if n < 0:
                return
            if not n:
                continue
            _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(inbuf)
            if opcode in _NO_REPLY:
                continue
            self._answer(opcode, unique, nodeid, inview[IN_HEADER.size:n], out)
            if opcode == DESTROY:
                return

    def _take(self, inbuf: bytearray) -> int:
        """Read one request: its length; 0 if there was none after all, -1 once unmounted (or at the end of a
        descriptor that is not /dev/fuse)."""
        try:
            return os.readv(self.fd, [inbuf]) or -1
        except InterruptedError:
            return 0
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the request was interrupted before we took it
                return 0
            if exc.errno == errno.ENODEV:
                return -1
            raise

    def _answer(self, opcode: int, unique: int, nodeid: int, body: memoryview, out: memoryview) -> None:
        metrics = self.metrics if opcode in _COUNTED else None
        started = time.perf_counter() if metrics is not None else 0.0
        reply = self._serve(opcode, nodeid, body, out)
        if metrics is not None:  # before the reply goes: a client that has it finds it counted
            command, nbytes = self._what(opcode, body)
            metrics.request(command, nbytes, time.perf_counter() - started,
                            reply.code if isinstance(reply, FuseError) else 0)
        if isinstance(reply, FuseError):
            self._reply_error(unique, reply.code)
            return
        data = out[:reply] if isinstance(reply, int) else reply  # an int: that many bytes of ``out``
        try:
            os.writev(self.fd, [OUT_HEADER.pack(OUT_HEADER.size + len(data), 0, unique), data])
        except OSError as exc:
            if exc.errno not in _GONE:
                raise

    def _serve(self, opcode: int, nodeid: int, body: memoryview, out: memoryview) -> int | bytes | FuseError:
        """Serve one request: its reply (an int: that many bytes of ``out``), or the error it fails with."""
        try:
            if opcode == READ:
                return self._read(body, out)
            op = self._ops.get(opcode)
            if op is None:
                raise FuseError(errno.ENOSYS)
            return op(nodeid, body, out)
        except FuseError as exc:
            return exc
        except Exception as exc:  # a failed source call: the request fails, the device goes on
            (log.warning if isinstance(exc, OverlaybdError) else log.exception)("FUSE request failed: %s", exc)
            return FuseError(errno_of(exc))

    def _what(self, opcode: int, body: memoryview) -> tuple[str, int]:
        """What a counted request counts as: its command and the bytes of the disk it covers."""
        if opcode in (READ, WRITE):
            _, offset, size, _ = RW_IN.unpack_from(body)
            return _COUNTED[opcode], size if opcode == WRITE else max(0, min(size, self.source.size - offset))
        if opcode == FALLOCATE:
            _, offset, length, mode = FALLOCATE_IN.unpack_from(body)
            covered = max(0, min(offset + length, self.source.size) - offset)
            return ("write_zeroes" if mode & ZERO_RANGE and not mode & PUNCH_HOLE else "discard"), covered
        return _COUNTED[opcode], 0

    def _reply_error(self, unique: int, code: int) -> None:
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size, -code, unique))
        except OSError as exc:
            if exc.errno not in _GONE:
                raise

    # -- requests -------------------------------------------------------------------------------------------
    def _init(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        major, minor, readahead, flags = INIT_IN.unpack_from(body)
        if major != 7:
            raise FuseError(errno.EPROTO)
        return INIT_OUT.pack(7, min(minor, MINOR), readahead, flags & WANTED, BACKGROUND, BACKGROUND * 3 // 4,
                             MAX_REQUEST, 1, MAX_REQUEST // mmap.PAGESIZE, 0, 0, *([0] * 7))

    def _attr(self, nodeid: int) -> bytes:
        t = self.started
        s, ns = divmod(t, 10**9)
        if nodeid == ROOT_ID:
            return ATTR.pack(ROOT_ID, 0, 0, s, s, s, ns, ns, ns, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
        if nodeid == DISK_ID:
            size = self.source.size
            mode = stat.S_IFREG | (0o644 if self.writable else 0o444)
            return ATTR.pack(DISK_ID, size, -(-size // 512), s, s, s, ns, ns, ns, mode, 1, 0, 0, 0, 4096, 0)
        raise FuseError(errno.ENOENT)

    def _lookup(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        if nodeid != ROOT_ID or bytes(body).rstrip(b"\0") != DISK:
            raise FuseError(errno.ENOENT)
        return ENTRY_OUT.pack(DISK_ID, 0, VALID, VALID, 0, 0) + self._attr(DISK_ID)

    def _getattr(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        return ATTR_OUT.pack(VALID, 0, 0) + self._attr(nodeid)

    def _setattr(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        valid, _, _, size = SETATTR_IN.unpack_from(body)
        if valid & FATTR_SIZE and (nodeid != DISK_ID or size != self.source.size):
            raise FuseError(errno.EPERM)
        return self._getattr(nodeid, body, out)

    def _open(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        (flags,) = struct.unpack_from("<I", body)
        if nodeid != DISK_ID:
            raise FuseError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY and not self.writable:
            raise FuseError(errno.EROFS)
        return OPEN_OUT.pack(0, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, 0)

    def _opendir(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        if nodeid != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        return OPEN_OUT.pack(0, 0, 0)

    def _readdir(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        _, offset, size, _ = RW_IN.unpack_from(body)
        entries = [(ROOT_ID, b".", stat.S_IFDIR), (ROOT_ID, b"..", stat.S_IFDIR), (DISK_ID, DISK, stat.S_IFREG)]
        reply = b""
        for i, (ino, name, mode) in enumerate(entries[offset:], start=offset + 1):
            entry = DIRENT.pack(ino, i, len(name), mode >> 12) + name
            entry += b"\0" * (-len(entry) % 8)
            if len(reply) + len(entry) > size:
                break
            reply += entry
        return reply

    def _statfs(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        return STATFS_OUT.pack(-(-self.source.size // 4096), 0, 0, 0, 0, 4096, 255, 4096, 0, *([0] * 6))

    def _read(self, body: memoryview, out: memoryview) -> int:
        _, offset, size, _ = RW_IN.unpack_from(body)
        n: int = max(0, min(size, self.source.size - offset, len(out)))
        if n:
            self.source.readinto(offset, out[:n])
        return n

    def _write(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        _, offset, size, _ = RW_IN.unpack_from(body)
        if not self.writable:
            raise FuseError(errno.EROFS)
        if offset + size > self.source.size:
            raise FuseError(errno.ENOSPC)
        start = RW_IN.size + 16  # after fuse_write_in: lock_owner, flags, padding
        self._mark(offset, size)
        if self._hold is not None:
            hold_write(self._hold, f"py-{threading.get_ident()}")
        self.source.pwrite(offset, body[start:start + size])
        return WRITE_OUT.pack(size, 0)

    def _fsync(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        self.source.flush()
        return b""

    def _mark(self, offset: int, length: int) -> None:
        """Before the upper changes: reads in C must leave ``[offset, offset+length)`` to Python from now on."""
        if self._native is not None:
            self._native.mark(offset, length)

    def _fallocate(self, nodeid: int, body: memoryview, out: memoryview) -> bytes:
        if not self.writable:
            raise FuseError(errno.EROFS)
        _, offset, length, mode = FALLOCATE_IN.unpack_from(body)
        source = self.source
        end = min(offset + length, source.size)
        if offset >= end:
            return b""
        self._mark(offset, end - offset)
        if mode & PUNCH_HOLE and Capability.TRIM in source.capabilities:
            source.trim(offset, end - offset)
        elif mode & ZERO_RANGE and Capability.WRITE_ZEROES in source.capabilities:
            source.write_zeroes(offset, end - offset)
        elif mode != 0:  # 0 is preallocation: every byte of the disk already exists
            raise FuseError(errno.EOPNOTSUPP)
        return b""


def hold_write(folder: str, name: str) -> None:
    """Tests only (:data:`HOLD_WRITES`): while FOLDER/hold exists, say so (FOLDER/held-NAME) and wait for it to go."""
    gate = os.path.join(folder, "hold")
    if not os.path.exists(gate):
        return
    with open(os.path.join(folder, f"held-{name}"), "w"):
        pass
    while os.path.exists(gate):
        time.sleep(0.001)


def native_disk(fd: int, source: BlockSource, *, writable: bool, hold: str | None = None) -> Any:
    """The C side of the connection (``_fusedev.Disk``) where the extension is built and ``source`` is a stack
    whose reads it can serve; else None. Granules of at least 4 KiB, at most 16 Mi of them: a granule the upper
    maps (now, or after a write, trim or zero-write) sends every read meeting it to Python. ``writable``, over a
    log-structured upper whose appender is the C one, it serves one-record writes and fsyncs too, through
    :attr:`WritableLayer.appender`, as the upper's own writes and flushes do."""
    if _fusedev is None or type(source) is not LsmtStack or not isinstance(source.lower_index, MergedIndex):
        return None
    index = source.lower_index
    if index.ends.dtype.itemsize != 8 or index.packed.dtype.itemsize != 8:
        return None
    fds = [src.fd if type(src) is FileSource else -1 for src in source.sources[:len(source.lowers)]]
    sectors = -(-source.size // SECTOR)
    shift = max(3, (sectors >> 24).bit_length())
    disk = _fusedev.Disk(fd, source.size, index.ends, index.packed, fds, shift, True)
    if source.upper is not None:
        seg = source.upper.segments()
        for o, n in zip(seg.offset.tolist(), seg.length.tolist(), strict=True):
            disk.mark(o * SECTOR, n * SECTOR)
    upper = source.upper
    if writable and type(upper) is WritableLayer and is_native(upper.appender):
        disk.set_writer(WRITE_SPLIT_SECTORS * SECTOR, upper.appender, upper.catch_up, CATCH_UP_AT, hold)
    return disk


def _nothing(nodeid: int, body: memoryview, out: memoryview) -> bytes:
    return b""


MS_NOSUID, MS_NODEV = 2, 4


def mount(mountpoint: str) -> int:
    """Open /dev/fuse and mount it on ``mountpoint`` (needs root); the descriptor to serve."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    if libc.mount(b"overlaybd", os.fsencode(mountpoint), b"fuse.overlaybd", MS_NOSUID | MS_NODEV,
                  options.encode()) != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise LayerIOError(f"cannot mount FUSE on {mountpoint}: {os.strerror(code)}", path=mountpoint)
    return fd


MNT_FORCE = 1
CONNECTIONS = "/sys/fs/fuse/connections"


def connection_of(mountpoint: str) -> int | None:
    """The FUSE connection number of the file system mounted on ``mountpoint`` (its device's minor number, as
    ``/proc/self/mountinfo`` says: asking the file system itself would wait for the connection to answer)."""
    # the folder it is in, resolved; not the mountpoint itself: a stat of it would wait for the connection
    where = os.fsencode(os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(mountpoint))),
                                     os.path.basename(os.path.abspath(mountpoint))))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            path = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])  # spaces and such: \ooo
            if path == where:
                found = int(fields[2].split(b":")[1])  # the last mount there is the one in use
    return found


def abort_connection(mountpoint: str, connection: int | None) -> None:
    """End a FUSE connection now, whoever still holds its file (the loop device): every request not answered yet
    fails, and the serving threads read its end. Through the fusectl file system where it is mounted, else a
    forced unmount (which aborts the connection before it finds the mount busy)."""
    if connection is not None and os.path.exists(f"{CONNECTIONS}/{connection}/abort"):
        try:
            with open(f"{CONNECTIONS}/{connection}/abort", "w") as f:
                f.write("1")
            return
        except OSError as exc:
            log.warning("cannot abort FUSE connection %d through %s: %s", connection, CONNECTIONS, exc.strerror)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), MNT_FORCE) != 0:
        code = ctypes.get_errno()
        if code != errno.EBUSY:  # busy: the loop device holds it; the connection is aborted all the same
            log.warning("cannot abort the FUSE connection on %s: %s", mountpoint, os.strerror(code))


def run_device(source: BlockSource, mountpoint: str, *, readonly: bool, threads: int = THREADS,
               metrics: Recorder | None = None, stop: Stop | None = None) -> None:
    """Mount ``mountpoint`` and serve ``MOUNTPOINT/disk`` until it is unmounted or ``stop`` is requested (blocks).
    Returns once every serving thread has returned; the caller may then flush and close ``source``."""
    fd = mount(mountpoint)
    try:
        connection = connection_of(mountpoint)
        device = DiskDevice(fd, source, readonly=readonly, threads=threads, metrics=metrics,
                            abort=lambda: abort_connection(mountpoint, connection))
        device.serve(stop)
    finally:
        os.close(fd)
