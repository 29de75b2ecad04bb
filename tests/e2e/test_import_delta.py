"""Delta import: a changed disk becomes one snapshot holding only the 4 KiB blocks that differ (zero runs as zeroed
records, never data); a qcow2 backing chain becomes one snapshot per image holding exactly that image's clusters;
a block device imports the same way. Checked with qemu-img compare and overlaybd diff."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD, require

pytestmark = pytest.mark.slow
MiB = 1 << 20
BLOCK = 4096


def cli(*args: object) -> str:
    res = subprocess.run([*OVERLAYBD, *map(str, args)], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"overlaybd {' '.join(map(str, args))}: {res.stderr}"
    return res.stdout


def run(*args: object) -> str:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"{args}: {res.stderr}"
    return res.stdout


def import_json(src: Path | str, vol: Path, *extra: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(cli("import", src, vol, "--output", "json", *extra))
    return out


def test_a_changed_raw_disk_imports_as_its_changed_blocks(tmp_path: Path) -> None:
    rng = random.Random(7)
    disk = tmp_path / "disk.raw"
    image = bytearray(rng.randbytes(16 * MiB)) + bytearray(16 * MiB)  # data, then a hole
    disk.write_bytes(image)
    vol = tmp_path / "vol"
    first = import_json(disk, vol)
    assert first["snapshots"][0]["written"] == 16 * MiB  # type: ignore[index]  # the hole costs nothing
    # change 1 % of the blocks: new data in some, zeros in others, and one block rewritten with the same bytes
    blocks = rng.sample(range(len(image) // BLOCK), len(image) // BLOCK // 100)
    data_blocks, zero_blocks = [b for b in blocks if b % 2], [b for b in blocks if b % 2 == 0 and b < 4096]
    for b in data_blocks:
        image[b * BLOCK : (b + 1) * BLOCK] = rng.randbytes(BLOCK)
    for b in zero_blocks:
        image[b * BLOCK : (b + 1) * BLOCK] = bytes(BLOCK)
    with open(disk, "r+b") as f:
        f.write(image)
    second = import_json(disk, vol)["snapshots"][0]  # type: ignore[index]
    assert second["written"] == len(data_blocks) * BLOCK
    assert second["zeroed"] == len(zero_blocks) * BLOCK
    assert second["file_size"] < len(data_blocks) * BLOCK + 64 * 1024  # the snapshot is the change, not the disk
    ranges = json.loads(cli("diff", vol, "0", "1", "--output", "json"))
    changed = sorted(data_blocks + zero_blocks)
    covered = sorted(b for r in ranges for b in range(r["start"] // BLOCK, (r["start"] + r["length"]) // BLOCK))
    assert covered == changed
    cli("export", f"{vol}@1", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == bytes(image)
    again = import_json(disk, vol)["snapshots"][0]  # type: ignore[index]
    assert again["written"] == again["zeroed"] == 0  # nothing changed: an empty snapshot


def test_a_qcow2_chain_becomes_one_snapshot_per_image(tmp_path: Path) -> None:
    qemu_img, qemu_io = require("qemu-img"), require("qemu-io")
    chain = [tmp_path / f"l{n}.qcow2" for n in range(5)]
    run(qemu_img, "create", "-q", "-f", "qcow2", chain[0], "32M")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 0x10 0 8M", chain[0])
    own: list[list[tuple[int, int]]] = [[(0, 8 * MiB)]]
    for n in range(1, 5):
        run(qemu_img, "create", "-q", "-f", "qcow2", "-b", chain[n - 1].name, "-F", "qcow2", chain[n])
        writes = [(n * 4 * MiB, 64 * 1024), (20 * MiB + n * MiB, 128 * 1024)]
        cmds = [arg for off, length in writes for arg in ("-c", f"write -P {0x10 + n} {off} {length}")]
        cmds += ["-c", f"write -z {n * MiB} 64k"]  # zero clusters hide what is below
        run(qemu_io, "-f", "qcow2", *cmds, chain[n])
        own.append(sorted([*writes, (n * MiB, 64 * 1024)]))
    vol = tmp_path / "vol"
    result = import_json(chain[-1], vol)
    assert len(result["snapshots"]) == 5  # type: ignore[arg-type]
    for n in range(1, 5):
        ranges = json.loads(cli("diff", vol, str(n - 1), str(n), "--output", "json"))
        assert [(r["start"], r["length"]) for r in ranges] == own[n]
    out = tmp_path / "out.raw"
    cli("export", vol, out)
    assert "identical" in run(qemu_img, "compare", "-f", "qcow2", "-F", "raw", chain[-1], out).lower()
    cli("export", vol, tmp_path / "out.qcow2", "-O", "qcow2")
    assert "identical" in run(qemu_img, "compare", chain[-1], tmp_path / "out.qcow2").lower()


def test_a_block_device_imports_as_a_delta(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup, for a loop device (CI runs as root)")
    backing = tmp_path / "lv.img"
    content = bytearray(random.Random(3).randbytes(8 * MiB))
    backing.write_bytes(content)
    dev = run("losetup", "-f", "--show", backing).strip()
    try:
        vol = tmp_path / "vol"
        assert import_json(dev, vol)["snapshots"][0]["written"] == 8 * MiB  # type: ignore[index]
        with open(dev, "r+b") as f:  # the device changes (as an LVM snapshot of a running disk would)
            f.seek(MiB)
            f.write(b"\xee" * BLOCK)
            content[MiB : MiB + BLOCK] = b"\xee" * BLOCK
        snap = import_json(dev, vol)["snapshots"][0]  # type: ignore[index]
        assert snap["written"] == BLOCK and snap["compared"] == 8 * MiB
        with Volume(str(vol)).open() as disk:
            assert disk.pread(0, 8 * MiB) == bytes(content)
    finally:
        run("losetup", "-d", dev)
