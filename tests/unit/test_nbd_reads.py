"""Plain NBD reads served in one call (``export.nbd.reads``): the C reader (``_nbdread``) returns, header and data,
what the generic path would for every read it takes, stops where it must (another command, a flag, a read not of
whole sectors, past the end, too large, past its byte limit, a source without a file), and over a real server
serves pipelined reads, steps aside once a writable upper maps something, and keeps within the connection's byte
budget."""

from __future__ import annotations

import random
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd import reads as R
from overlaybd.export.nbd import writes as W
from overlaybd.export.nbd.limits import Limits
from overlaybd.export.nbd.server import Export, NbdServer
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.metrics import Recorder
from overlaybd.source.base import ExtentKind
from overlaybd.source.file import FileSource
from overlaybd.volume import Volume
from tests.native import require_extension
from tests.nbd_client import Client
from tests.unit.nbd_thread import listening

SIZE = 4 << 20
KiB = 1024


@pytest.fixture(autouse=True)
def _c_reader() -> None:
    require_extension(R._nbdread, R.NBDREAD)


def layered(tmp_path: Path, name: str = "vol") -> Volume:
    """Three snapshots over each other: data, data written over it, a zeroed range over both; holes between."""
    vol = Volume.create(str(tmp_path / name), SIZE)
    rng = random.Random(5)
    for k in range(3):
        with vol.open(writable=True) as dev:
            for _ in range(12):
                off = rng.randrange(SIZE // 512 - 64) * 512
                dev.pwrite(off, rng.randbytes(rng.randrange(1, 64) * 512))
            if k == 2:
                dev.write_zeroes(64 * KiB, 256 * KiB)
        vol.snapshot(f"s{k}")
    return vol


def req(cmd: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


def reply(dev: LsmtStack, handle: int, offset: int, length: int, structured: bool) -> bytes:
    head = nbd.chunk_offset_data_header(handle, offset, length, True) if structured else nbd.simple_reply(handle)
    return head + dev.pread(offset, length)


@contextmanager
def opened(tmp_path: Path, *, writable: bool = False) -> Iterator[tuple[LsmtStack, R.Reads]]:
    with layered(tmp_path).open(writable=writable) as dev:
        reads = R.reads_for(dev)
        assert reads is not None
        yield dev, reads


@pytest.mark.parametrize("structured", [False, True])
def test_replies_are_what_the_generic_path_reads(tmp_path: Path, structured: bool) -> None:
    rng = random.Random(7)
    with opened(tmp_path) as (dev, reads):
        asked = [(rng.randrange(SIZE // 512 - 128) * 512, rng.randrange(1, 128) * 512) for _ in range(300)]
        asked += [(0, SIZE), (SIZE - 512, 512), (64 * KiB, 256 * KiB)]  # all of it, the last sector, the zeroed
        stream = b"".join(req(nbd.CMD_READ, 100 + k, off, n, nbd.CMD_FLAG_DF * (k % 2)) for k, (off, n)
                          in enumerate(asked))
        pos, replies, count = reads.serve(b"junk" + stream + b"tail", 4, structured, SIZE, 1 << 30)
        assert (pos, count) == (4 + len(stream), len(asked))
        assert replies == b"".join(reply(dev, 100 + k, off, n, structured) for k, (off, n) in enumerate(asked))
        assert reads.reader.served == len(asked)


STOPS: dict[str, Callable[[int], bytes]] = {
    "write": lambda h: req(nbd.CMD_WRITE, h, 0, 512, payload=b"x" * 512),
    "flush": lambda h: req(nbd.CMD_FLUSH, h, 0, 0),
    "block status": lambda h: req(nbd.CMD_BLOCK_STATUS, h, 0, 4096),
    "fua": lambda h: req(nbd.CMD_READ, h, 0, 512, nbd.CMD_FLAG_FUA),
    "unknown flag": lambda h: req(nbd.CMD_READ, h, 0, 512, 1 << 9),
    "unaligned offset": lambda h: req(nbd.CMD_READ, h, 100, 512),
    "unaligned length": lambda h: req(nbd.CMD_READ, h, 0, 700),
    "empty": lambda h: req(nbd.CMD_READ, h, 0, 0),
    "past the end": lambda h: req(nbd.CMD_READ, h, SIZE - 512, 1024),
    "offset that wraps": lambda h: req(nbd.CMD_READ, h, (1 << 64) - 512, 1024),
    "more than max_read": lambda h: req(nbd.CMD_READ, h, 0, 8192),
    "header not all there": lambda h: req(nbd.CMD_READ, h, 0, 4096)[:20],
    "bad magic": lambda h: b"\0" * 4 + req(nbd.CMD_READ, h, 0, 512)[4:],
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_serving_stops_at_what_is_not_a_plain_read(tmp_path: Path, stop: str) -> None:
    with opened(tmp_path) as (dev, reads):
        first = req(nbd.CMD_READ, 1, 8192, 4096)
        data = first + STOPS[stop](2) + req(nbd.CMD_READ, 3, 0, 512)
        assert reads.serve(data, 0, False, 4096, 1 << 20) == (len(first), reply(dev, 1, 8192, 4096, False), 1)


def test_replies_stay_within_the_limit(tmp_path: Path) -> None:
    with opened(tmp_path) as (dev, reads):
        data = b"".join(req(nbd.CMD_READ, h, h * 4096, 4096) for h in range(10))
        each = len(nbd.simple_reply(0)) + 4096
        pos, replies, count = reads.serve(data, 0, False, 4096, 3 * each + each - 1)
        assert (pos, count, len(replies)) == (3 * nbd.REQUEST.size, 3, 3 * each)
        assert reads.serve(data, 0, False, 4096, each - 1) == (0, b"", 0)
        assert reads.serve(data, 0, False, 4096, -5) == (0, b"", 0)


def test_a_read_that_fails_is_left_to_the_generic_path(tmp_path: Path) -> None:
    """Sources without a descriptor (as layers that are not local files would be): a read of the zeroed range is
    served, the first that meets data is not, nor any after it."""
    with opened(tmp_path) as (dev, reads):
        plan = dev.direct_plan()
        assert plan is not None
        _, index, fds = plan
        reader = R._nbdread.Reader(index.handle, array("i", [-1] * len(fds)), dev.size)
        data_at = next(e.offset for e in dev.extents(0, SIZE) if e.kind is ExtentKind.DATA)
        data = req(nbd.CMD_READ, 1, 64 * KiB, 4096) + req(nbd.CMD_READ, 2, data_at, 512) \
            + req(nbd.CMD_READ, 3, 64 * KiB, 512)
        pos, replies, count = reader.serve(data, 0, True, 4096, 1 << 20)
        assert (pos, count, replies) == (nbd.REQUEST.size, 1, reply(dev, 1, 64 * KiB, 4096, True))
        assert dev.pread(64 * KiB, 4096) == bytes(4096)
        assert reader.served == 1


def test_arguments_are_checked(tmp_path: Path) -> None:
    with opened(tmp_path) as (dev, reads):
        plan = dev.direct_plan()
        assert plan is not None
        _, index, fds = plan
        with pytest.raises(TypeError):
            R._nbdread.Reader(index.handle, array("q", [3]), dev.size)  # not int32
        with pytest.raises(ValueError):
            R._nbdread.Reader(object(), fds, dev.size)  # not an index handle
        with pytest.raises(ValueError):
            reads.serve(b"", 1, False, 4096, 4096)
        with pytest.raises(ValueError):
            R._nbdread.Reader.__new__(R._nbdread.Reader).serve(b"", 0, False, 4096, 4096)
        with pytest.raises(TypeError):
            reads.reader.mark_records(array("i", [0]), array("q", [8]))
        with pytest.raises(ValueError):
            reads.reader.mark_records(array("q", [0, 8]), array("q", [8]))
        # records outside the device, empty or negative, and lengths whose byte count would overflow: no harm
        big = (1 << 63) - 1
        reads.reader.mark_records(array("q", [-8, SIZE // 512, big, 16, 24]), array("q", [8, 8, 8, 0, big]))
        assert not reads.reader.marked(0, 4096) and not reads.reader.marked(16 * 512, 4096)  # granules 0, 2
        assert reads.reader.marked(24 * 512, 512) and reads.reader.marked(SIZE - 512, 512)  # 3 to the end


def test_what_the_upper_maps_is_marked(tmp_path: Path) -> None:
    vol = layered(tmp_path)
    with vol.open(writable=True) as dev:
        dev.pwrite(SIZE - 8192, b"\x01" * 512)  # the upper maps this when the reader is made
        reads = R.reads_for(dev)
        assert reads is not None
        marked = reads.reader.marked
        assert marked(SIZE - 8192, 512) and marked(SIZE - 8192 + 4096 - 512, 512)  # its 4 KiB granule
        assert not marked(SIZE - 4096, 4096) and not marked(0, SIZE - 8192)
        data = req(nbd.CMD_READ, 1, 0, 4096) + req(nbd.CMD_READ, 2, SIZE - 12288, 8192) + req(nbd.CMD_READ, 3, 0, 512)
        # the read that meets the upper asks it for its records (once), and reads them with the layers below
        assert reads.serve(data, 0, False, 1 << 20, 1 << 20) == (
            len(data), reply(dev, 1, 0, 4096, False) + reply(dev, 2, SIZE - 12288, 8192, False)
            + reply(dev, 3, 0, 512, False), 3)
        assert reads.reader.asked == 1 and dev.pread(SIZE - 8192, 512) == b"\x01" * 512
        # a reader not given the upper's records leaves that read to the generic path
        plan = dev.direct_plan()
        assert plan is not None
        blind = R._nbdread.Reader(plan[1].handle, plan[2], dev.size)
        blind.mark(SIZE - 8192, 512)
        assert blind.serve(data, 0, False, 1 << 20, 1 << 20) == (nbd.REQUEST.size, reply(dev, 1, 0, 4096, False), 1)
        reads.mark(4096 + 100, 1)  # a byte marks its granule
        assert marked(4096, 512) and not marked(0, 4096) and not marked(8192, 4096)
        reads.mark(SIZE - 512, 1 << 40)  # past the end: up to the end
        assert marked(SIZE - 512, 512)
        reads.mark(SIZE, 4096)  # outside: nothing
        assert Export("", dev, inline=False).reads() is None  # not all local
        export = Export("", dev, inline=True)
        assert export.reads() is not None and export.reads() is export.reads()  # made once for a source
    with FileSource(str(tmp_path / "vol" / "config.json")) as plain:
        assert R.reads_for(plain) is None  # not read through a merged index


@contextmanager
def served(tmp_path: Path, *, writable: bool, limits: Limits | None = None) -> Iterator[tuple[str, Export]]:
    with layered(tmp_path).open(writable=writable) as dev:
        export = Export("", dev, readonly=not writable, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2, limits=limits), path):
            yield path, export


def _read_all(c: Client, structured: bool, asked: dict[int, tuple[int, int]]) -> dict[int, bytes]:
    got: dict[int, bytes] = {}
    while len(got) < len(asked):
        if structured:
            handle, kind, _, body = c.chunk()
            assert kind == nbd.REPLY_TYPE_OFFSET_DATA and int.from_bytes(body[:8], "big") == asked[handle][0]
            got[handle] = body[8:]
        else:
            handle, error, _ = c.simple()
            assert error == 0
            got[handle] = c.recv(asked[handle][1])
    return got


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_reads_over_nbd(tmp_path: Path, structured: bool) -> None:
    rng = random.Random(9)
    with served(tmp_path, writable=False) as (path, export):
        dev = export.source
        c = Client(path)
        c.go("", structured=structured)
        asked = {h: (rng.randrange(SIZE // 4096 - 32) * 4096, rng.choice([512, 4096, 32 * KiB, 128 * KiB]))
                 for h in range(1, 400)}
        c.s.sendall(b"".join(req(nbd.CMD_READ, h, off, n) for h, (off, n) in asked.items()))
        got = _read_all(c, structured, asked)
        for h, (off, n) in asked.items():
            assert got[h] == dev.pread(off, n), h
        reads = export.reads()
        assert reads is not None and reads.reader.served > 200  # most went the one-call way
        c.close()


CHANGES: dict[str, Callable[[int, int], bytes]] = {
    "write (C, with others)": lambda h, off: req(nbd.CMD_WRITE, h, off, 4096, payload=b"\x5a" * 4096)
    + req(nbd.CMD_WRITE, h + 1000, off + 4096, 512, payload=b"\x5b" * 512),
    "write alone": lambda h, off: req(nbd.CMD_WRITE, h, off, 4096, payload=b"\x5a" * 4096),
    "fua write (pool)": lambda h, off: req(nbd.CMD_WRITE, h, off, 4096, nbd.CMD_FLAG_FUA, b"\x5a" * 4096),
    "unaligned write": lambda h, off: req(nbd.CMD_WRITE, h, off + 100, 1000, payload=b"\x5a" * 1000),
    "trim": lambda h, off: req(nbd.CMD_TRIM, h, off, 8192),
    "write zeroes": lambda h, off: req(nbd.CMD_WRITE_ZEROES, h, off, 8192),
    "large write (pool)": lambda h, off: req(nbd.CMD_WRITE, h, off, (1 << 20) + 4096,
                                             payload=b"\x5a" * ((1 << 20) + 4096)),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("writer", ["c", "python"])
def test_a_read_after_a_change_sees_it(tmp_path: Path, change: str, writer: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads in C before and after; each change to the upper is read back right after its reply (the read goes the
    generic way); reads elsewhere stay in C."""
    if writer == "python":
        monkeypatch.setattr(W, "_nbdwrite", None)
    with served(tmp_path, writable=True) as (path, export):
        dev = export.source
        c = Client(path)
        c.go("")
        at = 256 * KiB
        c.request(nbd.CMD_READ, 1, at, 4096)
        assert c.simple(4096) == (1, 0, dev.pread(at, 4096))
        reads = export.reads()
        assert reads is not None and reads.reader.served == 1
        span = (1 << 20) + 8192
        old = dev.pread(at, span)
        c.s.sendall(CHANGES[change](2, at))
        answers = 2 if change.startswith("write (C") else 1
        for _ in range(answers):
            assert c.simple()[1] == 0
        before = reads.reader.served
        asked = {3: (at, span), 4: (SIZE - 8192, 4096)}
        c.s.sendall(b"".join(req(nbd.CMD_READ, h, off, n) for h, (off, n) in asked.items()))
        got = _read_all(c, False, asked)  # the replies may come in either order
        assert got[3] == _changed(change, old) == dev.pread(at, span)
        assert got[4] == dev.pread(SIZE - 8192, 4096)
        assert reads.reader.served == before + 1  # elsewhere, still in C
        c.close()


def _changed(change: str, old: bytes) -> bytes:
    """``old`` (the bytes from the changed offset on) as the change leaves them."""
    new = bytearray(old)
    if change.startswith("write (C"):
        new[:4096 + 512] = b"\x5a" * 4096 + b"\x5b" * 512
    elif change == "unaligned write":
        new[100:1100] = b"\x5a" * 1000
    elif change in ("trim", "write zeroes"):
        new[:8192] = bytes(8192)
    elif change == "large write (pool)":
        new[:(1 << 20) + 4096] = b"\x5a" * ((1 << 20) + 4096)
    else:
        new[:4096] = b"\x5a" * 4096
    return bytes(new)


def test_a_small_budget_still_serves_every_read(tmp_path: Path) -> None:
    """The connection may hold 24 KiB: each call serves what fits; larger reads wait their turn the usual way."""
    limits = Limits(max_inflight=24 * KiB)
    with served(tmp_path, writable=False, limits=limits) as (path, export):
        dev = export.source
        c = Client(path)
        c.go("")
        asked = {h: (h * 8192, 8192 if h % 3 else 16 * KiB) for h in range(1, 200)}
        c.s.sendall(b"".join(req(nbd.CMD_READ, h, off, n) for h, (off, n) in asked.items()))
        got = _read_all(c, False, asked)
        for h, (off, n) in asked.items():
            assert got[h] == dev.pread(off, n), h
        c.close()


class Counted(Recorder):
    """A recorder that keeps every request it is told of."""

    active = True

    def __init__(self) -> None:
        self.requests: list[tuple[str, int, float, int]] = []

    def request(self, command: str, nbytes: int, seconds: float, error: int = 0) -> None:
        self.requests.append((command, nbytes, seconds, error))


def test_reads_and_writes_served_in_one_call_are_counted_each(tmp_path: Path) -> None:
    """With a recorder (``--metrics``), pipelined reads and writes still go the one-call way, and each is counted
    with its own length before its reply goes."""
    with layered(tmp_path).open(writable=True) as dev:
        export = Export("", dev, inline=True)
        counted = Counted()
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2, metrics=counted), path):
            c = Client(path)
            c.go("")
            reads = {h: (h * 8192, 512 * h) for h in range(1, 40)}
            c.s.sendall(b"".join(req(nbd.CMD_READ, h, off, n) for h, (off, n) in reads.items()))
            got = _read_all(c, False, reads)
            assert all(got[h] == dev.pread(off, n) for h, (off, n) in reads.items())
            writes = [req(nbd.CMD_WRITE, 100 + k, (1 << 20) + k * 4096, 1024, payload=b"\x33" * 1024)
                      for k in range(30)]
            c.s.sendall(b"".join(writes))
            for _ in writes:
                assert c.simple()[1] == 0
            c.close()
        made = export.reads()
        assert made is not None and made.reader.served >= 30
        writer = export.writes()
        assert writer is not None and writer[0].served >= 20
    assert sorted(n for cmd, n, _, _ in counted.requests if cmd == "READ") == sorted(n for _, n in reads.values())
    assert [n for cmd, n, _, _ in counted.requests if cmd == "WRITE"] == [1024] * 30
    assert all(seconds >= 0 and error == 0 for _, _, seconds, error in counted.requests)


def test_reads_of_an_upper_written_all_over_are_what_the_generic_path_reads(tmp_path: Path) -> None:
    """An upper of a few thousand records (writes, trims, zero-writes of 512 B to 24 KiB over the layered volume):
    reopened, the reader marks what it maps; more changes, each marked first as the server does; reads of every
    size and place, pipelined in one call, are what ``pread`` gives, and those that meet a mark ask the upper."""
    vol = layered(tmp_path)
    rng = random.Random(11)

    def change(dev: LsmtStack, reads: R.Reads | None, n: int) -> None:
        for _ in range(n):
            off = rng.randrange(SIZE // 512 - 48) * 512
            length = rng.randrange(1, 48) * 512
            if reads is not None:
                reads.mark(off, length)
            kind = rng.random()
            if kind < 0.8:
                dev.pwrite(off, rng.randbytes(length))
            elif kind < 0.9:
                dev.trim(off, length)
            else:
                dev.write_zeroes(off, length)

    with vol.open(writable=True) as dev:
        change(dev, None, 3000)
    with vol.open(writable=True) as dev:
        reads = R.reads_for(dev)
        assert reads is not None
        change(dev, reads, 500)
        for structured in (False, True):
            asked = [(rng.randrange(SIZE // 512 - 256) * 512, rng.randrange(1, 256) * 512) for _ in range(400)]
            stream = b"".join(req(nbd.CMD_READ, k, off, n) for k, (off, n) in enumerate(asked))
            before = reads.reader.served
            pos, replies, count = reads.serve(stream, 0, structured, SIZE, 1 << 30)
            assert (pos, count) == (len(stream), len(asked))
            assert replies == b"".join(reply(dev, k, off, n, structured) for k, (off, n) in enumerate(asked))
            assert reads.reader.served == before + len(asked)
        assert reads.reader.asked > 300


@pytest.mark.parametrize("case", ["raises", "not a list", "not tuples", "short tuples", "out of order",
                                  "overlapping", "no such source", "source without a file", "past its file",
                                  "negative", "too large"])
def test_upper_records_that_cannot_be_read_here_leave_the_read_to_the_generic_path(tmp_path: Path,
                                                                                   case: str) -> None:
    """What the upper's ``rows`` gives is checked before it is used: a read whose records are not usable (the call
    fails, the wrong shape, out of order or overlapping, a source without a descriptor, data past its file, values
    that do not fit) is not served here, nor anything after it; what was served before it is right."""
    with opened(tmp_path) as (dev, reads):
        plan = dev.direct_plan()
        assert plan is not None
        _, index, fds = plan
        data = tmp_path / "upper.bin"
        data.write_bytes(bytes(range(256)) * 256)  # 64 KiB
        with FileSource(str(data)) as up:
            mine = array("i", list(fds) + [up.fd])
            src = len(fds)
            bad: dict[str, object] = {
                "not a list": ((8, 8, 0, False, src),), "not tuples": [[8, 8, 0, False, src]],
                "short tuples": [(8, 8, 0, False)], "out of order": [(12, 4, 0, False, src), (8, 4, 0, False, src)],
                "overlapping": [(8, 8, 0, False, src), (12, 8, 0, False, src)],
                "no such source": [(8, 8, 0, False, src + 1)], "source without a file": [(8, 8, 0, False, -1)],
                "past its file": [(8, 8, 124, False, src)], "negative": [(8, 8, -1, False, src)],
                "too large": [(8, 8, 1 << 63, False, src)],
            }

            def rows(start: int, end: int) -> object:
                if start == 0:  # the first read: a zeroed record, then data from the file
                    return [(0, 4, 0, True, src), (4, 4, 2, False, src)]
                if case == "raises":
                    raise ValueError("no rows")
                return bad[case]

            reader = R._nbdread.Reader(index.handle, mine, dev.size, rows)
            reader.mark(0, SIZE)
            stream = req(nbd.CMD_READ, 1, 0, 4096) + req(nbd.CMD_READ, 2, 4096, 4096) + req(nbd.CMD_READ, 3, 0, 512)
            pos, replies, count = reader.serve(stream, 0, False, 4096, 1 << 20)
            assert (pos, count) == (nbd.REQUEST.size, 1)
            expected = bytes(2048) + data.read_bytes()[1024:3072]
            assert replies == nbd.simple_reply(1) + expected
            # data past its file is found when read (a short read), after the third request was planned
            assert reader.served == 1 and reader.asked == (3 if case == "past its file" else 2)


def test_an_interrupt_in_the_upper_records_is_not_swallowed(tmp_path: Path) -> None:
    with opened(tmp_path) as (dev, reads):
        plan = dev.direct_plan()
        assert plan is not None

        def rows(start: int, end: int) -> object:
            raise KeyboardInterrupt

        reader = R._nbdread.Reader(plan[1].handle, plan[2], dev.size, rows)
        reader.mark(0, 4096)
        with pytest.raises(KeyboardInterrupt):
            reader.serve(req(nbd.CMD_READ, 1, 8192, 4096) + req(nbd.CMD_READ, 2, 0, 4096), 0, False, 4096, 1 << 20)
        assert reader.served == 0
        with pytest.raises(TypeError):
            R._nbdread.Reader(plan[1].handle, plan[2], dev.size, 5)  # not callable
