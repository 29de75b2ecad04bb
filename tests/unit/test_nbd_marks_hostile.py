"""NBD reads in C on a writable export (``export.nbd.reads``: the reader's granule marks) under careless and hostile
use over a real server: several connections writing, trimming and zero-writing sectors of the same granules (each
its own stripes, 3 sectors wide, so that every granule is shared) in every way the upper changes, with reads
pipelined behind the changes in one send and after their replies; a volume whose upper maps data when it is served
(reopened), read at the edges of its marked granules; a 64 TiB sparse volume, whose granules are 32 MiB; counting
(metrics on); and the reader failing to be made (memory) while a client reads."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd import writes as W
from overlaybd.export.nbd.server import Export, NbdServer
from overlaybd.formats.lsmt.mapping import MutableLevel
from overlaybd.metrics import Recorder
from overlaybd.volume import Volume
from tests.nbd_client import Client
from tests.unit.nbd_thread import listening
from tests.unit.test_nbd_reads_hostile import _answers, asked_in_c, req, served_in_c

KiB = 1024
MiB = 1 << 20
SIZE = 4 * MiB
STRIPE = 3 * 512  # a connection's stripes: every 4 KiB granule holds sectors of two or three connections
WRITTEN = SIZE // 2  # the changes stay below this; reads above it are of granules never marked (served in C)


def _base(tmp_path: Path, size: int = SIZE) -> tuple[Volume, bytes]:
    """A volume of one snapshot, every sector of it different."""
    vol = Volume.create(str(tmp_path / "vol"), size)
    image = random.Random(1).randbytes(size)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, image)
    vol.snapshot("base")
    return vol, image


def _span(rng: random.Random, k: int, conns: int, aligned: bool) -> tuple[int, int]:
    """A random span inside one of connection ``k``'s stripes below WRITTEN (whole sectors if ``aligned``)."""
    stripe = rng.randrange(WRITTEN // STRIPE // conns) * conns + k
    base = stripe * STRIPE
    if aligned:
        a = base + rng.randrange(STRIPE // 512) * 512
        return a, rng.randrange(1, (base + STRIPE - a) // 512 + 1) * 512
    a = base + rng.randrange(STRIPE)
    return a, rng.randrange(1, base + STRIPE - a + 1)


def _mine(offset: int, k: int, conns: int) -> bool:
    return offset >= WRITTEN or offset // STRIPE % conns == k


def _changes(rng: random.Random, k: int, conns: int, model: bytearray, handle: int,
             inline_only: bool) -> list[bytes]:
    """A few changes to connection ``k``'s stripes, applied to ``model``: only those served on the event loop (in
    the order they come) if ``inline_only``, else FUA ones (in the thread pool) too."""
    out: list[bytes] = []
    for h in range(handle, handle + rng.randrange(1, 6)):
        r = rng.random() * (0.7 if inline_only else 1.0)
        a, n = _span(rng, k, conns, aligned=r < 0.5 or 0.7 <= r < 0.85)
        if r < 0.6:  # whole sectors (the C writer serves them, many in one send), or not (the generic path)
            data = rng.randbytes(n)
            out.append(req(nbd.CMD_WRITE, h, a, n, payload=data))
        elif r < 0.65:
            out.append(req(nbd.CMD_TRIM, h, a, n))
            data = bytes(n)
        elif r < 0.7:
            out.append(req(nbd.CMD_WRITE_ZEROES, h, a, n))
            data = bytes(n)
        elif r < 0.85:
            data = rng.randbytes(n)
            out.append(req(nbd.CMD_WRITE, h, a, n, nbd.CMD_FLAG_FUA, data))
        else:
            out.append(req(nbd.CMD_WRITE_ZEROES, h, a, n, nbd.CMD_FLAG_FUA))
            data = bytes(n)
        model[a : a + n] = data
    return out


@pytest.mark.parametrize("writer", ["c", "python"])
@pytest.mark.parametrize("conns", [1, 3])
def test_connections_changing_the_same_granules_read_what_they_wrote(tmp_path: Path, writer: str, conns: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection changes its stripes (every way: C batches, single writes, not of whole sectors, trims,
    zero-writes, FUA in the pool) while the others change theirs in the same granules; it reads back, in one send
    right behind changes served on the event loop and after the replies of those in the pool, what it wrote, and
    the granules nobody writes are still read in C. At the end the device is the model."""
    if writer == "python":
        monkeypatch.setattr(W, "_nbdwrite", None)
    vol, image = _base(tmp_path)
    model = bytearray(image)
    with vol.open(writable=True) as dev:
        export = Export("", dev, inline=True)
        path = str(tmp_path / "s.sock")
        errors: list[BaseException] = []
        with listening(NbdServer([export], workers=4), path):

            def connection(k: int) -> None:
                try:
                    rng = random.Random(k)
                    c = Client(path)
                    c.go("", structured=k % 2 == 1)
                    handle = 1
                    for _ in range(60):
                        inline_only = rng.random() < 0.5
                        sent = _changes(rng, k, conns, model, handle, inline_only)
                        lengths = {h: 0 for h in range(handle, handle + len(sent))}
                        handle += len(sent)
                        if not inline_only:  # after the replies (FUA ones are served in the pool)
                            c.s.sendall(b"".join(sent))
                            assert all(e == 0 for e, _ in _answers(c, k % 2 == 1, lengths).values())
                            sent, lengths = [], {}
                        asked = {}
                        for h in range(handle, handle + rng.randrange(1, 8)):
                            a = rng.randrange(SIZE // 512) * 512
                            asked[h] = (a, min(rng.choice([512, 4096, 8192, 60 * KiB]), SIZE - a))
                        handle += len(asked)
                        c.s.sendall(b"".join(sent) + b"".join(req(nbd.CMD_READ, h, a, n)
                                                              for h, (a, n) in asked.items()))
                        got = _answers(c, k % 2 == 1, lengths | {h: n for h, (_, n) in asked.items()})
                        assert all(got[h][0] == 0 for h in got)
                        for h, (a, n) in asked.items():
                            data = got[h][1]
                            bad = [a + i for i in range(n) if _mine(a + i, k, conns) and data[i] != model[a + i]]
                            assert not bad, f"connection {k}: read [{a}, +{n}) differs at {bad[:4]}"
                    c.close()
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=connection, args=(k,)) for k in range(conns)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            c = Client(path)
            c.go("")
            before = served_in_c(export)
            c.s.sendall(req(nbd.CMD_READ, 1, WRITTEN, 4096) + req(nbd.CMD_READ, 2, SIZE - 4096, 4096))
            assert _answers(c, False, {1: 4096, 2: 4096}) == {1: (0, image[WRITTEN : WRITTEN + 4096]),
                                                             2: (0, image[SIZE - 4096 :])}
            assert served_in_c(export) in (before + 2, -1)
            c.close()
        assert dev.pread(0, SIZE) == model


def test_an_upper_that_maps_data_when_served_is_read_at_its_granule_edges(tmp_path: Path) -> None:
    """A volume written to and reopened (no snapshot): its upper maps a sector at the end of one granule, one at the
    start of another, and a trimmed one. Reads of each, of the granules beside them, and across the edges where
    only one side is marked give the volume's bytes, all served in C but the one too large; those meeting a mark
    ask the upper for its records."""
    vol, image = _base(tmp_path)
    model = bytearray(image)
    with vol.open(writable=True) as dev:
        for at, data in ((8192 - 512, b"\x01" * 512), (64 * KiB, b"\x02" * 512), (128 * KiB + 1536, bytes(512))):
            if any(data):
                dev.pwrite(at, data)
            else:
                dev.trim(at, 512)
            model[at : at + 512] = data
    with vol.open(writable=True) as dev:
        export = Export("", dev, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2), path):
            c = Client(path)
            c.go("")
            asked = {1: (4096, 4096), 2: (4096 - 512, 1024), 3: (0, 4096), 4: (8192, 4096),  # marked, edges, C, C
                     5: (8192 - 512, 1024), 6: (60 * KiB, 8192), 7: (64 * KiB - 512, 512),
                     8: (128 * KiB, 4096), 9: (124 * KiB, 4096), 10: (132 * KiB, 4096), 11: (0, SIZE // 4)}
            c.s.sendall(b"".join(req(nbd.CMD_READ, h, a, n) for h, (a, n) in asked.items()))
            got = _answers(c, False, {h: n for h, (_, n) in asked.items()})
            assert got == {h: (0, bytes(model[a : a + n])) for h, (a, n) in asked.items()}
            assert served_in_c(export) in (10, -1)  # not 11 (1 MiB: the generic way, or sendfile)
            assert asked_in_c(export) in (5, -1)  # 1, 2, 5, 6, 8 meet a marked granule; 3, 4, 7, 9, 10 do not
            c.close()


def test_a_64_tib_sparse_volume_keeps_small_marks_and_reads_right(tmp_path: Path) -> None:
    """64 TiB: granules of 32 MiB (4 Mi at most). A sector written at the last sector of a granule and at the
    device's last sector: reads over them and across to the next granule give what was written; a granule beside
    them, never written, is still read in C without asking the upper."""
    size = 64 << 40
    g = 32 * MiB
    vol = Volume.create(str(tmp_path / "vol"), size)
    with vol.open(writable=True) as dev:
        dev.pwrite(1000 * g + 4096, b"L" * 4096)
    vol.snapshot("base")
    with vol.open(writable=True) as dev:
        dev.pwrite(size - 512, b"U" * 512)  # mapped by the upper when served
    with vol.open(writable=True) as dev:
        export = Export("", dev, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2), path):
            c = Client(path)
            c.go("")
            c.request(nbd.CMD_WRITE, 1, 1000 * g - 512, 512, payload=b"W" * 512)  # the last sector of a granule
            assert _answers(c, False, {1: 0}) == {1: (0, b"")}
            reads = export.reads()
            if reads is not None:
                marked = reads.reader.marked
                assert marked(999 * g, 512) and not marked(998 * g + g - 512, 512) and not marked(1000 * g, 512)
                assert marked(size - g, 512) and not marked(size - g - 512, 512)
            asked = {2: (1000 * g - 4096, 12288), 3: (1000 * g, 8192), 4: (size - 4096, 4096), 5: (999 * g, 4096),
                     6: (1001 * g, 4096)}
            c.s.sendall(b"".join(req(nbd.CMD_READ, h, a, n) for h, (a, n) in asked.items()))
            got = _answers(c, False, {h: n for h, (_, n) in asked.items()})
            assert got == {2: (0, bytes(3584) + b"W" * 512 + bytes(4096) + b"L" * 4096),
                           3: (0, bytes(4096) + b"L" * 4096), 4: (0, bytes(3584) + b"U" * 512),
                           5: (0, bytes(4096)), 6: (0, bytes(4096))}
            assert served_in_c(export) in (5, -1)
            assert asked_in_c(export) in (3, -1)  # 2, 4, 5 meet a marked granule; 3 and 6 do not
            c.close()


def test_counting_reads_go_the_generic_way_and_see_every_change(tmp_path: Path) -> None:
    """With metrics on, reads after writes see them (served in C, asking the upper, and counted there)."""
    vol, image = _base(tmp_path)
    with vol.open(writable=True) as dev:
        export = Export("", dev, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2, metrics=Recorder()), path):
            c = Client(path)
            c.go("")
            c.s.sendall(req(nbd.CMD_WRITE, 1, 4096, 4096, payload=b"m" * 4096) + req(nbd.CMD_READ, 2, 0, 12288)
                        + req(nbd.CMD_TRIM, 3, 8192, 512) + req(nbd.CMD_READ, 4, 8192, 4096))
            got = _answers(c, False, {1: 0, 2: 12288, 3: 0, 4: 4096})
            assert got == {1: (0, b""), 2: (0, image[:4096] + b"m" * 4096 + image[8192:12288]), 3: (0, b""),
                           4: (0, bytes(512) + image[8704:12288])}
            assert served_in_c(export) in (2, -1) and asked_in_c(export) in (2, -1)
            c.close()


@pytest.mark.parametrize("first", ["read", "write"])
def test_a_reader_that_cannot_be_made_leaves_the_request_to_the_generic_path(
        tmp_path: Path, first: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Making the C reader reads what the upper maps (a catch-up of its index): if that fails for memory, the
    request that needed it is served the generic way (or fails with an error), the connection is not dropped,
    and the reader is made at the next request."""
    vol, image = _base(tmp_path)
    with vol.open(writable=True) as dev:
        dev.pwrite(4096, b"u" * 4096)
    segments = MutableLevel.segments
    failures = [1]

    def failing(level: MutableLevel) -> object:
        if failures[0]:
            failures[0] -= 1
            raise MemoryError
        return segments(level)

    monkeypatch.setattr(MutableLevel, "segments", failing)
    with vol.open(writable=True) as dev:
        export = Export("", dev, inline=True)
        path = str(tmp_path / "s.sock")
        with listening(NbdServer([export], workers=2), path):
            c = Client(path)
            c.go("")
            if first == "read":
                c.request(nbd.CMD_READ, 1, 0, 12288)
                assert _answers(c, False, {1: 12288}) == {1: (0, image[:4096] + b"u" * 4096 + image[8192:12288])}
            else:
                c.request(nbd.CMD_WRITE, 1, 0, 512, payload=b"w" * 512)
                error, _ = _answers(c, False, {1: 0})[1]
                assert error in (0, nbd.ENOMEM)
            c.s.sendall(req(nbd.CMD_READ, 2, 4096, 4096) + req(nbd.CMD_READ, 3, 64 * KiB, 4096))
            got = _answers(c, False, {2: 4096, 3: 4096})
            assert got == {2: (0, b"u" * 4096), 3: (0, image[64 * KiB : 68 * KiB])}
            in_c = served_in_c(export)
            assert (in_c, failures) in ((2, [0]), (-1, [1]))  # without the C reader nothing made it catch up
            c.close()
