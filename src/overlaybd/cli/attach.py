"""``overlaybd attach`` / ``detach``: a volume as a kernel block device (/dev/loopN over a FUSE file; the work is in
``export/loop.py``), and the hidden ``fuse-daemon`` command that serves the FUSE file."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ..export import loop
from .common import hosts_dir_option, open_volume, split_volume_ref


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    a = sub.add_parser("attach", help="expose a volume (or VOL@SNAP, read-only) as /dev/loopN (root)")
    a.add_argument("volume", metavar="VOL[@SNAP]")
    a.add_argument("--readonly", action="store_true")
    hosts_dir_option(a)
    a.set_defaults(run=run_attach)

    d = sub.add_parser("detach", help="undo attach: free the loop device, stop the FUSE export")
    d.add_argument("device", help="/dev/loopN printed by attach")
    d.set_defaults(run=run_detach)

    f = sub.add_parser("fuse-daemon", help=argparse.SUPPRESS)
    f.add_argument("volume")
    f.add_argument("mountpoint")
    f.add_argument("--readonly", action="store_true")
    f.add_argument("--snapshot", type=int)
    f.set_defaults(run=run_daemon)


def run_attach(args: argparse.Namespace) -> int:
    loop.require_root()
    vol_path, ref = split_volume_ref(args.volume)
    vol = open_volume(vol_path)
    snapshot = vol.resolve(ref) if ref is not None else None
    print(loop.attach(vol.path, snapshot=snapshot, readonly=args.readonly).device)
    return 0


def run_detach(args: argparse.Namespace) -> int:
    loop.detach(args.device)
    return 0


def run_daemon(args: argparse.Namespace) -> int:
    try:  # mfusepy is an extra (pyoverlaybd[attach]), loaded by the daemon only
        from ..export.fuse import run_fuse
    except ImportError as exc:
        raise UsageError(f"attach needs mfusepy (pip install 'pyoverlaybd[attach]'): {exc}") from None
    vol = open_volume(args.volume)
    with vol.open(writable=not args.readonly and args.snapshot is None, snapshot=args.snapshot) as dev:
        try:
            run_fuse(dev, args.mountpoint, readonly=args.readonly or args.snapshot is not None)
        finally:
            dev.flush()
    return 0
