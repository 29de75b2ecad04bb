"""Starting the writeback of freshly written ranges at once, so that a final ``fsync`` finds little left to do."""

from __future__ import annotations

import ctypes

_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these dirty pages to disk without waiting for them (``sync_file_range`` with
    SYNC_FILE_RANGE_WRITE, the GIL released). Nothing where the call is missing or the file refuses it (a pipe):
    it only saves time at the final ``fsync``."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
