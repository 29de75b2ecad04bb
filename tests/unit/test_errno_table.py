"""One errno table for every block export: FUSE reports ``errno_of`` as it is, NBD narrows it to the errors its
protocol names. Each error a request can end in is checked on both edges."""

from __future__ import annotations

import errno
import os

import pytest

from overlaybd.errors import (
    ChecksumError,
    LayerIOError,
    OutOfBoundsError,
    OverlaybdError,
    ReadOnlyError,
    errno_of,
)
from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd.requests import nbd_errno


def _io_error(code: int) -> LayerIOError:
    try:
        raise LayerIOError("write failed", path="/x/upper.data", offset=4096) from OSError(code, os.strerror(code))
    except LayerIOError as exc:
        return exc


CASES = [
    # (the error, what FUSE reports, what an NBD client sees)
    (ReadOnlyError("read-only"), errno.EROFS, nbd.EPERM),
    (OutOfBoundsError("past the end"), errno.EINVAL, nbd.EINVAL),
    (_io_error(errno.ENOSPC), errno.ENOSPC, nbd.ENOSPC),
    (_io_error(errno.EDQUOT), errno.EDQUOT, nbd.ENOSPC),
    (_io_error(errno.EIO), errno.EIO, nbd.EIO),
    (_io_error(errno.EACCES), errno.EACCES, nbd.EIO),
    (ChecksumError("block CRC", path="/x/layer.zfile", offset=8192), errno.EIO, nbd.EIO),
    (OverlaybdError("anything else"), errno.EIO, nbd.EIO),
    (RuntimeError("a bug"), errno.EIO, nbd.EIO),
]


@pytest.mark.parametrize(("exc", "posix", "on_the_wire"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_one_table_for_fuse_and_nbd(exc: BaseException, posix: int, on_the_wire: int) -> None:
    assert errno_of(exc) == posix
    assert nbd_errno(exc) == on_the_wire
    assert on_the_wire in nbd.NBD_ERRNOS


def test_an_io_error_without_an_errno_is_eio() -> None:
    exc = LayerIOError("short read", path="/x/a", offset=0)
    assert errno_of(exc) == errno.EIO
    assert nbd_errno(exc) == nbd.EIO
