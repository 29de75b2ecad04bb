"""``overlaybd info``: what a layer, ZFile or stack is."""

from __future__ import annotations

import argparse
import os

from ..formats.lsmt import glance
from .common import configure_logging, emit_json, human, split_volume_ref

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("info", help="describe a layer, a ZFile, or a stack of layers")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="one file, several layers bottom to top, a volume (its device as a stack), or VOL@SNAP (that "
                        "snapshot: the layers up to it)")
    p.add_argument("--index", help="index file of a writable layer (default: the sibling *index* file)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    vol_path, ref = split_volume_ref(args.paths[0]) if len(args.paths) == 1 else (args.paths[0], None)
    volume = len(args.paths) == 1 and os.path.isdir(vol_path)
    if ref is not None and not volume:
        from ..errors import UsageError

        raise UsageError(f"{vol_path} is not a volume: VOL@SNAP names a snapshot of a volume")
    data = glance.describe_small(args.paths[0]) if len(args.paths) == 1 and args.index is None and not volume \
        else None
    if data is None:  # any other form, a large index, several layers: the full readers (and numpy)
        from ..inspection import describe_layer, describe_stack
        from ..operations import open_stack
        from ..volume import Volume

        configure_logging()
        if volume and ref is not None:
            from .common import open_volume

            vol = open_volume(vol_path)
            snapshot = vol.resolve(ref)
            with vol.open(snapshot=snapshot) as stack:
                data = {"snapshot": snapshot, **describe_stack(stack)}
        elif volume:
            with Volume(args.paths[0]).open() as stack:
                data = describe_stack(stack)
        elif len(args.paths) == 1:
            data = describe_layer(args.paths[0], args.index)
        else:
            with open_stack(args.paths) as stack:
                data = describe_stack(stack)
    if args.output == "json":
        emit_json(data)
    else:
        _print(data)
    return 0


def _print(data: dict[str, Any], indent: str = "") -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}:")
            for item in value:
                print(f"{indent}  -", ", ".join(f"{k}: {v}" for k, v in item.items()))
        elif isinstance(value, int) and not isinstance(value, bool) and key.endswith(("size", "bytes")):
            print(f"{indent}{key}: {value} ({human(value)})")
        else:
            print(f"{indent}{key}: {value}")
