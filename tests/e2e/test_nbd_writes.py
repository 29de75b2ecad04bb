"""Writes through ``overlaybd serve`` with the C writer (``_nbdwrite``) and without it (``OVERLAYBD_NATIVE=0``):
real clients (nbdcopy, fio with verification, qemu-io) write and read back, and a FLUSH reply means every write
answered before it survives ``kill -9`` of the server."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.volume import Volume
from tests.nbd_client import Client

from .nbd_helpers import OVERLAYBD, require, run, serving

pytestmark = pytest.mark.slow
MiB = 1 << 20
NATIVE = ["1", "0"]


@pytest.fixture
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """OVERLAYBD_NATIVE for the servers this test starts."""
    value: str = request.param
    monkeypatch.setenv("OVERLAYBD_NATIVE", value)
    return value


@pytest.mark.parametrize("native", NATIVE, indirect=True)
def test_flush_reply_means_the_writes_answered_before_it_survive_kill_9(tmp_path: Path, native: str) -> None:
    rng = random.Random(int(native) + 5)
    blocks = 1024
    vol = Volume.create(str(tmp_path / "vol"), blocks * 4096)
    for round_no in range(4):
        sock = tmp_path / "s.sock"
        proc = subprocess.Popen([*OVERLAYBD, "serve", vol.path, "--listen", f"unix:{sock}"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("nbd")
            c = Client(str(sock))
            c.go("", structured=bool(round_no % 2))
            # pipelined: writes (a few FUA, a few not of whole sectors), the FLUSH behind them, more writes behind it
            written = {}
            stream = []
            for k, block in enumerate(rng.sample(range(blocks), 300)):
                data = rng.randbytes(4096)
                off, n = (block * 4096 + 512, 3000) if k % 41 == 7 else (block * 4096, 4096)
                stream.append(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, nbd.CMD_FLAG_FUA if k % 53 == 9 else 0,
                                               nbd.CMD_WRITE, k + 1, off, n) + data[:n])
                written[k + 1] = (off, data[:n])
            stream.insert(250, nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_FLUSH, 99_999, 0, 0))
            c.s.sendall(b"".join(stream))
            answered = set()
            while True:
                handle, error = _reply(c, bool(round_no % 2))
                assert error == 0
                if handle == 99_999:
                    break
                answered.add(handle)
            os.kill(proc.pid, signal.SIGKILL)  # at once: nothing after the FLUSH reply is waited for
        finally:
            proc.kill()
            proc.wait()
        # the FLUSH covers the writes sent before it and answered before its reply (no two writes of a round touch
        # the same block)
        covered = {handle for handle in answered if handle <= 250}
        assert covered
        with Volume(vol.path).open() as dev:
            got = dev.pread(0, blocks * 4096)
        for handle in covered:
            off, data = written[handle]
            assert got[off:off + len(data)] == data, f"round {round_no}: write {handle} answered before the FLUSH " \
                                                     "reply is lost"
    with Volume(vol.path).open(writable=True):
        pass  # opens writable: no lock left behind, no repair needed


def _reply(c: Client, structured: bool) -> tuple[int, int]:
    if structured:
        handle, kind, _, body = c.chunk()
        return handle, int.from_bytes(body[:4], "big") if kind & (1 << 15) else 0
    handle, error, _ = c.simple()
    return handle, error


@pytest.mark.parametrize("native", NATIVE, indirect=True)
def test_real_clients_write_and_read_back(tmp_path: Path, native: str) -> None:
    for tool in ("nbdcopy", "fio", "qemu-io"):
        require(tool)
    size = 16 * MiB
    vol = Volume.create(str(tmp_path / "vol"), size)
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(9).randbytes(size))
    with serving([vol.path], tmp_path) as server:
        uri = server.uri
        run("nbdcopy", "--flush", "--requests=16", str(src), uri)  # 256 KiB writes, 16 in flight
        # fio: 4 KiB random writes at QD16 with a flush every 64, over the first 8 MiB, each block checked after
        run("fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
            "--fsync=64", "--size=8m", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
            "--randseed=3")
        out = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 9437184 65536", "-c", "write -P 0xa5 9502720 4096",
                  "-c", "flush", "-c", "read -P 0x5a 9437184 65536", "-c", "read -P 0xa5 9502720 4096", uri)
        assert "Pattern verification failed" not in out
        copy = tmp_path / "back.raw"
        run("nbdcopy", uri, str(copy))
    want = bytearray(src.read_bytes())
    want[9437184:9437184 + 65536] = b"\x5a" * 65536
    want[9502720:9502720 + 4096] = b"\xa5" * 4096
    back = copy.read_bytes()
    assert back[8 * MiB:] == want[8 * MiB:]  # nbdcopy's and qemu-io's bytes; fio checked its own
    with Volume(vol.path).open() as dev:  # and the files hold what the server answered
        assert dev.pread(0, size) == back
