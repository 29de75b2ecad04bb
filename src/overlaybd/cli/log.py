"""``overlaybd log``: a volume's snapshots, newest first, read from the layers' headers."""

from __future__ import annotations

import argparse

from .. import volume_config
from .common import emit_json, human


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    g = sub.add_parser("log", help="list a volume's snapshots, newest first")
    g.add_argument("volume")
    g.add_argument("--output", choices=("human", "json"), default="human")
    g.set_defaults(run=run_log)


def snap_json(s: volume_config.Snapshot) -> dict[str, object]:
    out: dict[str, object] = {k: getattr(s, k) for k in ("number", "uuid", "parent_uuid", "message", "created",
                                                         "virtual_size", "file_size", "file", "digest")}
    out["repositories"] = list(s.repositories)
    return out


def run_log(args: argparse.Namespace) -> int:
    snaps = volume_config.snapshots(args.volume)
    if snaps is None:  # a snapshot compressed, in the tar envelope or still in its repository: open the layers
        from .common import open_volume

        snaps = open_volume(args.volume).snapshots()
    if args.output == "json":
        emit_json([snap_json(s) for s in reversed(snaps)])
        return 0
    for s in reversed(snaps):
        print(f"snapshot {s.number} {s.uuid}")
        print(f"Date:   {s.created or '-'}")
        print(f"Parent: {s.parent_uuid}")
        print(f"Size:   {human(s.file_size)} on disk, {human(s.virtual_size)} device")
        if s.digest:
            print(f"Blob:   {s.digest}")
        for ref in s.repositories:
            print(f"In:     {ref}")
        print(f"\n    {s.message or '(no message)'}\n")
    return 0
