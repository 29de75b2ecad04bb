"""``overlaybd export``: a volume (or VOL@SNAP) to a raw or qcow2 disk (qcow2 through qemu-img); holes stay holes.

A volume of a few plain snapshots (and an upper with a short log) is written out without numpy or the layer
readers: its records merged in Python (``formats.lsmt.small_stack``), its data copied by ``formats.rawout``.
Anything else (ZFile or tar snapshots, snapshots still in their repository, a trace to replay, many records) is
opened as a stack and copied by ``formats.output``; the two write the same file. qcow2 is made by ``qemu-img
convert`` of a temporary raw file written either way.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from .. import volume_config
from ..formats.lsmt.small_stack import SmallStack, open_small
from ..formats.rawout import copy_pieces
from .common import BAR_BYTES, human, progress_bar, split_volume_ref


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    e = sub.add_parser("export", help="write a volume (or VOL@SNAP) to a raw or qcow2 disk; holes stay holes")
    e.add_argument("volume", metavar="VOL[@SNAP]")
    e.add_argument("dst")
    e.add_argument("-O", "--format", choices=("raw", "qcow2"), default="raw")
    e.add_argument("--force", action="store_true")
    e.set_defaults(run=run_export)


def small_volume(path: str, ref: str | None) -> SmallStack | None:
    """The volume's device (or snapshot ``ref``) when ``small_stack`` reads it: plain snapshot files here, no
    trace to replay, few records; else None."""
    volume = os.path.abspath(path)
    config = volume_config.read_config(volume)
    if config.get("recordTracePath"):  # replayed at open by the full path (a prefetch)
        return None
    lowers = volume_config.lower_paths(volume, config)
    upper: tuple[str, str] | None = None
    if ref is None:
        upper = (os.path.join(volume, config["upper"]["data"]), os.path.join(volume, config["upper"]["index"]))
    else:
        snaps = volume_config.snapshots(volume)
        if snaps is None:
            return None
        lowers = lowers[: volume_config.resolve_snapshot(volume, snaps, ref) + 1]
    size = int(config.get(volume_config.META, {}).get("size", 0))
    return open_small(lowers, upper, size or None)


def run_export(args: argparse.Namespace) -> int:
    vol_path, ref = split_volume_ref(args.volume)
    small = small_volume(vol_path, ref)
    if small is None:
        size = export_opened(args, vol_path, ref)
    else:
        pieces = small.pieces()
        with progress_bar("export", sum(b - a for a, b, _s, _at in pieces) >= BAR_BYTES) as progress:
            write_disk(args, lambda raw, force: copy_pieces(raw, small.size, small.files, pieces, force=force,
                                                              progress=progress))
        size = small.size
    print(f"{args.dst}: {args.format}, {human(size)}")
    return 0


def write_disk(args: argparse.Namespace, write_raw: Callable[[str, bool], object]) -> None:
    """``write_raw(path, force)`` to ``args.dst``, or, for qcow2, to a temporary raw file beside it that qemu-img
    converts."""
    if args.format == "raw":
        write_raw(args.dst, args.force)
        return
    import tempfile

    from .. import qemu
    from ..errors import UsageError

    if os.path.exists(args.dst) and not args.force:
        raise UsageError("output exists (use --force to replace it)", path=args.dst)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.dst))) as tmp:
        raw = os.path.join(tmp, "disk.raw")
        write_raw(raw, False)
        qemu.from_raw(raw, args.dst)


def export_opened(args: argparse.Namespace, vol_path: str, ref: str | None) -> int:
    """The export through the full readers (numpy, the codecs); returns the device's size."""
    from ..formats.output import copy_out
    from .common import open_volume

    vol = open_volume(vol_path, remote=False)
    snapshot = vol.resolve(ref) if ref is not None else None
    with vol.open(snapshot=snapshot) as dev, progress_bar("export", True) as progress:
        write_disk(args, lambda raw, force: copy_out(raw, dev, force=force, progress=progress))
    return dev.size
