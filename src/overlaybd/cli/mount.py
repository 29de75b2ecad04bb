"""``overlaybd mount REF|VOL DIR`` / ``umount DIR``: an image (pulled lazily unless ``--eager``) or a volume, its
ext4 mounted on a directory (the work is in ``export/mounting.py``); and the hidden ``mount-daemon`` that serves a
volume's FUSE file for a rootless mount."""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError
from ..export import mounting
from ..remote.reference import parse_reference
from ..remote.transfer import pull
from ..volume import CONFIG
from .common import hosts_dir_option, open_volume


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    m = sub.add_parser("mount", help="mount an image (pulled lazily) or a volume on a directory: through the kernel "
                       "as root, through fuse2fs with --rootless")
    m.add_argument("source", metavar="REF|VOL", help="oci:PATH[:TAG], HOST[:PORT]/REPO[:TAG], or a volume directory")
    m.add_argument("directory", metavar="DIR")
    m.add_argument("--rootless", action="store_true", help="no kernel mount: fuse2fs over the volume's FUSE file "
                   "(the default when not root)")
    m.add_argument("--writable", nargs="?", const="overlay", choices=mounting.WRITABLE_MODES,
                   help="writable: an overlayfs upper over the read-only image (overlay, the default; root), or "
                   "the volume's own upper (volume)")
    m.add_argument("--eager", action="store_true", help="download the whole image first (default: lazily)")
    m.add_argument("--insecure", action="store_true", help="plain HTTP to a registry that is not on localhost")
    hosts_dir_option(m)
    m.set_defaults(run=run_mount)

    u = sub.add_parser("umount", help="undo overlaybd mount: unmount DIR, stop what served it")
    u.add_argument("directory", metavar="DIR")
    u.set_defaults(run=run_umount)

    d = sub.add_parser("mount-daemon", help=argparse.SUPPRESS)
    d.add_argument("volume")
    d.add_argument("mountpoint")
    d.add_argument("--writable", action="store_true")
    d.set_defaults(run=run_daemon)


def run_mount(args: argparse.Namespace) -> int:
    rootless = args.rootless or os.geteuid() != 0
    directory = mounting.check_directory(args.directory)
    home = mounting.home_for(directory)
    if os.path.exists(os.path.join(args.source, CONFIG)):
        volume, pulled = os.path.abspath(args.source), False
    else:
        ref = parse_reference(args.source)
        if os.path.exists(home):
            raise UsageError(f"{home} is left from an earlier mount of this directory: remove it", path=home)
        volume, pulled = os.path.join(home, "volume"), True
        try:
            pull(ref, volume, lazy=not args.eager, insecure=args.insecure)
        except BaseException:
            if os.path.isdir(home) and not os.listdir(home):
                os.rmdir(home)
            raise
    try:
        done = mounting.mount(volume, directory, home=home, rootless=rootless, writable=args.writable,
                              pulled=pulled)
    except BaseException:
        if pulled and os.path.isdir(home):
            mounting.remove_home(home)
        raise
    how = "fuse2fs" if done.mode == "fuse2fs" else done.device
    print(f"{directory}: {'read-write' if args.writable else 'read-only'} ({how})")
    return 0


def run_umount(args: argparse.Namespace) -> int:
    mounting.umount(args.directory)
    return 0


def run_daemon(args: argparse.Namespace) -> int:
    try:  # mfusepy is an extra (pyoverlaybd[attach]), loaded by the daemon only
        from ..export.fuse import DirectReadFUSE, DiskFile
    except ImportError as exc:
        raise UsageError(f"a rootless mount needs mfusepy (pip install 'pyoverlaybd[attach]'): {exc}") from None
    vol = open_volume(args.volume)
    with vol.open(writable=args.writable) as dev:
        try:
            DirectReadFUSE(DiskFile(dev, readonly=not args.writable), args.mountpoint, foreground=True,
                           raw_fi=True, nothreads=False, fsname="overlaybd", subtype="overlaybd")
        finally:
            dev.flush()
    return 0
