"""What a blob is, under its wrappers: the overlaybd tar envelope and ZFile, peeled as the reference does (and no
further). Without numpy or the LSMT readers, so that ``zfile decompress`` loads neither."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..source.base import BlockSource
from ..source.file import RangeSource
from . import tarwrap
from .lsmt.header import is_lsmt
from .zfile.reader import ZFileSource
from .zfile.spec import is_zfile

SNIFF = 512


@dataclass
class Peeled:
    """What a blob turned out to be, outermost first."""

    source: BlockSource  # the innermost byte stream
    tar: tarwrap.TarMember | None = None
    zfile: ZFileSource | None = None
    wrappers: list[str] = field(default_factory=list)

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
