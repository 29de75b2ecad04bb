"""Reading a registry answer's body within bounds: as it arrives, within the operation's deadline, no further than
a cap or a declared size. No retries here: a connection that fails mid-body raises :class:`~.http.Retryable` for
the operation's one loop (:mod:`.http`) to count."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import IO

import requests
import urllib3

from .. import metrics
from ..errors import LimitError
from .errors import DigestMismatchError
from .http import Operation, Retryable
from .repository import Progress


def body_chunks(r: requests.Response, op: Operation, what: str, *, size: int = 1 << 20, bounded: bool = True
                ) -> Iterator[bytes]:
    """An answer's body as it arrives (each piece at most ``size``, returned as soon as the socket has some). A
    ``bounded`` body (a range, a manifest, a token) checks the operation's deadline between pieces, so a server that
    trickles it out cannot hold the operation past it; a whole blob is not bounded (a stalled socket still times
    out). A connection that fails mid-body is :class:`Retryable`."""
    while True:
        if bounded:
            op.check_deadline()
        try:
            piece = r.raw.read1(size)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            raise Retryable(f"reading {what}: {type(exc).__name__}") from None
        if not piece:
            return
        metrics.current().fetched(op.host, len(piece))
        yield piece


def declared_length(r: requests.Response) -> int | None:
    """The Content-Length an answer declares, if it declares a sane one."""
    text = r.headers.get("Content-Length", "").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None


def read_capped(r: requests.Response, op: Operation, limit: int, what: str, *, path: str,
                exact: bool = False) -> bytes:
    """A body of at most ``limit`` bytes: refused from its Content-Length when that says more, and read no further
    than ``limit`` and one chunk when it does not say (LimitError). With ``exact``, ``limit`` is the size its
    descriptor declares, and any other length is a DigestMismatchError."""
    declared = declared_length(r)
    if declared is not None and (declared > limit or (exact and declared != limit)):
        if exact:
            raise DigestMismatchError(f"{what}: the registry sends {declared} bytes, its descriptor says {limit}",
                                      path=path)
        raise LimitError(f"{what}: {declared} bytes is more than the {limit} allowed", path=path)
    raw = bytearray()
    for chunk in body_chunks(r, op, what, size=64 << 10):
        raw += chunk
        if len(raw) > limit:
            if exact:
                raise DigestMismatchError(f"{what}: the registry sent more than the {limit} bytes declared",
                                          path=path)
            raise LimitError(f"{what}: more than the {limit} bytes allowed", path=path)
    if exact and len(raw) != limit:
        raise DigestMismatchError(f"{what}: the registry sent {len(raw)} bytes, its descriptor says {limit}",
                                  path=path)
    return bytes(raw)


class Download:
    """A whole-blob download's progress across attempts: the file so far and its running hash."""

    def __init__(self, out: IO[bytes], size: int, progress: Progress | None) -> None:
        self.out = out
        self.size = size
        self.progress = progress
        self.done = 0
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self._hash.update(chunk)
        self.done += len(chunk)
        if self.progress:
            self.progress(self.done, self.size)

    def restart(self) -> None:
        if self.done:
            self.out.seek(0)
            self.out.truncate()
            self._hash = hashlib.sha256()
            self.done = 0

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


