"""The kernel as the client: attach a volume as /dev/loopN, mkfs, mount, write, snapshot, attach read-only."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from overlaybd.export.loop import attachment
from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD, require, run

pytestmark = pytest.mark.slow
BLKDISCARD = 0x1277  # linux/fs.h: _IO(0x12, 119)


def _kernel_ready() -> None:
    """Skip only where the machine truly lacks what attaching needs; say why."""
    if os.geteuid() != 0:
        pytest.skip("attach needs root (FUSE mount + loop device); this run is not root")
    for dev in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(dev):
            pytest.skip(f"{dev} is missing on this machine: no FUSE/loop, so no kernel block device")
    for tool in ("losetup", "fusermount3", "mount", "umount"):
        require(tool)


@contextmanager
def attached(target: str, *extra: str) -> Iterator[str]:
    device = run(*OVERLAYBD, "attach", target, *extra).strip()
    assert device.startswith("/dev/loop")
    try:
        yield device
    finally:
        run(*OVERLAYBD, "detach", device)


@contextmanager
def mounted(device: str, where: Path, *opts: str) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    run("mount", *opts, device, str(where))
    try:
        yield where
    finally:
        run("umount", str(where))


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_mkfs_mount_snapshot_and_mount_the_snapshot(tmp_path: Path, fs: str) -> None:
    _kernel_ready()
    mkfs = require(f"mkfs.{fs}")
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "320M")
    payload = os.urandom(3 << 20)
    with attached(str(vol)) as dev:
        run(mkfs, *(["-q", "-F"] if fs == "ext4" else ["-q", "-f"]), dev)
        with mounted(dev, tmp_path / "m") as m:
            (m / "dir").mkdir()
            (m / "dir" / "hello.txt").write_text("hello from overlaybd\n")
            (m / "blob").write_bytes(payload)
            run("sync")
    run(*OVERLAYBD, "snapshot", str(vol), "-m", f"{fs} with files")
    with attached(f"{vol}@HEAD") as dev:
        ro = ["-o", "ro,noload"] if fs == "ext4" else ["-o", "ro,norecovery"]
        with mounted(dev, tmp_path / "m", *ro) as m:
            assert (m / "dir" / "hello.txt").read_text() == "hello from overlaybd\n"
            assert hashlib.sha256((m / "blob").read_bytes()).digest() == hashlib.sha256(payload).digest()
        if fs == "ext4":
            run("e2fsck", "-fn", dev)
    # writes after the snapshot go to the new upper and leave the snapshot alone
    with attached(str(vol)) as dev:
        with mounted(dev, tmp_path / "m") as m:
            (m / "dir" / "hello.txt").write_text("changed\n")
            (m / "blob").unlink()
            if shutil.which("fstrim"):
                run("fstrim", str(m))  # discards reach the upper as zeroed records
            run("sync")
    with attached(f"{vol}@HEAD") as dev, mounted(dev, tmp_path / "m", "-o", "ro,noload" if fs == "ext4" else
                                                 "ro,norecovery") as m:
        assert (m / "dir" / "hello.txt").read_text() == "hello from overlaybd\n"
    v = Volume(str(vol))
    assert len(v.snapshots()) == 1


def test_attach_refuses_a_second_writer_and_detach_cleans_up(tmp_path: Path) -> None:
    _kernel_ready()
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "64M")
    with attached(str(vol)) as dev:
        res = subprocess.run([*OVERLAYBD, "attach", str(vol)], capture_output=True, text=True)
        assert res.returncode != 0 and "overlaybd: error:" in res.stderr
        res = subprocess.run([*OVERLAYBD, "snapshot", str(vol)], capture_output=True, text=True)
        assert res.returncode == 1 and "in use" in res.stderr
        with open(dev, "r+b", buffering=0) as f:
            f.write(b"\x5a" * 4096)
            os.fsync(f.fileno())
    with Volume(str(vol)).open() as disk:  # what was fsynced through the loop device is in the upper
        assert disk.pread(0, 4096) == b"\x5a" * 4096
    name = os.path.basename(dev)
    assert not Path(f"/run/overlaybd/{name}.json").exists()  # detach removed its record
    assert not Path(f"/sys/block/{name}/loop/backing_file").exists()  # and freed the loop device


def test_discard_through_the_loop_device_reaches_the_volume(tmp_path: Path) -> None:
    _kernel_ready()
    blkdiscard = require("blkdiscard")
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "64M")
    with attached(str(vol)) as dev:
        with open(dev, "r+b", buffering=0) as f:
            f.write(b"\x5a" * (1 << 20))
            os.fsync(f.fileno())
        run(blkdiscard, "-o", "0", "-l", str(256 << 10), dev)
        with open(dev, "rb", buffering=0) as f:
            os.fsync(f.fileno())
            assert f.read(256 << 10) == bytes(256 << 10)
    with Volume(str(vol)).open() as disk:
        assert disk.pread(0, 256 << 10) == bytes(256 << 10)
        assert disk.pread(256 << 10, 768 << 10) == b"\x5a" * (768 << 10)


def test_a_killed_daemon_loses_no_write_it_acknowledged(tmp_path: Path) -> None:
    """Four writers at once through the loop device (direct I/O: the daemon's parallel write path, in C where it
    is built), a flush half-way, more writes, then SIGKILL of the daemon: every write the device acknowledged,
    flushed or not, is in the volume when it is opened again (a killed process loses nothing the kernel holds),
    and the volume opens, snapshots and reads as the writers left it."""
    _kernel_ready()
    vol = tmp_path / "vol"
    size = 64 << 20
    run(*OVERLAYBD, "create", str(vol), "--size", str(size))
    model = bytearray(size)
    device = run(*OVERLAYBD, "attach", str(vol)).strip()
    try:
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        try:
            def writer(k: int, rounds: int) -> None:
                buf = mmap.mmap(-1, 4096)
                rng = random.Random(k * 1000 + rounds)
                for _ in range(rounds):
                    off = (rng.randrange(size // 4096 // 4) * 4 + k) * 4096  # each writer its own blocks
                    data = rng.randbytes(4096)
                    buf[:] = data
                    assert os.pwrite(fd, buf, off) == 4096
                    model[off:off + 4096] = data

            for rounds in (300, 200):  # flushed, then not flushed
                threads = [threading.Thread(target=writer, args=(k, rounds)) for k in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if rounds == 300:
                    os.fsync(fd)
        finally:
            os.close(fd)
        os.kill(attachment(device).pid, signal.SIGKILL)
    finally:
        run(*OVERLAYBD, "detach", device)
    with Volume(str(vol)).open() as disk:
        assert hashlib.sha256(disk.pread(0, size)).hexdigest() == hashlib.sha256(model).hexdigest()
    run(*OVERLAYBD, "snapshot", str(vol), "-m", "after the kill")
    with Volume(str(vol)).open() as disk:
        assert disk.pread(0, size) == bytes(model)


def test_the_reference_commits_an_upper_written_through_the_loop_device(tmp_path: Path) -> None:
    """Four writers through the loop device (4 KiB and 64 KiB writes, served in C, and discards, served in
    Python, each writer its own blocks), then detach: the reference's overlaybd-commit accepts the upper (every
    record inside the data file) and commits it to the bytes ours does, which read as the writers left them."""
    _kernel_ready()
    folder = os.environ.get("OVERLAYBD_REFERENCE_TOOLS")
    if not folder or not Path(folder, "overlaybd-commit").exists():
        pytest.skip("set OVERLAYBD_REFERENCE_TOOLS to the reference tools' folder to commit with overlaybd-commit")
    vol = tmp_path / "vol"
    size = 64 << 20
    run(*OVERLAYBD, "create", str(vol), "--size", str(size))
    model = bytearray(size)
    with attached(str(vol)) as device:
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        try:
            def writer(k: int) -> None:
                buf = mmap.mmap(-1, 65536)
                rng = random.Random(k)
                for _ in range(300):
                    off = (rng.randrange(size // 65536 // 4) * 4 + k) * 65536
                    if rng.random() < 0.3:
                        fcntl.ioctl(fd, BLKDISCARD, struct.pack("<QQ", off, 65536))
                        model[off:off + 65536] = bytes(65536)
                        continue
                    n = rng.choice((4096, 65536))
                    data = rng.randbytes(n)
                    buf[:n] = data
                    assert os.pwrite(fd, memoryview(buf)[:n], off) == n
                    model[off:off + n] = data

            threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            os.close(fd)
    data, index = Volume(str(vol)).upper
    uuid = "11111111-2222-3333-4444-555555555555"
    run(str(Path(folder, "overlaybd-commit")), data, index, str(tmp_path / "ref.lsmt"), "--uuid", uuid)
    run(*OVERLAYBD, "layer", "commit", data, index, str(tmp_path / "our.lsmt"), "--uuid", uuid)
    assert (tmp_path / "ref.lsmt").read_bytes() == (tmp_path / "our.lsmt").read_bytes()
    run(*OVERLAYBD, "cat", str(tmp_path / "ref.lsmt"), "-o", str(tmp_path / "ref.raw"))
    assert (tmp_path / "ref.raw").read_bytes() == bytes(model)
