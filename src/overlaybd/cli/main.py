"""Entry point: parse, dispatch, and turn errors into one readable line and an exit code.

Exit codes: 0 success; 1 an error (the message names the file and offset); 2 bad usage, or ``check`` found
corruption (as ``qemu-img check``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import OverlaybdError, UsageError
from .common import configure_logging

# command -> the module under overlaybd.cli that registers and runs it. Only the module of the command given is
# imported (with what it needs): ``--version`` and a command's start load no numpy, requests or codecs they do
# not use. Help and a mistyped command load them all, to list every command.
COMMANDS = {
    "info": "info", "map": "extent_map", "check": "check", "cat": "cat",
    **dict.fromkeys(("create", "snapshot", "merge", "diff", "clone"), "volume"), "log": "log",
    "import": "transfer", "export": "exporting",
    **dict.fromkeys(("push", "pull", "gc", "cache"), "remote"),
    "serve": "serve", "stats": "stats", **dict.fromkeys(("attach", "detach", "fuse-daemon"), "attach"),
    "layer": "layer", "zfile": "zfile", "convert": "convert",
    **dict.fromkeys(("mount", "umount", "mount-daemon"), "mount"),
}
MODULES = tuple(dict.fromkeys(COMMANDS.values()))  # in the order help lists them


class _Version(argparse.Action):
    """--version, unwrapped: the package version and which paths (C or Python) are in use."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from .. import native  # the extensions, loaded for --version only
        from ..export import eventloop

        print(f"overlaybd {__version__}\nZFile blocks: {native.describe_blocks()}\n"
              f"cache reads: {native.describe_hits()}\nindex lookups: {native.describe_lookups()}\n"
              f"layer appends: {native.describe_writes()}\nserve event loop: {eventloop.describe()}")
        parser.exit()


def build_parser(modules: Sequence[str] = MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overlaybd", description="OverlayBD block images: layers, ZFile, stacks.")
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and the ZFile block path")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def modules_for(argv: Sequence[str]) -> Sequence[str]:
    """The modules to load for ``argv``: the command's own, or all (help, no command, an unknown one)."""
    for arg in argv:
        if arg in ("-h", "--help", "--version"):
            return () if arg == "--version" else MODULES
        if not arg.startswith("-"):
            return (COMMANDS[arg],) if arg in COMMANDS else MODULES
    return MODULES


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:
        # whoever read our output stopped (``overlaybd --version | head -1``): end quietly, as a command killed by
        # SIGPIPE does, and keep the interpreter's final flush of stdout from failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13


def _main(argv: list[str]) -> int:
    parser = build_parser(modules_for(argv))
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:
        raise
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
