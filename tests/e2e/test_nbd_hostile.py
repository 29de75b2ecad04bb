"""``overlaybd serve`` under careless and hostile clients: clients that pipeline large reads and never take the
replies, that stall a snapshot, that connect and say nothing, that open more connections than allowed, that run
the server out of descriptors, and a second server on the same volume. Real clients (qemu-io, nbdinfo) check that
everyone else is still served; a raw-socket client of our own plays the hostile one."""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from overlaybd import trace
from overlaybd.export.control import socket_path
from overlaybd.export.nbd import protocol
from overlaybd.volume import Volume
from tests.nbd_client import Client, connect, unix_path

from .nbd_helpers import OVERLAYBD, Server, require, run, serving, wait_for

pytestmark = pytest.mark.slow
MiB = 1 << 20
BIG = 32 * MiB  # the largest READ the server accepts


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERLAYBD, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    vol = tmp_path / "vol"
    res = cli("create", str(vol), "--size", "1G")
    assert res.returncode == 0, res.stderr
    return vol


def hostile_reader(server: Server, count: int, length: int = BIG) -> Client:
    """A client that asks for ``count`` reads of ``length`` bytes at once and takes none of the replies."""
    c = Client(unix_path(server.uri), receive_buffer=4096)
    c.go("")
    for h in range(count):
        c.request(protocol.CMD_READ, h, (h * length) % (c.size - length), length)
    return c


def queued(s: socket.socket) -> int:
    """Bytes waiting in a socket's receive queue."""
    return int(struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


def qemu_io_reads(uri: str) -> None:
    out = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 1M", "-c", "read -P 0 512M 1M", uri)
    assert "Pattern verification failed" not in out and "read 1048576/1048576" in out


def test_pipelined_reads_nobody_takes_keep_memory_bounded(tmp_path: Path, volume: Path) -> None:
    require("qemu-io")
    per_connection, total = 64 * MiB, 256 * MiB
    overhead = 192 * MiB  # interpreter, pooled buffers, the transports' copies of a reply being written
    with serving([str(volume), "--readonly", "--max-inflight", "64M", "--max-inflight-total", "256M"],
                 tmp_path) as server:
        qemu_io_reads(server.uri)
        baseline = server.rss()
        bound = baseline + total + overhead
        hostile = [hostile_reader(server, 64) for _ in range(4)]  # 8 GiB asked for, nothing taken
        try:
            peak = baseline
            for _ in range(3):  # another client is served meanwhile, and memory stays bounded throughout
                qemu_io_reads(server.uri)
                for _ in range(10):
                    peak = max(peak, server.rss())
                    assert peak <= bound, f"server RSS {peak >> 20} MiB > {bound >> 20} MiB"
                    time.sleep(0.05)
            assert peak > baseline + per_connection  # the clients did make it hold memory, up to their budget
        finally:
            for c in hostile:
                c.close()
        # they are gone: what they made the server take goes back (pooled buffers and free heap, once idle)
        after = baseline + 64 * MiB
        wait_for(f"server RSS back under {after >> 20} MiB (baseline {baseline >> 20} MiB)",
                 lambda: server.rss() <= after)
        qemu_io_reads(server.uri)


def test_a_client_that_goes_away_has_its_requests_cancelled(tmp_path: Path, volume: Path) -> None:
    """64 pipelined 1 MiB reads, one admitted at a time (--max-inflight 1M); the client leaves once the first
    replies back up: the server reads far fewer than 64 MiB from the layer (the trace counts what it read)."""
    seed = tmp_path / "seed.raw"
    with open(seed, "wb") as f:
        f.write(b"\x5a" * 64 * MiB)
    assert cli("import", str(seed), str(tmp_path / "data")).returncode == 0
    recorded = tmp_path / "reads.trace"
    with serving([str(tmp_path / "data"), "--readonly", "--max-inflight", "1M", "--record-trace", str(recorded)],
                 tmp_path) as server:
        c = Client(unix_path(server.uri), receive_buffer=4096)
        c.go("")
        for h in range(64):
            c.request(protocol.CMD_READ, h, h * MiB, MiB)
        time.sleep(0.5)  # let the replies back up (the assertion below does not depend on how long this takes)
        c.close()
    read = sum(r.count for r in trace.decode(recorded.read_bytes()))
    assert read < 48 * MiB, f"the server read {read >> 20} MiB for a client that left after asking for 64 MiB"


def test_snapshot_is_not_held_back_by_a_client_that_takes_no_replies(tmp_path: Path, volume: Path) -> None:
    require("qemu-io")
    require("nbdinfo")
    with serving([str(volume)], tmp_path) as server:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "flush", server.uri)
        stuck = hostile_reader(server, 8)  # 256 MiB of replies, none taken
        try:
            # the first reply (32 MiB) is being written and cannot finish: the socket holds less than that
            wait_for("the stuck client's replies to back up", lambda: queued(stuck.s) >= 4 * MiB)
            res = cli("snapshot", str(volume), "-m", "while stuck", timeout=90)
            assert res.returncode == 0, res.stderr
            # the stuck client was not dropped for it: it can still take a whole reply
            handle, error, data = stuck.simple(BIG)
            assert error == 0 and len(data) == BIG
        finally:
            stuck.close()
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 1M", "-c", "write -P 0x22 0 4k", "-c", "flush",
                  server.uri)
        assert "Pattern verification failed" not in out
        names = run("nbdinfo", "--list", server.uri)
        assert "snapshot 0: while stuck" in names


