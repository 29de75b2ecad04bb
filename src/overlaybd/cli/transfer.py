"""``overlaybd import``: raw and qcow2 disks (and block devices) into volumes (qcow2 through qemu-img). An import
writes only what differs from the volume's current device, as one new snapshot; a qcow2 backing chain becomes one
snapshot per image of the chain. (``export``, the way out, is ``exporting``.)"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from .. import qemu
from ..errors import UsageError
from ..formats.output import Compression
from ..importing import DeltaStats, write_delta, write_ranges
from ..source.file import FileSource
from ..volume import CONFIG, Volume
from .common import emit_json, human, open_volume, progress_bar


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    i = sub.add_parser("import", help="import a raw or qcow2 disk, or a block device, as a new snapshot of a volume "
                       "holding only what differs from it")
    i.add_argument("src", help="a raw or qcow2 file, or a block device (/dev/VG/LV)")
    i.add_argument("volume", help="created (with the disk's size) if it does not exist")
    i.add_argument("-f", "--format", choices=("raw", "qcow2"), help="default: detected")
    i.add_argument("-m", "--message", default="")
    i.add_argument("--compress", choices=("lz4", "zstd"))
    i.add_argument("--layers", action=argparse.BooleanOptionalAction, default=None,
                   help="a qcow2 backing chain as one snapshot per image (default: when SRC has backing files)")
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.set_defaults(run=run_import)


def _target(volume: str, size: int) -> Volume:
    if os.path.exists(os.path.join(volume, CONFIG)):
        vol = open_volume(volume)
        if size > vol.size:
            raise UsageError(f"the disk ({human(size)}) is larger than the volume ({human(vol.size)})")
        return vol
    return Volume.create(volume, -(-size // 512) * 512)


def run_import(args: argparse.Namespace) -> int:
    fmt = args.format or qemu.image_format(args.src)
    chain = qemu.backing_chain(args.src) if fmt == "qcow2" else []
    layered = args.layers if args.layers is not None else len(chain) > 1
    compression = Compression(args.compress, 4096) if args.compress else None
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.volume)) or ".") as tmp:
        if fmt == "qcow2" and layered:
            vol = _target(args.volume, int(chain[-1]["virtual-size"]))
            for n, image in enumerate(chain):
                path, image_fmt = image["filename"], image.get("format", "qcow2")
                raw = os.path.join(tmp, f"layer{n}.raw")
                qemu.to_raw(path, image_fmt, raw)
                with FileSource(raw) as src, vol.open(writable=True) as dev, progress_bar(
                        f"import {os.path.basename(path)}", args.output == "human") as progress:
                    stats = write_ranges(dev, src, qemu.own_ranges(path, image_fmt), progress=progress)
                    dev.flush()
                os.unlink(raw)
                message = args.message or f"import {os.path.basename(path)}"
                results.append(_snapshot(vol, message, compression, stats, path))
        else:
            raw = args.src
            if fmt == "qcow2":
                raw = os.path.join(tmp, "disk.raw")
                qemu.to_raw(args.src, "qcow2", raw)
            with FileSource(raw) as src:
                vol = _target(args.volume, src.size)
                with vol.open(writable=True) as dev, progress_bar("import", args.output == "human") as progress:
                    stats = write_delta(dev, src, progress=progress)
                    dev.flush()
            results.append(_snapshot(vol, args.message or f"import {os.path.basename(args.src)}", compression, stats,
                                     args.src))
    if args.output == "json":
        emit_json({"volume": vol.path, "format": fmt, "snapshots": results})
    else:
        for r in results:
            print(f"snapshot {r['snapshot']} {r['uuid']}: {human(r['written'])} of data, {human(r['zeroed'])} "
                  f"zeroed, of {human(r['compared'])} ({r['source']})")
    return 0


def _snapshot(vol: Volume, message: str, compression: Compression | None, stats: DeltaStats, source: str
              ) -> dict[str, Any]:
    snap = vol.snapshot(message, compression)
    return {"snapshot": snap.number, "uuid": snap.uuid, "file_size": snap.file_size, "source": source,
            **stats.as_json()}
