"""A single-file FUSE export of a BlockSource through libfuse (mfusepy): ``MOUNTPOINT/disk``, which the rootless
``overlaybd mount`` hands to fuse2fs (``attach``, as root, serves the same file on /dev/fuse: :mod:`.fusedev`).

Reads, writes, fsync (→ ``flush()``), and fallocate punch-hole / zero-range (→ ``trim`` / ``write_zeroes``) pass
through. The file is opened with FUSE ``direct_io`` so the kernel keeps no second copy of the disk's pages.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import time
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy prefers libfuse2 when both are installed
import mfusepy  # noqa: E402

from ..errors import OverlaybdError, errno_of  # noqa: E402
from ..source.base import BlockSource, Capability  # noqa: E402

log = logging.getLogger(__name__)

DISK = "disk"
_PUNCH_HOLE = 0x02
_KEEP_SIZE = 0x01
_ZERO_RANGE = 0x10


def _fail(exc: BaseException) -> mfusepy.FuseOSError:
    if not isinstance(exc, OverlaybdError):
        log.exception("FUSE request failed")
    else:
        log.warning("FUSE request failed: %s", exc)
    return mfusepy.FuseOSError(errno_of(exc))


class DiskFile(mfusepy.Operations):  # type: ignore[misc]
    """The mfusepy operations of a folder holding one file, ``disk``: the source's bytes."""

    use_ns = True

    def __init__(self, source: BlockSource, *, readonly: bool) -> None:
        self.source = source
        self.writable = not readonly and Capability.WRITE in source.capabilities
        self.started = time.time_ns()

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        started = self.started
        base = {"st_uid": 0, "st_gid": 0, "st_atime": started, "st_mtime": started, "st_ctime": started}
        if path == "/":
            return {**base, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == f"/{DISK}":
            size = self.source.size
            return {**base, "st_mode": stat.S_IFREG | (0o644 if self.writable else 0o444), "st_nlink": 1,
                    "st_size": size, "st_blocks": -(-size // 512), "st_blksize": 4096}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", DISK]

    def open(self, path: str, fi: Any) -> int:
        if path != f"/{DISK}":
            raise mfusepy.FuseOSError(errno.ENOENT)
        if (fi.flags & os.O_ACCMODE) != os.O_RDONLY and not self.writable:
            raise mfusepy.FuseOSError(errno.EROFS)
        fi.direct_io = 1
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        n = max(0, min(size, self.source.size - offset))
        if not n:
            return b""
        try:
            return self.source.pread(offset, n)
        except Exception as exc:
            raise _fail(exc) from None

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        if not self.writable:
            raise mfusepy.FuseOSError(errno.EROFS)
        if offset + len(data) > self.source.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        try:
            self.source.pwrite(offset, data)
        except Exception as exc:
            raise _fail(exc) from None
        return len(data)

    def fsync(self, path: str, datasync: int, fi: Any) -> int:
        try:
            self.source.flush()
        except Exception as exc:
            raise _fail(exc) from None
        return 0

    def flush(self, path: str, fi: Any) -> int:
        return 0

    def release(self, path: str, fi: Any) -> int:
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        if length != self.source.size:
            raise mfusepy.FuseOSError(errno.EPERM)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fi: Any) -> int:
        if not self.writable:
            raise mfusepy.FuseOSError(errno.EROFS)
        source = self.source
        end = min(offset + size, source.size)
        if offset >= end:
            return 0
        if mode & _PUNCH_HOLE and Capability.TRIM in source.capabilities:
            op = source.trim
        elif mode & _ZERO_RANGE and Capability.WRITE_ZEROES in source.capabilities:
            op = source.write_zeroes
        elif mode == 0:
            return 0  # preallocation: every byte of the disk already exists
        else:
            raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
        try:
            op(offset, end - offset)
        except Exception as exc:
            raise _fail(exc) from None
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        blocks = -(-self.source.size // 4096)
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": 0, "f_bavail": 0,
                "f_namemax": 255}


class DirectReadFUSE(mfusepy.FUSE):  # type: ignore[misc]
    """Reads land straight in libfuse's buffer: no Python bytes object, no extra copies."""

    def __init__(self, operations: DiskFile, mountpoint: str, **options: Any) -> None:
        self.disk = operations.source
        super().__init__(operations, mountpoint, **options)

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        source = self.disk
        n = max(0, min(size, source.size - offset))
        if n:
            target = (ctypes.c_char * n).from_address(ctypes.addressof(buf.contents))
            try:
                source.readinto(offset, memoryview(target).cast("B"))
            except Exception as exc:
                log.warning("FUSE read [%d, +%d) failed: %s", offset, n, exc)
                raise mfusepy.FuseOSError(errno_of(exc)) from None
        return n
