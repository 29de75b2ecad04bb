"""``overlaybd check``: every header, index order and bound, and every block CRC (like ``qemu-img check``)."""

from __future__ import annotations

import argparse

from ..inspection import check_layer
from .common import emit_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("check", help="verify layers and ZFiles; exit 2 if anything is corrupt")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--index", help="index file of a writable layer (default: the sibling *index* file)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reports = [check_layer(path, args.index) for path in args.paths]
    if args.output == "json":
        emit_json(reports if len(reports) > 1 else reports[0])
    else:
        for r in reports:
            state = "corrupt" if r["errors"] else "ok"
            extra = []
            if "records" in r:
                extra.append(f"{r['records']} records")
            if "blocks_checked" in r:
                extra.append(f"{r['blocks_checked']} blocks checked")
            print(f"{r['path']}: {r.get('format', '?')}: {state}" + (f" ({', '.join(extra)})" if extra else ""))
            for w in r["warnings"]:
                print(f"  warning: {w}")
            for e in r["errors"]:
                print(f"  error: {e}")
    return 2 if any(r["errors"] for r in reports) else 0
