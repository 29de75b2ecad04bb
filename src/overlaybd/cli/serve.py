"""``overlaybd serve``: export a volume (and its snapshots), or a stack of layer files, over NBD."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from contextlib import ExitStack

from ..errors import UsageError
from ..export.nbd.server import Export, serve
from ..operations import open_stack
from ..volume import CONFIG, Volume


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve a volume (its snapshots too), or layers, as NBD exports")
    p.add_argument("layers", nargs="+", metavar="VOL_OR_LAYER",
                   help="a volume directory, or layer files bottom to top")
    p.add_argument("--upper", nargs=2, metavar=("DATA", "INDEX"), help="with layer files: a writable layer on top")
    p.add_argument("--readonly", action="store_true", help="refuse writes")
    p.add_argument("--listen", default=None,
                   help="unix:PATH (default: unix:./overlaybd.sock) or tcp:HOST:PORT (tcp:PORT binds 127.0.0.1)")
    p.add_argument("--name", default="", help="name of the main export (default: the empty name)")
    p.add_argument("--workers", type=int, default=8, help="threads serving requests (default 8)")
    p.add_argument("--record-trace", metavar="FILE",
                   help="with a volume: record which layer blocks are read, for 'pull --lazy --prefetch FILE'")
    p.set_defaults(run=run)


def _exports(args: argparse.Namespace, owned: ExitStack) -> list[Export]:
    first = args.layers[0]
    if len(args.layers) == 1 and os.path.isfile(os.path.join(first, CONFIG)):
        if args.upper:
            raise UsageError("--upper goes with layer files, not with a volume")
        vol = Volume(first)
        main = owned.enter_context(vol.open(writable=not args.readonly, record_trace=args.record_trace))
        exports = [Export(args.name, main, readonly=args.readonly, description=f"volume {vol.path}")]
        for snap in vol.snapshots():
            dev = owned.enter_context(vol.open(snapshot=snap.number))
            exports.append(Export(snap.uuid, dev, readonly=True,
                                  description=f"snapshot {snap.number}: {snap.message}".strip()))
        return exports
    if args.record_trace:
        raise UsageError("--record-trace goes with a volume")
    upper = tuple(args.upper) if args.upper else None
    writable = upper is not None and not args.readonly
    stack = owned.enter_context(open_stack(args.layers, upper, writable=writable))
    return [Export(args.name, stack, readonly=not writable)]


def run(args: argparse.Namespace) -> int:
    listen = args.listen or f"unix:{os.path.abspath('overlaybd.sock')}"
    with ExitStack() as owned:
        exports = _exports(args, owned)
        main = exports[0]

        async def run_server() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)

            def ready(uri: str) -> None:
                print(uri, flush=True)
                mode = "read-only" if main.readonly else "read-write"
                print(f"overlaybd: serving {main.source.size} bytes ({mode}), {len(exports)} export(s); "
                      "stop with Ctrl-C or SIGTERM", file=sys.stderr, flush=True)

            await serve(exports, listen, ready=ready, stop=stop, workers=args.workers)

        try:
            asyncio.run(run_server())
        finally:
            main.source.flush()
    return 0
