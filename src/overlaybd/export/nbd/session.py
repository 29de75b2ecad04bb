"""What a client deals with: the exports it may open, the session the handshake agrees on, and the signal that
ends one connection (never the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...source.base import BlockSource, Capability
from . import protocol
from .flushing import Flusher


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
