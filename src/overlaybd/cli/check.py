"""``overlaybd check``: every header, index order and bound, and every block CRC (like ``qemu-img check``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..inspection import check_layer
from ..volume import Volume
from .common import emit_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("check", help="verify layers and ZFiles; exit 2 if anything is corrupt")
    p.add_argument("paths", nargs="+", metavar="PATH", help="a layer or ZFile, or a volume (each of its layers)")
    p.add_argument("--index", help="index file of a writable layer (default: the sibling *index* file)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reports = [r for path in args.paths for r in
               (check_volume(path) if os.path.isdir(path) else [check_layer(path, args.index)])]
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


def check_volume(path: str) -> list[dict[str, Any]]:
    """Each layer of the volume at ``path``: its snapshots bottom to top, then its writable upper. A snapshot still
    in its repository (pulled lazily) is reported, not checked; a layer file that is missing (the upper's data or
    index file too) is an error."""
    vol = Volume(path)  # not a volume: a one-line error
    reports = []
    for n, layer in enumerate(vol.lowers):
        if os.path.exists(layer):
            reports.append(check_layer(layer))
        elif vol.in_repository(n):
            reports.append({"path": layer, "format": "remote", "errors": [],
                            "warnings": [f"snapshot {n} is in its repository (pulled lazily): not checked here"]})
        else:
            reports.append({"path": layer, "errors": [f"snapshot {n}: layer file is missing"], "warnings": []})
    data, index = vol.upper
    missing = [f for f in (data, index) if not os.path.exists(f)]
    if missing:
        reports.append({"path": data, "errors": [f"upper: {f}: file is missing" for f in missing], "warnings": []})
    else:
        reports.append(check_layer(data, index))
    return reports
