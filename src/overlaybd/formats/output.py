"""Writing a layer file as users ask for it: plain, ZFile'd, and/or in the tar envelope; always atomically.

The file is built under a temporary name in the destination's folder, synced, then renamed, so a failure never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import LayerIOError, UsageError
from ..source.base import BlockSource, ExtentKind
from ..source.file import FileSource, write_all
from . import tarwrap
from .zfile.writer import Progress, ZFileResult, write_zfile

#: writes the payload into ``fd`` at ``base``; returns its length in bytes
Producer = Callable[[int, int], int]


@dataclass(frozen=True, slots=True)
class Compression:
    algo: str = "lz4"
    block_size: int = 4096
    verify: bool = True
    threads: int | None = None
    overwrite_header: bool = False


@dataclass(frozen=True, slots=True)
class Written:
    path: str
    size: int  # bytes in the file
    payload_size: int  # bytes inside the tar envelope (== size without one)
    zfile: ZFileResult | None = None


def _tmp_beside(path: str) -> tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise LayerIOError(f"cannot create a file: {exc.strerror}", path=folder) from exc
    os.fchmod(fd, 0o644)
    return fd, tmp


def set_length(fd: int, length: int, path: str) -> None:
    """``ftruncate``, its refusal (a file system's size limit, a full disk) a LayerIOError naming ``path``."""
    try:
        os.ftruncate(fd, length)
    except OSError as exc:
        raise LayerIOError(f"cannot make the file {length} bytes long: {exc.strerror}", path=path) from exc


def write_atomically(path: str, produce: Producer, *, tar: bool = False, force: bool = False) -> Written:
    if os.path.exists(path) and not force:
        raise UsageError("output exists (use --force to replace it)", path=path)
    fd, tmp = _tmp_beside(path)
    try:
        base = tarwrap.PAYLOAD_OFFSET if tar else 0
        payload = produce(fd, base)
        size = payload
        if tar:
            head, end_at, size = tarwrap.envelope(payload, os.fstat(fd).st_mode)
            write_all(fd, head, 0, path)
            write_all(fd, bytes(2 * tarwrap.BLOCK), end_at, path)
        set_length(fd, size, path)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return Written(path, size, payload)


def write_layer_file(path: str, produce: Producer, *, compression: Compression | None = None, tar: bool = False,
                     force: bool = False, progress: Progress | None = None) -> Written:
    """Write an LSMT (or any) payload; with ``compression`` it goes through a ZFile first."""
    if compression is None:
        return write_atomically(path, produce, tar=tar, force=force)
    if os.path.exists(path) and not force:
        raise UsageError("output exists (use --force to replace it)", path=path)
    fd, tmp = _tmp_beside(path + ".plain")
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
    """Write all of ``src`` to ``path`` as a raw file; ranges that are not DATA stay holes when ``sparse``."""
    chunk = 4 << 20

    def produce(fd: int, base: int) -> int:
        set_length(fd, base + src.size, path)  # first: a device the file system cannot hold fails before any copy
        buf = bytearray(chunk)
        done = 0
        for ext in (src.extents() if sparse else [None]):
            if ext is not None and ext.kind is not ExtentKind.DATA:
                done += ext.length
                continue
            start = 0 if ext is None else ext.offset
            end = src.size if ext is None else ext.end
            pos = start
            while pos < end:
                n = min(chunk, end - pos)
                view = memoryview(buf)[:n]
                src.readinto(pos, view)
                if not sparse or not is_zero(view):
                    write_all(fd, view, base + pos, path)
                pos += n
                done += n
                if progress is not None:
                    progress(done, src.size)
        return src.size

    return write_atomically(path, produce, force=force)


def is_zero(view: memoryview) -> bool:
    n = len(view) - len(view) % 8
    return not np.frombuffer(view[:n], dtype=np.uint64).any() and not any(view[n:])
