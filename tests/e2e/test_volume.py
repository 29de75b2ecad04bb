"""Volumes end to end: create, write through NBD, snapshot, log, diff, clone, merge, import/export, locking."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import overlaybd
from overlaybd.errors import LockedError
from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD, require, run, served

pytestmark = pytest.mark.slow
MiB = 1 << 20


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*OVERLAYBD, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if ok:
        assert res.returncode == 0, f"overlaybd {' '.join(args)}: {res.stderr}"
    return res


def test_snapshot_history_through_nbd(tmp_path: Path) -> None:
    require("qemu-io")
    vol = tmp_path / "vol"
    cli("create", str(vol), "--size", "64M")
    with served([str(vol)], tmp_path) as uri:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 8M 64k", "-c", "flush", uri)
        # the server holds the volume: it takes the snapshot itself, between requests, and goes on serving
        cli("snapshot", str(vol), "-m", "first")
        run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 1M", "-c", "write -P 0x44 2M 4k", "-c", "flush", uri)
        if _has("nbdinfo"):
            names = {e["export-name"] for e in json.loads(run("nbdinfo", "--list", "--json", uri))["exports"]}
            assert len(names) == 2  # the volume, and the new snapshot as an export
        run("qemu-io", "-f", "raw", "-c", "write -P 0 2M 4k", "-c", "flush", uri)
    with served([str(vol)], tmp_path) as uri:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", "-c", "discard 8M 64k", "-c", "flush", uri)
        listing = run("nbdinfo", "--list", "--json", uri) if _has("nbdinfo") else ""
        if listing:
            names = {e["export-name"] for e in json.loads(listing)["exports"]}
            assert len(names) == 2 and "" in names
    cli("snapshot", str(vol), "-m", "second", "--compress", "zstd")
    log = json.loads(cli("log", str(vol), "--output", "json").stdout)
    assert [e["message"] for e in log] == ["second", "first"]
    assert log[0]["parent_uuid"] == log[1]["uuid"]
    assert log[0]["file"].endswith(".zfile")
    assert json.loads(cli("diff", str(vol), "0", "1", "--output", "json").stdout) == [
        {"start": 0, "length": 4096}, {"start": 2 * MiB, "length": 4096}, {"start": 8 * MiB, "length": 65536}]

    v = Volume(str(vol))
    with v.open(snapshot=0) as first, v.open() as head:
        assert first.pread(0, MiB) == b"\x11" * MiB and first.pread(8 * MiB, 65536) == b"\x22" * 65536
        assert head.pread(0, 4096) == b"\x33" * 4096 and head.pread(8 * MiB, 65536) == bytes(65536)
        want_head = hashlib.sha256(head.pread(0, head.size)).hexdigest()

    # export raw and qcow2, import back, compare
    cli("export", str(vol), str(tmp_path / "head.qcow2"), "-O", "qcow2")
    cli("export", f"{vol}@0", str(tmp_path / "first.raw"))
    assert hashlib.sha256((tmp_path / "first.raw").read_bytes()[:MiB]).digest() == \
        hashlib.sha256(b"\x11" * MiB).digest()
    assert (tmp_path / "first.raw").stat().st_blocks * 512 < 4 * MiB  # holes stayed holes
    cli("import", str(tmp_path / "head.qcow2"), str(tmp_path / "vol3"))
    with Volume(str(tmp_path / "vol3")).open() as imported:
        assert hashlib.sha256(imported.pread(0, imported.size)).hexdigest() == want_head

    # clone shares the layer files
    cli("clone", f"{vol}@0", str(tmp_path / "vol2"))
    clone = Volume(str(tmp_path / "vol2"))
    assert Path(clone.lowers[0]).stat().st_ino == Path(v.lowers[0]).stat().st_ino
    with clone.open() as c:
        assert c.pread(0, 4096) == b"\x11" * 4096

    # merge flattens without changing the device
    cli("merge", str(vol))
    merged = Volume(str(vol))
    assert len(merged.lowers) == 1
    with merged.open() as m:
        assert hashlib.sha256(m.pread(0, m.size)).hexdigest() == want_head
    with clone.open() as c:  # the clone's hard link survived the merge's clean-up
        assert c.pread(0, 4096) == b"\x11" * 4096


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    vol = Volume.create(str(tmp_path / "v"), 4 * MiB)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, b"x" * 4096)
        dev.flush()
        with pytest.raises(LockedError):
            vol.open(writable=True)
        code = subprocess.run([sys.executable, "-c", "import sys; from overlaybd.volume import Volume;"
                               f"Volume({str(tmp_path / 'v')!r}).open(writable=True)"],
                              capture_output=True, text=True).returncode
        assert code != 0
        with vol.open() as reader:  # readers are fine
            assert reader.pread(0, 1) == b"x"
    with vol.open(writable=True) as dev:  # released on close
        assert dev.pread(0, 4096) == b"x" * 4096


def test_create_from_layers_and_files_not_its_own_are_kept(tmp_path: Path, reference_dir: Path) -> None:
    layers = [str(reference_dir / f"b/layer{i}.lsmt") for i in (1, 2, 3)]
    vol = Volume.create(str(tmp_path / "v"), None, layers)
    assert [s.message for s in vol.snapshots()] == ["", "", ""]
    with vol.open() as dev, overlaybd.open_stack(layers) as ref:
        assert dev.size == ref.size and dev.pread(0, ref.size) == ref.pread(0, ref.size)
    # a file the volume did not record as its own stays, whatever its name (a real crash's leftovers, which the
    # volume did record, are removed: test_volume_trust.py)
    (tmp_path / "v" / "layers" / "0003-orphan.lsmt").write_bytes(b"not the volume's")
    vol.snapshot("empty")
    assert (tmp_path / "v" / "layers" / "0003-orphan.lsmt").exists()
    assert len(vol.snapshots()) == 4
