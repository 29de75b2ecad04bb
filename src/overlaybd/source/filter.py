"""The base of every filter: a source in front of another that keeps its bytes (sub-range, cache, download switch,
trace recorder). It forwards size, name, reads, extents and ``invalidate``; a filter overrides only what it changes.
Writes are not forwarded: a filter that passes writes through says so in its own code."""

from __future__ import annotations

from collections.abc import Iterator

from .base import BlockSource, Extent


class Filter(BlockSource):
    """Forwards everything to ``inner``; reads of any alignment go straight into the caller's buffer."""

    def __init__(self, inner: BlockSource, *, name: str | None = None, size: int | None = None) -> None:
        self.inner = inner
        self.name = inner.name if name is None else name
        self.size = inner.size if size is None else size
        self.block_size = 1  # the inner source aligns for itself

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.inner.readinto(offset, buf)

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        return self.inner.extents(offset, length)

    def invalidate(self, offset: int, length: int) -> None:
        self.inner.invalidate(offset, length)
