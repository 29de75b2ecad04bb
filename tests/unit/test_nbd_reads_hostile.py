"""Plain NBD reads in C (``export.nbd.reads``) under a careless or hostile caller, client or operator: a request
buffer rewritten while the reads run, a source closed in place under its export (a snapshot whose reopen failed),
arguments out of range, random and mutated request streams against the rules; and over a real server, the first
change of each kind (served in C, on the event loop, in the thread pool) seen by a read sent after its reply on any
connection, reads at the edges of devices not of whole 4 KiB blocks or sectors and of the sendfile threshold, layer
files cut short under the server, replies of reads pipelined before a disconnect."""

from __future__ import annotations

import os
import random
import struct
import threading
from array import array
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd import reads as R
from overlaybd.export.nbd.connection import SENDFILE_MIN
from overlaybd.export.nbd.limits import Limits
from overlaybd.export.nbd.server import Export, NbdServer
from overlaybd.export.served import ServedVolume
from overlaybd.formats.detect import open_layer
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.volume import Volume
from tests.native import require_extension
from tests.nbd_client import Client
from tests.unit.nbd_thread import listening

KiB = 1024
MiB = 1 << 20


@pytest.fixture
def c_reader() -> None:
    require_extension(R._nbdread, R.NBDREAD)


def served_in_c(export: Export) -> int:
    """Reads the export's C reader has served; where it is not built (or OVERLAYBD_NATIVE=0) the export has none,
    the generic path serves every read, and the tests over a server check that path: -1."""
    reads = export.reads()
    if R._nbdread is None:
        assert reads is None
        return -1
    assert reads is not None
    return int(reads.reader.served)


def asked_in_c(export: Export) -> int:
    """How many times the export's C reader asked the upper for its records (-1 as :func:`served_in_c`)."""
    reads = export.reads()
    return -1 if reads is None else int(reads.reader.asked)


