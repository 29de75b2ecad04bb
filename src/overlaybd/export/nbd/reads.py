"""Plain NBD reads of a stack's merged index, served without the generic request path: the READ requests at the
front of the bytes a client sent are served in one call in C (``_nbdread``, the GIL let go), each read as
:meth:`~overlaybd.formats.lsmt.mapping.MergedIndex.read` reads it (zeros, or ``pread`` from the layer files), and
their replies come back together, headers and data, for one send.

That holds only while the merged index alone answers: the source is a stack whose lower layers are local files
and whose writable upper, if any, maps nothing yet (:meth:`Reads.answers` asks it before every call). A request is
served this way only if it is a READ with no flag but DF, of whole sectors, inside the device, small enough, and its
reply fits in the bytes the connection may still hold. Serving stops at the first other request, and at the first
read that fails: that one goes the generic way, which reads it again and answers the error.

Where the extension is not built (or ``OVERLAYBD_NATIVE=0``) every read goes the generic way, which does the same
one request at a time.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

from ... import native
from ...formats.lsmt.mapping import MutableLevel
from ...formats.lsmt.spec import SECTOR
from ...formats.lsmt.view import LsmtView
from ...source.base import BlockSource

NBDREAD = native.NBDREAD
_nbdread: Any = native.load(NBDREAD)
__all__ = ["NBDREAD", "Reads", "reads_for"]


@dataclass(frozen=True)
class Reads:
    """The C reader of one source, and the writable level above its merged index (None: there is none)."""

    reader: Any  # _nbdread.Reader
    upper: MutableLevel | None
    sectors: int
    source: LsmtView
    fds: array[int]  # the descriptors the reader reads, as the source had them

    def answers(self) -> bool:
        """Whether the merged index alone answers reads now: the source still has the descriptors the reader
        reads (a source closed in place has none: the process hands those numbers out again), and the upper
        (having taken the records its log holds) maps nothing. A log-structured upper that maps something never
        maps nothing again while open (a trim maps a hole too); a sparse one does once all it maps is trimmed (the
        layers below show through), and the index answers again."""
        plan = self.source.direct_plan()  # worked out again once the source is closed
        return plan is not None and plan[2] == self.fds and (self.upper is None
                                                             or not self.upper.covers(0, self.sectors))

    def serve(self, data: bytes, pos: int, structured: bool, max_read: int, limit: int) -> tuple[int, bytes, int]:
        """Serve the reads at the front of ``data[pos:]`` whose replies fit in ``limit`` bytes: (where the first
        request not served starts, the replies of those served, how many)."""
        result: tuple[int, bytes, int] = self.reader.serve(data, pos, structured, max_read, limit)
        return result


def reads_for(source: BlockSource) -> Reads | None:
    """The C reads of ``source`` where the extension is built and ``source`` reads straight through a merged
    index into local files; else None."""
    if _nbdread is None or not isinstance(source, LsmtView):
        return None
    plan = source.direct_plan()
    if plan is None:
        return None
    upper, index, fds = plan
    if index.handle is None or any(fd < 0 for fd in fds[: len(fds) - (upper is not None)]):
        return None
    return Reads(_nbdread.Reader(index.handle, fds, source.size), upper, -(-source.size // SECTOR), source, fds)
