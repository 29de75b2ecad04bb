"""``overlaybd serve``: export a volume (and its snapshots), or a stack of layer files, over NBD."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Any

from ..errors import UsageError
from ..export.control import serve_control, socket_path
from ..export.nbd.server import Export, NbdServer, serve
from ..formats.output import Compression
from ..operations import open_stack
from ..volume import CONFIG, Snapshot, Volume
from .common import open_volume


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
    vol = _volume(args)
    if vol is not None:
        main = owned.enter_context(vol.open(writable=not args.readonly, record_trace=args.record_trace))
        local = all(os.path.exists(path) for path in vol.lowers)  # no lazily pulled layer to wait for
        exports = [Export(args.name, main, readonly=args.readonly, description=f"volume {vol.path}", inline=local)]
        for snap in vol.snapshots():
            dev = owned.enter_context(vol.open(snapshot=snap.number))
            exports.append(Export(snap.uuid, dev, readonly=True, inline=local,
                                  description=f"snapshot {snap.number}: {snap.message}".strip()))
        return exports
    if args.record_trace:
        raise UsageError("--record-trace goes with a volume")
    upper = tuple(args.upper) if args.upper else None
    writable = upper is not None and not args.readonly
    stack = owned.enter_context(open_stack(args.layers, upper, writable=writable))
    return [Export(args.name, stack, readonly=not writable, inline=True)]


def _volume(args: argparse.Namespace) -> Volume | None:
    first = args.layers[0]
    if len(args.layers) == 1 and os.path.isfile(os.path.join(first, CONFIG)):
        if args.upper:
            raise UsageError("--upper goes with layer files, not with a volume")
        return open_volume(first)
    return None


def _snapshot_between_requests(vol: Volume, main: Export, owned: ExitStack) -> Callable[[NbdServer], Awaitable[None]]:
    """Serve the volume's control socket: ``overlaybd snapshot VOL`` while we serve it writable."""

    async def started(server: NbdServer) -> None:
        async def handle(req: dict[str, Any]) -> dict[str, Any]:
            if req.get("op") != "snapshot":
                return {"ok": False, "error": f"unknown operation {req.get('op')!r}"}
            compression = Compression(req["compress"], 4096) if req.get("compress") else None

            def work() -> Snapshot:
                main.source.flush()
                main.source.close()  # releases the upper and the volume lock for the snapshot
                try:
                    snap = vol.snapshot(str(req.get("message", "")), compression)
                finally:
                    main.source = owned.enter_context(vol.open(writable=True))
                server.exports[snap.uuid] = Export(snap.uuid, owned.enter_context(vol.open(snapshot=snap.number)),
                                                   inline=main.inline,
                                                   readonly=True, description=f"snapshot {snap.number}: "
                                                   f"{snap.message}".strip())
                return snap

            snap = await server.quiesced(work)
            assert isinstance(snap, Snapshot)
            return {"ok": True, "snapshot": {"number": snap.number, "uuid": snap.uuid, "file_size": snap.file_size}}

        ctl = await serve_control(socket_path(vol.path), handle)
        server.adopt_listener(ctl)

    return started


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

            vol = _volume(args)
            started = _snapshot_between_requests(vol, main, owned) if vol is not None and not main.readonly \
                else None
            try:
                await serve(exports, listen, ready=ready, stop=stop, workers=args.workers, started=started)
            finally:
                if vol is not None and os.path.exists(socket_path(vol.path)):
                    os.unlink(socket_path(vol.path))

        try:
            asyncio.run(run_server())
        finally:
            main.source.flush()
    return 0
