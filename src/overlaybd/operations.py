"""What the command line does, as plain functions: open, create, commit, seal, merge, compress, verify."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

from .errors import UsageError
from .formats.detect import open_layer, peel
from .formats.lsmt.commit import Progress, seal_in_place, write_compacted
from .formats.lsmt.index import merge_layers
from .formats.lsmt.layer import LsmtLayer
from .formats.lsmt.spec import NULL_UUID, parse_uuid
from .formats.lsmt.stack import LsmtStack
from .formats.lsmt.writable import SparseLayer, WritableBase, WritableLayer, create_writable
from .formats.output import (
    Compression,
    Written,
    compress_to,
    write_layer_file,
)
from .formats.zfile.extract import decompress_file
from .formats.zfile.reader import ZFileSource
from .source.file import FileSource

AnyLayer = LsmtLayer | WritableBase


def open_stack(layers: Sequence[str], upper: tuple[str, str] | None = None, *, writable: bool = False) -> LsmtStack:
    """Open layers (bottom→top; any form) and an optional writable upper ``(data, index)``. Close the result."""
    owned = ExitStack()
    try:
        lowers = [open_layer(p, owned=owned) for p in layers]
        top = open_layer(upper[0], upper[1], owned=owned, writable=writable) if upper else None
        if top is not None and not isinstance(top, WritableBase):
            raise UsageError("the upper layer must be writable", path=upper[0] if upper else None)
        return LsmtStack(lowers, top, owned=owned)
    except BaseException:
        owned.close()
        raise


def open_layer_alone(path: str, index: str | None = None, *, writable: bool = False) -> AnyLayer:
    """Open one layer file (any form) on its own; close it when done (``overlaybd.open_layer``)."""
    owned = ExitStack()
    try:
        layer = open_layer(path, index, owned=owned, writable=writable)
    except BaseException:
        owned.close()
        raise
    layer.adopt(owned)
    return layer


def _uuid(text: str | None, default: bytes = NULL_UUID) -> bytes:
    if text is None:
        return default
    try:
        return parse_uuid(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def create(data: str, index: str, virtual_size: int, *, parent_uuid: str | None = None, uuid: str | None = None,
           sparse: bool = False) -> None:
    create_writable(data, index, virtual_size, uuid=_uuid(uuid) if uuid else None, parent_uuid=_uuid(parent_uuid),
                    sparse=sparse)


def commit(source: AnyLayer, output: str, *, uuid: str | None = None, parent_uuid: str | None = None,
           message: str = "", compression: Compression | None = None, tar: bool = False, force: bool = False,
           progress: Progress | None = None) -> Written:
    """``overlaybd-commit``: compact a writable or sealed layer into a committed file."""
    header = source.header
    parent = _uuid(parent_uuid, header.parent_uuid)
    seg = source.segments().with_tag(0)

    def produce(fd: int, base: int) -> int:
        return write_compacted(fd, base, seg, [source.data], virtual_size=header.virtual_size, uuid=_uuid(uuid),
                               parent_uuid=parent, message=message.encode(), progress=progress, name=output)[1]

    return write_layer_file(output, produce, compression=compression, tar=tar, force=force, progress=progress)


def merge(layers: Sequence[AnyLayer], output: str, *, uuid: str | None = None, message: str = "",
          compression: Compression | None = None, tar: bool = False, force: bool = False,
          progress: Progress | None = None) -> Written:
    """``overlaybd-merge``: flatten layers (bottom→top) into one committed layer.

    As the reference: on-disk tags are source ordinals counted from the top, the virtual size comes from the top
    layer and the parent UUID from the bottom one.
    """
    if not layers:
        raise UsageError("nothing to merge")
    top_first = list(layers)[::-1]
    seg = merge_layers([layer.segments().with_tag(k) for k, layer in enumerate(top_first)])

    def produce(fd: int, base: int) -> int:
        return write_compacted(fd, base, seg, [layer.data for layer in top_first],
                               virtual_size=top_first[0].header.virtual_size, uuid=_uuid(uuid),
                               parent_uuid=top_first[-1].header.parent_uuid, message=message.encode(),
                               progress=progress, name=output)[1]

    return write_layer_file(output, produce, compression=compression, tar=tar, force=force, progress=progress)


def seal(data: str, index: str | None) -> None:
    """``overlaybd-commit --seal``: finish a writable data file in place so it opens as a sealed layer."""
    with ExitStack() as owned:
        layer = open_layer(data, index, owned=owned, writable=True)
        if not isinstance(layer, (WritableLayer, SparseLayer)):
            raise UsageError("only a writable layer can be sealed", path=data)
        layer.flush()
        seal_in_place(layer.data.fd, layer.data.size, layer.header, layer.segments(), name=data)


def compress(src: str, dst: str, compression: Compression, *, tar: bool = False, force: bool = False,
             progress: Progress | None = None) -> Written:
    """ZFile any file (``overlaybd-zfile``)."""
    with FileSource(src) as f:
        return compress_to(dst, f, compression, tar=tar, force=force, progress=progress)


def decompress(src: str, dst: str, *, force: bool = False, progress: Progress | None = None) -> Written:
    """``overlaybd-zfile -x``: the original bytes of a ZFile (tar envelope peeled first)."""
    size = decompress_file(src, dst, force=force, progress=progress)
    return Written(dst, size, size)


def verify_zfile(path: str, progress: Progress | None = None) -> ZFileSource:
    """Check every block CRC (and that every block decompresses)."""
    f = FileSource(path)
    try:
        peeled = peel(f)
        if peeled.zfile is None:
            raise UsageError("not a ZFile", path=path)
        if not peeled.zfile.verify:
            raise UsageError("this ZFile has no per-block CRCs to verify", path=path)
        peeled.zfile.verify_all(progress)
        return peeled.zfile
    finally:
        f.close()


