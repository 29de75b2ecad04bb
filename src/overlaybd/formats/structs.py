"""A binary record declared once: its fields in order, from which come the ``struct.Struct`` and each field's offset.

Errors about a field point at ``record_start + offsets[name]``, so no offset is ever written out by hand.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence


class Record:
    """``fields``: ``(name, struct format)`` pairs in order; little-endian, no implicit padding. (A plain class,
    not a dataclass: loading dataclasses costs the command line's start 15 ms.)"""

    __slots__ = ("fields", "offsets", "struct")

    def __init__(self, fields: tuple[tuple[str, str], ...], layout: struct.Struct, offsets: dict[str, int]) -> None:
        self.fields = fields
        self.struct = layout
        self.offsets = offsets

    @classmethod
    def declare(cls, fields: Sequence[tuple[str, str]]) -> Record:
        offsets: dict[str, int] = {}
        fmt = "<"
        for name, code in fields:
            offsets[name] = struct.calcsize(fmt)
            fmt += code
        return cls(tuple(fields), struct.Struct(fmt), offsets)

    @property
    def size(self) -> int:
        return self.struct.size

    def span(self, name: str) -> tuple[int, int]:
        """``[start, end)`` of a field inside the record."""
        start = self.offsets[name]
        code = dict(self.fields)[name]
        return start, start + struct.calcsize("<" + code)
