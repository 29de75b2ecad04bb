"""``overlaybd serve`` of a writable volume whose upper maps data when it starts (written, not snapshotted),
snapshotted through the control socket (``overlaybd snapshot``) again and again while two clients write, trim and
read the sectors of the same 4 KiB granules (each its own stripes): every read sent after a change's reply, before
or after any snapshot, gives what its client wrote, and the volume reopened afterwards holds it all."""

from __future__ import annotations

import random
import subprocess
import threading
from pathlib import Path

import pytest

from overlaybd.export.nbd import protocol
from overlaybd.volume import Volume
from tests.nbd_client import Client, unix_path

from .nbd_helpers import OVERLAYBD, serving

pytestmark = pytest.mark.slow
SIZE = 8 << 20
STRIPE = 1536


def _req(cmd: int, handle: int, offset: int, length: int, payload: bytes = b"") -> bytes:
    return protocol.REQUEST.pack(protocol.REQUEST_MAGIC, 0, cmd, handle, offset, length) + payload


def test_snapshots_of_a_served_volume_while_clients_change_the_same_granules(tmp_path: Path) -> None:
    vol = Volume.create(str(tmp_path / "vol"), SIZE)
    image = bytearray(random.Random(2).randbytes(SIZE))
    with vol.open(writable=True) as dev:
        dev.pwrite(0, bytes(image))
    vol.snapshot("base")
    with vol.open(writable=True) as dev:  # the upper maps these when the server starts
        for k in range(0, SIZE, 64 << 10):
            dev.pwrite(k + 4096 - 512, b"\xee" * 512)
            image[k + 4096 - 512 : k + 4096] = b"\xee" * 512
    models = [bytearray(image), bytearray(image)]
    errors: list[BaseException] = []
    stop = threading.Event()
    with serving([str(tmp_path / "vol")], tmp_path) as server:
        path = unix_path(server.uri)

        def client(k: int) -> None:
            try:
                rng = random.Random(10 + k)
                model = models[k]
                c = Client(path)
                c.go("")
                h = 0
                while not stop.is_set() or h < 400:
                    stripe = rng.randrange(SIZE // STRIPE // 2) * 2 + k
                    a = stripe * STRIPE + rng.randrange(3) * 512
                    n = rng.randrange(1, (stripe + 1) * STRIPE // 512 - a // 512 + 1) * 512
                    h += 1
                    if rng.random() < 0.8:
                        data = rng.randbytes(n)
                        c.s.sendall(_req(protocol.CMD_WRITE, h, a, n, data))
                    else:
                        data = bytes(n)
                        c.s.sendall(_req(protocol.CMD_TRIM, h, a, n))
                    assert c.simple()[:2] == (h, 0)
                    model[a : a + n] = data
                    at = rng.randrange(SIZE // 4096) * 4096
                    h += 1
                    c.request(protocol.CMD_READ, h, at, 8192 if at + 8192 <= SIZE else 4096)
                    n = 8192 if at + 8192 <= SIZE else 4096
                    got = c.simple(n)
                    assert got[:2] == (h, 0)
                    bad = [at + i for i in range(n) if (at + i) // STRIPE % 2 == k and got[2][i] != model[at + i]]
                    assert not bad, f"client {k}: read at {at} differs at {bad[:4]}"
                c.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            for s in range(3):
                res = subprocess.run([*OVERLAYBD, "snapshot", str(tmp_path / "vol"), "-m", f"s{s}"],
                                     capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
                assert res.returncode == 0, res.stderr
        finally:
            stop.set()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
    want = bytearray(SIZE)
    for i in range(0, SIZE, STRIPE):
        k = i // STRIPE % 2
        want[i : i + STRIPE] = models[k][i : i + STRIPE]
    with vol.open() as dev:
        assert dev.pread(0, SIZE) == want
    assert len(vol.snapshots()) == 4
