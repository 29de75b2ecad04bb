"""Durability: kill -9 the server at random moments while a client writes and flushes; every write acknowledged
before the last completed flush must be there, and the volume must open without repair."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol as nbd
from overlaybd.volume import Volume
from tests.nbd_client import Client

from .nbd_helpers import OVERLAYBD

pytestmark = pytest.mark.slow
BLOCK = 4096
BLOCKS = 512  # a 2 MiB volume: overwrites are frequent


def pattern(block: int, serial: int) -> bytes:
    return struct.pack(">QQ", block, serial) * (BLOCK // 16)


def test_kill_minus_nine_at_random_points_loses_nothing_flushed(tmp_path: Path) -> None:
    rng = random.Random(20261128)
    vol = Volume.create(str(tmp_path / "vol"), BLOCKS * BLOCK)
    durable: dict[int, int] = {}  # block -> serial, as of the last completed flush
    serial = 0
    rounds = 12
    for round_no in range(rounds):
        sock = tmp_path / "s.sock"
        proc = subprocess.Popen([*OVERLAYBD, "serve", vol.path, "--listen", f"unix:{sock}"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                text=True)
        assert proc.stdout is not None and proc.stdout.readline().startswith("nbd")
        client = Client(str(sock))
        client.go("")
        killer = threading.Timer(rng.uniform(0.05, 0.6), os.kill, (proc.pid, signal.SIGKILL))
        killer.start()
        acked: dict[int, int] = {}  # since the last completed flush
        sent_since_flush: dict[int, set[int]] = {}
        try:
            handle = 0
            while True:
                handle += 1
                if rng.random() < 0.1:
                    client.request(nbd.CMD_FLUSH, handle, 0, 0)
                    _, error, _ = client.simple()
                    assert error == 0
                    durable.update(acked)
                    acked.clear()
                    sent_since_flush.clear()
                    continue
                block = rng.randrange(BLOCKS)
                serial += 1
                sent_since_flush.setdefault(block, set()).add(serial)
                client.request(nbd.CMD_WRITE, handle, block * BLOCK, BLOCK, payload=pattern(block, serial))
                _, error, _ = client.simple()
                assert error == 0
                acked[block] = serial
        except (ConnectionError, OSError):
            pass  # the server died under us: that is the point
        finally:
            killer.cancel()
            proc.kill()
            proc.wait()
            client.s.close()
        # reopen with no repair step; every block is its durable value or one written after that flush
        with Volume(vol.path).open() as dev:
            for block in range(BLOCKS):
                got = dev.pread(block * BLOCK, BLOCK)
                allowed = {pattern(block, s) for s in sent_since_flush.get(block, ())}
                allowed.add(pattern(block, durable[block]) if block in durable else bytes(BLOCK))
                assert got in allowed, f"round {round_no}: block {block} lost a flushed write"
                # what survived becomes the new baseline (it is on disk now, in the page cache at least)
                if got != bytes(BLOCK):
                    durable[block] = struct.unpack(">QQ", got[:16])[1]
                else:
                    durable.pop(block, None)
        time.sleep(0.01)
    with Volume(vol.path).open(writable=True):
        pass  # still opens writable: no lock left behind by the killed servers
