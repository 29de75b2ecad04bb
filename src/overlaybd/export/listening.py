"""Listening sockets and the loop that accepts connections on them.

A Unix socket belongs to the process that made it: it refuses to take over a path where another process still
listens, and at the end removes the path only if it is still the socket it made (same device and inode), never
one another process put there since.

Accepting goes on when the process runs out of descriptors: the connection waits in the listen backlog and the
loop tries again after a pause that doubles up to a second, reporting each failure to a callback (asyncio's own
loop logs a traceback per failed attempt, a hundred per second or more).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from ..errors import LockedError, UsageError

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
GAVE_UP = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM)  # the client left before we took the connection
RETRY_FIRST, RETRY_LONGEST = 0.05, 1.0  # seconds between accept attempts while out of descriptors


class UnixListener:
    def __init__(self, path: str, backlog: int = 128) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._clear_stale(path)
            self.sock.bind(path)
            self.identity = _identity(path)
            self.sock.listen(backlog)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    @staticmethod
    def _clear_stale(path: str) -> None:
        """Remove a socket file nobody listens on any more; refuse a live one, and anything that is not a socket."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"{path}: exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
        else:
            raise LockedError("another process is listening on this socket", path=path)
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def owns_path(self) -> bool:
        """Is the file at ``path`` still the socket this listener bound?"""
        try:
            return _identity(self.path) == self.identity
        except OSError:
            return False

    def close(self) -> None:
        """Stop listening; remove the path if it is still ours."""
        if self.owns_path():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.sock.close()


def _identity(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def tcp_listener(address: tuple[Any, ...], family: int, backlog: int = 128) -> socket.socket:
    sock = socket.create_server(address[:2], family=family, backlog=backlog)
    sock.setblocking(False)
    return sock


async def accept_connections(sock: socket.socket, accepted: Callable[[socket.socket, Any], None],
                             starved: Callable[[OSError], None]) -> None:
    """Accept connections on ``sock`` until cancelled, handing each to ``accepted``; out of descriptors, call
    ``starved`` and try again after a pause."""
    loop = asyncio.get_running_loop()
    delay = RETRY_FIRST
    while True:
        try:
            conn, address = await loop.sock_accept(sock)
        except OSError as exc:
            if exc.errno in OUT_OF_DESCRIPTORS:
                starved(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_LONGEST)
                continue
            if exc.errno in GAVE_UP:
                continue
            raise
        delay = RETRY_FIRST
        accepted(conn, address)
