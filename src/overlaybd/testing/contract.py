"""The BlockSource contract: what every source must do, checked against an independent model of its bytes.

Usage (from pytest or anywhere)::

    from overlaybd.testing.contract import BlockSourceContract

    def make():
        return MemorySource(data), data          # (source, expected bytes or a ReferenceModel)

    BlockSourceContract(make).run()             # every check; or .run(["extents", "concurrent_reads"])

To check a source you keep open yourself (a live volume, say), use
``BlockSourceContract().run_on(source, expected, ["extents", "sub_extents"])``.

The factory is called once per check, so each check sees a fresh source (writes never leak from one check into
another). It may return ``(source, expected)``, ``(source, expected, cleanup)`` or a :class:`Subject`;
``source.close()`` and then ``cleanup()`` are called when the check is done. Failures raise ``AssertionError``
with a message naming the source, the request and the first differing byte; the checks do not rely on ``assert``
statements, so they also run under ``python -O``.

Nothing here imports Hypothesis or pytest: the module ships with the package.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn, Protocol, runtime_checkable

from ..errors import OutOfBoundsError, ReadOnlyError
from ..source.base import BlockSource, Capability, Extent, ExtentKind

__all__ = [
    "CHECKS",
    "BlockSourceContract",
    "ByteModel",
    "ReferenceModel",
    "SparseModel",
    "Subject",
    "as_model",
    "check_block_source",
]

_CHUNK = 4 << 20
_ZERO_CHUNK = bytes(_CHUNK)


# -- reference models ---------------------------------------------------------------------------------------


@runtime_checkable
class ReferenceModel(Protocol):
    """What the bytes of a source should be. ``write``/``zero`` are used only for writable sources."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...


