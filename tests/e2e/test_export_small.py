"""The numpy-free export of a small stack (``formats.lsmt.small_stack`` + ``formats.rawout``) writes the file the full
path (``LsmtStack`` + ``formats.output.copy_out``) writes: the same bytes, the same blocks allocated, the same
holes, for the reference C++ tools' files, for volumes with overlapping writes, zeroed ranges and writes not
snapshotted, and for odd device sizes; what it does not read goes to the full path; an export that fails leaves
nothing at the destination."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from overlaybd.cli.exporting import small_volume
from overlaybd.errors import TruncatedError
from overlaybd.formats.lsmt import small_stack
from overlaybd.formats.lsmt.small_stack import SmallStack, open_small
from overlaybd.formats.output import COPY_CHUNK, ZERO_BLOCK, Compression, copy_out
from overlaybd.formats.rawout import copy_pieces
from overlaybd.operations import commit, create, open_layer_alone, open_stack
from overlaybd.volume import Volume

from ..conftest import REFERENCE
from .nbd_helpers import OVERLAYBD
from .test_export_copy import sha256

MiB = 1 << 20


def data_map(path: Path) -> list[tuple[int, int]]:
    """The file's data ranges as the file system reports them (``SEEK_DATA`` / ``SEEK_HOLE``)."""
    out = []
    with open(path, "rb") as f:
        fd, pos, size = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def same_file(a: Path, b: Path) -> None:
    assert os.path.getsize(a) == os.path.getsize(b)
    assert sha256(a) == sha256(b)
    assert os.stat(a).st_blocks == os.stat(b).st_blocks
    assert data_map(a) == data_map(b)


def small_copy(out: Path, small: SmallStack) -> int:
    return copy_pieces(str(out), small.size, small.files, small.pieces())


def both_ways(tmp: Path, layers: list[str], upper: tuple[str, str] | None = None) -> Path:
    """The stack copied out by each path; checked the same; the small path's file."""
    small = open_small(layers, upper)
    assert small is not None
    fast, full = tmp / "small.raw", tmp / "full.raw"
    for p in (fast, full):
        if p.exists():
            p.unlink()
    assert small_copy(fast, small) == small.size
    with open_stack(layers, upper) as stack:
        assert stack.size == small.size
        copy_out(str(full), stack)
    same_file(fast, full)
    return fast


# -- the reference tools' files ------------------------------------------------------------------------------


def _cases() -> list[str]:
    import json

    try:
        data = json.loads((REFERENCE / "MANIFEST.json").read_text())
    except FileNotFoundError:
        return ["<fixtures absent>"]
    return [c["name"] for c in data["cases"]]


@pytest.mark.parametrize("name", _cases())
def test_reference_cases_copy_out_as_the_full_path_does(name: str, manifest: dict[str, Any], reference_dir: Path,
                                                        tmp_path: Path) -> None:
    case = next(c for c in manifest["cases"] if c["name"] == name)
    files = case["files"]
    if "layers" in files:
        layers, upper = [str(reference_dir / p) for p in files["layers"]], None
    elif "data" in files and "not shipped" not in files.get("index", "not shipped"):
        layers, upper = [], (str(reference_dir / files["data"]), str(reference_dir / files["index"]))
    else:
        pytest.skip("a lone ZFile or a sparse writable layer: not a stack export reads")
    plain = all(p.endswith(".lsmt") for p in layers)
    if not plain:  # ZFile, tar: the full path's
        assert open_small(layers, upper) is None
        return
    out = both_ways(tmp_path, layers, upper)
    assert (os.path.getsize(out), sha256(out)) == (case["expected"]["size"], case["expected"]["sha256"])


def test_a_sparse_writable_upper_goes_to_the_full_path(reference_dir: Path, tmp_path: Path) -> None:
    index = tmp_path / "s.index"
    data = reference_dir / "a" / "sparse_rw.data"
    assert open_small([], (str(data), str(index))) is None
    assert open_small([str(data)]) is None  # a writable data file is no sealed layer


# -- volumes ---------------------------------------------------------------------------------------------------


