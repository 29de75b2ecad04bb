"""What a blob is, under its wrappers: the overlaybd tar envelope and ZFile, peeled as the reference does (and no
further). Without numpy or the LSMT readers, so that ``zfile decompress`` loads neither."""

from __future__ import annotations

from ..source.base import BlockSource
from ..source.file import RangeSource
from . import tarwrap
from .lsmt.header import is_lsmt
from .zfile.reader import ZFileSource
from .zfile.spec import is_zfile

SNIFF = 512


class Peeled:
    """What a blob turned out to be, outermost first. (A plain class, not a dataclass: ``zfile decompress`` starts
    without loading dataclasses; see ``overlaybd.frozen``.)"""

    def __init__(self, source: BlockSource, tar: tarwrap.TarMember | None = None, zfile: ZFileSource | None = None,
                 wrappers: list[str] | None = None) -> None:
        self.source = source  # the innermost byte stream
        self.tar = tar
        self.zfile = zfile
        self.wrappers: list[str] = [] if wrappers is None else wrappers

    def __repr__(self) -> str:
        return f"Peeled(source={self.source!r}, tar={self.tar!r}, zfile={self.zfile!r}, wrappers={self.wrappers!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Peeled)
        return (self.source, self.tar, self.zfile, self.wrappers) == (other.source, other.tar, other.zfile,
                                                                      other.wrappers)

    __hash__ = None  # type: ignore[assignment]  # mutable, equal by value: unhashable, as the dataclass was

    @property
    def is_lsmt(self) -> bool:
        return self.source.size >= 24 and is_lsmt(self.source.pread(0, 24))


def peel(src: BlockSource) -> Peeled:
    """Unwrap tar and ZFile; never looks further than the reference does."""
    out = Peeled(src)
    head = src.pread(0, min(SNIFF, src.size))
    if len(head) == SNIFF and tarwrap.is_tar(head):
        member = tarwrap.first_member(src)
        out.tar = member
        out.wrappers.append("tar")
        src = RangeSource(src, member.offset, member.size)
        head = src.pread(0, min(SNIFF, src.size))
    if is_zfile(head):
        z = ZFileSource(src, base=out.tar.offset if out.tar is not None else 0)
        out.zfile = z
        out.wrappers.append("zfile")
        src = z
    out.source = src
    return out
