"""Protocol sources: a local file and a buffer in memory."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator

from ..errors import LayerIOError, TruncatedError
from .base import BlockSource, Capability, Extent, ExtentKind
from .filter import Filter
from .writes import write_all

__all__ = ["FileSource", "MemorySource", "RangeSource", "allocate_ahead", "punch_hole", "write_all"]


class FileSource(BlockSource):
    """A local file read with ``os.preadv``; writable when opened so."""

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        self.name = os.fspath(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.name, flags)
        except OSError as exc:
            raise LayerIOError(f"cannot open: {exc.strerror}", path=self.name) from exc
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)
        # a block device (an LVM volume, /dev/sdX) has no size in fstat: its end is where lseek says
        self.size = st.st_size if self.regular else os.lseek(self.fd, 0, os.SEEK_END)
        self.block_size = 1
        self.capabilities = Capability.WRITE | Capability.FLUSH if writable else Capability.NONE

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        done = 0
        want = len(buf)
        while done < want:
            try:
                got = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise LayerIOError(f"read failed: {exc.strerror}", path=self.name, offset=offset + done) from exc
            if got == 0:
                raise TruncatedError(f"file ends at {offset + done}, wanted {want - done} more bytes",
                                     path=self.name, offset=offset + done)
            done += got

    def _write_aligned(self, offset: int, data: memoryview) -> None:
        write_all(self.fd, data, offset, self.name)

    def _flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise LayerIOError(f"fsync failed: {exc.strerror}", path=self.name) from exc

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Allocated ranges are DATA; holes of a sparse file are ZERO (as qemu-img map reports raw files). A block
        device is all DATA."""
        if not self.regular:
            yield Extent(offset, length, ExtentKind.DATA)
            return
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                data = end
            data = min(data, end)
            if data > pos:
                yield Extent(pos, data - pos, ExtentKind.ZERO)
            if data >= end:
                return
            try:
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(hole, end)
            yield Extent(data, hole - data, ExtentKind.DATA)
            pos = hole

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_fallocate: Callable[[int, int, int, int], int] | None = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """``fallocate(2)`` (no binding in ``os``; ``os.posix_fallocate`` writes zeros where the file system cannot):
    0, or the call's errno. libc's, through ctypes, loaded on the first call (commands that never allocate do not
    load ctypes)."""
    global _fallocate
    if _fallocate is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

        def call(fd: int, mode: int, offset: int, length: int) -> int:
            return 0 if libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()

        _fallocate = call
    return _fallocate(fd, mode, offset, length)


def allocate_ahead(fd: int, offset: int, length: int) -> None:
    """``fallocate(KEEP_SIZE)``: blocks for ``[offset, offset+length)`` without changing the file's size. Where
    the file system cannot, appends allocate as they go, as without it."""
    fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length)


def punch_hole(fd: int, offset: int, length: int, name: str) -> None:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)``: the range reads as zeros and takes no space (no binding in ``os``)."""
    err = fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if err:
        raise LayerIOError(f"cannot punch a hole: {os.strerror(err)}", path=name, offset=offset) from OSError(
            err, os.strerror(err))


class MemorySource(BlockSource):
    """Bytes in memory; writable if built from a bytearray."""

    def __init__(self, data: bytes | bytearray, *, name: str = "<memory>", block_size: int = 1) -> None:
        self.name = name
        self._data = data
        self.size = len(data)
        self.block_size = block_size
        self.capabilities = (
            Capability.WRITE | Capability.WRITE_ZEROES | Capability.TRIM | Capability.FLUSH
            if isinstance(data, bytearray) else Capability.NONE
        )

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        buf[:] = memoryview(self._data)[offset : offset + len(buf)]

    def _write_aligned(self, offset: int, data: memoryview) -> None:
        self._data[offset : offset + len(data)] = data  # type: ignore[index]


class RangeSource(Filter):
    """A filter exposing ``[start, start+length)`` of another source (e.g. the payload of a tar member)."""

    def __init__(self, inner: BlockSource, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > inner.size:
            raise TruncatedError(
                f"range [{start}, {start + length}) is beyond the end ({inner.size})", path=inner.name, offset=start
            )
        super().__init__(inner, size=length)
        self.start = start

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.inner.readinto(self.start + offset, buf)

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        for ext in self.inner.extents(self.start + offset, length):
            yield Extent(ext.offset - self.start, ext.length, ext.kind, ext.layer)

    def invalidate(self, offset: int, length: int) -> None:
        self.inner.invalidate(self.start + offset, length)
