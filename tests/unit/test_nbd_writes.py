"""Plain NBD writes served in one call (``export.nbd.writes``): the C writer (``_nbdwrite``) and its Python twin
serve the same requests the same way, stop where they must, leave failures to the generic path; and over a real
server, pipelined writes, FUA, unaligned writes, flushes and reads interleave with the answers of the generic
path."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd import writes as W
from overlaybd.export.nbd.server import Export, NbdServer
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.formats.lsmt.writable import WritableLayer
from overlaybd.volume import Volume
from tests.native import require_extension
from tests.nbd_client import Client
from tests.unit.nbd_thread import listening

SIZE = 4 << 20
KINDS = ["c", "python"]


def _kind(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers made from now on are of ``kind``."""
    if kind == "c":
        require_extension(W._nbdwrite, W.NBDWRITE)
    else:
        monkeypatch.setattr(W, "_nbdwrite", None)


@contextmanager
def volume(tmp_path: Path, name: str = "vol") -> Iterator[LsmtStack]:
    """A volume (a snapshot with a little data below an empty upper), open for writing."""
    vol = Volume.create(str(tmp_path / name), SIZE)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, b"\x11" * 65536)
    vol.snapshot("base")
    with vol.open(writable=True) as dev:
        yield dev


def req(cmd: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


def _writer(dev: LsmtStack) -> W.Writer:
    made = W.writer_for(dev)
    assert made is not None
    return made[0]


@pytest.mark.parametrize("structured", [False, True])
def test_the_twins_serve_alike(tmp_path: Path, structured: bool) -> None:
    rng = random.Random(3)
    writes = [(rng.randrange(SIZE // 512 - 16) * 512, rng.randbytes(rng.randrange(1, 16) * 512)) for _ in range(40)]
    stream = b"".join(req(nbd.CMD_WRITE, 1000 + k, off, len(d), payload=d) for k, (off, d) in enumerate(writes))
    tail = req(nbd.CMD_READ, 7, 0, 4096)
    outs = []
    images = []
    for kind, name in (("c", "a"), ("python", "b")):
        with volume(tmp_path, name) as dev:
            made = W.writer_for(dev)
            assert made is not None
            writer = made[0] if kind == "c" else W.PyWriter(made[1].appender, dev.size,
                                                            4 << 20)
            if kind == "c":
                require_extension(W._nbdwrite, W.NBDWRITE)
                assert W.is_c(writer)
            prefix = b"junk"
            outs.append(writer.serve(prefix + stream + tail, len(prefix), structured))
            assert writer.served == len(writes)
            images.append(dev.pread(0, SIZE))
    assert outs[0] == outs[1]
    pos, replies, count, pending = outs[0]
    assert (pos, count, pending) == (4 + len(stream), len(writes), len(writes))
    one: Callable[[int], bytes] = nbd.chunk_none if structured else nbd.simple_reply
    assert replies == b"".join(one(1000 + k) for k in range(len(writes)))
    model = bytearray(b"\x11" * 65536 + bytes(SIZE - 65536))
    for off, d in writes:
        model[off:off + len(d)] = d
    assert images[0] == images[1] == model  # the reads see the writes (the index took the records)


STOPS: dict[str, Callable[[int], bytes]] = {
    "read": lambda h: req(nbd.CMD_READ, h, 0, 512),
    "flush": lambda h: req(nbd.CMD_FLUSH, h, 0, 0),
    "fua": lambda h: req(nbd.CMD_WRITE, h, 0, 512, nbd.CMD_FLAG_FUA, b"x" * 512),
    "unaligned offset": lambda h: req(nbd.CMD_WRITE, h, 100, 512, payload=b"x" * 512),
    "unaligned length": lambda h: req(nbd.CMD_WRITE, h, 0, 700, payload=b"x" * 700),
    "empty": lambda h: req(nbd.CMD_WRITE, h, 0, 0),
    "past the end": lambda h: req(nbd.CMD_WRITE, h, SIZE - 512, 1024, payload=b"x" * 1024),
    "too long for one record": lambda h: req(nbd.CMD_WRITE, h, 0, 8192, payload=b"x" * 8192),
    "payload not all there": lambda h: req(nbd.CMD_WRITE, h, 0, 4096, payload=b"x" * 4000),
    "header not all there": lambda h: req(nbd.CMD_WRITE, h, 0, 4096)[:20],
    "bad magic": lambda h: b"\0" * 4 + req(nbd.CMD_WRITE, h, 0, 512, payload=b"x" * 512)[4:],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stop", list(STOPS))
def test_serving_stops_at_what_is_not_a_plain_write(tmp_path: Path, kind: str, stop: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _kind(kind, monkeypatch)
    with volume(tmp_path) as dev:
        made = W.writer_for(dev)
        assert made is not None
        upper = made[1]
        writer: W.Writer = W._nbdwrite.Writer(upper.appender, dev.size, 4096) if kind == "c" \
            else W.PyWriter(upper.appender, dev.size, 4096)
        first = req(nbd.CMD_WRITE, 1, 8192, 4096, payload=b"\xaa" * 4096)
        after = b"" if "not all there" in stop else req(nbd.CMD_WRITE, 3, 1 << 20, 512, payload=b"\xbb" * 512)
        data = first + STOPS[stop](2) + after
        pos, _, count, _ = writer.serve(data, 0, False)
        assert (pos, count) == (len(first), 1)
        assert writer.write(8192, b"\xcc" * 8192) == -1  # more than max_write
        assert dev.pread(8192, 4096) == b"\xaa" * 4096 and dev.pread(1 << 20, 512) == bytes(512)


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_write_is_left_to_the_generic_path(tmp_path: Path, kind: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _kind(kind, monkeypatch)
    with volume(tmp_path) as dev:
        writer = _writer(dev)
        assert isinstance(dev.upper, WritableLayer)
        dev.upper.appender.detach()  # every reserve and append fails from now on (EBADF)
        data = req(nbd.CMD_WRITE, 1, 0, 4096, payload=b"\xaa" * 4096)
        assert writer.serve(data, 0, True) == (0, b"", 0, 0)
        assert writer.write(0, b"\xaa" * 4096) == -1
        assert writer.served == 0


@contextmanager
def served_volume(tmp_path: Path) -> Iterator[tuple[str, Export]]:
    with volume(tmp_path) as dev:
        export = Export("", dev, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=4), path):
            yield path, export


def _answers(c: Client, structured: bool, want: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    """Every reply to the handles in ``want`` (handle: bytes a read returns): handle -> (error, data)."""
    got: dict[int, tuple[int, bytes]] = {}
    while len(got) < len(want):
        if structured:
            handle, kind, _, body = c.chunk()
            error = int.from_bytes(body[:4], "big") if kind & (1 << 15) else 0
            data = body[8:] if kind == nbd.REPLY_TYPE_OFFSET_DATA else b""
        else:
            handle, error, _ = c.simple()
            data = c.recv(want[handle]) if not error and want[handle] else b""
        assert handle not in got
        got[handle] = (error, data)
    return got


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_writes_flushes_and_reads_over_nbd(tmp_path: Path, kind: str, structured: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _kind(kind, monkeypatch)
    rng = random.Random(11)
    with served_volume(tmp_path) as (path, export):
        c = Client(path)
        c.go("", structured=structured)
        model = bytearray(b"\x11" * 65536 + bytes(SIZE - 65536))
        blocks = rng.sample(range(SIZE // 4096), 400)
        stream = []
        want: dict[int, int] = {}
        for k, block in enumerate(blocks[:300]):  # plain writes, some FUA, some not of whole sectors
            data = rng.randbytes(4096)
            off = block * 4096 + (100 if k % 37 == 5 else 0)
            n = 4096 - (100 if k % 37 == 5 else 0)
            flags = nbd.CMD_FLAG_FUA if k % 29 == 3 else 0
            stream.append(req(nbd.CMD_WRITE, k + 1, off, n, flags, data[:n]))
            model[off:off + n] = data[:n]
            want[k + 1] = 0
            if k % 64 == 63:
                stream.append(req(nbd.CMD_FLUSH, 10_000 + k, 0, 0))
                want[10_000 + k] = 0
        stream.append(req(nbd.CMD_WRITE_ZEROES, 20_000, blocks[300] * 4096, 4096))
        model[blocks[300] * 4096:blocks[300] * 4096 + 4096] = bytes(4096)
        want[20_000] = 0
        stream.append(req(nbd.CMD_FLUSH, 20_001, 0, 0))
        want[20_001] = 0
        c.s.sendall(b"".join(stream))
        got = _answers(c, structured, want)
        assert all(error == 0 for error, _ in got.values())
        # the reads come after every write was answered: they see them all
        reads = {30_000 + k: block for k, block in enumerate(blocks[:301])}
        c.s.sendall(b"".join(req(nbd.CMD_READ, h, b * 4096, 4096) for h, b in reads.items()))
        got = _answers(c, structured, dict.fromkeys(reads, 4096))
        for h, b in reads.items():
            assert got[h] == (0, bytes(model[b * 4096:(b + 1) * 4096])), h
        c.request(nbd.CMD_DISC, 0, 0, 0)
        c.close()
        writes = export.writes()
        assert writes is not None
        assert writes[0].served > 200  # most went the one-call way, in C or in Python as asked
        assert W.is_c(writes[0]) == (kind == "c")
    with volume_reopened(tmp_path) as dev:  # what was flushed is in the files
        assert dev.pread(0, SIZE) == model


@contextmanager
def volume_reopened(tmp_path: Path) -> Iterator[LsmtStack]:
    with Volume(str(tmp_path / "vol")).open() as dev:
        yield dev


@pytest.mark.parametrize("kind", KINDS)
def test_a_write_that_fails_is_answered_with_its_error(tmp_path: Path, kind: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _kind(kind, monkeypatch)
    with served_volume(tmp_path) as (path, export):
        c = Client(path)
        c.go("")
        c.request(nbd.CMD_WRITE, 1, 0, 4096, payload=b"\xaa" * 4096)
        assert c.simple()[:2] == (1, 0)
        assert isinstance(export.source, LsmtStack) and isinstance(export.source.upper, WritableLayer)
        export.source.upper.appender.detach()  # the upper's files fail every write from now on (EBADF)
        c.request(nbd.CMD_WRITE, 2, 4096, 4096, payload=b"\xbb" * 4096)
        assert c.simple()[:2] == (2, nbd.EIO)
        c.request(nbd.CMD_READ, 3, 0, 8192)  # the server goes on; the failed write changed nothing
        handle, error, data = c.simple(8192)
        assert (handle, error, data) == (3, 0, b"\xaa" * 4096 + b"\x11" * 4096)
        c.close()


def test_no_writer_for_a_read_only_or_remote_export(tmp_path: Path) -> None:
    with volume(tmp_path) as dev:
        assert Export("", dev, readonly=True, inline=True).writes() is None
        assert Export("", dev, inline=False).writes() is None
        export = Export("", dev, inline=True)
        first = export.writes()
        assert first is not None and export.writes() is first  # made once for a source


@pytest.mark.parametrize("kind", KINDS)
def test_a_flush_asked_for_before_disc_is_answered_before_the_close(tmp_path: Path, kind: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _kind(kind, monkeypatch)
    with served_volume(tmp_path) as (path, export):
        c = Client(path)
        c.go("")
        stream = [req(nbd.CMD_WRITE, k, (k + 100) * 4096, 4096, payload=bytes([k]) * 4096) for k in range(1, 9)]
        stream += [req(nbd.CMD_FLUSH, 50, 0, 0), req(nbd.CMD_FLUSH, 51, 0, 0), req(nbd.CMD_DISC, 52, 0, 0)]
        c.s.sendall(b"".join(stream))
        got = _answers(c, False, dict.fromkeys([*range(1, 9), 50, 51], 0))
        assert all(error == 0 for error, _ in got.values())
        assert c.s.recv(1) == b""  # then the server closes
        assert export.flusher.flushes >= 1
        c.close()
    with volume_reopened(tmp_path) as dev:
        assert all(dev.pread((k + 100) * 4096, 4096) == bytes([k]) * 4096 for k in range(1, 9))


def test_a_flush_that_fails_is_answered_with_its_error(tmp_path: Path) -> None:
    with served_volume(tmp_path) as (path, export):
        c = Client(path)
        c.go("", structured=True)
        c.request(nbd.CMD_WRITE, 1, 0, 4096, payload=b"\xaa" * 4096)
        assert c.chunk()[:2] == (1, nbd.REPLY_TYPE_NONE)
        assert isinstance(export.source, LsmtStack) and isinstance(export.source.upper, WritableLayer)
        export.source.upper.appender.detach()  # the sync fails (EBADF)
        c.s.sendall(req(nbd.CMD_FLUSH, 2, 0, 0) + req(nbd.CMD_FLUSH, 3, 0, 0))
        for _ in range(2):
            handle, kind, _, body = c.chunk()
            assert handle in (2, 3) and kind == nbd.REPLY_TYPE_ERROR and int.from_bytes(body[:4], "big") == nbd.EIO
        c.close()
