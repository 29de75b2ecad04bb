"""A stack of 1..255 read-only layers, merged into one index, with an optional writable upper."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Protocol

from ...errors import LimitError, UsageError
from ...source.base import BlockSource, Capability
from .index import Segments, merge_layers
from .mapping import Level, MergedIndex
from .spec import MAX_LAYERS
from .view import LsmtView
from .writable import WritableBase


class LowerLayer(Protocol):
    name: str

    @property
    def data(self) -> BlockSource: ...

    @property
    def virtual_size(self) -> int: ...

    @property
    def uuid(self) -> bytes: ...

    @property
    def parent_uuid(self) -> bytes: ...

    def segments(self) -> Segments: ...


class LsmtStack(LsmtView):
    """Layers bottom→top; reads cost one binary search in the merged index whatever the depth.

    Sources are numbered bottom-up: lower ``k`` is source ``k``; the upper (if any) is ``len(lowers)``.
    The stack closes only what was handed to it in ``owned``.
    """

    def __init__(self, lowers: Sequence[LowerLayer], upper: WritableBase | None = None, *,
                 owned: ExitStack | None = None, size: int | None = None) -> None:
        """``size``: the device's size when its owner knows it (a volume), else the top layer's virtual size."""
        if len(lowers) > MAX_LAYERS:
            raise LimitError(f"{len(lowers)} layers: a stack holds at most {MAX_LAYERS}")
        if not lowers and upper is None:
            raise UsageError("a stack needs at least one layer")
        self.lowers = list(lowers)
        self.upper = upper
        if owned is not None:
            self.adopt(owned)
        n = len(self.lowers)
        self.lower_index = MergedIndex(merge_layers([self.lowers[k].segments().with_tag(k)
                                                     for k in range(n - 1, -1, -1)]))
        for layer in self.lowers:  # the merged index is all the stack needs: free the per-layer copies
            release = getattr(layer, "release_index", None)
            if release is not None:
                release()
        levels: list[Level] = [self.lower_index]
        sources: list[BlockSource] = [layer.data for layer in self.lowers]
        if upper is not None:
            levels.insert(0, upper.level(n))
            sources.append(upper.data)
            self.capabilities = upper.capabilities
        else:
            self.capabilities = Capability.NONE
        self.levels = levels
        self.sources = sources
        top = [layer for layer in ([upper] if upper else []) + self.lowers[::-1] if layer.virtual_size]
        self.size = size if size is not None else top[0].virtual_size if top else 0
        self.name = upper.name if upper is not None else self.lowers[-1].name

    @property
    def depth(self) -> int:
        return len(self.lowers) + (self.upper is not None)


    def _write_aligned(self, offset: int, data: memoryview) -> None:
        assert self.upper is not None  # guarded by capabilities
        self.upper._write_aligned(offset, data)

    def _write_zeroes_aligned(self, offset: int, length: int) -> None:
        assert self.upper is not None
        self.upper._write_zeroes_aligned(offset, length)

    def _trim_aligned(self, offset: int, length: int) -> None:
        assert self.upper is not None
        self.upper._trim_aligned(offset, length)

    def _flush(self) -> None:
        if self.upper is not None:
            self.upper.flush()
