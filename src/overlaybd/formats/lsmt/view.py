"""A BlockSource that reads through index levels into data sources (shared by layers and stacks)."""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack

from ...source.base import BlockSource, Capability, Extent, ExtentKind, Span
from ...source.file import FileSource
from .mapping import DATA, HOLE, Level, MergedIndex, MutableLevel, fill_zero, resolve
from .spec import SECTOR


class LsmtView(BlockSource):
    """Reads resolve top-first through ``levels``; DATA pieces come from ``sources[source]`` at ``moffset``."""

    block_size = SECTOR
    levels: Sequence[Level]
    sources: Sequence[BlockSource]
    #: how extents name the source of a piece (a stack maps source ordinals to layer numbers)
    layer_of_source: Sequence[int] | None = None
    _owned: ExitStack | None = None
    # how reads take the direct path (see direct_plan), and the levels that was worked out for
    _direct_for: Sequence[Level] | None = None
    _direct_plan: tuple[MutableLevel | None, MergedIndex, array[int]] | None = None

    def adopt(self, owned: ExitStack) -> None:
        """Take ownership of what ``owned`` holds: ``close()`` will close it."""
        self._owned = owned

    def hold(self, resource: AbstractContextManager[object]) -> None:
        """Keep ``resource`` entered until ``close()``."""
        if self._owned is None:
            self._owned = ExitStack()
        self._owned.enter_context(resource)

    def close(self) -> None:
        self._direct_for = self._direct_plan = None  # the descriptors it holds are about to be closed
        if self._owned is not None:
            owned, self._owned = self._owned, None
            owned.close()

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        nbytes = buf.nbytes if isinstance(buf, memoryview) else len(buf)
        if nbytes and not (offset | nbytes) % SECTOR and 0 <= offset and offset + nbytes <= self.size \
                and self._read_direct(offset // SECTOR, nbytes // SECTOR, buf):
            return
        super().readinto(offset, buf)

    def file_spans(self, offset: int, length: int) -> list[Span] | None:
        """Sector-aligned ranges whose DATA pieces all come from local files opened read-only (sealed layers; not a
        writable upper, whose pages may change while a socket still holds them)."""
        if length <= 0 or (offset | length) % SECTOR or offset < 0 or offset + length > self.size:
            return None
        s0 = offset // SECTOR
        sources = self.sources
        spans: list[Span] = []
        for _start, n, kind, src, moff in resolve(self.levels, s0, s0 + length // SECTOR):
            fd, at = -1, 0
            if kind == DATA:
                source = sources[src]
                if type(source) is not FileSource or Capability.WRITE in source.capabilities:
                    return None
                fd, at = source.fd, moff * SECTOR
            if spans and spans[-1][0] == fd and (fd < 0 or spans[-1][1] + spans[-1][2] == at):
                spans[-1] = (fd, spans[-1][1], spans[-1][2] + n * SECTOR)
            else:
                spans.append((fd, at, n * SECTOR))
        return spans

    def direct_plan(self) -> tuple[MutableLevel | None, MergedIndex, array[int]] | None:
        """The direct path, where the levels allow it: a merged index at the bottom, at most a mutable level
        above it, and the descriptors of the sources that are local files (-1 for any other)."""
        levels = self.levels
        if levels is self._direct_for:
            return self._direct_plan
        plan = None
        if 1 <= len(levels) <= 2 and isinstance(levels[-1], MergedIndex) \
                and (len(levels) == 1 or isinstance(levels[0], MutableLevel)):
            top = levels[0] if len(levels) == 2 else None
            assert top is None or isinstance(top, MutableLevel)
            fds = array("i", [src.fd if type(src) is FileSource else -1 for src in self.sources])
            plan = (top, levels[-1], fds)
        self._direct_for, self._direct_plan = levels, plan
        return plan

    def _read_direct(self, start: int, count: int, buf: bytearray | memoryview) -> bool:
        """Sectors ``[start, start+count)`` in one call when the mutable level (if any) has nothing there and the
        merged index points only into local files: no pieces listed, no source objects called. False, for the
        general path, otherwise."""
        plan = self.direct_plan()
        if plan is None:
            return False
        top, index, fds = plan
        if top is not None and top.covers(start, start + count):
            return False
        return index.read(fds, start, buf)

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        if length % SECTOR:  # the last, partial sector of an odd-sized device
            tmp = bytearray(-(-length // SECTOR) * SECTOR)
            self._read_sectors(offset, memoryview(tmp))
            buf[:] = tmp[:length]
        else:
            self._read_sectors(offset, buf)

    def _read_sectors(self, offset: int, buf: memoryview) -> None:
        s0 = offset // SECTOR
        sources = self.sources
        for start, n, kind, src, moff in resolve(self.levels, s0, s0 + len(buf) // SECTOR):
            a = (start - s0) * SECTOR
            b = a + n * SECTOR
            if kind == DATA:
                sources[src].readinto(moff * SECTOR, buf[a:b])
            else:
                fill_zero(buf[a:b])

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        s0 = offset // SECTOR
        s1 = -(-(offset + length) // SECTOR)
        names = self.layer_of_source
        for start, n, kind, src, _moff in resolve(self.levels, s0, s1):
            lo = max(start * SECTOR, offset)
            hi = min((start + n) * SECTOR, offset + length)
            if kind == HOLE:
                yield Extent(lo, hi - lo, ExtentKind.HOLE)
            else:
                layer = names[src] if names is not None else src
                yield Extent(lo, hi - lo, ExtentKind.DATA if kind == DATA else ExtentKind.ZERO, layer)