def random_volume(path: Path, seed: int, size: int, snapshots: int, upper_writes: int) -> Volume:
    """Snapshots of overlapping writes (sub-4K, 512-aligned, some across copy chunks), zeroed ranges, trims, zero
    blocks inside data; then writes left in the upper, over each other."""
    rng = random.Random(seed)
    vol = Volume.create(str(path), size)

    def writes(dev: Any, count: int) -> None:
        for _ in range(count):
            kind = rng.random()
            length = rng.choice((512, 1536, 4096, 8192, 65536, COPY_CHUNK + 4096, 3 * 4096))
            off = rng.randrange(0, (size - length) // 512) * 512
            if kind < 0.15:
                dev.write_zeroes(off, length)
            elif kind < 0.25:
                dev.trim(off, length)
            elif kind < 0.35:  # a zero block between data
                dev.pwrite(off, rng.randbytes(4096) + bytes(ZERO_BLOCK) + rng.randbytes(length))
            else:
                dev.pwrite(off, rng.randbytes(length))

    for _ in range(snapshots):
        with vol.open(writable=True) as dev:
            writes(dev, rng.randrange(5, 40))
            dev.flush()
        vol.snapshot()
    if upper_writes:
        with vol.open(writable=True) as dev:
            writes(dev, upper_writes)
            dev.flush()
    return vol


@pytest.mark.parametrize("seed", range(6))
def test_random_volumes_export_as_the_full_path_does(seed: int, tmp_path: Path) -> None:
    size = random.Random(seed).choice((8 * MiB, 8 * MiB + 512, 5 * MiB + 3 * 512))
    vol = random_volume(tmp_path / "vol", seed, size, snapshots=1 + seed % 4, upper_writes=(seed % 3) * 15)
    small = small_volume(vol.path, None)
    assert small is not None and small.size == size
    fast, full = tmp_path / "small.raw", tmp_path / "full.raw"
    small_copy(fast, small)
    with vol.open() as dev:
        copy_out(str(full), dev)
    same_file(fast, full)
    # and each snapshot, named as export names them
    for ref in ("0", f"HEAD~{len(vol.lowers) - 1}", "@0"):
        snap = small_volume(vol.path, ref)
        assert snap is not None and snap.files == vol.lowers[:1]
    fast.unlink()
    full.unlink()
    last = small_volume(vol.path, "HEAD")
    assert last is not None
    small_copy(fast, last)
    with vol.open(snapshot=len(vol.lowers) - 1) as dev:
        copy_out(str(full), dev)
    same_file(fast, full)


def test_odd_sizes_and_a_top_smaller_than_its_lowers(tmp_path: Path) -> None:
    rng = random.Random(7)
    layers = []
    for n, vsize in enumerate((4 * MiB, 3 * MiB + 1536)):
        data, index = str(tmp_path / f"l{n}.data"), str(tmp_path / f"l{n}.index")
        create(data, index, vsize)
        with open_layer_alone(data, index, writable=True) as layer:
            layer.pwrite(vsize - 1536, rng.randbytes(1536))  # up to the odd end
            layer.pwrite(MiB - 512, rng.randbytes(COPY_CHUNK + 1024))
            layer.write_zeroes(MiB + 4096, 8192)
            if n == 0:
                layer.pwrite(3 * MiB + 2048, rng.randbytes(MiB - 4096))  # past the top's end
            layer.flush()
            name = str(tmp_path / f"l{n}.lsmt")
            commit(layer, name)
        layers.append(name)
    assert both_ways(tmp_path, layers).stat().st_size == 3 * MiB + 1536
    assert both_ways(tmp_path, layers[::-1]).stat().st_size == 4 * MiB


def test_what_small_stack_does_not_read_goes_to_the_full_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    vol = random_volume(tmp_path / "vol", 3, 8 * MiB, snapshots=2, upper_writes=5)
    assert small_volume(vol.path, None) is not None
    monkeypatch.setattr(small_stack, "SMALL_STACK_RECORDS", 4)  # the records counted from the headers
    assert small_volume(vol.path, None) is None
    assert open_small(vol.lowers) is None
    monkeypatch.undo()
    z = random_volume(tmp_path / "z", 4, 8 * MiB, snapshots=1, upper_writes=0)
    z.snapshot("zfile", Compression("lz4", 4096))  # a ZFile snapshot: the full path
    assert small_volume(z.path, None) is None
    assert small_volume(z.path, "0") is None  # naming a snapshot reads every snapshot's header
    assert open_small(z.lowers[:1]) is not None


# -- the command line ---------------------------------------------------------------------------------------


def cli(*args: object, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERLAYBD, *map(str, args)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, **kw)


def test_export_and_cat_write_what_the_full_path_writes(tmp_path: Path) -> None:
    vol = random_volume(tmp_path / "vol", 21, 16 * MiB, snapshots=3, upper_writes=10)
    out, cat = tmp_path / "out.raw", tmp_path / "cat.raw"
    assert cli("export", vol.path, out).returncode == 0
    assert cli("cat", *vol.lowers, "--upper", *vol.upper, "-o", cat).returncode == 0
    full = tmp_path / "full.raw"
    with vol.open() as dev:
        copy_out(str(full), dev)
    same_file(out, full)
    same_file(cat, full)
    res = cli("export", vol.path, out)
    assert res.returncode == 2 and "output exists" in res.stderr
    qcow2 = tmp_path / "out.qcow2"  # qemu-img convert of the raw file the numpy-free path writes
    assert cli("export", f"{vol.path}@1", qcow2, "-O", "qcow2").returncode == 0
    with vol.open(snapshot=1) as dev:
        snap = tmp_path / "snap.raw"
        copy_out(str(snap), dev)
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(qcow2), str(snap)],
                          capture_output=True).returncode == 0
    res = cli("export", vol.path, qcow2, "-O", "qcow2")
    assert res.returncode == 2 and "output exists" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.raw", "full.raw", "out.qcow2", "out.raw", "snap.raw",
                                                          "vol"]


