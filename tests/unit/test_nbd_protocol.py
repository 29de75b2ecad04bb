"""The NBD server at the byte level: handshake options, errors the spec names, pipelining, violations."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.export.nbd.server import Export, NbdServer
from overlaybd.source.file import MemorySource
from tests.nbd_client import Client
from tests.unit.nbd_thread import listening

SIZE = 1 << 20
DATA = bytes((i * 7) % 251 for i in range(SIZE))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "s.sock")
    exports = [Export("", MemorySource(DATA)), Export("rw", MemorySource(bytearray(DATA)), description="writable")]
    with listening(NbdServer(exports, workers=4), path):
        yield path


def test_options_answer_as_the_spec_says(server: str) -> None:
    c = Client(server)
    names = [d[4:4 + struct.unpack(">I", d[:4])[0]] for k, d in c.option(nbd.OPT_LIST) if k == nbd.REP_SERVER]
    assert sorted(names) == [b"", b"rw"]
    assert c.option(nbd.OPT_LIST, b"junk")[-1][0] == nbd.REP_ERR_INVALID
    assert c.option(99)[-1][0] == nbd.REP_ERR_UNSUP
    assert c.option(nbd.OPT_STARTTLS)[-1][0] == nbd.REP_ERR_UNSUP
    body = struct.pack(">I", 0) + struct.pack(">I", 0)
    assert c.option(nbd.OPT_SET_META_CONTEXT, body)[-1][0] == nbd.REP_ERR_INVALID  # before STRUCTURED_REPLY
    assert c.option(nbd.OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))[-1][0] == nbd.REP_ERR_UNKNOWN
    assert c.option(nbd.OPT_INFO, struct.pack(">I", 40) + b"x")[-1][0] == nbd.REP_ERR_INVALID  # truncated
    info = c.option(nbd.OPT_INFO, struct.pack(">I", 2) + b"rw" + struct.pack(">HH", 1, nbd.INFO_DESCRIPTION))
    assert (nbd.REP_INFO, struct.pack(">H", nbd.INFO_DESCRIPTION) + b"writable") in info
    listed = c.option(nbd.OPT_LIST_META_CONTEXT, struct.pack(">II", 0, 0))
    assert listed[0] == (nbd.REP_META_CONTEXT, struct.pack(">I", 1) + nbd.BASE_ALLOCATION.encode())
    flags = c.go("", size=SIZE)
    assert flags & nbd.TFLAG_READ_ONLY and flags & nbd.TFLAG_SEND_FLUSH and not flags & nbd.TFLAG_SEND_TRIM


def test_requests_get_the_errors_the_spec_names(server: str) -> None:
    c = Client(server)
    c.go("", size=SIZE)
    c.request(nbd.CMD_READ, 1, SIZE - 10, 20)
    assert c.simple() == (1, nbd.EINVAL, b"")
    c.request(42, 2, 0, 10)
    assert c.simple() == (2, nbd.EINVAL, b"")
    c.request(nbd.CMD_WRITE, 3, 0, 4, payload=b"abcd")
    assert c.simple() == (3, nbd.EPERM, b"")
    c.request(nbd.CMD_BLOCK_STATUS, 4, 0, 4096)
    assert c.simple() == (4, nbd.EINVAL, b"")  # no structured replies, no context
    c.request(nbd.CMD_READ, 5, 0, 10, flags=1 << 12)  # unknown command flag
    assert c.simple() == (5, nbd.EINVAL, b"")
    c.request(nbd.CMD_READ, 6, 100, 10)
    assert c.simple(10) == (6, 0, DATA[100:110])  # and the connection still works


def test_pipelined_reads_come_back_matched_by_handle(server: str) -> None:
    c = Client(server)
    c.go("", size=SIZE)
    wanted = {}
    for h in range(200):
        off, n = (h * 4099) % (SIZE - 9000), 1 + (h * 37) % 9000
        wanted[h] = DATA[off : off + n]
        c.request(nbd.CMD_READ, h, off, n)
    for _ in range(200):
        magic, error, handle = struct.unpack(">IIQ", c.recv(16))
        assert error == 0
        assert c.recv(len(wanted[handle])) == wanted.pop(handle)
    assert not wanted


def test_structured_writes_block_status_and_disc(server: str) -> None:
    c = Client(server)
    flags = c.go("rw", structured=True, meta=True, size=SIZE)
    assert flags & nbd.TFLAG_SEND_DF and not flags & nbd.TFLAG_READ_ONLY
    c.request(nbd.CMD_WRITE, 7, 4096, 5, flags=nbd.CMD_FLAG_FUA, payload=b"hello")
    handle, kind, cflags, _ = c.chunk()
    assert (handle, kind, cflags & nbd.REPLY_FLAG_DONE) == (7, nbd.REPLY_TYPE_NONE, 1)
    c.request(nbd.CMD_READ, 8, 4094, 9)
    handle, kind, _, body = c.chunk()
    assert (handle, kind) == (8, nbd.REPLY_TYPE_OFFSET_DATA)
    assert body == struct.pack(">Q", 4094) + DATA[4094:4096] + b"hello" + DATA[4101:4103]
    c.request(nbd.CMD_BLOCK_STATUS, 9, 0, SIZE)
    handle, kind, _, body = c.chunk()
    assert (handle, kind) == (9, nbd.REPLY_TYPE_BLOCK_STATUS)
    context, length, state = struct.unpack(">III", body[:12])
    assert (context, length, state) == (1, SIZE, 0)
    c.request(nbd.CMD_READ, 10, SIZE, 1)
    handle, kind, _, body = c.chunk()
    assert (handle, kind) == (10, nbd.REPLY_TYPE_ERROR) and struct.unpack(">I", body[:4])[0] == nbd.EINVAL
    c.request(nbd.CMD_DISC, 11, 0, 0)
    assert c.s.recv(1) == b""  # the server closes after DISC


def test_violations_end_one_connection_not_the_server(server: str) -> None:
    bad = Client(server, flags=1 << 7)  # unknown client flag: the server must close
    assert bad.s.recv(1) == b""
    c = Client(server)
    c.go("", size=SIZE)
    c.s.sendall(b"\x00" * nbd.REQUEST.size)  # bad request magic: cannot resynchronise
    assert c.s.recv(1) == b""
    c2 = Client(server)
    c2.s.sendall(struct.pack(">QII", 0x1234, nbd.OPT_LIST, 0))  # bad option magic
    assert c2.s.recv(1) == b""
    ok = Client(server)
    ok.go("", size=SIZE)
    ok.request(nbd.CMD_READ, 1, 0, 4)
    assert ok.simple(4) == (1, 0, DATA[:4])
