"""Requests that arrive together: the server serves the small ones as their bytes arrive, hands the rest (a FLUSH,
a large read, a request cut in two by the client's writes) to its request reader in order, and admits no more
than its limits allow; every request is answered once, with the right bytes, and counted once."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from overlaybd import trace
from overlaybd.export.nbd import protocol
from tests.nbd_client import Client, unix_path

from .nbd_helpers import OVERLAYBD, run, serving
from .test_metrics import scrape, value, wait_url

pytestmark = pytest.mark.slow
BLOCK = 4096


def pattern(k: int) -> bytes:
    return struct.pack(">I", k) * (BLOCK // 4)


def burst(c: Client, requests: list[tuple[int, int, int, int, bytes]], cut: int | None = None) -> None:
    """Send every request in one write (or two, cut at byte ``cut``)."""
    data = b"".join(protocol.REQUEST.pack(protocol.REQUEST_MAGIC, 0, cmd, h, off, ln) + payload
                    for cmd, h, off, ln, payload in requests)
    if cut is None:
        c.s.sendall(data)
    else:
        c.s.sendall(data[:cut])
        c.s.sendall(data[cut:])


def replies(c: Client, lengths: dict[int, int]) -> dict[int, bytes]:
    """Simple replies for every handle in ``lengths`` (the read length, 0 for others), in whatever order."""
    out: dict[int, bytes] = {}
    while len(out) < len(lengths):
        magic, error, handle = struct.unpack(">IIQ", c.recv(16))
        assert magic == protocol.SIMPLE_REPLY_MAGIC and error == 0 and handle not in out, (handle, error)
        out[handle] = c.recv(lengths[handle])
    return out


def test_bursts_of_mixed_requests_are_each_answered_once_and_counted(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "64M")
    with serving([str(vol), "--metrics", "127.0.0.1:0"], tmp_path) as server:
        url = wait_url(server)
        before = scrape(url)
        c = Client(unix_path(server.uri))
        c.go("")
        n = 150  # more than a connection may have in flight (64): the rest wait for their turn
        writes = [(protocol.CMD_WRITE, k, k * 3 * BLOCK, BLOCK, pattern(k)) for k in range(n)]
        burst(c, writes)
        assert set(replies(c, {k: 0 for k in range(n)})) == set(range(n))

        big = 300 * 1024  # above what is served on the event loop: it goes to the thread pool
        reads = [(protocol.CMD_READ, 1000 + k, k * 3 * BLOCK, BLOCK, b"") for k in range(n)]
        mixed = reads[:50] + [(protocol.CMD_FLUSH, 2000, 0, 0, b""), (protocol.CMD_READ, 2001, 0, big, b"")] \
            + reads[50:]
        lengths = {h: ln if cmd == protocol.CMD_READ else 0 for cmd, h, _o, ln, _p in mixed}
        # cut inside the header of the 101st request: its first bytes wait in the reader for the rest
        burst(c, mixed, cut=100 * (protocol.REQUEST.size) + 13)
        got = replies(c, lengths)
        for k in range(n):
            assert got[1000 + k] == pattern(k), k
        whole = b"".join(pattern(k) + bytes(2 * BLOCK) for k in range(big // (3 * BLOCK) + 1))
        assert got[2001] == whole[:big]
        c.request(protocol.CMD_DISC, 0, 0, 0)
        c.close()

        after = scrape(url)
        counted = {cmd: value(after, "overlaybd_requests_total", command=cmd)
                   - value(before, "overlaybd_requests_total", command=cmd) for cmd in ("READ", "WRITE", "FLUSH")}
        assert counted == {"READ": n + 1, "WRITE": n, "FLUSH": 1}


def test_a_burst_of_reads_nobody_takes_is_not_all_served(tmp_path: Path) -> None:
    """256 reads of 256 KiB (64 MiB) in one write from a client that takes no reply, then leaves: the requests
    arrive together and are small enough to be served as they arrive, but serving stops once the socket takes no
    more replies (or the connection breaks), so the server reads far fewer than 64 MiB from the layer (the trace
    counts what it read)."""
    seed = tmp_path / "seed.raw"
    seed.write_bytes(b"\x5a" * 64 * (1 << 20))
    run(*OVERLAYBD, "import", str(seed), str(tmp_path / "data"))
    recorded = tmp_path / "reads.trace"
    size = 256 * 1024
    with serving([str(tmp_path / "data"), "--readonly", "--record-trace", str(recorded)], tmp_path) as server:
        c = Client(unix_path(server.uri), receive_buffer=4096)
        c.go("")
        burst(c, [(protocol.CMD_READ, h, h * size, size, b"") for h in range(256)])
        time.sleep(0.5)  # let the replies back up (the assertion below does not depend on how long this takes)
        c.close()
    read = sum(r.count for r in trace.decode(recorded.read_bytes()))
    assert read < 48 << 20, f"the server read {read >> 20} MiB for a client that took no reply and left"