def req(cmd: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


def filled(tmp_path: Path, size: int, name: str = "vol") -> tuple[Volume, bytes]:
    """A volume of ``size`` bytes of one snapshot, every byte written (a pattern that differs at every sector)."""
    vol = Volume.create(str(tmp_path / name), size)
    image = b"".join(struct.pack(">Q", k) * 64 for k in range(size // 512))
    with vol.open(writable=True) as dev:
        dev.pwrite(0, image)
    vol.snapshot("all")
    return vol, image


def chunks(replies: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The structured replies of serve(): (handle, offset, data) of each OFFSET_DATA chunk, all of them DONE."""
    at = 0
    while at < len(replies):
        magic, flags, kind, handle, length = struct.unpack_from(">IHHQI", replies, at)
        assert (magic, flags, kind) == (nbd.STRUCTURED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_OFFSET_DATA)
        offset = int.from_bytes(replies[at + 20 : at + 28], "big")
        yield handle, offset, replies[at + 28 : at + 20 + length]
        at += 20 + length
    assert at == len(replies)


@pytest.mark.usefixtures("c_reader")
def test_requests_rewritten_while_the_reads_run_never_overrun_the_replies(tmp_path: Path) -> None:
    """serve() sizes the replies of the requests it takes, then reads their data without the GIL, parsing the
    requests again: a buffer that another thread rewrites meanwhile (a bytearray) must not make it write past the
    replies (it did: a heap overflow, the interpreter aborted). Whatever it serves is what the replies say."""
    vol, image = filled(tmp_path, 24 * MiB)
    first = req(nbd.CMD_READ, 1, 0, 16 * MiB)
    small = first + b"".join(req(nbd.CMD_READ, h, h * 4096, 512) for h in range(2, 40))
    grown = first + b"".join(req(nbd.CMD_READ, h, h * 4096, 8 * MiB) for h in range(2, 40))
    data = bytearray(small)
    go, done, stop = threading.Event(), threading.Event(), threading.Event()

    def rewrite() -> None:  # once a round, as soon as it gets the GIL (serve() lets it go to read)
        while go.wait() and not stop.is_set():
            go.clear()
            data[:] = grown
            done.set()

    t = threading.Thread(target=rewrite)
    t.start()
    try:
        with vol.open() as dev:
            reads = R.reads_for(dev)
            assert reads is not None
            for _ in range(20):
                data[:] = small
                go.set()
                pos, replies, count = reads.reader.serve(data, 0, True, 32 * MiB, 1 << 30)  # any buffer
                assert done.wait(10)
                done.clear()
                served = list(chunks(replies))
                assert (pos, count) == (count * nbd.REQUEST.size, len(served)) and count >= 1
                for k, (handle, offset, got) in enumerate(served):
                    assert handle == k + 1 and got == image[offset : offset + len(got)]
    finally:
        stop.set()
        go.set()
        t.join(10)


def test_a_source_closed_in_place_is_not_read_through_stale_descriptors(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot of a served volume closes the source, snapshots, reopens it; when the reopen fails, the export
    keeps the closed source, whose reads fail (EIO). The C reads made for it must fail too: they read through
    the descriptors it had, which the process hands out again to the next files it opens (here a file of 0xEE:
    its bytes came back as the volume's)."""
    vol, image = filled(tmp_path, 4 * MiB)
    filler = tmp_path / "filler"
    filler.write_bytes(b"\xee" * (8 * MiB))
    served = ServedVolume(vol)
    held: list[int] = []
    try:
        path = str(tmp_path / "s.sock")
        with listening(NbdServer(served.exports, workers=2), path):
            c = Client(path)
            c.go("")
            c.request(nbd.CMD_READ, 1, 8192, 4096)
            assert c.simple(4096) == (1, 0, image[8192:12288])
            assert served_in_c(served.main) in (1, -1)

            def cannot_open(**kwargs: object) -> LsmtStack:
                raise OSError(24, "Too many open files")

            with monkeypatch.context() as m:
                m.setattr(vol, "open", cannot_open)
                with pytest.raises(OSError):
                    served._snapshot_now("s", None)  # as the server runs it between requests
            held += [os.open(filler, os.O_RDONLY) for _ in range(64)]  # the lowest numbers free: the closed ones
            c.request(nbd.CMD_READ, 2, 8192, 4096)
            assert c.simple(4096)[:2] == (2, nbd.EIO)  # it was (2, 0) and the filler's 0xEE bytes
            assert served_in_c(served.main) in (1, -1)
            c.close()
    finally:
        for fd in held:
            os.close(fd)
        served._owned.close()  # not close(): it would flush the closed source


@pytest.mark.usefixtures("c_reader")
def test_a_negative_size_is_refused(tmp_path: Path) -> None:
    vol, _ = filled(tmp_path, 1 * MiB)
    with vol.open() as dev:
        plan = dev.direct_plan()
        assert plan is not None
        _, index, fds = plan
        with pytest.raises(ValueError):
            R._nbdread.Reader(index.handle, fds, -1)  # it was taken as 2**64 - 1: reads past the end were served
        reader = R._nbdread.Reader(index.handle, array("i", list(fds)), dev.size)
        assert reader.serve(req(nbd.CMD_READ, 1, 1 << 30, 4096), 0, False, MiB, MiB) == (0, b"", 0)


def _eligible_model(dev_size: int, data: bytes, pos: int, structured: bool, max_read: int, limit: int
                    ) -> tuple[int, list[tuple[int, int, int]]]:
    """What serve() takes from data[pos:], by the rules of the module: (where it stops, (handle, offset, length)
    of each read taken)."""
    head = 28 if structured else 16
    room = max(limit, 0)
    total, taken = 0, []
    while len(data) - pos >= nbd.REQUEST.size:
        magic, flags, cmd, handle, offset, length = nbd.REQUEST.unpack_from(data, pos)
        if not (magic == nbd.REQUEST_MAGIC and cmd == nbd.CMD_READ and not flags & ~nbd.CMD_FLAG_DF and length
                and not (offset | length) % 512 and length <= max_read and offset + length <= dev_size
                and head + length <= room - total):
            break
        total += head + length
        taken.append((handle, offset, length))
        pos += nbd.REQUEST.size
    return pos, taken


@pytest.mark.usefixtures("c_reader")
@pytest.mark.parametrize("sectors", [2048, 2048 + 3, 27])
def test_random_and_mutated_request_streams_are_served_by_the_rules(tmp_path: Path, sectors: int) -> None:
    """Streams of reads (most valid, some at the edges: the last sector, the end, offsets that wrap, lengths of
    2**32 - 512), other commands, flags, bytes flipped, cut short; any position, limit and max_read: serve() takes
    exactly what the rules say, and replies what the generic path reads."""
    size = sectors * 512
    vol, image = filled(tmp_path, size)
    rng = random.Random(sectors)
    with vol.open() as dev:
        reads = R.reads_for(dev)
        assert reads is not None
        taken_total = 0
        for _ in range(400):
            parts = []
            for _ in range(rng.randrange(0, 24)):
                if rng.random() < 0.9:
                    n = rng.randrange(1, min(sectors, 160) + 1) * 512
                    off = rng.randrange(sectors - n // 512 + 1) * 512
                    parts.append(req(nbd.CMD_READ, rng.randrange(1 << 64), off, n, rng.choice([0, nbd.CMD_FLAG_DF])))
                    continue
                n = rng.choice([0, 511, 512, 4096, size, size + 512, (1 << 32) - 512, (1 << 32) - 1])
                off = rng.choice([0, size - 512, size, (size - n) % (1 << 64), (1 << 64) - 512, 1 << 63])
                flags = rng.choice([0, nbd.CMD_FLAG_DF, nbd.CMD_FLAG_FUA, 1 << 9, 0xFFFF])
                cmd = rng.choice([nbd.CMD_READ] * 4 + [nbd.CMD_WRITE, nbd.CMD_FLUSH, nbd.CMD_TRIM, 0xFFFF])
                parts.append(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, cmd, rng.randrange(1 << 64), off, n))
            stream = bytearray(b"".join(parts))
            for _ in range(rng.choice([0, 0, 1, 3])):
                if stream:
                    stream[rng.randrange(len(stream))] = rng.randrange(256)
            prefix = rng.randbytes(rng.randrange(0, 30))
            data = prefix + bytes(stream[: rng.randrange(len(stream) + 1)] if rng.random() < 0.2 else stream)
            pos = len(prefix) if rng.random() < 0.9 else rng.randrange(len(data) + 1)
            structured = rng.random() < 0.5
            max_read = rng.choice([-1, 0, 512, 4096, 65535, MiB] + [1 << 62] * 4)
            limit = rng.choice([-(1 << 62), 0, 600, 5000, MiB] + [1 << 62] * 4)
            end, taken = _eligible_model(size, data, pos, structured, max_read, limit)
            want = b"".join((nbd.chunk_offset_data_header(h, off, n, True) if structured else nbd.simple_reply(h))
                            + image[off : off + n] for h, off, n in taken)
            assert reads.serve(data, pos, structured, max_read, limit) == (end, want, len(taken))
            taken_total += len(taken)
        assert reads.reader.served == taken_total > 300  # not a vacuous run


def _answer(c: Client, structured: bool, lengths: dict[int, int]) -> tuple[int, int, bytes]:
    """One reply, whole: (handle, error, data); ``lengths`` gives the data length of each handle's simple reply."""
    if not structured:
        magic, error, handle = struct.unpack(">IIQ", c.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        return handle, error, c.recv(lengths[handle]) if not error else b""
    data, error = bytearray(), 0
    while True:
        handle, kind, flags, body = c.chunk()
        if kind == nbd.REPLY_TYPE_OFFSET_DATA:
            data += body[8:]
        elif kind == nbd.REPLY_TYPE_ERROR:
            error = int.from_bytes(body[:4], "big")
        if flags & nbd.REPLY_FLAG_DONE:
            return handle, error, bytes(data)


def _answers(c: Client, structured: bool, lengths: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    got: dict[int, tuple[int, bytes]] = {}
    while len(got) < len(lengths):
        handle, error, data = _answer(c, structured, lengths)
        assert handle in lengths and handle not in got
        got[handle] = (error, data)
    return got


FIRST_CHANGES = {  # (command, flags, length): on the event loop in C, on it in Python, in the thread pool
    "write in C": (nbd.CMD_WRITE, 0, 4096),
    "write not of whole sectors": (nbd.CMD_WRITE, 0, 1000),
    "write past SMALL_PAYLOAD": (nbd.CMD_WRITE, 0, 64 * KiB + 512),
    "write of 1 MiB": (nbd.CMD_WRITE, 0, MiB),
    "write of 2 MiB (pool)": (nbd.CMD_WRITE, 0, 2 * MiB),
    "FUA write (pool)": (nbd.CMD_WRITE, nbd.CMD_FLAG_FUA, 4096),
    "write zeroes": (nbd.CMD_WRITE_ZEROES, 0, 4096),
    "write zeroes, no hole": (nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_NO_HOLE, 4096),
    "FUA write zeroes (pool)": (nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_FUA, 4096),
    "write zeroes of 3 MiB (pool)": (nbd.CMD_WRITE_ZEROES, 0, 3 * MiB),
}


@pytest.mark.parametrize("reader", ["same connection", "another connection"])
@pytest.mark.parametrize("change", list(FIRST_CHANGES))
def test_a_read_after_the_first_change_is_answered_sees_it(tmp_path: Path, change: str, reader: str) -> None:
    """The C reads serve while the writable upper maps nothing; the first change of any kind, wherever it is
    served, maps something before its reply goes: a read sent after the reply sees it, on any connection, whether
    the C reader serves it (asking the upper for its records there) or the generic path (a read too large)."""
    cmd, flags, n = FIRST_CHANGES[change]
    vol = Volume.create(str(tmp_path / "vol"), 8 * MiB)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, b"\x11" * (8 * MiB))
    vol.snapshot("base")
    with vol.open(writable=True) as dev:
        export = Export("", dev, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=4), path):
            c, d = Client(path), Client(path)
            c.go("")
            d.go("", structured=True)
            other = c if reader == "same connection" else d
            c.s.sendall(req(nbd.CMD_READ, 1, 4096, 4096) + req(nbd.CMD_READ, 2, 4096, 4096))
            assert _answers(c, False, {1: 4096, 2: 4096}) == {1: (0, b"\x11" * 4096), 2: (0, b"\x11" * 4096)}
            assert served_in_c(export) in (2, -1)
            payload = b"\x5a" * n if cmd == nbd.CMD_WRITE else b""
            c.request(cmd, 3, 4096, n, flags, payload)
            assert _answers(c, False, {3: 0}) == {3: (0, b"")}
            structured = other is d
            other.s.sendall(req(nbd.CMD_READ, 4, 0, n + 8192) + req(nbd.CMD_READ, 5, 4096, 512))
            got = _answers(other, structured, {4: n + 8192, 5: 512})
            new = payload or bytes(n)
            assert got[4] == (0, b"\x11" * 4096 + new + b"\x11" * 4096)
            assert got[5] == (0, new[:512])
            in_c = served_in_c(export)
            assert in_c == -1 or (in_c >= 3 and asked_in_c(export) == in_c - 2)  # 5 at least, in C, asking
            c.close()
            d.close()


def odd_stack(tmp_path: Path, size: int) -> tuple[LsmtStack, bytes]:
    """A stack of a volume's layers whose device is ``size`` bytes, which need not be whole sectors (its owner
    says so: ``LsmtStack(size=)``)."""
    whole = -(-size // 512) * 512
    _, image = filled(tmp_path, whole)
    owned = ExitStack()
    lowers = [open_layer(str(p), owned=owned) for p in sorted((tmp_path / "vol" / "layers").iterdir())]
    return LsmtStack(lowers, owned=owned, size=size), image[:size]


@pytest.mark.parametrize("size", [40 * MiB + 1536, 40 * MiB + 1000])
@pytest.mark.parametrize("structured", [False, True])
def test_reads_at_the_edges_are_what_the_generic_path_answers(tmp_path: Path, size: int, structured: bool) -> None:
    """Devices of whole sectors but not 4 KiB blocks, and not of whole sectors: reads at the sendfile threshold,
    of the largest size, ending at the last whole sector and at the end, the partial last sector, past the end,
    offsets that wrap, DF, flags unknown; each pipelined between two small reads served in C."""
    dev, image = odd_stack(tmp_path, size)
    last = size // 512 * 512
    asked: list[tuple[int, int, int]] = []
    for n in [SENDFILE_MIN - 512, SENDFILE_MIN, SENDFILE_MIN + 512, MiB, MiB + 512, nbd.MAX_PAYLOAD, 512]:
        asked += [(0, n, 0), (last - n, n, 0), (last - n, n, nbd.CMD_FLAG_DF), (size - n, n, 0)]
    asked += [(last, size - last, 0), (size - 1, 1, 0), (size, 0, 0), (size, 512, 0), (last, 512, 0),
              ((1 << 64) - 512, 1024, 0), (1 << 63, 512, 0), (0, nbd.MAX_PAYLOAD + 512, 0), (0, 512, 1 << 9),
              (0, 512, 0xFFFF & ~nbd.CMD_FLAG_FUA)]
    with dev:
        export = Export("", dev, readonly=True, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2), path):
            c = Client(path)
            c.go("", structured=structured)
            for h, (off, n, flags) in enumerate(asked, 1):
                valid = off + n <= size and n <= nbd.MAX_PAYLOAD and not flags & ~nbd.CMD_FLAG_DF
                c.s.sendall(req(nbd.CMD_READ, 1000 + h, 512, 512) + req(nbd.CMD_READ, h, off, n, flags)
                            + req(nbd.CMD_READ, 2000 + h, last - 512, 512))
                got = _answers(c, structured, {1000 + h: 512, h: n if valid else 0, 2000 + h: 512})
                assert got[h] == ((0, image[off : off + n]) if valid else (nbd.EINVAL, b"")), (off, n, flags)
                assert got[1000 + h] == (0, image[512:1024]) and got[2000 + h] == (0, image[last - 512 : last])
            assert served_in_c(export) >= len(asked) or R._nbdread is None  # most of the small ones
            c.close()


@pytest.mark.parametrize("structured", [False, True])
def test_a_layer_cut_short_under_the_server_answers_errors_not_bytes(tmp_path: Path, structured: bool) -> None:
    """Layer files truncated while served: the C read of what is gone fails, and the generic path answers the
    read's error; the reads of what is left, before and after it, are served (in C) as before."""
    vol, image = filled(tmp_path, 4 * MiB)
    with vol.open() as dev:
        export = Export("", dev, readonly=True, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2), path):
            c = Client(path)
            c.go("", structured=structured)
            for layer in (tmp_path / "vol" / "layers").iterdir():
                os.truncate(layer, 64 * KiB + 100)  # a header, some data, a sector cut
            lengths = {1: 4096, 2: 32 * KiB, 3: 4096, 4: 512, 5: 4096}
            c.s.sendall(req(nbd.CMD_READ, 1, 0, 4096) + req(nbd.CMD_READ, 2, 32 * KiB, 32 * KiB)
                        + req(nbd.CMD_READ, 3, 4096, 4096) + req(nbd.CMD_READ, 4, 2 * MiB, 512)
                        + req(nbd.CMD_READ, 5, 8192, 4096))
            got = _answers(c, structured, lengths)
            assert {h: e for h, (e, _) in got.items()} == {1: 0, 2: nbd.EIO, 3: 0, 4: nbd.EIO, 5: 0}
            assert [got[h][1] for h in (1, 3, 5)] == [image[0:4096], image[4096:8192], image[8192:12288]]
            assert served_in_c(export) in (3, -1)
            c.close()


def test_replies_of_reads_pipelined_before_a_disconnect_all_arrive(tmp_path: Path) -> None:
    vol, image = filled(tmp_path, 4 * MiB)
    with vol.open() as dev:
        export = Export("", dev, readonly=True, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2), path):
            c = Client(path)
            c.go("")
            asked = {h: (h * 8192 % (4 * MiB), 4096 + 512 * (h % 8)) for h in range(1, 2001)}
            c.s.sendall(b"".join(req(nbd.CMD_READ, h, off, n) for h, (off, n) in asked.items())
                        + req(nbd.CMD_DISC, 0, 0, 0))
            got = _answers(c, False, {h: n for h, (_, n) in asked.items()})
            assert got == {h: (0, image[off : off + n]) for h, (off, n) in asked.items()}
            assert c.s.recv(1) == b""  # then the server closes
            assert served_in_c(export) > 1000 or R._nbdread is None


def test_after_a_snapshot_the_reads_in_c_see_what_was_written_before_it(tmp_path: Path) -> None:
    """A served volume written to (its upper maps something: the generic path reads), then snapshotted: the new
    source's upper is empty, so the C reads serve again, from the new merged index, which holds the writes (a
    reader left over from the old source would have read the old layers)."""
    vol, image = filled(tmp_path, 4 * MiB)
    served = ServedVolume(vol)
    try:
        path = str(tmp_path / "s.sock")
        with listening(NbdServer(served.exports, workers=2), path):
            c = Client(path)
            c.go("")
            model = bytearray(image)
            for k in range(3):
                c.request(nbd.CMD_WRITE, 1, k * MiB + 4096, 8192, payload=bytes([0x40 + k]) * 8192)
                assert c.simple()[:2] == (1, 0)
                model[k * MiB + 4096 : k * MiB + 12288] = bytes([0x40 + k]) * 8192
                served._snapshot_now(f"s{k}", None)  # as the server runs it between requests
                assert served_in_c(served.main) in (0, -1)  # a reader of its own for the new source
                asked = {h: (k * MiB + h * 2048, 4096) for h in range(1, 8)}
                c.s.sendall(b"".join(req(nbd.CMD_READ, h, off, n) for h, (off, n) in asked.items()))
                got = _answers(c, False, {h: n for h, (_, n) in asked.items()})
                assert got == {h: (0, bytes(model[off : off + n])) for h, (off, n) in asked.items()}
                assert served_in_c(served.main) in (len(asked), -1)
            c.close()
    finally:
        served.close()


def test_a_flood_of_small_reads_nobody_takes_stops_and_is_dropped(tmp_path: Path) -> None:
    """400,000 reads of 512 bytes (200 MiB of replies) sent by a client that takes no reply: the server serves
    them only while the socket takes the replies (it holds one batch at most beyond that), then reads no more
    requests, drops the client once no reply byte is taken for reply_timeout, and serves the others."""
    vol, image = filled(tmp_path, 4 * MiB)
    with vol.open() as dev:
        export = Export("", dev, readonly=True, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2, limits=Limits(reply_timeout=1)), path):
            hostile = Client(path, receive_buffer=4096)
            hostile.go("")
            count = 400_000
            flood = b"".join(req(nbd.CMD_READ, h, h * 512 % (4 * MiB), 512) for h in range(count))
            sent = 0
            try:
                while sent < len(flood):
                    sent += hostile.s.send(flood[sent : sent + 65536])
            except (BrokenPipeError, ConnectionResetError):
                pass  # dropped while sending: the server stopped reading long before
            except TimeoutError:
                pytest.fail("the server neither read the requests nor dropped the client")
            taken = hostile.read_until_closed()  # what was queued for it, then the end: it was dropped
            hostile.close()
            assert taken < count * 528 // 3  # far from all of them were served (the socket took 16 MiB)
            c = Client(path)
            c.go("")
            c.request(nbd.CMD_READ, 1, 4096, 4096)
            assert c.simple(4096) == (1, 0, image[4096:8192])
            c.close()
            assert served_in_c(export) * 528 <= taken + 2 * MiB or R._nbdread is None
