"""Where a log-structured writable layer appends: space at the end of its data file, records at the end of its index.

A write reserves its space (:meth:`~Appender.reserve`), writes its data there (:meth:`~Appender.write`), then
appends the records that point at it (:meth:`~Appender.append`). The appender keeps each record until the layer's
in-memory index takes it (:meth:`~Appender.take`), so writers need not touch that index: the C extension
``_appender`` does all of this without the GIL, and ``overlaybd.export._fusedev`` calls it from C threads that
never enter Python.
:meth:`~Appender.sync` makes every record appended so far durable after the data it points at (``fdatasync`` of the
data file, then of the index file, with no append in between). :class:`PyAppender` does the same in Python where
the extension is not built (or ``OVERLAYBD_NATIVE=0``).

The appender is where writers reach the layer's files: :meth:`~Appender.detach` waits for the writes in flight, and
every call fails (EBADF) after it, so the files may then close without a write landing on a descriptor number the
process has reused meanwhile. An append that would take the index file's end past ``index_limit`` fails with ENOSPC
and changes nothing.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, Protocol

from ... import native
from ...source.file import allocate_ahead
from .header import RECORD_SIZE

APPENDER = native.APPENDER
_appender: Any = native.load(APPENDER)


class Appender(Protocol):
    @property
    def data_end(self) -> int:
        """Where the next reservation starts."""

    @property
    def data_ahead(self) -> int:
        """The data file is allocated (fallocate KEEP_SIZE) up to here; 0: nothing yet."""

    @property
    def index_end(self) -> int:
        """Where the next record goes."""

    @property
    def index_ahead(self) -> int:
        """The index file is allocated up to here; 0: nothing yet."""

    @property
    def pending(self) -> int:
        """Records appended and not yet taken."""

    @property
    def data_high(self) -> int:
        """The highest data-file end of a record appended so far."""

    def reserve(self, length: int) -> int:
        """Where ``length`` bytes of new data go in the data file: the space is the caller's. ENOSPC once the index
        file takes no record more (the record of that data would be refused)."""

    def write(self, data: bytes | memoryview, at: int) -> None:
        """Write ``data`` at byte ``at`` of the data file (space :meth:`reserve` gave); OSError if that fails."""

    def append(self, records: bytes, data_end: int) -> int:
        """Write ``records`` at the end of the index file (their data is written, up to ``data_end``); the number
        of records now pending. OSError if the write fails: then nothing is appended, and the index file is cut
        back to its end (if that fails too, every later append fails with EIO). ENOSPC past the index limit."""

    def take(self) -> bytes:
        """The records appended since the last take, in the order they were appended."""

    def sync(self, data_path: str, index_path: str) -> None:
        """fdatasync the data file, then the index file, with no append in between; OSError names the file."""

    def detach(self) -> None:
        """Wait for the writes in flight; every call fails from then on (the files are closing)."""


class PyAppender:
    """:class:`Appender` in Python."""

    def __init__(self, data_fd: int, data_end: int, data_step: int, index_fd: int, index_end: int,
                 index_step: int, index_limit: int = 1 << 64) -> None:
        self._data_fd, self._index_fd = data_fd, index_fd
        self._index_limit = index_limit
        self._writing = 0  # writes of data in flight (under _data_lock); detach waits for none
        self._written = threading.Condition(threading.Lock())
        self.data_end, self.index_end = data_end, index_end
        self.data_ahead = self.index_ahead = 0
        self._data_step, self._index_step = data_step, index_step
        self.data_high = 0
        self._broken = False  # as in C: a failed append could not cut the index file back
        self._pending: list[bytes] = []
        self._count = 0
        self._data_lock = threading.Lock()
        self._index_lock = threading.Lock()  # held across a sync
        self._pending_lock = threading.Lock()  # held for an append's write at most: take() never waits for a sync

    @property
    def pending(self) -> int:
        return self._count

    def reserve(self, length: int) -> int:
        with self._data_lock:
            _check_open(self._data_fd)
            if self.index_end + RECORD_SIZE > self._index_limit:  # as in C: no data space for a refused record
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            at = self.data_end
            if at + length > self.data_ahead:
                self.data_ahead = at + length + self._data_step
                allocate_ahead(self._data_fd, at, self.data_ahead - at)
            self.data_end += length
            return at

    def write(self, data: bytes | memoryview, at: int) -> None:
        with self._written:
            fd = self._data_fd
            _check_open(fd)
            self._writing += 1
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                n = os.pwrite(fd, view[done:], at + done)
                if not n:
                    raise OSError(errno.EIO, "pwrite wrote nothing")
                done += n
        finally:
            with self._written:
                self._writing -= 1
                if not self._writing:
                    self._written.notify_all()

    def append(self, records: bytes, data_end: int) -> int:
        if len(records) % 16:
            raise ValueError("records are 16 bytes each")
        with self._index_lock, self._pending_lock:  # the records join the file and the pending ones in one step
            _check_open(self._index_fd)
            if self._broken:
                raise OSError(errno.EIO, "an earlier append failed and its records could not be cut off")
            end = self.index_end
            if end + len(records) > self._index_limit:
                raise OSError(errno.ENOSPC, "the index file holds all the records it may")
            if end + len(records) > self.index_ahead:
                self.index_ahead = end + len(records) + self._index_step
                allocate_ahead(self._index_fd, end, self.index_ahead - end)
            view = memoryview(records)
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(self._index_fd, view[done:], end + done)
            except OSError:
                # cut back what a short write left: those records would outlive a shorter next append
                try:
                    os.ftruncate(self._index_fd, end)
                    self.index_ahead = end
                except OSError:
                    self._broken = True
                raise
            self.index_end = end + len(records)
            self._pending.append(records)
            self._count += len(records) // 16
            self.data_high = max(self.data_high, data_end)
            return self._count

    def take(self) -> bytes:
        with self._pending_lock:
            out = b"".join(self._pending)
            self._pending = []
            self._count = 0
            return out

    def sync(self, data_path: str, index_path: str) -> None:
        with self._index_lock:
            for fd, path in ((self._data_fd, data_path), (self._index_fd, index_path)):
                try:
                    _check_open(fd)
                    os.fdatasync(fd)
                except OSError as exc:
                    raise OSError(exc.errno, exc.strerror, path) from exc

    def detach(self) -> None:
        with self._written:
            self._data_fd = -1
            while self._writing:
                self._written.wait()
        with self._data_lock:
            self._data_fd = -1
        with self._index_lock:
            self._index_fd = -1


def _check_open(fd: int) -> None:
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def is_native(appender: Appender) -> bool:
    """Whether ``appender`` is the C one (other extensions call it without the GIL)."""
    return _appender is not None and isinstance(appender, _appender.Appender)


def open_appender(data_fd: int, data_end: int, data_step: int, index_fd: int, index_end: int,
                  index_step: int, index_limit: int) -> Appender:
    """The appender of a layer whose data file ``data_fd`` takes new data from byte ``data_end`` and whose index
    file ``index_fd`` takes new records from byte ``index_end`` up to byte ``index_limit``; each file is allocated
    ahead ``*_step`` bytes at a time. In C where the extension is built."""
    if _appender is not None:
        out: Appender = _appender.Appender(data_fd, data_end, data_step, index_fd, index_end, index_step,
                                           index_limit)
        return out
    return PyAppender(data_fd, data_end, data_step, index_fd, index_end, index_step, index_limit)
