"""Peel a layer blob the way the reference reader does: tar envelope, then ZFile, then LSMT."""

from __future__ import annotations

import os
from contextlib import ExitStack

from ..errors import BadMagicError, UsageError
from ..source.base import BlockSource
from ..source.file import FileSource
from .lsmt.layer import LsmtLayer, read_header
from .lsmt.spec import HEADER_SIZE
from .lsmt.writable import SparseLayer, WritableBase, WritableLayer
from .peel import Peeled, peel

__all__ = ["Peeled", "open_layer", "peel", "replace_last", "sibling_index"]


def replace_last(text: str, old: str, new: str) -> str:
    """``text`` with its last ``old`` (if any) replaced by ``new``."""
    before, found, after = text.rpartition(old)
    return before + new + after if found else text


def sibling_index(data_path: str) -> str | None:
    """``x.data`` -> ``x.index``, ``writable_data`` -> ``writable_index``, if that file exists."""
    head, base = os.path.split(data_path)
    if "data" not in base:
        return None
    candidate = os.path.join(head, replace_last(base, "data", "index"))
    return candidate if os.path.exists(candidate) else None


def open_layer(path: str, index: str | None = None, *, owned: ExitStack, writable: bool = False
               ) -> LsmtLayer | WritableBase:
    """Open any LSMT layer file: sealed (raw, ZFile'd, tar-wrapped) or writable (data+index pair, sparse)."""
    f = owned.enter_context(FileSource(path))
    peeled = peel(f)
    if not peeled.is_lsmt:
        raise BadMagicError("not an LSMT layer (after unwrapping: " + ("+".join(peeled.wrappers) or "raw") + ")",
                            path=path, offset=0)
    hdr = read_header(peeled.source, 0)
    if not hdr.is_data:
        raise UsageError("this is the index file of a writable layer: open its data file (with the index)",
                         path=path)
    sealed = bool(peeled.wrappers) or hdr.is_sealed or (index is None and _has_trailer(peeled.source))
    if sealed:
        if writable:
            raise UsageError("a sealed layer is read-only", path=path)
        return LsmtLayer(peeled.source, name=path)
    f.close()
    if hdr.is_sparse:
        return owned.enter_context(SparseLayer(path, readonly=not writable))
    index = index or sibling_index(path)
    if index is None:
        raise UsageError("this is the data file of a writable layer: give its index file too", path=path)
    return owned.enter_context(WritableLayer(path, index, readonly=not writable))


def _has_trailer(src: BlockSource) -> bool:
    if src.size < 2 * HEADER_SIZE:
        return False
    try:
        t = read_header(src, src.size - HEADER_SIZE)
    except BadMagicError:
        return False
    return not t.is_header and t.is_sealed
