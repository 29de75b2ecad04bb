"""``overlaybd attach`` / ``detach``: a volume as a kernel block device (/dev/loopN over a FUSE file; the work is in
``export/loop.py``), and the hidden ``fuse-daemon`` command that serves the FUSE file."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from contextlib import ExitStack
from typing import Any

from ..errors import LockedError
from ..export import fusedev, loop
from ..export.control import ControlThread, socket_path
from ..metrics import Recorder
from .common import hosts_dir_option, open_volume, split_volume_ref, start_metrics

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    a = sub.add_parser("attach", help="expose a volume (or VOL@SNAP, read-only) as /dev/loopN (root)")
    a.add_argument("volume", metavar="VOL[@SNAP]")
    a.add_argument("--readonly", action="store_true")
    a.add_argument("--metrics", metavar="HOST:PORT",
                   help="the daemon counts reads, writes, fsyncs and discards, cache and registry traffic, and "
                        "serves them for Prometheus at http://HOST:PORT/metrics (port 0: a free one, printed) and "
                        "to 'overlaybd stats VOL' (needs pyoverlaybd[metrics])")
    hosts_dir_option(a)
    a.set_defaults(run=run_attach)

    d = sub.add_parser("detach", help="undo attach: free the loop device, stop the FUSE export")
    d.add_argument("device", help="/dev/loopN printed by attach")
    d.set_defaults(run=run_detach)

    f = sub.add_parser("fuse-daemon", help=argparse.SUPPRESS)
    f.add_argument("volume")
    f.add_argument("mountpoint")
    f.add_argument("--readonly", action="store_true")
    f.add_argument("--snapshot", type=int)
    f.add_argument("--metrics")
    f.set_defaults(run=run_daemon)


def run_attach(args: argparse.Namespace) -> int:
    loop.require_root()
    vol_path, ref = split_volume_ref(args.volume)
    vol = open_volume(vol_path)
    snapshot = vol.resolve(ref) if ref is not None else None
    if args.metrics:
        with ExitStack() as trial:  # a bad address or a missing extra fails here, in one line, not in the daemon
            start_metrics(args.metrics, trial)
    done = loop.attach(vol.path, snapshot=snapshot, readonly=args.readonly, metrics=args.metrics)
    print(done.device)
    if done.metrics:
        print(f"overlaybd: metrics at {done.metrics}", file=sys.stderr)
    return 0


def run_detach(args: argparse.Namespace) -> int:
    loop.detach(args.device)
    return 0


def run_daemon(args: argparse.Namespace) -> int:
    """Serve the volume until ``detach`` unmounts it, or SIGINT or SIGTERM: then the FUSE connection is aborted
    (requests not answered yet fail: the loop device reports I/O errors until ``detach``), every serving thread
    is joined, and only then is the volume flushed and closed. Exit status 0 once it is (every write the device
    acknowledged is then durable), 1 if the flush fails (the error is logged)."""
    stop = fusedev.Stop()
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.request(signal.Signals(signum).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        vol = open_volume(args.volume)
        with ExitStack() as owned:
            recorder: Recorder | None = None
            if args.metrics:
                recorder, url = start_metrics(args.metrics, owned)
                print(f"{loop.METRICS_AT}{url}", file=sys.stderr, flush=True)
                _answer_stats(vol.path, recorder, owned, readonly=args.readonly or args.snapshot is not None)
            with vol.open(writable=not args.readonly and args.snapshot is None, snapshot=args.snapshot) as dev:
                try:  # returns once no thread serves the connection any more
                    fusedev.run_device(dev, args.mountpoint, readonly=args.readonly or args.snapshot is not None,
                                       metrics=recorder, stop=stop)
                finally:
                    dev.flush()
        if stop.reason is not None:
            log.warning("%s: stopped by %s; the volume is flushed and closed", vol.path, stop.reason)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop.close()
    return 0


def _answer_stats(volume: str, recorder: Recorder, owned: ExitStack, *, readonly: bool) -> None:
    """``overlaybd stats VOL`` through the volume's control socket (a snapshot is refused: the volume is attached).
    Read-only, the socket goes to a writable server of the volume that asks for it."""
    async def answer(request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "stats":
            return {"ok": True, "stats": recorder.figures()}
        if request.get("op") == "release" and readonly and control.socket is not None:
            await control.socket.stop_listening()
            log.warning("%s: a writable server took the control socket", volume)
            return {"ok": True}
        return {"ok": False, "error": f"the volume is in use by overlaybd attach: {request.get('op')} refused"}

    control = ControlThread(socket_path(volume), answer)
    try:
        control.start()
    except LockedError:
        log.warning("%s: another process answers on the control socket; 'overlaybd stats' reads that one's "
                    "figures", volume)
        return
    owned.callback(control.close)