def _no_bigger_files(limit: int) -> None:  # in the child, before exec: a file may not grow past ``limit``
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_failed_export_leaves_nothing_at_the_destination(tmp_path: Path) -> None:
    vol = random_volume(tmp_path / "vol", 22, 16 * MiB, snapshots=2, upper_writes=0)
    assert small_volume(vol.path, None) is not None
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "disk.raw"
    res = cli("export", vol.path, out, preexec_fn=lambda: _no_bigger_files(MiB))  # the 16 MiB file is refused
    assert res.returncode == 1 and res.stderr.startswith("overlaybd: error:") and len(res.stderr.splitlines()) == 1
    assert list(folder.iterdir()) == []
    out.write_bytes(b"kept")
    res = cli("cat", *vol.lowers, "-o", out, "--force", preexec_fn=lambda: _no_bigger_files(MiB))
    assert res.returncode == 1 and out.read_bytes() == b"kept" and len(list(folder.iterdir())) == 1


def test_a_layer_that_ends_early_fails_the_copy_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * COPY_CHUNK))
    out = tmp_path / "out.raw"
    # the third chunk's bytes are past the file's end: the first two are written before the read fails
    with pytest.raises(TruncatedError):
        copy_pieces(str(out), 8 * MiB, [str(src)], [(0, 4 * COPY_CHUNK, 0, 0)])
    assert list(tmp_path.iterdir()) == [src]
    out.write_bytes(b"kept")
    with pytest.raises(TruncatedError):
        copy_pieces(str(out), 8 * MiB, [str(src)], [(0, 4 * COPY_CHUNK, 0, 0)], force=True)
    assert out.read_bytes() == b"kept" and sorted(tmp_path.iterdir()) == [out, src]


def test_the_python_zero_scan_finds_the_blocks_numpy_finds() -> None:
    import numpy as np

    from overlaybd.formats.rawout import nonzero_runs

    def by_numpy(view: memoryview) -> list[tuple[int, int]]:
        n = len(view)
        whole = n - n % ZERO_BLOCK
        blocks = np.frombuffer(view[:whole], dtype=np.uint64).reshape(-1, ZERO_BLOCK // 8).any(axis=1)
        flags = np.append(blocks, bool(any(view[whole:]))) if whole < n else blocks
        edges = np.flatnonzero(np.diff(np.concatenate(([False], flags, [False])).astype(np.int8)))
        return [(int(a) * ZERO_BLOCK, min(int(b) * ZERO_BLOCK, n)) for a, b in zip(edges[0::2], edges[1::2],
                                                                                  strict=True)]

    rng = random.Random(5)
    for _ in range(300):
        n = rng.choice((COPY_CHUNK, rng.randrange(1, COPY_CHUNK), rng.randrange(1, 8) * ZERO_BLOCK))
        data = bytearray(n)
        for _ in range(rng.randrange(0, 12)):
            data[rng.randrange(n)] = rng.randrange(1, 256)
        if rng.random() < 0.3:
            data[: n // 2] = rng.randbytes(n // 2)
        assert nonzero_runs(memoryview(data)) == by_numpy(memoryview(data)), n
