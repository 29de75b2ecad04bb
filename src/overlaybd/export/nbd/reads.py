"""Plain NBD reads of a stack, served without the generic request path: the READ requests at the front of the bytes
a client sent are served in one call in C (``_nbdread``, the GIL let go), each read as
:meth:`~overlaybd.formats.lsmt.mapping.MergedIndex.read` reads it (zeros, or ``pread`` from the layer files), and
their replies come back together, headers and data, for one send.

That holds where the source is a stack whose layers are local files: a merged index, and at most a writable upper
above it. The reader keeps granules marked where the upper may map something: what it maps when the reader is
made, and the range of every write, trim and zero-write before it changes the upper
(:meth:`~overlaybd.export.nbd.session.Export.mark` on the generic paths; the C writer of :mod:`.writes` marks in C).
A read that meets no marked granule is the merged index's alone. One that meets a marked granule takes the upper's
records there (:meth:`~overlaybd.formats.lsmt.mapping.MutableLevel.rows`: caught up, under the upper's lock) when
it is planned, and reads its pieces from the upper's file, the gaps between them through the merged index. A
request is served this way only if it is a READ with no flag but DF, of whole sectors, inside the device, small
enough, and its reply fits in the bytes the connection may still hold. Serving stops at the first other request,
and at the first read that fails (or whose upper records cannot be read here): that one goes the generic way,
which reads it again and answers the error.

Where the extension is not built (or ``OVERLAYBD_NATIVE=0``) every read goes the generic way, which does the same
one request at a time.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from ... import native
from ...formats.lsmt.mapping import MergedIndex, MutableLevel
from ...formats.lsmt.view import LsmtView
from ...source.base import BlockSource

NBDREAD = native.NBDREAD
_nbdread: Any = native.load(NBDREAD)
__all__ = ["NBDREAD", "Reads", "reads_for"]


@dataclass(frozen=True)
class Reads:
    """The C reader of one source."""

    reader: Any  # _nbdread.Reader
    source: LsmtView
    fds: array[int]  # the descriptors the reader reads, as the source had them
    upper: MutableLevel | None  # the levels it reads, as the source had them
    index: MergedIndex

    def current(self) -> bool:
        """Whether the source still reads through the levels and descriptors the reader reads: one closed in place
        (a served volume's snapshot whose reopen failed keeps the closed source) has none, and the process hands
        those numbers out again to the next files it opens."""
        plan = self.source.direct_plan()  # worked out again once the source is closed
        return plan is not None and plan[0] is self.upper and plan[1] is self.index and plan[2] == self.fds

    def serve(self, data: bytes, pos: int, structured: bool, max_read: int, limit: int) -> tuple[int, bytes, int]:
        """Serve the reads at the front of ``data[pos:]`` whose replies fit in ``limit`` bytes: (where the first
        request not served starts, the replies of those served, how many)."""
        result: tuple[int, bytes, int] = self.reader.serve(data, pos, structured, max_read, limit)
        return result

    def mark(self, offset: int, length: int) -> None:
        """Bytes ``[offset, offset+length)`` may be mapped by the upper from now on: reads meeting them go the
        generic way. Called before the upper changes there."""
        self.reader.mark(offset, length)


def reads_for(source: BlockSource) -> Reads | None:
    """The C reads of ``source`` where the extension is built and ``source`` reads straight through a merged
    index into local files (and a writable upper above it); else None. What its upper maps now is marked."""
    if _nbdread is None or not isinstance(source, LsmtView):
        return None
    plan = source.direct_plan()
    if plan is None:
        return None
    upper, index, fds = plan
    if index.handle is None or any(fd < 0 for fd in fds[: len(fds) - (upper is not None)]):
        return None
    reads = Reads(_nbdread.Reader(index.handle, fds, source.size, upper.rows if upper is not None else None), source,
                  fds, upper, index)
    if upper is not None:
        seg = upper.segments()
        reads.reader.mark_records(seg.offset, seg.length)
    return reads
