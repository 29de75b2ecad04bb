"""The one abstraction: a positional, thread-safe source of disk bytes.

Subclasses implement ``_read_aligned`` (and, if they write, ``_write_aligned`` and friends). Bounds checks,
alignment (read-modify-write of partial blocks) and splitting are written here, once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from ..errors import OutOfBoundsError, ReadOnlyError
from ..frozen import Frozen

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from typing import Self


class ExtentKind(enum.Enum):
    DATA = "data"
    ZERO = "zero"  # reads as zeros and hides anything below
    HOLE = "hole"  # not in this source: reads as zeros here, falls through in a stack


class Capability(enum.Flag):
    NONE = 0
    WRITE = enum.auto()
    WRITE_ZEROES = enum.auto()
    TRIM = enum.auto()
    FLUSH = enum.auto()


class Extent(Frozen):
    __slots__ = ("offset", "length", "kind", "layer")
    offset: int
    length: int
    kind: ExtentKind
    layer: int | None  # which layer of a stack holds it (0 = bottom), when known

    def __init__(self, offset: int, length: int, kind: ExtentKind, layer: int | None = None) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "offset", offset)
        setattr_(self, "length", length)
        setattr_(self, "kind", kind)
        setattr_(self, "layer", layer)

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge_extents(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Join neighbours of the same kind and layer."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if (pending is not None and pending.end == ext.offset and pending.kind is ext.kind
                and pending.layer == ext.layer):
            pending = Extent(pending.offset, pending.length + ext.length, ext.kind, ext.layer)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


Span = tuple[int, int, int]  # (descriptor or -1 for zeros, offset in the file, length): see BlockSource.file_spans


class BlockSource:
    """Bytes of a disk, read (and perhaps written) by position.

    ``size`` is the byte length; ``block_size`` is the alignment the implementation needs; callers may use any
    offset and length inside ``[0, size)``: the base class widens and trims.
    """

    name: str = "<source>"
    size: int = 0
    block_size: int = 1
    capabilities: Capability = Capability.NONE

    # -- reading -------------------------------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)  # before allocating: a huge or negative length is out of bounds too
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``; exactly ``len(buf)`` bytes or an error."""
        view = memoryview(buf).cast("B")
        length = len(view)
        self._check_range(offset, length)
        if length == 0:
            return
        bs = self.block_size
        start = offset - offset % bs
        end = offset + length
        aligned_end = min(-(-end // bs) * bs, self.size)
        if start == offset and aligned_end == end:
            self._read_aligned(offset, view)
            return
        # a partial head block and a partial tail block through small buffers; the aligned body straight into buf
        pos = offset
        if offset != start:
            block_end = min(start + bs, self.size)
            tmp = bytearray(block_end - start)
            self._read_aligned(start, memoryview(tmp))
            n = min(block_end, end) - offset
            view[:n] = tmp[offset - start : offset - start + n]
            pos += n
        body_end = end if aligned_end == end else end - end % bs
        if body_end > pos:
            self._read_aligned(pos, view[pos - offset : body_end - offset])
            pos = body_end
        if pos < end:
            tmp = bytearray(aligned_end - pos)
            self._read_aligned(pos, memoryview(tmp))
            view[pos - offset :] = tmp[: end - pos]

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf``; ``offset`` is a multiple of block_size, the end is one too or equals size."""
        raise NotImplementedError

    def file_spans(self, offset: int, length: int) -> list[Span] | None:
        """Where the bytes ``[offset, offset+length)`` are, in order: (descriptor, file offset, length) spans of
        local files opened read-only, descriptor -1 for zeros; None where any byte is elsewhere (a cache, a
        remote layer, a writable file) or the range is not one the source can place. A server can then hand the
        page cache's pages to a socket without copying them (``sendfile``)."""
        return None

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents covering exactly ``[offset, offset+length)``, in order."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        if length:
            yield from merge_extents(self._extents(offset, length))

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        yield Extent(offset, length, ExtentKind.DATA)

    def invalidate(self, offset: int, length: int) -> None:
        """Forget any cached copy of this range (a check above found it corrupt); sources without a cache
        below them do nothing."""

    # -- writing -------------------------------------------------------------------------------------------
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require(Capability.WRITE)
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        if not len(view):
            return
        bs = self.block_size
        end = offset + len(view)
        head = offset % bs
        tail = end % bs
        if head == 0 and tail == 0:
            self._write_aligned(offset, view)
            return
        start = offset - head
        # the last block of a source whose size is not a multiple of bs ends at size, not at the next multiple
        aligned_end = min(end if tail == 0 else end - tail + bs, self.size)
        last = (aligned_end - 1) // bs * bs  # start of the last block
        buf = bytearray(aligned_end - start)
        # read-modify-write the partial first and last blocks only
        self._read_aligned(start, memoryview(buf)[: min(bs, aligned_end - start)])
        if last > start:
            self._read_aligned(last, memoryview(buf)[last - start :])
        buf[head : head + len(view)] = view
        self._write_aligned(start, memoryview(buf))

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require(Capability.WRITE_ZEROES)
        self._check_range(offset, length)
        self._for_aligned_core(offset, length, self._write_zeroes_aligned)

    def trim(self, offset: int, length: int) -> None:
        """Discard a range: it reads as zeros afterwards. Partial blocks at the edges are zero-written."""
        self._require(Capability.TRIM)
        self._check_range(offset, length)
        self._for_aligned_core(offset, length, self._trim_aligned)

    def flush(self) -> None:
        if Capability.FLUSH in self.capabilities:
            self._flush()

    def _for_aligned_core(self, offset: int, length: int, op: object) -> None:
        bs = self.block_size
        end = offset + length
        core_start = -(-offset // bs) * bs
        core_end = end - end % bs
        if core_start >= core_end:
            if length:
                self.pwrite(offset, bytes(length))
            return
        if core_start > offset:
            self.pwrite(offset, bytes(core_start - offset))
        op(core_start, core_end - core_start)  # type: ignore[operator]
        if end > core_end:
            self.pwrite(core_end, bytes(end - core_end))

    def _write_aligned(self, offset: int, data: memoryview) -> None:
        raise ReadOnlyError("source is read-only", path=self.name)

    def _write_zeroes_aligned(self, offset: int, length: int) -> None:
        self._write_aligned(offset, memoryview(bytes(length)))

    def _trim_aligned(self, offset: int, length: int) -> None:
        self._write_zeroes_aligned(offset, length)

    def _flush(self) -> None:
        return None

    # -- helpers -------------------------------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfBoundsError(
                f"request [{offset}, {offset + length}) is outside [0, {self.size})", path=self.name, offset=offset
            )

    def _require(self, cap: Capability) -> None:
        if cap not in self.capabilities:
            raise ReadOnlyError(f"source does not support {cap.name}", path=self.name)

    def close(self) -> None:
        """Release what this source opened itself (never what it was given)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} size={self.size}>"
