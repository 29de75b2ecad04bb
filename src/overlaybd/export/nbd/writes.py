"""Plain writes to a volume's log-structured upper, served without the generic request path: the WRITE requests at
the front of the bytes a client sent are served in one call, each as :class:`~overlaybd.formats.lsmt.writable.
WritableLayer` serves a write of one record (space reserved at the data file's end through the layer's appender,
the data written there, then its index record appended), and their replies come back together for one send.

Where the C extension ``_nbdwrite`` is built (and ``OVERLAYBD_NATIVE`` is not 0) and the upper's appender is the C
one, that call runs in C with the GIL let go, through the appender's capsule, as attach's ``_fusedev`` does for
FUSE writes; :class:`PyWriter` does the same in Python otherwise. The layer's index takes the records before its
next lookup (a read sees the write), or at once when the connection finds ``CATCH_UP_AT`` of them waiting.

A request is served this way only if it is a WRITE with no flag (FUA goes the generic way), of whole sectors,
inside the device, of at most one record's length, with its whole payload in the bytes given. Serving stops at the
first other request, and at the first write that fails: that one goes the generic way, which serves it again and
answers the error (EIO, ENOSPC, ...).
"""

from __future__ import annotations

import errno
from typing import Any, Protocol

from ... import native
from ...formats.lsmt.appender import Appender, is_native
from ...formats.lsmt.header import SECTOR, WRITE_SPLIT_SECTORS, pack_record
from ...formats.lsmt.stack import LsmtStack
from ...formats.lsmt.writable import CATCH_UP_AT, WritableLayer
from ...source.base import BlockSource, Capability
from .protocol import CMD_WRITE, REQUEST, REQUEST_MAGIC, chunk_none, simple_reply

NBDWRITE = native.NBDWRITE
_nbdwrite: Any = native.load(NBDWRITE)
__all__ = ["CATCH_UP_AT", "PyWriter", "Writer", "writer_for"]


class Writer(Protocol):
    @property
    def served(self) -> int:
        """Writes served so far."""

    def serve(self, data: bytes, pos: int, structured: bool) -> tuple[int, bytes, int, int]:
        """Serve the writes at the front of ``data[pos:]``: (where the first request not served starts, the
        replies of the writes served in order, how many, the records the appender holds for the index after the
        last; 0 if none was served)."""

    def write(self, offset: int, data: bytes) -> int:
        """One write served as :meth:`serve` serves each: the records the appender holds for the index after it,
        or -1 if it is not served here (not whole sectors, too large, outside the device, or it failed: the
        generic path serves it again and raises the error)."""


class PyWriter:
    """:class:`Writer` in Python."""

    def __init__(self, appender: Appender, size: int, max_write: int, marks: Any = None) -> None:
        self.appender = appender
        self.marks = marks  # the _nbdread.Reader of the same source: each write marks its range there first
        self.index_full = False  # an append said ENOSPC: no write is served here from then on (as in C)
        self.size = size
        self.max_write = max_write
        self.served = 0

    def _eligible(self, offset: int, length: int) -> bool:
        return (0 < length <= self.max_write and not length % SECTOR and not offset % SECTOR
                and offset + length <= self.size)

    def serve(self, data: bytes, pos: int, structured: bool) -> tuple[int, bytes, int, int]:
        if not 0 <= pos <= len(data):
            raise ValueError("pos out of range")
        replies: list[bytes] = []
        pending = 0
        end = len(data)
        head = REQUEST.size
        view = memoryview(data)
        while end - pos >= head:
            magic, flags, command, handle, offset, length = REQUEST.unpack_from(data, pos)
            if magic != REQUEST_MAGIC or command != CMD_WRITE or flags or not self._eligible(offset, length) \
                    or end - pos - head < length:
                break
            done = self._write(offset, view[pos + head : pos + head + length])
            if done < 0:
                break
            pending = done
            replies.append(chunk_none(handle) if structured else simple_reply(handle))
            pos += head + length
        return pos, b"".join(replies), len(replies), pending

    def write(self, offset: int, data: bytes) -> int:
        if not self._eligible(offset, len(data)):
            return -1
        return self._write(offset, memoryview(data))

    def _write(self, offset: int, data: memoryview) -> int:
        if self.index_full:
            return -1
        if self.marks is not None:
            self.marks.mark(offset, len(data))  # before the upper maps it
        try:
            at = self.appender.reserve(len(data))
            self.appender.write(data, at)  # on failure the space reserved stays unused: nothing points at it
            record = pack_record(offset // SECTOR, len(data) // SECTOR, at // SECTOR)
            pending = self.appender.append(record, at + len(data))
        except OSError as exc:
            self.index_full = exc.errno == errno.ENOSPC
            return -1
        self.served += 1
        return pending


def writer_for(source: BlockSource, marks: Any = None) -> tuple[Writer, WritableLayer] | None:
    """The writer of ``source`` (in C where the extension is built and the appender is the C one) and the upper it
    writes to, if ``source`` is a stack over a log-structured upper that takes writes; else None. ``marks``: the
    ``_nbdread.Reader`` of the same source, where reads go in C (each write marks its range there first)."""
    if type(source) is not LsmtStack or Capability.WRITE not in source.capabilities:
        return None
    upper = source.upper
    if type(upper) is not WritableLayer or upper.readonly:
        return None
    appender = upper.appender
    max_write = WRITE_SPLIT_SECTORS * SECTOR
    if _nbdwrite is not None and is_native(appender):
        writer: Writer = _nbdwrite.Writer(appender, source.size, max_write, marks)
    else:
        writer = PyWriter(appender, source.size, max_write, marks)
    return writer, upper


def is_c(writer: Writer) -> bool:
    """Whether ``writer`` is the C one."""
    return _nbdwrite is not None and isinstance(writer, _nbdwrite.Writer)
