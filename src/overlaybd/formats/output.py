"""Writing a layer file as users ask for it: plain, ZFile'd, and/or in the tar envelope; always atomically; and any
device (a BlockSource) to a sparse raw file.

The file is built under a temporary name in the destination's folder, synced, then renamed, so a failure never
leaves a half-written file under the final name (``rawout.write_atomically``, which the numpy-free export of a
small stack uses too).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from ..errors import UsageError
from ..frozen import Frozen
from ..source.base import BlockSource, ExtentKind
from ..source.file import FileSource, write_all
from . import rawout, tarwrap
from .rawout import (  # re-exported: what writing a device out is made of
    COPY_CHUNK as COPY_CHUNK,
)
from .rawout import (
    ZERO_BLOCK as ZERO_BLOCK,
)
from .rawout import (
    chunked as chunked,
)
from .rawout import (
    nonzero_runs as nonzero_runs,
)
from .rawout import (
    scan_blocks,
    tmp_beside,
)
from .rawout import (
    set_length as set_length,
)
from .zfile.writer import Progress, ZFileResult, write_zfile

#: writes the payload into ``fd`` at ``base``; returns its length in bytes
Producer = Callable[[int, int], int]


class Compression(Frozen):
    __slots__ = ("algo", "block_size", "verify", "threads", "overwrite_header")
    algo: str
    block_size: int
    verify: bool
    threads: int | None
    overwrite_header: bool

    def __init__(self, algo: str = "lz4", block_size: int = 4096, verify: bool = True, threads: int | None = None,
                 overwrite_header: bool = False) -> None:
        object.__setattr__(self, "algo", algo)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "verify", verify)
        object.__setattr__(self, "threads", threads)
        object.__setattr__(self, "overwrite_header", overwrite_header)


class Written(Frozen):
    __slots__ = ("path", "size", "payload_size", "zfile")
    path: str
    size: int  # bytes in the file
    payload_size: int  # bytes inside the tar envelope (== size without one)
    zfile: ZFileResult | None

    def __init__(self, path: str, size: int, payload_size: int, zfile: ZFileResult | None = None) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "payload_size", payload_size)
        object.__setattr__(self, "zfile", zfile)


def write_atomically(path: str, produce: Producer, *, tar: bool = False, force: bool = False) -> Written:
    sizes: list[int] = []

    def fill(fd: int) -> int:
        base = tarwrap.PAYLOAD_OFFSET if tar else 0
        payload = produce(fd, base)
        size = payload
        if tar:
            head, end_at, size = tarwrap.envelope(payload, os.fstat(fd).st_mode)
            write_all(fd, head, 0, path)
            write_all(fd, bytes(2 * tarwrap.BLOCK), end_at, path)
        sizes.append(payload)
        return size

    size = rawout.write_atomically(path, fill, force=force)
    return Written(path, size, sizes[0])


def write_layer_file(path: str, produce: Producer, *, compression: Compression | None = None, tar: bool = False,
                     force: bool = False, progress: Progress | None = None) -> Written:
    """Write an LSMT (or any) payload; with ``compression`` it goes through a ZFile first."""
    if compression is None:
        return write_atomically(path, produce, tar=tar, force=force)
    if os.path.exists(path) and not force:
        raise UsageError("output exists (use --force to replace it)", path=path)
    fd, tmp = tmp_beside(path + ".plain")
    try:
        length = produce(fd, 0)
        set_length(fd, length, tmp)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        with FileSource(tmp) as plain:
            return compress_to(path, plain, compression, tar=tar, force=force, progress=progress)
    finally:
        os.unlink(tmp)


def compress_to(path: str, src: BlockSource, compression: Compression, *, tar: bool = False, force: bool = False,
                progress: Progress | None = None) -> Written:
    result: list[ZFileResult] = []

    def produce(fd: int, base: int) -> int:
        res = write_zfile(src, fd, base, algo=compression.algo, block_size=compression.block_size,
                          verify=compression.verify, threads=compression.threads,
                          overwrite_header=compression.overwrite_header, progress=progress, name=path)
        result.append(res)
        return res.length

    w = write_atomically(path, produce, tar=tar, force=force)
    return Written(w.path, w.size, w.payload_size, result[0])


def copy_out(path: str, src: BlockSource, *, force: bool = False, progress: Progress | None = None,
             sparse: bool = True) -> Written:
    """Write all of ``src`` to ``path`` as a raw file; with ``sparse``, what is not DATA (holes, zeroed ranges)
    and 4 KiB blocks of zeros inside data stay holes.

    The file is made at its full length first (``ftruncate``: holes cost nothing); the DATA extents of the
    merged index, neighbours joined whatever layer holds them, are read in chunks of up to 256 KiB into one reused
    buffer and written with one ``pwrite`` per run of non-zero blocks; then one fsync and the rename
    (``write_atomically``)."""

    def produce(fd: int, base: int) -> int:
        set_length(fd, base + src.size, path)  # first: a device the file system cannot hold fails before any copy
        runs = data_runs(src) if sparse else iter([(0, src.size)])
        copy_ranges(src, fd, base, path, chunked(runs, COPY_CHUNK), progress, skip_zeros=sparse)
        return src.size

    return write_atomically(path, produce, force=force)


def data_runs(src: BlockSource) -> Iterator[tuple[int, int]]:
    """``[start, end)`` byte ranges of ``src`` whose extents are DATA, adjacent ones joined."""
    start = end = -1
    for ext in src.extents():
        if ext.kind is not ExtentKind.DATA:
            continue
        if ext.offset == end:
            end = ext.end
            continue
        if end > start:
            yield start, end
        start, end = ext.offset, ext.end
    if end > start:
        yield start, end


def copy_ranges(src: BlockSource, fd: int, base: int, path: str, ranges: Iterable[tuple[int, int]],
                progress: Progress | None, *, skip_zeros: bool) -> None:
    """Copy each ``(offset, length)`` of ``src`` to ``fd`` at ``base + offset`` through one reused buffer.

    One thread: a reader thread with three 8 MiB buffers was measured no faster on 2 cores (the copy is bound by
    the kernel's page-cache copies), so the copy stays a plain loop."""
    buf = bytearray(COPY_CHUNK)
    whole = memoryview(buf)
    for pos, n in ranges:
        view = whole[:n]
        src.readinto(pos, view)
        for a, b in (scan_blocks(buf, n) if skip_zeros else [(0, n)]):
            write_all(fd, view[a:b], base + pos + a, path)
        if progress is not None:
            progress(pos + n, src.size)
