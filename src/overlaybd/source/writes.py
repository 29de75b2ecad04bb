"""Writing all of a buffer to a file descriptor (no ctypes, no numpy: the numpy-free export path uses it too)."""

from __future__ import annotations

import os

from ..errors import LayerIOError


def write_all(fd: int, data: memoryview | bytes, offset: int, name: str) -> None:
    """``pwrite`` until every byte is written; OS errors (ENOSPC, EIO) become LayerIOError."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise LayerIOError(f"write failed: {exc.strerror}", path=name, offset=offset + done) from exc
