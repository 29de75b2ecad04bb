"""``overlaybd import`` / ``export``: raw and qcow2 disks in and out of volumes (qcow2 through qemu-img)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile

from ..errors import LayerIOError, UsageError
from ..formats.output import Compression, copy_out
from ..source.base import ExtentKind
from ..source.file import FileSource
from ..volume import Volume
from .common import human, open_volume, progress_bar, split_volume_ref

QCOW2_MAGIC = b"QFI\xfb"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    i = sub.add_parser("import", help="import a raw or qcow2 disk as a new snapshot of a volume")
    i.add_argument("src")
    i.add_argument("volume", help="created (with the disk's size) if it does not exist")
    i.add_argument("-f", "--format", choices=("raw", "qcow2"), help="default: detected")
    i.add_argument("-m", "--message", default="")
    i.add_argument("--compress", choices=("lz4", "zstd"))
    i.set_defaults(run=run_import)

    e = sub.add_parser("export", help="write a volume (or VOL@SNAP) to a raw or qcow2 disk; holes stay holes")
    e.add_argument("volume", metavar="VOL[@SNAP]")
    e.add_argument("dst")
    e.add_argument("-O", "--format", choices=("raw", "qcow2"), default="raw")
    e.add_argument("--force", action="store_true")
    e.set_defaults(run=run_export)


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise UsageError("qcow2 needs qemu-img (Debian package qemu-utils)")
    return path


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode:
        raise LayerIOError(f"{os.path.basename(cmd[0])} failed: {res.stderr.strip() or res.returncode}",
                           path=cmd[-1])


def run_import(args: argparse.Namespace) -> int:
    with open(args.src, "rb") as f:
        magic = f.read(4)
    fmt = args.format or ("qcow2" if magic == QCOW2_MAGIC else "raw")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.volume)) or ".") as tmp:
        raw = args.src
        if fmt == "qcow2":
            raw = os.path.join(tmp, "disk.raw")
            _run([_qemu_img(), "convert", "-f", "qcow2", "-O", "raw", "-S", "4k", args.src, raw])
        with FileSource(raw) as disk:
            size = -(-disk.size // 512) * 512
            vol = open_volume(args.volume) if os.path.exists(os.path.join(args.volume, "config.json")) else \
                Volume.create(args.volume, size)
            if disk.size > vol.size:
                raise UsageError(f"the disk ({human(disk.size)}) is larger than the volume ({human(vol.size)})")
            done = 0
            with vol.open(writable=True) as dev, progress_bar("import", True) as progress:
                buf = bytearray(4 << 20)
                for ext in disk.extents():
                    if ext.kind is not ExtentKind.DATA:
                        continue
                    pos = ext.offset
                    while pos < ext.end:
                        n = min(len(buf), ext.end - pos)
                        view = memoryview(buf)[:n]
                        disk.readinto(pos, view)
                        dev.pwrite(pos, view)
                        pos += n
                        done += n
                        if progress:
                            progress(done, disk.size)
                dev.flush()
    snap = vol.snapshot(args.message or f"import {os.path.basename(args.src)}",
                        Compression(args.compress, 4096) if args.compress else None)
    print(f"snapshot {snap.number} {snap.uuid}: {human(done)} of data from {args.src} ({fmt})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    vol_path, ref = split_volume_ref(args.volume)
    vol = open_volume(vol_path)
    snapshot = vol.resolve(ref) if ref is not None else None
    with vol.open(snapshot=snapshot) as dev, progress_bar("export", True) as progress:
        if args.format == "raw":
            copy_out(args.dst, dev, force=args.force, progress=progress)
        else:
            if os.path.exists(args.dst) and not args.force:
                raise UsageError("output exists (use --force to replace it)", path=args.dst)
            with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.dst))) as tmp:
                raw = os.path.join(tmp, "disk.raw")
                copy_out(raw, dev, progress=progress)
                _run([_qemu_img(), "convert", "-f", "raw", "-O", "qcow2", raw, args.dst])
    print(f"{args.dst}: {args.format}, {human(dev.size)}")
    return 0
