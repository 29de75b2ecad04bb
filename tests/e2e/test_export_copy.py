"""``overlaybd export`` and ``overlaybd cat``: the raw file holds the device byte for byte (against the bytes the
test wrote, kept in memory), for sparse, many-layer, ZFile-compressed and lazily pulled volumes; what is not data
stays a hole; an export that fails leaves nothing at the destination."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from overlaybd.formats.output import COPY_CHUNK, ZERO_BLOCK, Compression, chunked, nonzero_runs
from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD

MiB = 1 << 20


@pytest.fixture(autouse=True)
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OVERLAYBD_LAYER_STORE", str(tmp_path / "store"))


def cli(*args: object, ok: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*OVERLAYBD, *map(str, args)], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL, env=env)
    if ok:
        assert res.returncode == 0, f"overlaybd {' '.join(map(str, args))}: {res.stderr}"
    return res


class Model:
    """A volume and the bytes its device should hold."""

    def __init__(self, path: Path, size: int) -> None:
        self.vol = Volume.create(str(path), size)
        self.bytes = bytearray(size)
        self.digests: list[str] = []  # the device after each snapshot

    def snapshot(self, writes: list[tuple[int, bytes]], compression: Compression | None = None) -> None:
        with self.vol.open(writable=True) as dev:
            for off, data in writes:
                dev.pwrite(off, data)
                self.bytes[off : off + len(data)] = data
            dev.flush()
        self.vol.snapshot(f"{len(writes)} writes", compression)
        self.digests.append(self.digest())

    def digest(self) -> str:
        return hashlib.sha256(self.bytes).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def random_writes(rng: random.Random, size: int, count: int, most: int) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(count):
        length = rng.randrange(1, most // 4096 + 1) * 4096
        out.append((rng.randrange(0, (size - length) // 4096) * 4096, rng.randbytes(length)))
    return out


def test_a_sparse_volume_exports_exactly_and_its_holes_stay_holes(tmp_path: Path) -> None:
    m = Model(tmp_path / "vol", 256 * MiB)
    rng = random.Random(11)
    m.snapshot([(0, rng.randbytes(64 << 10)), (100 * MiB, rng.randbytes(1 * MiB))])
    # data with a zero block in its middle; a run crossing a copy chunk's end
    m.snapshot([(50 * MiB, rng.randbytes(8192) + bytes(ZERO_BLOCK) + rng.randbytes(8192)),
                (COPY_CHUNK * 3 - 12288, rng.randbytes(3 * 8192))])
    m.snapshot([(100 * MiB + 4096, rng.randbytes(4096))])  # over an earlier layer
    out = tmp_path / "out.raw"
    cli("export", m.vol.path, out)
    assert os.path.getsize(out) == 256 * MiB and sha256(out) == m.digest()
    assert allocated(out) <= 2 * MiB  # ~1.2 MiB of data in 256 MiB
    with open(out, "rb") as f:  # the zero block inside data is a hole
        assert os.lseek(f.fileno(), 50 * MiB + 8192, os.SEEK_HOLE) == 50 * MiB + 8192
    cat = tmp_path / "cat.raw"
    cli("cat", *m.vol.lowers, "-o", cat)
    assert sha256(cat) == m.digest() and allocated(cat) == allocated(out)
    first = tmp_path / "first.raw"
    cli("export", f"{m.vol.path}@0", first)
    assert sha256(first) == m.digests[0]


def test_a_dense_many_layer_volume_exports_exactly(tmp_path: Path) -> None:
    size = 32 * MiB
    m = Model(tmp_path / "vol", size)
    rng = random.Random(12)
    m.snapshot([(off, rng.randbytes(MiB)) for off in range(0, size, MiB)])  # every byte written
    for _ in range(15):
        m.snapshot(random_writes(rng, size, 40, 64 << 10))
    out = tmp_path / "out.raw"
    cli("export", m.vol.path, out)
    assert sha256(out) == m.digest()
    expected = tmp_path / "expected.raw"
    expected.write_bytes(m.bytes)
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(out), str(expected)],
                          capture_output=True).returncode == 0
    cat = tmp_path / "cat.raw"
    cli("cat", *m.vol.lowers, "-o", cat)
    assert sha256(cat) == m.digest()


def test_zfile_snapshots_export_exactly(tmp_path: Path) -> None:
    m = Model(tmp_path / "vol", 64 * MiB)
    rng = random.Random(13)
    for algo in ("lz4", "zstd"):
        m.snapshot(random_writes(rng, 64 * MiB, 30, 256 << 10) + [(rng.randrange(0, 60) * MiB, b"text " * 40000)],
                   Compression(algo, 4096))
    assert all(p.endswith(".zfile") for p in m.vol.lowers)
    out = tmp_path / "out.raw"
    cli("export", m.vol.path, out)
    assert sha256(out) == m.digest()


def test_a_lazily_pulled_volume_exports_exactly(tmp_path: Path) -> None:
    m = Model(tmp_path / "origin", 32 * MiB)
    rng = random.Random(14)
    m.snapshot(random_writes(rng, 32 * MiB, 20, 128 << 10))
    m.snapshot(random_writes(rng, 32 * MiB, 20, 128 << 10))
    layout = tmp_path / "layout"
    cli("push", m.vol.path, f"oci:{layout}:v1", env={**os.environ, "OVERLAYBD_LAYER_STORE": str(tmp_path / "s1")})
    node = tmp_path / "node"
    cli("pull", f"oci:{layout}:v1", node, "--lazy", env={**os.environ, "OVERLAYBD_LAYER_STORE": str(tmp_path / "s2")})
    vol = Volume(str(node))
    assert not any(os.path.exists(p) for p in vol.lowers)  # still in the repository: read on demand
    out = tmp_path / "out.raw"
    cli("export", node, out, env={**os.environ, "OVERLAYBD_LAYER_STORE": str(tmp_path / "s2")})
    assert sha256(out) == m.digest()


def test_a_failed_export_leaves_nothing_at_the_destination(tmp_path: Path) -> None:
    m = Model(tmp_path / "vol", 64 * MiB)
    rng = random.Random(15)
    m.snapshot([(off, rng.randbytes(MiB)) for off in range(0, 64 * MiB, MiB)], Compression("lz4", 4096))
    layer = Path(m.vol.lowers[0])
    data = bytearray(layer.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # a block's bytes flipped
    layer.write_bytes(bytes(data))
    out = tmp_path / "out" / "disk.raw"
    out.parent.mkdir()
    res = cli("export", m.vol.path, out, ok=False)
    assert res.returncode == 1 and res.stderr.startswith("overlaybd: error:") and len(res.stderr.splitlines()) == 1
    assert list(out.parent.iterdir()) == []  # neither the file nor its temporary
    out.write_bytes(b"kept")
    res = cli("export", m.vol.path, out, "--force", ok=False)
    assert res.returncode == 1 and out.read_bytes() == b"kept" and len(list(out.parent.iterdir())) == 1


def test_chunks_and_zero_runs() -> None:
    assert list(chunked([(0, 10), (20, 45)], 10)) == [(0, 10), (20, 10), (30, 10), (40, 5)]
    block = ZERO_BLOCK
    data = bytearray(5 * block + 100)
    assert nonzero_runs(memoryview(data)) == []
    data[block + 3] = 1
    data[3 * block] = 1
    data[4 * block + 5] = 1
    data[-1] = 1
    assert nonzero_runs(memoryview(data)) == [(block, 2 * block), (3 * block, 5 * block + 100)]
    assert nonzero_runs(memoryview(bytearray(b"\x01" * 100))) == [(0, 100)]
    assert nonzero_runs(memoryview(bytearray(100))) == []
