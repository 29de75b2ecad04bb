"""One transmission request on its own, without I/O on the socket: is it valid, what does it cost in memory, what
does it do to the source, and which NBD error does a failure become."""

from __future__ import annotations

import errno

from ...errors import errno_of
from ...source.base import BlockSource, Capability, ExtentKind
from .protocol import (
    CMD_BLOCK_STATUS,
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    EIO,
    ENOSPC,
    EPERM,
    MAX_PAYLOAD,
    NBD_ERRNOS,
    STATE_HOLE,
    STATE_ZERO,
    Request,
)
from .session import Session

MAX_EXTENTS = 65536  # descriptors in one BLOCK_STATUS reply
STATUS_SCAN = 64 << 20  # bytes of the device one BLOCK_STATUS looks at, at most
REQUEST_OVERHEAD = 4096  # what a request costs besides its data: the task serving it, its reply header
KNOWN_FLAGS = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE
_COMMANDS = (CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS)
_NBD_ERRNO = {errno.EROFS: EPERM, errno.EDQUOT: ENOSPC}  # POSIX errors the protocol spells otherwise
_STATE = {ExtentKind.DATA: 0, ExtentKind.ZERO: STATE_ZERO, ExtentKind.HOLE: STATE_HOLE | STATE_ZERO}


def cost(req: Request) -> int:
    """Bytes of memory a request may hold while in flight: its read buffer or reply, or its write payload."""
    if req.command in (CMD_READ, CMD_WRITE) and req.length <= MAX_PAYLOAD:
        return REQUEST_OVERHEAD + req.length
    if req.command == CMD_BLOCK_STATUS:
        return REQUEST_OVERHEAD + 8 * MAX_EXTENTS
    return REQUEST_OVERHEAD


def validate(session: Session, req: Request) -> int:
    """0, or the NBD error the spec names for this request on this export."""
    export = session.export
    cmd = req.command
    if req.flags & ~KNOWN_FLAGS or cmd not in _COMMANDS:
        return EINVAL
    if cmd == CMD_FLUSH:
        return 0
    if req.length > MAX_PAYLOAD and cmd in (CMD_READ, CMD_WRITE):
        return EINVAL
    if req.offset + req.length > export.source.size:
        return EINVAL
    if cmd == CMD_BLOCK_STATUS:
        return 0 if session.structured and session.allocation and req.length else EINVAL
    if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and not export.writable:
        return EPERM
    caps = export.source.capabilities
    if cmd == CMD_TRIM and Capability.TRIM not in caps:
        return EINVAL
    if cmd == CMD_WRITE_ZEROES and Capability.WRITE_ZEROES not in caps:
        return EINVAL
    return 0


def modify(src: BlockSource, req: Request, payload: bytes) -> None:
    """WRITE, TRIM, WRITE_ZEROES, FLUSH (and FUA on any of them)."""
    cmd = req.command
    if cmd == CMD_WRITE:
        src.pwrite(req.offset, payload)
    elif cmd == CMD_TRIM:
        src.trim(req.offset, req.length)
    elif cmd == CMD_WRITE_ZEROES:
        if req.flags & CMD_FLAG_NO_HOLE:
            _write_zero_data(src, req.offset, req.length)
        else:
            src.write_zeroes(req.offset, req.length)
    if cmd == CMD_FLUSH or req.flags & CMD_FLAG_FUA:
        src.flush()


def block_status(src: BlockSource, req: Request) -> list[tuple[int, int]]:
    """Extents as (length, base:allocation state). Neighbours of the same state are one extent (layers do not
    matter to base:allocation); a request is answered for at most STATUS_SCAN bytes, which the spec allows."""
    out: list[tuple[int, int]] = []
    one = bool(req.flags & CMD_FLAG_REQ_ONE)
    for ext in src.extents(req.offset, min(req.length, STATUS_SCAN)):
        state = _STATE[ext.kind]
        if out and out[-1][1] == state:
            out[-1] = (out[-1][0] + ext.length, state)
            continue
        if one and out or len(out) >= MAX_EXTENTS:
            break
        out.append((ext.length, state))
    return out


def nbd_errno(exc: BaseException) -> int:
    """The NBD error a client sees for a failed request: :func:`~overlaybd.errors.errno_of`, narrowed to the errors
    the protocol names (read-only is ``EPERM``, a full quota ``ENOSPC``, any other errno ``EIO``)."""
    code = errno_of(exc)
    return _NBD_ERRNO.get(code, code if code in NBD_ERRNOS else EIO)


def _write_zero_data(src: BlockSource, offset: int, length: int) -> None:
    zeros = bytes(min(length, 4 << 20))
    pos = offset
    end = offset + length
    while pos < end:
        n = min(len(zeros), end - pos)
        src.pwrite(pos, memoryview(zeros)[:n])
        pos += n
