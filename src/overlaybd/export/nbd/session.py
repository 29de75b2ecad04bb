"""What a client deals with: the exports it may open, the session the handshake agrees on, and the signal that
ends one connection (never the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...formats.lsmt.writable import WritableLayer
from ...source.base import BlockSource, Capability
from . import protocol
from .flushing import Flusher
from .reads import Reads, reads_for
from .writes import Writer, writer_for


@dataclass
class Export:
    name: str
    source: BlockSource
    readonly: bool = False
    description: str = ""
    #: every byte is local (no remote layers): small requests are served on the event loop itself, saving two
    #: thread hops; a slow read there (a page-cache miss) costs the other requests of the moment a little latency
    inline: bool = False
    #: its FLUSH requests, joined (see :mod:`.flushing`)
    flusher: Flusher = field(default_factory=Flusher, compare=False, repr=False)
    #: the writer of plain writes (see :mod:`.writes`) and the source it was made for
    _writes: tuple[BlockSource, tuple[Writer, WritableLayer] | None] | None = field(default=None, compare=False,
                                                                                    repr=False)

    #: the C reads of the source (see :mod:`.reads`) and the source they were made for
    _reads: tuple[BlockSource, Reads | None] | None = field(default=None, compare=False, repr=False)

    def reads(self) -> Reads | None:
        """The C reads of the source as it is now; None if it is not all local or not a stack read straight
        through its merged index. Called between a request gate's enter and leave, as :meth:`writes`."""
        cached = self._reads
        if cached is None or cached[0] is not self.source:
            cached = self._reads = (self.source, reads_for(self.source) if self.inline else None)
        return cached[1]

    def writes(self) -> tuple[Writer, WritableLayer] | None:
        """The writer of plain writes to the source as it is now (a snapshot replaces it) and the upper it writes
        to; None if the export is read-only, not all local, or its source is not a stack over a log-structured
        upper. Called between a request gate's enter and leave, so that the source does not change meanwhile."""
        cached = self._writes
        if cached is None or cached[0] is not self.source:
            reads = self.reads()  # made first: the writer marks what it writes in its reader
            writer = writer_for(self.source, reads.reader if reads else None) if self.writable and self.inline \
                else None
            cached = self._writes = (self.source, writer)
        return cached[1]

    def mark(self, offset: int, length: int) -> None:
        """Before the source's upper changes in ``[offset, offset+length)`` (a write, trim or zero-write on the
        generic path): reads there go the generic way from now on (see :mod:`.reads`)."""
        reads = self.reads()
        if reads is not None:
            reads.mark(offset, length)

    @property
    def writable(self) -> bool:
        return not self.readonly and Capability.WRITE in self.source.capabilities

    def transmission_flags(self, structured: bool) -> int:
        flags = (protocol.TFLAG_HAS_FLAGS | protocol.TFLAG_SEND_FLUSH | protocol.TFLAG_SEND_FUA
                 | protocol.TFLAG_CAN_MULTI_CONN)
        if structured:
            flags |= protocol.TFLAG_SEND_DF
        if not self.writable:
            return flags | protocol.TFLAG_READ_ONLY
        caps = self.source.capabilities
        if Capability.TRIM in caps:
            flags |= protocol.TFLAG_SEND_TRIM
        if Capability.WRITE_ZEROES in caps:
            flags |= protocol.TFLAG_SEND_WRITE_ZEROES
        return flags


@dataclass(frozen=True)
class Session:
    """What the handshake agreed: the export, structured replies, and whether base:allocation was selected."""

    export: Export
    structured: bool
    allocation: bool


class EndConnection(Exception):
    """End this connection: the client aborted, went silent, stopped taking replies, or broke the stream in a way
    that cannot be resynchronised."""
