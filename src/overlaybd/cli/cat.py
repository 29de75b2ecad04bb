"""``overlaybd cat``: the merged device of a stack as a sparse raw file.

A few plain sealed layers (and a writable upper with a short log) are merged in Python and copied without numpy
(``formats.lsmt.small_stack``, ``formats.rawout``); anything else is opened as a stack and copied by
``formats.output``; the two write the same file."""

from __future__ import annotations

import argparse

from ..formats.lsmt.small_stack import open_small
from ..formats.rawout import copy_pieces
from .common import BAR_BYTES, configure_logging, emit_json, progress_bar


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("cat", help="write the merged device (layers bottom to top) to a sparse raw file")
    p.add_argument("layers", nargs="*", metavar="LAYER", help="layers bottom to top")
    p.add_argument("--upper", nargs=2, metavar=("DATA", "INDEX"), help="a writable layer on top")
    p.add_argument("-o", "--out", required=True, help="output raw file")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    upper = (args.upper[0], args.upper[1]) if args.upper else None
    small = open_small(list(args.layers), upper)
    pieces = small.pieces() if small is not None else None
    bar = args.output == "human" and (pieces is None or sum(b - a for a, b, _s, _at in pieces) >= BAR_BYTES)
    with progress_bar("cat", bar) as progress:
        if small is not None and pieces is not None:
            size = copy_pieces(args.out, small.size, small.files, pieces, force=args.force, progress=progress)
        else:  # any other form, many records: the full readers (and numpy)
            from ..formats.output import copy_out
            from ..operations import open_stack

            configure_logging()
            with open_stack(args.layers, upper) as stack:
                size = copy_out(args.out, stack, force=args.force, progress=progress).size
    if args.output == "json":
        emit_json({"path": args.out, "size": size})
    return 0