class ByteModel:
    """A device held whole in memory; copied on the first write (so shared expected bytes are never changed)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data: bytes | bytearray = data if isinstance(data, bytes | bytearray) else bytes(data)
        self._owned = False

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset : offset + length])

    def _mutable(self) -> bytearray:
        if not self._owned:
            self._data = bytearray(self._data)
            self._owned = True
        assert isinstance(self._data, bytearray)
        return self._data

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"model write [{offset}, {offset + len(data)}) outside [0, {self.size})")
        self._mutable()[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))


class SparseModel:
    """A device of ``size`` bytes that reads as zeros except where written; memory grows with what is written.

    Suits large, mostly empty devices (a 1 GiB empty layer). ``chunks`` maps chunk number to its bytes.
    """

    def __init__(self, size: int, chunk: int = 1 << 16, chunks: dict[int, bytes | bytearray] | None = None) -> None:
        self._size = size
        self.chunk = chunk
        self.chunks: dict[int, bytes | bytearray] = dict(chunks or {})

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        pos = offset
        end = offset + length
        cs = self.chunk
        while pos < end:
            k, at = divmod(pos, cs)
            n = min(cs - at, end - pos)
            blk = self.chunks.get(k)
            if blk is not None:
                out[pos - offset : pos - offset + n] = blk[at : at + n]
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self._size:
            raise ValueError(f"model write [{offset}, {offset + len(data)}) outside [0, {self._size})")
        cs = self.chunk
        pos = 0
        while pos < len(data):
            k, at = divmod(offset + pos, cs)
            n = min(cs - at, len(data) - pos)
            blk = self.chunks.get(k)
            if not isinstance(blk, bytearray):
                blk = bytearray(blk) if blk is not None else bytearray(min(cs, self._size - k * cs))
                self.chunks[k] = blk
            blk[at : at + n] = data[pos : pos + n]
            pos += n

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))


Expected = bytes | bytearray | memoryview | ReferenceModel


def as_model(expected: Expected) -> ReferenceModel:
    if isinstance(expected, bytes | bytearray | memoryview):
        return ByteModel(expected)
    if isinstance(expected, ReferenceModel):
        return expected
    raise TypeError(f"expected bytes or a ReferenceModel, not {type(expected).__name__}")


@dataclass
class Subject:
    """A source under test, what it should read as, and what to release afterwards (besides ``source.close``)."""

    source: BlockSource
    expected: Expected
    cleanup: Callable[[], None] | None = None


Factory = Callable[[], "Subject | tuple[BlockSource, Expected] | tuple[BlockSource, Expected, Callable[[], None]]"]


# -- helpers ------------------------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise AssertionError(message)


def _check(cond: bool, message: str | Callable[[], str]) -> None:
    if not cond:
        _fail(message() if callable(message) else message)


def _diff(got: bytes | bytearray | memoryview, want: bytes, what: str) -> str | None:
    """None when equal; otherwise a message naming the first difference."""
    if len(got) != len(want):
        return f"{what}: returned {len(got)} bytes, expected {len(want)}"
    if got == want:
        return None
    g = bytes(got)
    first = next(i for i in range(len(g)) if g[i] != want[i])
    ndiff = sum(1 for a, b in zip(g, want, strict=True) if a != b)
    ctx_g = g[first : first + 8].hex()
    ctx_w = want[first : first + 8].hex()
    return (f"{what}: first difference at byte {first} of the read (got {ctx_g}..., expected {ctx_w}...); "
            f"{ndiff} of {len(g)} bytes differ")


def _same(got: bytes | bytearray | memoryview, want: bytes, what: str) -> None:
    msg = _diff(got, want, what)
    if msg is not None:
        _fail(msg)


def _raises(exc: type[BaseException], call: Callable[[], object], what: str) -> None:
    try:
        call()
    except exc:
        return
    except Exception as other:  # noqa: BLE001 - report what was raised instead
        _fail(f"{what}: expected {exc.__name__}, got {type(other).__name__}: {other}")
    _fail(f"{what}: expected {exc.__name__}, nothing was raised")


def _do(what: str, fn: Callable[..., object], *args: object) -> None:
    """Call ``fn``; an unexpected exception fails the check with the request named."""
    try:
        fn(*args)
    except Exception as exc:
        _fail(f"{what} raised {type(exc).__name__}: {exc}")


def _readinto_new(source: BlockSource, offset: int, length: int) -> None:
    source.readinto(offset, bytearray(length))


def _list_extents(source: BlockSource, offset: int, length: int | None) -> list[Extent]:
    return list(source.extents(offset, length))


def _is_zero(data: bytes | bytearray | memoryview) -> bool:
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        n = min(_CHUNK, len(view) - pos)
        if view[pos : pos + n] != _ZERO_CHUNK[:n]:
            return False
        pos += n
    return True


# -- the contract -------------------------------------------------------------------------------------------

#: every check, in the order :meth:`BlockSourceContract.run` runs them
CHECKS: tuple[str, ...] = (
    "size",
    "exact_reads",
    "zero_length",
    "unaligned",
    "end_reads",
    "out_of_bounds",
    "readinto",
    "concurrent_reads",
    "extents",
    "sub_extents",
    "read_only",
    "writes",
)


@dataclass
class BlockSourceContract:
    """Checks one kind of source; each check builds a fresh subject with ``factory``.

    ``writable`` (when not None) is what the caller expects: ``True`` means the source must have the WRITE
    capability, ``False`` that it must have none. ``scan_limit`` bounds the bytes a check reads in one sweep
    (larger devices are sampled: every extent's edges and a random middle window).
    """

    factory: Factory | None = None
    seed: int = 0
    writable: bool | None = None
    random_reads: int = 48
    max_read: int = 1 << 18
    threads: int = 8
    reads_per_thread: int = 24
    scan_limit: int = 64 << 20
    label: str | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, checks: Iterable[str] | None = None) -> None:
        for name in CHECKS if checks is None else checks:
            self.check(name)

    def check(self, name: str) -> None:
        if name not in CHECKS:
            raise ValueError(f"unknown contract check {name!r} (known: {', '.join(CHECKS)})")
        self._rng = random.Random(f"{self.seed}/{name}")
        with self.subject() as (source, model):
            getattr(self, f"check_{name}")(source, model)

    def run_on(self, source: BlockSource, expected: Expected, checks: Iterable[str]) -> None:
        """Run checks on a source the caller keeps open (and closes); ``factory`` is not used."""
        model = as_model(expected)
        for name in checks:
            if name not in CHECKS:
                raise ValueError(f"unknown contract check {name!r} (known: {', '.join(CHECKS)})")
            self._rng = random.Random(f"{self.seed}/{name}")
            getattr(self, f"check_{name}")(source, model)

    @contextmanager
    def subject(self) -> Iterator[tuple[BlockSource, ReferenceModel]]:
        if self.factory is None:
            raise ValueError("this contract has no factory: use run_on() with an open source")
        made = self.factory()
        if isinstance(made, Subject):
            subj = made
        elif len(made) == 2:
            subj = Subject(made[0], made[1])
        else:
            subj = Subject(made[0], made[1], made[2])
        try:
            yield subj.source, as_model(subj.expected)
        finally:
            try:
                subj.source.close()
            finally:
                if subj.cleanup is not None:
                    subj.cleanup()

    def _name(self, source: BlockSource) -> str:
        return self.label or repr(source)

    # -- shared pieces ---------------------------------------------------------------------------------------
    def _read_ok(self, source: BlockSource, model: ReferenceModel, offset: int, length: int, how: str = "pread"
                 ) -> None:
        what = f"{self._name(source)}: {how}(offset={offset}, length={length})"
        want = model.read(offset, length)
        if how == "pread":
            try:
                got: bytes | bytearray = source.pread(offset, length)
            except Exception as exc:
                _fail(f"{what} raised {type(exc).__name__}: {exc}")
            _check(type(got) is bytes, f"{what} returned {type(got).__name__}, not bytes")
        else:
            buf = bytearray(length)
            try:
                source.readinto(offset, buf)
            except Exception as exc:
                _fail(f"{what} raised {type(exc).__name__}: {exc}")
            got = buf
        _same(got, want, what)

    def _read_span(self, source: BlockSource, model: ReferenceModel, offset: int, length: int) -> None:
        """Read ``[offset, offset+length)`` in pieces of at most 4 MiB and compare."""
        pos = offset
        end = offset + length
        while pos < end:
            n = min(_CHUNK, end - pos)
            self._read_ok(source, model, pos, n)
            pos += n

    def _random_range(self, source: BlockSource, *, max_len: int | None = None, aligned: bool = False
                      ) -> tuple[int, int]:
        size = source.size
        rng = self._rng
        cap = min(size, max_len if max_len is not None else self.max_read)
        if size == 0:
            return 0, 0
        bs = max(1, source.block_size)
        length = rng.randint(1, max(1, cap))
        offset = rng.randint(0, size - length)
        if aligned:
            offset -= offset % bs
            length = min(size - offset, max(bs, length - length % bs))
        return offset, length

    def _boundaries(self, source: BlockSource) -> list[int]:
        """Interesting offsets: block and extent edges."""
        size = source.size
        bs = max(1, source.block_size)
        out = {0, size}
        for k in (1, 2, 3):
            out.update((k * bs, size - k * bs, size - size % bs))
        try:
            for i, ext in enumerate(source.extents()):
                out.update((ext.offset, ext.end))
                if i > 256:
                    break
        except Exception:  # noqa: BLE001 - the extents check reports it
            pass
        return sorted(o for o in out if 0 <= o <= size)

    # -- checks ----------------------------------------------------------------------------------------------
    def check_size(self, source: BlockSource, model: ReferenceModel) -> None:
        name = self._name(source)
        _check(isinstance(source.size, int) and source.size >= 0, f"{name}: size {source.size!r} is not an int >= 0")
        _check(source.size == model.size, f"{name}: size is {source.size}, expected {model.size}")
        bs = source.block_size
        _check(isinstance(bs, int) and bs >= 1, f"{name}: block_size {bs!r} is not an int >= 1")
        _check(isinstance(source.capabilities, Capability),
               f"{name}: capabilities {source.capabilities!r} is not a Capability")
        if self.writable is True:
            _check(Capability.WRITE in source.capabilities, f"{name}: expected a writable source, capabilities "
                   f"are {source.capabilities!r}")
        elif self.writable is False:
            _check(source.capabilities == Capability.NONE, f"{name}: expected a read-only source, capabilities "
                   f"are {source.capabilities!r}")

    def check_exact_reads(self, source: BlockSource, model: ReferenceModel) -> None:
        size = source.size
        if size <= self.scan_limit:
            self._read_span(source, model, 0, size)
        bs = max(1, source.block_size)
        self._read_ok(source, model, 0, min(size, bs))
        for _ in range(self.random_reads // 2):
            self._read_ok(source, model, *self._random_range(source, aligned=True))
        for _ in range(self.random_reads // 2):
            self._read_ok(source, model, *self._random_range(source))

    def check_zero_length(self, source: BlockSource, model: ReferenceModel) -> None:
        name = self._name(source)
        for off in sorted({0, source.size // 2, max(0, source.size - 1), source.size}):
            got = source.pread(off, 0)
            _check(got == b"" and type(got) is bytes, f"{name}: pread({off}, 0) returned {got!r}, expected b''")
            buf = bytearray()
            source.readinto(off, buf)
            source.readinto(off, memoryview(buf))
            exts = list(source.extents(off, 0))
            _check(exts == [], f"{name}: extents({off}, 0) returned {exts}, expected nothing")
        exts = list(source.extents(source.size))
        _check(exts == [], f"{name}: extents({source.size}) returned {exts}, expected nothing")

    def check_unaligned(self, source: BlockSource, model: ReferenceModel) -> None:
        size = source.size
        if size == 0:
            return
        bs = max(1, source.block_size)
        rng = self._rng
        cases: set[tuple[int, int]] = {(0, 1), (0, min(size, 3))}
        for edge in self._boundaries(source):
            for d_off in (-3, -1, 0, 1, 7):
                for length in (1, 2, 511, 513, bs - 1, bs + 1, 2 * bs + 5, 3 * 4096 + 17):
                    o = edge + d_off
                    if 0 <= o and length > 0 and o + length <= size:
                        cases.add((o, length))
        # strictly inside one block, and spanning several with both ends partial
        for _ in range(16):
            blk = rng.randrange(0, -(-size // bs))
            start = blk * bs
            span = min(bs, size - start)
            a = rng.randrange(0, span)
            b = rng.randrange(a, span) + 1
            cases.add((start + a, b - a))
            o = start + rng.randrange(0, span)
            cases.add((o, min(size - o, rng.randint(1, 5 * bs + 3))))
        if size % bs:
            tail = size - size % bs
            cases.update({(tail, size - tail), (tail + (size - tail) // 2, size - tail - (size - tail) // 2)})
        for o, n in sorted(cases)[: 4000]:
            self._read_ok(source, model, o, n)

    def check_end_reads(self, source: BlockSource, model: ReferenceModel) -> None:
        size = source.size
        bs = max(1, source.block_size)
        for n in sorted({1, 2, 511, 512, 513, 4095, 4096, 4097, bs - 1, bs, bs + 1, 2 * bs + 1, 70000}):
            if 0 < n <= size:
                self._read_ok(source, model, size - n, n)
                self._read_ok(source, model, size - n, n, how="readinto")
        if size:
            self._read_ok(source, model, size - 1, 1)
        name = self._name(source)
        got = source.pread(size, 0)
        _check(got == b"", f"{name}: pread(size={size}, 0) returned {len(got)} bytes")

    def check_out_of_bounds(self, source: BlockSource, model: ReferenceModel) -> None:
        """Every request outside ``[0, size)`` raises OutOfBoundsError (all cases are tried; all failures are
        reported together)."""
        size = source.size
        name = self._name(source)
        bad: list[tuple[int, int]] = [(-1, 1), (-1, 0), (-4096, 8192), (size, 1), (size + 1, 0), (size + 4096, 1),
                                      (0, size + 1), (-(1 << 62), 1), (0, 1 << 62), (0, -1), (size, -1)]
        if size:
            bad += [(size - 1, 2), (size // 2, size - size // 2 + 1)]
        calls: list[tuple[Callable[[], object], str]] = []
        for off, n in bad:
            calls.append((partial(source.pread, off, n), f"pread({off}, {n})"))
            if 0 <= n < 1 << 24:
                calls.append((partial(_readinto_new, source, off, n), f"readinto({off}, bytearray({n}))"))
            calls.append((partial(_list_extents, source, off, n), f"extents({off}, {n})"))
        calls += [(partial(_list_extents, source, size + 1, None), f"extents({size + 1})"),
                  (partial(_list_extents, source, -1, None), "extents(-1)")]
        failures: list[str] = []
        for call, what in calls:
            try:
                _raises(OutOfBoundsError, call, what)
            except AssertionError as exc:
                failures.append(str(exc))
        _check(not failures, lambda: f"{name}: {len(failures)} out-of-bounds request(s) misbehaved: "
               + "; ".join(failures))
        # a failed request must not disturb the source
        if size:
            self._read_ok(source, model, 0, min(size, 4096))

    def check_readinto(self, source: BlockSource, model: ReferenceModel) -> None:
        name = self._name(source)
        if source.size == 0:
            return
        for i in range(max(4, self.random_reads // 4)):
            off, n = self._random_range(source, aligned=bool(i % 2))
            want = model.read(off, n)
            what = f"{name}: readinto(offset={off}, length={n})"
            ba = bytearray(n)
            source.readinto(off, ba)
            _same(ba, want, what + " into a bytearray")
            # a memoryview in the middle of a larger buffer: bytes around it stay untouched
            big = bytearray(b"\xa5" * (n + 64))
            mv = memoryview(big)[32 : 32 + n]
            source.readinto(off, mv)
            _same(mv, want, what + " into a memoryview slice")
            _check(big[:32] == b"\xa5" * 32 and big[32 + n :] == b"\xa5" * 32,
                   f"{what}: wrote outside the memoryview it was given")
            # a memoryview of another item format, as long as the length is a whole number of items
            if n % 8 == 0:
                wide = bytearray(n)
                source.readinto(off, memoryview(wide).cast("Q"))
                _same(wide, want, what + " into a memoryview of 8-byte items")
            # a buffer that held other bytes is fully overwritten
            dirty = bytearray(b"\xff" * n)
            source.readinto(off, memoryview(dirty))
            _same(dirty, want, what + " into a buffer of 0xff")

    def check_concurrent_reads(self, source: BlockSource, model: ReferenceModel) -> None:
        name = self._name(source)
        if source.size == 0:
            return
        plans = []
        for _ in range(self.threads):
            plans.append([(*self._random_range(source, aligned=self._rng.random() < 0.3), self._rng.random() < 0.5)
                          for _ in range(self.reads_per_thread)])
        wants = [[model.read(o, n) for o, n, _ in plan] for plan in plans]
        failures: list[str] = []
        barrier = threading.Barrier(self.threads)

        def worker(t: int) -> None:
            try:
                barrier.wait(timeout=60)
                for (o, n, into), want in zip(plans[t], wants[t], strict=True):
                    if into:
                        buf = bytearray(n)
                        source.readinto(o, memoryview(buf))
                        got: bytes | bytearray = buf
                    else:
                        got = source.pread(o, n)
                    msg = _diff(got, want, f"{name}: thread {t}: {'readinto' if into else 'pread'}({o}, {n})")
                    if msg is not None:
                        failures.append(msg)
                        return
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"{name}: thread {t} raised {type(exc).__name__}: {exc}")

        workers = [threading.Thread(target=worker, args=(t,), name=f"contract-{t}") for t in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=300)
        _check(not any(w.is_alive() for w in workers), f"{name}: concurrent readers did not finish")
        _check(not failures, lambda: f"{len(failures)} concurrent reader(s) failed: " + "; ".join(failures[:4]))

    def _full_extents(self, source: BlockSource) -> list[Extent]:
        name = self._name(source)
        exts = list(source.extents())
        self._check_cover(name, "extents()", exts, 0, source.size)
        return exts

    @staticmethod
    def _check_cover(name: str, call: str, exts: list[Extent], start: int, end: int) -> None:
        pos = start
        for i, ext in enumerate(exts):
            _check(isinstance(ext, Extent), f"{name}: {call} yielded {ext!r}, not an Extent")
            _check(isinstance(ext.kind, ExtentKind), f"{name}: {call}[{i}] has kind {ext.kind!r}")
            _check(ext.length > 0, f"{name}: {call}[{i}] = {ext} is empty")
            _check(ext.layer is None or (isinstance(ext.layer, int) and ext.layer >= 0),
                   f"{name}: {call}[{i}] = {ext} names layer {ext.layer!r}")
            _check(ext.offset == pos, f"{name}: {call}[{i}] = {ext} starts at {ext.offset}, expected {pos} ("
                   + ("a gap" if ext.offset > pos else "an overlap or out of order") + ")")
            if i:
                prev = exts[i - 1]
                _check(not (prev.kind is ext.kind and prev.layer == ext.layer),
                       f"{name}: {call}[{i - 1}] = {prev} and [{i}] = {ext} are neighbours of the same kind and "
                       f"layer: they should have been merged")
            pos = ext.end
        _check(pos == end, f"{name}: {call} covers [{start}, {pos}), expected [{start}, {end})")

    def _check_claims(self, source: BlockSource, model: ReferenceModel, exts: list[Extent]) -> None:
        """ZERO and HOLE extents read as zeros (and the model agrees); DATA extents read as the model."""
        name = self._name(source)
        size = source.size
        whole = size <= self.scan_limit
        rng = self._rng
        for ext in exts:
            if whole:
                windows = [(ext.offset, ext.length)]
            else:
                w = min(ext.length, 1 << 16)
                mid = ext.offset + rng.randrange(0, ext.length - w + 1)
                windows = [(ext.offset, w), (ext.end - w, w), (mid, w)]
            for off, n in windows:
                pos = off
                while pos < off + n:
                    step = min(_CHUNK, off + n - pos)
                    got = source.pread(pos, step)
                    want = model.read(pos, step)
                    what = f"{name}: bytes [{pos}, {pos + step}) inside {ext}"
                    if ext.kind is not ExtentKind.DATA and not _is_zero(got):
                        first = next(i for i, b in enumerate(got) if b)
                        _fail(f"{what} do not read as zeros (first non-zero byte at +{first})")
                    if ext.kind is not ExtentKind.DATA:
                        _check(_is_zero(want), f"{what}: the source claims {ext.kind.name} but the expected bytes are "
                               f"not all zero")
                    _same(got, want, what)
                    pos += step

    def check_extents(self, source: BlockSource, model: ReferenceModel) -> None:
        exts = self._full_extents(source)
        self._check_claims(source, model, exts)
        name = self._name(source)
        again = list(source.extents(0, source.size))
        _check(again == exts, f"{name}: extents(0, size) differs from extents()")

    def check_sub_extents(self, source: BlockSource, model: ReferenceModel) -> None:
        name = self._name(source)
        size = source.size
        full = self._full_extents(source)
        if size == 0:
            return
        bs = max(1, source.block_size)
        ranges: set[tuple[int, int]] = {(0, size), (0, 1), (size - 1, 1)}
        for ext in full[:64]:
            for a, b in ((ext.offset, ext.end), (ext.offset + 1, ext.end - 1), (ext.offset - 1, ext.end + 1),
                         (ext.offset - bs + 3, ext.offset + 5)):
                a, b = max(0, a), min(size, b)
                if a < b:
                    ranges.add((a, b - a))
        for _ in range(32):
            ranges.add(self._random_range(source, max_len=size))
            ranges.add(self._random_range(source))
        for off, n in sorted(ranges):
            call = f"extents({off}, {n})"
            sub = list(source.extents(off, n))
            self._check_cover(name, call, sub, off, off + n)
            want = [Extent(max(e.offset, off), min(e.end, off + n) - max(e.offset, off), e.kind, e.layer)
                    for e in full if e.end > off and e.offset < off + n]
            _check(sub == want, f"{name}: {call} = {sub[:6]}{'...' if len(sub) > 6 else ''} is not extents() "
                   f"clipped to the range: {want[:6]}{'...' if len(want) > 6 else ''}")

    def check_read_only(self, source: BlockSource, model: ReferenceModel) -> None:
        name = self._name(source)
        caps = source.capabilities
        size = source.size
        n = min(size, 1)
        if Capability.WRITE not in caps:
            _raises(ReadOnlyError, lambda: source.pwrite(0, b"\x01" * n), f"{name}: pwrite on a read-only source")
            _raises(ReadOnlyError, lambda: source.pwrite(0, b""), f"{name}: empty pwrite on a read-only source")
            if size > 600:
                _raises(ReadOnlyError, lambda: source.pwrite(513, b"\x01" * 70), f"{name}: unaligned pwrite on a "
                        f"read-only source")
        if Capability.WRITE_ZEROES not in caps:
            _raises(ReadOnlyError, lambda: source.write_zeroes(0, n), f"{name}: write_zeroes without WRITE_ZEROES")
        if Capability.TRIM not in caps:
            _raises(ReadOnlyError, lambda: source.trim(0, n), f"{name}: trim without TRIM")
        if Capability.FLUSH not in caps:
            source.flush()  # a no-op, never an error
        if caps == Capability.NONE:
            self._read_ok(source, model, 0, min(size, 8192))

    def check_writes(self, source: BlockSource, model: ReferenceModel) -> None:
        name = self._name(source)
        caps = source.capabilities
        size = source.size
        if Capability.WRITE not in caps or size == 0:
            return
        rng = self._rng
        bs = max(1, source.block_size)
        counter = [0]

        def payload(n: int) -> bytes:
            counter[0] += 1
            return random.Random(f"{self.seed}/payload/{counter[0]}").randbytes(n)

        def settle(off: int, n: int, what: str) -> None:
            a = max(0, off - bs - 7)
            b = min(size, off + n + bs + 7)
            want = model.read(a, b - a)
            got = source.pread(a, b - a)
            _same(got, want, f"{name}: after {what}, pread({a}, {b - a})")

        def rand_range(max_len: int) -> tuple[int, int]:
            n = rng.randint(1, max(1, min(size, max_len)))
            return rng.randint(0, size - n), n

        # writes: unaligned head/tail, inside one block, aligned, at both ends, across many blocks
        writes: list[tuple[int, int]] = [(1, min(size - 1, bs + 3)) if size > 1 else (0, 1),
                                         (0, min(size, bs)), (size - min(size, 3), min(size, 3)),
                                         (size - min(size, bs + 5), min(size, bs + 5))]
        if size > 2 * bs:
            writes += [(bs + 5, bs - 10 if bs > 10 else 1), (bs - 1, 2), (bs, bs), (bs // 2, 3 * bs + 1)]
        writes += [rand_range(3 * bs + 100) for _ in range(10)]
        writes += [rand_range(1 << 17) for _ in range(3)]
        for off, n in writes:
            if n <= 0 or off < 0 or off + n > size:
                continue
            data = payload(n)
            _do(f"{name}: pwrite({off}, {n} bytes)", source.pwrite, off, data)
            model.write(off, data)
            settle(off, n, f"pwrite({off}, {n} bytes)")
        # writes from a memoryview and a bytearray, and an empty write
        off, n = rand_range(2 * bs + 9)
        data = payload(n)
        _do(f"{name}: pwrite({off}, memoryview of {n} bytes)", source.pwrite, off, memoryview(bytearray(data)))
        model.write(off, data)
        settle(off, n, f"pwrite({off}, memoryview of {n} bytes)")
        source.pwrite(rng.randint(0, size), b"")
        _raises(OutOfBoundsError, lambda: source.pwrite(size, b"\x01"), f"{name}: pwrite at size")
        _raises(OutOfBoundsError, lambda: source.pwrite(-1, b"\x01"), f"{name}: pwrite at -1")
        _raises(OutOfBoundsError, lambda: source.pwrite(size - 1, b"\x01\x02"), f"{name}: pwrite across the end")
        for cap, op, label in ((Capability.WRITE_ZEROES, source.write_zeroes, "write_zeroes"),
                               (Capability.TRIM, source.trim, "trim")):
            if cap not in caps:
                continue
            tail = min(size, 2 * bs + 1)
            spans = [rand_range(3 * bs + 100) for _ in range(6)]
            spans += [rand_range(bs // 2 or 1), (0, min(size, bs + 1)), (size - tail, tail)]
            for off, n in spans:
                _do(f"{name}: {label}({off}, {n})", op, off, n)
                model.zero(off, n)
                settle(off, n, f"{label}({off}, {n})")
                got = source.pread(off, n)
                _check(_is_zero(got), f"{name}: after {label}({off}, {n}) the range does not read as zeros")
            op(rng.randint(0, size), 0)
            _raises(OutOfBoundsError, partial(op, size - 1, 2), f"{name}: {label} across the end")
            _raises(OutOfBoundsError, partial(op, -1, 1), f"{name}: {label} at -1")
        _do(f"{name}: flush()", source.flush)
        # everything written is there, and the extents still tell the truth
        if size <= self.scan_limit:
            self._read_span(source, model, 0, size)
        exts = self._full_extents(source)
        self._check_claims(source, model, exts)


def check_block_source(factory: Factory, checks: Iterable[str] | None = None, **options: object) -> None:
    """Run the contract (every check, or those named) over the sources ``factory`` builds."""
    BlockSourceContract(factory, **options).run(checks)  # type: ignore[arg-type]