def test_a_client_that_takes_no_replies_is_dropped(tmp_path: Path, volume: Path) -> None:
    require("qemu-io")
    with serving([str(volume), "--readonly", "--reply-timeout", "1"], tmp_path) as server:
        stuck = hostile_reader(server, 16)
        try:
            wait_for("the server to drop the stuck client", lambda: "dropped client" in server.log())
            taken = stuck.read_until_closed()
            assert taken < 16 * BIG, "the server sent every reply: it did not drop the client"
        finally:
            stuck.close()
        qemu_io_reads(server.uri)


def test_a_client_that_announces_a_large_write_and_stalls_is_dropped(tmp_path: Path, volume: Path) -> None:
    """A WRITE of 32 MiB holds that much of the budgets while its payload arrives: sending 1 MiB of it and then
    nothing must not hold them for ever."""
    require("qemu-io")
    with serving([str(volume), "--reply-timeout", "1"], tmp_path) as server:
        c = Client(unix_path(server.uri))
        c.go("")
        c.request(protocol.CMD_WRITE, 1, 0, BIG, payload=b"\x44" * MiB)
        try:
            c.s.settimeout(30)
            assert _closed(c.s), "the server still waits for the payload"
        finally:
            c.close()
        assert "write payload" in server.log()
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0x45 0 64k", "-c", "read -P 0x45 0 64k", server.uri)
        assert "Pattern verification failed" not in out


def test_stopping_with_clients_in_every_state_is_clean(tmp_path: Path, volume: Path) -> None:
    """SIGTERM while one client is silent in the handshake, one is idle, one has reads it does not take and one
    writes: the server ends at once, exit 0, no traceback (``serving`` checks both), and what was acknowledged
    before a flush is there."""
    with serving([str(volume)], tmp_path) as server:
        path = unix_path(server.uri)
        silent = connect(path)
        idle = Client(path)
        idle.go("")
        stuck = hostile_reader(server, 8)
        writer = Client(path)
        writer.go("")
        writer.request(protocol.CMD_WRITE, 1, 0, 4096, payload=b"\x77" * 4096)
        writer.request(protocol.CMD_FLUSH, 2, 0, 0)
        assert sorted([writer.simple()[:2], writer.simple()[:2]]) == [(1, 0), (2, 0)]
        writer.request(protocol.CMD_WRITE, 3, 8192, 4096, payload=b"\x78" * 4096)  # not waited for
        wait_for("the stuck client's replies to back up", lambda: queued(stuck.s) >= 4 * MiB)
    for c in (silent, idle.s, stuck.s, writer.s):
        c.close()
    with Volume(str(volume)).open() as dev:
        assert dev.pread(0, 4096) == b"\x77" * 4096


def test_silent_and_dribbling_clients_are_dropped_after_the_handshake_limit(tmp_path: Path, volume: Path) -> None:
    require("nbdinfo")
    with serving([str(volume), "--readonly", "--handshake-limit", "1"], tmp_path) as server:
        path = unix_path(server.uri)
        silent = connect(path, timeout=30)
        dribbling = Client(path)
        dribbling.s.settimeout(30)
        try:
            header = struct.pack(">QII", protocol.IHAVEOPT, protocol.OPT_LIST, 0)
            try:
                for byte in header[:15]:  # an option header one byte at a time, never finished
                    dribbling.s.sendall(bytes([byte]))
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass  # dropped while it dribbled
            assert len(silent.recv(18)) == 18  # the greeting, then nothing: it said nothing back
            assert silent.recv(1) == b"", "a silent client was not dropped"
            assert _closed(dribbling.s), "a dribbling client was not dropped"
        finally:
            silent.close()
            dribbling.close()
        assert "no handshake within 1 s" in server.log()
        assert '"export-size": 1073741824' in run("nbdinfo", "--json", server.uri)


