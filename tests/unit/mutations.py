"""Mutating fixture files in place, observing what the package does with each, and judging that against what the
independent oracle (``tests/oracle.py``) predicts.

* an :class:`Observed` is what the package did with a file; :func:`judge` compares it with an expectation and
  returns a description of the failure, or None.
"""

from __future__ import annotations

import os
import shutil
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import overlaybd
from overlaybd.errors import ChecksumError, FormatError, OverlaybdError
from overlaybd.formats.detect import peel
from overlaybd.source.file import FileSource

from ..oracle import Expectation, NotDetected, Raises, Reads

# -- observing what the package does ---------------------------------------------------------------------------------

WINDOW_CAP = 64 << 20
WINDOW_TAIL = 1 << 20


def windows(size: int) -> list[tuple[int, int]]:
    """The whole device when it is of a sane size; else its first 64 MiB and its last 1 MiB."""
    if size <= WINDOW_CAP:
        return [(0, size)] if size else []
    return [(0, WINDOW_CAP), (max(WINDOW_CAP, size - WINDOW_TAIL), size)]


@dataclass
class Observed:
    exc: BaseException | None = None
    stage: str = ""
    tb: str = ""
    size: int | None = None
    reads: list[tuple[int, memoryview]] = field(default_factory=list)
    detected: bool = True


class _Buffers:
    """Reused read buffers: a fresh 64 MiB buffer per mutation costs more in page faults than the read itself.
    An observation's reads are valid until the next observation of the same kind."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, int], bytearray] = {}

    def views(self, kind: str, spans: list[tuple[int, int]]) -> list[tuple[int, memoryview]]:
        out = []
        for k, (a, b) in enumerate(spans):
            buf = self.bufs.get((kind, k))
            if buf is None or len(buf) < b - a:
                buf = self.bufs[(kind, k)] = bytearray(max(b - a, WINDOW_TAIL))
            out.append((a, memoryview(buf)[: b - a]))
        return out


_BUFFERS = _Buffers()


def _caught(obs: Observed, stage: str, exc: BaseException) -> Observed:
    obs.exc = exc
    obs.stage = stage
    obs.tb = "".join(traceback.format_exception(exc)[-6:])
    return obs


def observe_device(path: str | os.PathLike[str], index: str | os.PathLike[str] | None = None) -> Observed:
    """``overlaybd.open_layer`` then read the whole device (or its windows) and list its extents."""
    obs = Observed()
    try:
        layer = overlaybd.open_layer(os.fspath(path), None if index is None else os.fspath(index))
    except Exception as exc:  # any type at all: judge() tells typed from untyped
        return _caught(obs, "open", exc)
    try:
        with layer:
            obs.size = layer.size
            obs.reads = _BUFFERS.views("device", windows(layer.size))
            for a, view in obs.reads:
                layer.readinto(a, view)
            for _ext in layer.extents():
                pass
    except Exception as exc:
        return _caught(obs, "read", exc)
    return obs


def observe_stream(path: str | os.PathLike[str]) -> Observed:
    """``peel`` (tar, ZFile) then read the whole ZFile stream."""
    obs = Observed()
    try:
        with FileSource(os.fspath(path)) as f:
            p = peel(f)
            if p.zfile is None:
                obs.detected = False
                return obs
            obs.size = p.zfile.size
            obs.reads = _BUFFERS.views("stream", windows(p.zfile.size))
            for a, view in obs.reads:
                p.zfile.readinto(a, view)
    except Exception as exc:
        return _caught(obs, "peel/read", exc)
    return obs


def check_error(exc: BaseException, tb: str, names: Sequence[str]) -> str | None:
    """The rule for every error: typed, names the file, and a format error gives the offset."""
    if not isinstance(exc, OverlaybdError):
        return f"untyped {type(exc).__name__}: {exc}\n{tb}"
    if not any(n in str(exc) for n in names):
        return f"{type(exc).__name__} does not name the file: {exc}"
    if isinstance(exc, FormatError) and exc.offset is None:
        return f"{type(exc).__name__} gives no offset: {exc}"
    return None


def judge(exp: Expectation, obs: Observed, names: Sequence[str]) -> str | None:
    """None when ``obs`` is what ``exp`` demands, else what went wrong."""
    if obs.exc is not None:
        bad = check_error(obs.exc, obs.tb, names)
        if bad:
            return bad
        got = f"{type(obs.exc).__name__} at {obs.stage}: {obs.exc}"
        if isinstance(exp, (Reads, NotDetected)):
            return f"expected success ({exp.why}), got {got}"
        if not isinstance(obs.exc, exp.types):
            return f"expected {'/'.join(t.__name__ for t in exp.types)} ({exp.why}), got {got}"
        if isinstance(exp, Raises) and exp.block is not None:
            assert isinstance(obs.exc, ChecksumError)
            if obs.exc.block != exp.block or obs.exc.offset not in exp.block_offsets:
                return (f"expected block {exp.block} at offset {exp.block_offsets}, got block {obs.exc.block} "
                        f"at offset {obs.exc.offset}: {obs.exc}")
            if f"block {exp.block}" not in str(obs.exc):
                return f"message does not name block {exp.block}: {obs.exc}"
        return None
    if isinstance(exp, NotDetected):
        return None if not obs.detected else f"expected the ZFile to go undetected ({exp.why}), it was read"
    if not obs.detected:
        return "peel did not detect the ZFile"
    if isinstance(exp, Raises):
        return f"expected {'/'.join(t.__name__ for t in exp.types)} ({exp.why}), read {obs.size} bytes silently"
    if exp.image is None:
        return None
    if obs.size != exp.image.size:
        return f"size {obs.size}, expected {exp.image.size} ({exp.why})"
    for off, data in obs.reads:
        bad = exp.image.check(off, data)
        if bad:
            return f"wrong bytes ({exp.why}): {bad}"
    return None


# -- mutating a private copy in place --------------------------------------------------------------------------------


class Workbench:
    """A private copy of a fixture, mutated in place and restored after each mutation."""

    def __init__(self, src: Path, dst: Path) -> None:
        shutil.copyfile(src, dst)
        self.path = dst
        self.orig = src.read_bytes()

    @contextmanager
    def flipped(self, offset: int, xor: int) -> Iterator[bytes]:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes([self.orig[offset] ^ xor]), offset)
            mutated = bytearray(self.orig)
            mutated[offset] ^= xor
            yield bytes(mutated)
        finally:
            os.pwrite(fd, self.orig[offset : offset + 1], offset)
            os.close(fd)

    @contextmanager
    def patched(self, offset: int, data: bytes) -> Iterator[bytes]:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            yield self.orig[:offset] + data + self.orig[offset + len(data):]
        finally:
            os.pwrite(fd, self.orig[offset : offset + len(data)], offset)
            os.close(fd)

    @contextmanager
    def truncated(self, n: int) -> Iterator[bytes]:
        os.truncate(self.path, n)
        try:
            yield self.orig[:n]
        finally:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, self.orig[n:], n)
            finally:
                os.close(fd)


class Failures:
    """Collects every failing mutation so one test run reports all of them."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.items: list[str] = []
        self.count = 0

    def add(self, what: str, problem: str | None) -> None:
        self.count += 1
        if problem:
            self.items.append(f"{what}: {problem}")

    def report(self) -> str:
        head = f"{self.label}: {len(self.items)} of {self.count} mutations misbehaved"
        return "\n".join([head, *self.items[:25], *(["..."] if len(self.items) > 25 else [])])
