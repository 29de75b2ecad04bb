"""``overlaybd map``: extents of a layer or stack, and which layer holds each (like ``qemu-img map``)."""

from __future__ import annotations

import argparse

from ..operations import open_stack
from .common import emit_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("map", help="list data / zero / hole extents and the layer that holds them")
    p.add_argument("layers", nargs="+", metavar="LAYER", help="layers bottom to top")
    p.add_argument("--upper", nargs=2, metavar=("DATA", "INDEX"), help="a writable layer on top")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_stack(args.layers, tuple(args.upper) if args.upper else None) as stack:
        names = [layer.name for layer in stack.lowers] + ([stack.upper.name] if stack.upper else [])
        extents = list(stack.extents())
    if args.output == "json":
        emit_json([{"start": e.offset, "length": e.length, "kind": e.kind.value, "layer": e.layer,
                    "file": names[e.layer] if e.layer is not None else None} for e in extents])
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Kind':<6}{'Layer':<7}File")
    for e in extents:
        layer = "-" if e.layer is None else str(e.layer)
        name = names[e.layer] if e.layer is not None else ""
        print(f"{e.offset:<#20x}{e.length:<#20x}{e.kind.value:<6}{layer:<7}{name}")
    return 0
