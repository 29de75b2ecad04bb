"""``overlaybd cat``: the merged device of a stack as a sparse raw file."""

from __future__ import annotations

import argparse

from ..formats.output import copy_out
from ..operations import open_stack
from .common import emit_json, progress_bar


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("cat", help="write the merged device (layers bottom to top) to a sparse raw file")
    p.add_argument("layers", nargs="*", metavar="LAYER", help="layers bottom to top")
    p.add_argument("--upper", nargs=2, metavar=("DATA", "INDEX"), help="a writable layer on top")
    p.add_argument("-o", "--out", required=True, help="output raw file")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_stack(args.layers, tuple(args.upper) if args.upper else None) as stack, \
            progress_bar("cat", args.output == "human") as progress:
        written = copy_out(args.out, stack, force=args.force, progress=progress)
    if args.output == "json":
        emit_json({"path": written.path, "size": written.size})
    return 0
