"""``overlaybd serve``: export a volume (and its snapshots), or a stack of layer files, over NBD."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from typing import Any

from ..errors import UsageError
from ..export import eventloop
from ..export.nbd.limits import Limits
from ..export.nbd.server import Export, serve
from ..export.served import ServedVolume
from ..metrics import Recorder
from ..operations import open_stack
from ..volume import CONFIG, Volume
from .common import hosts_dir_option, open_volume, parse_size, start_metrics
from .stats import render

_DEFAULTS = Limits()


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as exc:  # argparse turns this into its usage line and exit 2
        raise argparse.ArgumentTypeError(exc.message) from None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve a volume (its snapshots too), or layers, as NBD exports",
                       description="Serve over NBD until SIGINT or SIGTERM. The limits bound what clients can make "
                                   "the server hold; sizes read as 64M, 1G or bytes.")
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
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="count requests, cache and registry traffic; serve them for Prometheus at "
                        "http://HOST:PORT/metrics (port 0: a free one, printed) and to 'overlaybd stats VOL'; "
                        "SIGUSR1 prints them (needs pyoverlaybd[metrics])")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-connections", type=int, default=_DEFAULTS.max_connections, metavar="N",
                        help="clients connected at once; more are closed at once (qemu-nbd --shared, QEMU's "
                             f"max-connections; default {_DEFAULTS.max_connections})")
    limits.add_argument("--max-inflight", type=_size, default=_DEFAULTS.max_inflight, metavar="SIZE",
                        help="bytes of requests in flight per connection (read buffers, replies not yet sent, "
                             "write payloads); past it, no more requests are read from that client "
                             f"(default {_DEFAULTS.max_inflight >> 20}M)")
    limits.add_argument("--max-inflight-total", type=_size, default=_DEFAULTS.max_inflight_total,
                        metavar="SIZE", help="the same for all connections together "
                                             f"(default {_DEFAULTS.max_inflight_total >> 20}M)")
    limits.add_argument("--handshake-limit", "--handshake-timeout", type=float, dest="handshake_limit",
                        default=_DEFAULTS.handshake_limit, metavar="SECONDS",
                        help="a client that has not finished negotiating by then is dropped (qemu-nbd "
                             f"--handshake-limit; default {_DEFAULTS.handshake_limit:g})")
    limits.add_argument("--reply-timeout", type=float, default=_DEFAULTS.reply_timeout, metavar="SECONDS",
                        help="a client that takes no byte of its replies for that long, or does not send a large "
                             "write payload it announced within it, is dropped "
                             f"(default {_DEFAULTS.reply_timeout:g})")
    hosts_dir_option(p)
    p.set_defaults(run=run)


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(max_connections=args.max_connections, max_inflight=args.max_inflight,
                  max_inflight_total=args.max_inflight_total, handshake_limit=args.handshake_limit,
                  reply_timeout=args.reply_timeout)


def _volume(args: argparse.Namespace) -> Volume | None:
    first = args.layers[0]
    if len(args.layers) == 1 and os.path.isfile(os.path.join(first, CONFIG)):
        if args.upper:
            raise UsageError("--upper goes with layer files, not with a volume")
        return open_volume(first)
    return None


def _stack_exports(args: argparse.Namespace, owned: ExitStack) -> list[Export]:
    if args.record_trace:
        raise UsageError("--record-trace goes with a volume")
    upper = tuple(args.upper) if args.upper else None
    writable = upper is not None and not args.readonly
    stack = owned.enter_context(open_stack(args.layers, upper, writable=writable))
    return [Export(args.name, stack, readonly=not writable, inline=True)]


def run(args: argparse.Namespace) -> int:
    listen = args.listen or f"unix:{os.path.abspath('overlaybd.sock')}"
    limits = _limits(args)
    vol = _volume(args)
    with ExitStack() as owned:
        recorder: Recorder | None = None
        url = ""
        if args.metrics:
            recorder, url = start_metrics(args.metrics, owned)
        if vol is not None:
            served = owned.enter_context(ServedVolume(vol, readonly=args.readonly, name=args.name,
                                                      record_trace=args.record_trace))
            exports = served.exports
            serving: Callable[..., Coroutine[Any, Any, None]] = served.serve
        else:
            exports = _stack_exports(args, owned)
            owned.callback(exports[0].source.flush)

            async def serving(listen: str, **kw: Any) -> None:
                await serve(exports, listen, **kw)

        main = exports[0]
        count = len(exports)

        def ready(uri: str) -> None:
            print(uri, flush=True)
            mode = "read-only" if not main.writable else "read-write"
            print(f"overlaybd: serving {main.source.size} bytes ({mode}), {count} export(s); "
                  "stop with Ctrl-C or SIGTERM", file=sys.stderr, flush=True)
            if recorder is not None:
                print(f"overlaybd: metrics at {url}", file=sys.stderr, flush=True)

        async def until_signalled() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if recorder is not None:
                loop.add_signal_handler(signal.SIGUSR1, _print_figures, recorder)
            await serving(listen, ready=ready, stop=stop, workers=args.workers, limits=limits, metrics=recorder)

        eventloop.run(until_signalled())
    return 0


def _print_figures(recorder: Recorder) -> None:
    print(render(recorder.figures()), file=sys.stderr, flush=True)
