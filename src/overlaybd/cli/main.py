"""Entry point: parse, dispatch, and turn errors into one readable line and an exit code.

Exit codes: 0 success; 1 an error (the message names the file and offset); 2 bad usage, or ``check`` found
corruption (as ``qemu-img check``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..cache import store
from ..errors import OverlaybdError, UsageError
from ..formats.lsmt import mapping
from ..formats.zfile import blocks
from . import attach, cat, check, convert, extent_map, info, layer, mount, remote, serve, stats, transfer, volume, zfile

COMMANDS = (info, extent_map, check, cat, volume, transfer, remote, serve, stats, attach, layer, zfile, convert,
            mount)


class _Version(argparse.Action):
    """--version, unwrapped: the package version and which paths (C or Python) are in use."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(f"overlaybd {__version__}\nZFile blocks: {blocks.describe()}\ncache reads: {store.describe_reads()}\n"
              f"index lookups: {mapping.describe_lookups()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overlaybd", description="OverlayBD block images: layers, ZFile, stacks.")
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and the ZFile block path")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="overlaybd: %(levelname)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        print(f"overlaybd: error: {exc}", file=sys.stderr)
        return 2
    except OverlaybdError as exc:
        print(f"overlaybd: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"overlaybd: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("overlaybd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
