"""Volume commands: ``create``, ``snapshot``, ``merge``, ``diff``, ``clone`` (``log`` is in ``cli.log``)."""

from __future__ import annotations

import argparse
import os

from ..errors import LockedError, UsageError
from ..export import control
from ..formats.output import Compression
from ..volume import Volume, VolumeError
from .common import emit_json, human, open_volume, parse_size, split_volume_ref
from .log import snap_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("create", help="create a volume (a directory with config.json and its layers)")
    c.add_argument("volume")
    c.add_argument("--size", help="virtual size: 10G, 512M, or bytes (default: the size of --from)")
    c.add_argument("--from", dest="base", nargs="+", metavar="SNAPSHOT_OR_LAYERS",
                   help="VOL@SNAP, or layer files bottom to top, to start from")
    c.set_defaults(run=run_create)

    s = sub.add_parser("snapshot", help="commit the volume's writes into a new snapshot; start a fresh upper")
    s.add_argument("volume")
    s.add_argument("-m", "--message", default="")
    s.add_argument("--compress", choices=("lz4", "zstd"), help="store the snapshot as a ZFile")
    s.add_argument("--output", choices=("human", "json"), default="human")
    s.set_defaults(run=run_snapshot)

    m = sub.add_parser("merge", help="flatten snapshots into one (default: all of them)")
    m.add_argument("volume")
    m.add_argument("range", nargs="?", help="FIRST..LAST (snapshot references; default: all)")
    m.add_argument("--compress", choices=("lz4", "zstd"))
    m.set_defaults(run=run_merge)

    d = sub.add_parser("diff", help="byte ranges written or discarded between two snapshots")
    d.add_argument("volume")
    d.add_argument("a", help="snapshot reference (or 'empty')")
    d.add_argument("b", help="snapshot reference")
    d.add_argument("--output", choices=("human", "json"), default="human")
    d.set_defaults(run=run_diff)

    k = sub.add_parser("clone", help="a new volume over a snapshot's layers (shared, not copied)")
    k.add_argument("source", metavar="VOL@SNAP")
    k.add_argument("target", metavar="NEWVOL")
    k.set_defaults(run=run_clone)


def _compression(name: str | None) -> Compression | None:
    return Compression(name, 4096) if name else None


def run_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size else None
    lowers: list[str] = []
    if args.base:
        if len(args.base) == 1:
            vol, ref = split_volume_ref(args.base[0])
            if ref is not None or os.path.isdir(vol):
                src = open_volume(vol)
                n = src.resolve(ref) if ref is not None else len(src.lowers) - 1
                lowers = src.lowers[: n + 1]
            else:
                lowers = [vol]
        else:
            lowers = list(args.base)
    new = Volume.create(args.volume, size, lowers)
    print(f"{new.path}: {human(new.size)}, {len(lowers)} snapshot(s)")
    return 0


def run_snapshot(args: argparse.Namespace) -> int:
    vol = open_volume(args.volume)
    try:
        snap = vol.snapshot(args.message, _compression(args.compress))
    except LockedError:
        # served writable: ask the server to take it between requests
        reply = control.request(vol.path, {"op": "snapshot", "message": args.message, "compress": args.compress})
        if reply is None:
            raise
        if not reply.get("ok"):
            raise VolumeError(str(reply.get("error")), path=vol.path) from None
        snap = vol.snapshots()[reply["snapshot"]["number"]]
    if args.output == "json":
        emit_json(snap_json(snap))
    else:
        print(f"snapshot {snap.number} {snap.uuid} ({human(snap.file_size)})")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    vol = open_volume(args.volume)
    if args.range:
        first_ref, sep, last_ref = args.range.partition("..")
        if not sep:
            raise UsageError("the range is FIRST..LAST")
        first, last = vol.resolve(first_ref), vol.resolve(last_ref)
    else:
        first, last = 0, len(vol.lowers) - 1
    if first > last:
        first, last = last, first
    snap = vol.merge(first, last, _compression(args.compress))
    print(f"snapshots {first}..{last} merged into snapshot {snap.number} {snap.uuid} ({human(snap.file_size)})")
    return 0


def run_diff(args: argparse.Namespace) -> int:
    vol = open_volume(args.volume)
    a = -1 if args.a == "empty" else vol.resolve(args.a)
    ranges = vol.diff(a, vol.resolve(args.b))
    if args.output == "json":
        emit_json([{"start": s, "length": n} for s, n in ranges])
    else:
        for s, n in ranges:
            print(f"{s:#x} {n:#x}")
        print(f"{len(ranges)} range(s), {human(sum(n for _, n in ranges))}")
    return 0


def run_clone(args: argparse.Namespace) -> int:
    vol_path, ref = split_volume_ref(args.source)
    src = open_volume(vol_path)
    n = src.resolve(ref) if ref is not None else len(src.lowers) - 1
    new = src.clone(n, args.target)
    print(f"{new.path}: clone of snapshot {n} of {src.path}")
    return 0
