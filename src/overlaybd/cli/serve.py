"""``overlaybd serve``: export a stack (optionally with a writable upper) over NBD."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from ..export.nbd.server import Export, serve
from ..operations import open_stack


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve layers (bottom to top, optional writable upper) as an NBD export")
    p.add_argument("layers", nargs="*", metavar="LAYER", help="layers bottom to top")
    p.add_argument("--upper", nargs=2, metavar=("DATA", "INDEX"), help="a writable layer on top")
    p.add_argument("--readonly", action="store_true", help="refuse writes even with a writable upper")
    p.add_argument("--listen", default=None,
                   help="unix:PATH (default: unix:./overlaybd.sock) or tcp:HOST:PORT (tcp:PORT binds 127.0.0.1)")
    p.add_argument("--name", default="", help="export name (default: the empty name)")
    p.add_argument("--workers", type=int, default=8, help="threads serving requests (default 8)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    listen = args.listen or f"unix:{os.path.abspath('overlaybd.sock')}"
    upper = tuple(args.upper) if args.upper else None
    writable = upper is not None and not args.readonly
    with open_stack(args.layers, upper, writable=writable) as stack:
        export = Export(args.name, stack, readonly=not writable)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)

            def ready(uri: str) -> None:
                print(uri, flush=True)
                print(f"overlaybd: serving {stack.size} bytes ({'read-write' if writable else 'read-only'}); "
                      "stop with Ctrl-C or SIGTERM", file=sys.stderr, flush=True)

            await serve([export], listen, ready=ready, stop=stop, workers=args.workers)

        try:
            asyncio.run(main())
        finally:
            stack.flush()
    return 0