def test_connections_beyond_the_maximum_are_refused(tmp_path: Path, volume: Path) -> None:
    require("nbdinfo")
    with serving([str(volume), "--readonly", "--max-connections", "4"], tmp_path) as server:
        path = unix_path(server.uri)
        working = Client(path)
        working.go("")
        idle = [Client(path) for _ in range(3)]
        for c in idle:
            c.go("")  # then idle
        try:
            for _ in range(20):  # each is closed at once, without a greeting
                s = connect(path)
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass
                finally:
                    s.close()
            working.request(protocol.CMD_READ, 7, 4096, 4096)  # the existing client goes on working
            assert working.simple(4096) == (7, 0, bytes(4096))
            idle.pop().close()
            wait_for("a place to free up", lambda: _greets(path))
            assert '"export-size": 1073741824' in run("nbdinfo", "--json", server.uri)
        finally:
            working.close()
            for c in idle:
                c.close()
        refusals = server.log().count("refused a connection")
        assert refusals == 1, f"{refusals} warnings for 20 refusals: at most one per interval"


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _greets(path: str) -> bool:
    s = connect(path)
    try:
        return len(s.recv(18)) == 18
    except OSError:
        return False
    finally:
        s.close()


def test_out_of_descriptors_the_server_backs_off_quietly_and_recovers(tmp_path: Path, volume: Path) -> None:
    require("nbdinfo")
    with serving([str(volume), "--readonly"], tmp_path) as server:
        path = unix_path(server.uri)
        open_now = len(os.listdir(f"/proc/{server.pid}/fd"))
        soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (open_now + 3, hard))
        held = [connect(path) for _ in range(12)]  # 3 accepted; the rest wait in the backlog
        try:
            wait_for("the server to run out of descriptors", lambda: "cannot accept connections" in server.log())
            time.sleep(1.5)  # a second and a half of refused accepts: asyncio's own loop logs hundreds of tracebacks
            log = server.log()
            assert "Traceback" not in log
            assert len(log) < 4096, f"{len(log)} bytes of log in 1.5 s out of descriptors"
        finally:
            for s in held:
                s.close()
        # descriptors free again: new clients are served
        assert '"export-size": 1073741824' in run("nbdinfo", "--json", server.uri)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))


def test_a_second_server_leaves_the_first_ones_sockets_alone(tmp_path: Path, volume: Path) -> None:
    require("qemu-io")
    control = socket_path(str(volume))
    with serving([str(volume)], tmp_path, name="writable") as writable:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", "-c", "flush", writable.uri)
        inode = os.stat(control).st_ino
        # a read-only server of the same volume comes and goes
        with serving([str(volume), "--readonly"], tmp_path, listen=f"unix:{tmp_path / 'ro.sock'}", name="ro") as ro:
            out = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 1M 4k", ro.uri)
            assert "Pattern verification failed" not in out
        assert os.stat(control).st_ino == inode, "the read-only server removed the writable one's control socket"
        # a second writable server is refused by the volume lock, and touches nothing
        second = cli("serve", str(volume), "--listen", f"unix:{tmp_path / 'rw2.sock'}", timeout=30)
        assert second.returncode == 1 and "in use" in second.stderr and "Traceback" not in second.stderr
        assert os.stat(control).st_ino == inode
        # a server asked to listen where this one listens is refused, and this one keeps serving
        third = cli("serve", str(volume), "--readonly", "--listen", f"unix:{unix_path(writable.uri)}", timeout=30)
        assert third.returncode == 1 and "another process is listening" in third.stderr
        res = cli("snapshot", str(volume), "-m", "through the control socket")
        assert res.returncode == 0, res.stderr
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0x33 0 64k", writable.uri)
        assert "Pattern verification failed" not in out
    assert not os.path.exists(control)  # the writable server removed its own socket at the end
    assert not (tmp_path / "nbd.sock").exists()


