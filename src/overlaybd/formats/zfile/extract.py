"""Writing out the whole original file of a ZFile, on all cores (``zfile decompress``: without numpy or the LSMT
readers, so that the command starts fast).

Block ``k`` always lands at ``k * block_size`` in the output, so the work splits without any coordination: each
worker takes a chunk of blocks, reads their stored bytes, decompresses them (CRCs checked) into its own buffer
and writes that buffer at its place (``writeback.write_out``: in pieces, its writeback started at once).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable

from ...errors import UsageError
from ...source.file import FileSource
from ..peel import peel
from ..rawout import set_length, write_atomically
from .reader import ZFileSource
from .workers import Task, Workers
from .writeback import allocate, write_out

Progress = Callable[[int, int], None]
CHUNK_BYTES = 4 << 20  # output bytes a worker handles at a time

_local = threading.local()


def _buffer(n: int) -> memoryview:
    """A per-thread output buffer, reused: fresh memory costs about 1 ms a MiB to fault in."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = bytearray(n)
    return memoryview(buf)[:n]


def _chunk(z: ZFileSource, fd: int, base: int, offset: int, length: int, name: str) -> None:
    view = _buffer(length)
    z.readinto(offset, view)
    write_out(fd, view, base + offset, name)


def decompress_to(z: ZFileSource, fd: int, base: int = 0, *, threads: int | None = None,
                  progress: Progress | None = None, name: str = "<output>") -> int:
    """Write the original bytes of ``z`` into ``fd`` from byte ``base`` on; returns how many. Every block's CRC is
    checked on the way (ChecksumError, FormatError as ``ZFileSource`` raises them)."""
    threads = max(1, threads or os.cpu_count() or 1)
    total = z.size
    chunk = max(z.block_size, CHUNK_BYTES // z.block_size * z.block_size)
    offsets = range(0, total, chunk)
    if threads == 1:
        for off in offsets:
            _chunk(z, fd, base, off, min(chunk, total - off), name)
            if progress is not None:
                progress(min(off + chunk, total), total)
        return total
    with Workers(threads, "unzfile") as workers:
        pending: deque[tuple[Task, int]] = deque()
        try:
            for off in offsets:
                if len(pending) >= 2 * threads:
                    fut, upto = pending.popleft()
                    fut.result()
                    if progress is not None:
                        progress(upto, total)
                n = min(chunk, total - off)
                pending.append((workers.submit(_chunk, z, fd, base, off, n, name), off + n))
            while pending:
                fut, upto = pending.popleft()
                fut.result()
                if progress is not None:
                    progress(upto, total)
        finally:
            for fut, _ in pending:
                fut.cancel()
    return total


def decompress_file(src: str, dst: str, *, force: bool = False, progress: Progress | None = None) -> int:
    """``overlaybd-zfile -x``: the original bytes of the ZFile ``src`` (tar envelope peeled first) into a new file
    ``dst``, written under a temporary name, synced and renamed. Returns its size."""
    with FileSource(src) as f:
        z = peel(f).zfile
        if z is None:
            raise UsageError("not a ZFile", path=src)

        def fill(fd: int) -> int:
            set_length(fd, z.size, dst)  # first: a device the file system cannot hold fails before any copy
            allocate(fd, z.size, dst)
            return decompress_to(z, fd, 0, progress=progress, name=dst)

        return write_atomically(dst, fill, force=force)
