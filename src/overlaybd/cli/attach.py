"""``overlaybd attach`` / ``detach``: a volume as a kernel block device (/dev/loopN over a FUSE file).

``attach`` starts a FUSE daemon that exposes the volume as ``MOUNT/disk``, binds a free loop device to it with
``losetup --direct-io=on``, records the pair in ``/run/overlaybd/loopN.json`` and prints the device. ``detach``
undoes it in the order that works: loop device first, then the FUSE mount (the daemon then flushes and exits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ..errors import LayerIOError, UsageError
from .common import open_volume, split_volume_ref

STATE = "/run/overlaybd"
OVERLAYBD = [sys.executable, "-m", "overlaybd.cli.main"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    a = sub.add_parser("attach", help="expose a volume (or VOL@SNAP, read-only) as /dev/loopN (root)")
    a.add_argument("volume", metavar="VOL[@SNAP]")
    a.add_argument("--readonly", action="store_true")
    a.set_defaults(run=run_attach)

    d = sub.add_parser("detach", help="undo attach: free the loop device, stop the FUSE export")
    d.add_argument("device", help="/dev/loopN printed by attach")
    d.set_defaults(run=run_detach)

    f = sub.add_parser("fuse-daemon", help=argparse.SUPPRESS)
    f.add_argument("volume")
    f.add_argument("mountpoint")
    f.add_argument("--readonly", action="store_true")
    f.add_argument("--snapshot", type=int)
    f.set_defaults(run=run_daemon)


def _need_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("attach needs root (a FUSE mount and a loop device)")
    for tool in ("losetup", "fusermount3"):
        if shutil.which(tool) is None:
            raise UsageError(f"attach needs {tool} (Debian packages mount and fuse3)")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("attach needs /dev/fuse")


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode:
        raise LayerIOError(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")
    return res.stdout.strip()


def run_attach(args: argparse.Namespace) -> int:
    _need_root()
    vol_path, ref = split_volume_ref(args.volume)
    vol = open_volume(vol_path)
    readonly = args.readonly or ref is not None
    snapshot = vol.resolve(ref) if ref is not None else None
    os.makedirs(STATE, exist_ok=True)
    mnt = tempfile.mkdtemp(prefix="fuse-", dir=STATE)
    log_path = mnt + ".log"
    cmd = [*OVERLAYBD, "fuse-daemon", vol.path, mnt] + (["--readonly"] if readonly else [])
    if snapshot is not None:
        cmd += ["--snapshot", str(snapshot)]
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    disk = os.path.join(mnt, "disk")
    deadline = time.monotonic() + 30
    while not os.path.exists(disk):
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            os.rmdir(mnt)
            with open(log_path) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            os.unlink(log_path)
            raise LayerIOError("the FUSE export did not start: " + (lines[-1] if lines else "no output"),
                               path=vol.path)
        time.sleep(0.05)
    try:
        device = _run(["losetup", "-f", "--show", "--direct-io=on"] + (["-r"] if readonly else []) + [disk])
    except BaseException:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        daemon.wait(30)
        os.rmdir(mnt)
        raise
    state = {"device": device, "mountpoint": mnt, "pid": daemon.pid, "volume": vol.path, "snapshot": snapshot,
             "readonly": readonly, "log": log_path}
    with open(os.path.join(STATE, os.path.basename(device) + ".json"), "w") as f:
        json.dump(state, f)
    print(device)
    return 0


def run_detach(args: argparse.Namespace) -> int:
    _need_root()
    name = os.path.basename(args.device)
    state_path = os.path.join(STATE, name + ".json")
    try:
        with open(state_path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{args.device} was not attached by overlaybd", path=state_path) from None
    holders = f"/sys/block/{name}/holders"
    if os.path.isdir(holders) and os.listdir(holders):
        raise UsageError(f"{args.device} is in use by {', '.join(os.listdir(holders))}")
    if os.path.exists(f"/sys/block/{name}/loop/backing_file"):
        _run(["losetup", "-d", args.device])
    # the loop device lets go of the file asynchronously; the FUSE mount is busy until it does
    deadline = time.monotonic() + 30
    while True:
        res = subprocess.run(["fusermount3", "-u", state["mountpoint"]], capture_output=True, text=True)
        if res.returncode == 0 or not os.path.ismount(state["mountpoint"]):
            break
        if time.monotonic() > deadline:
            raise LayerIOError(f"cannot unmount the FUSE export: {res.stderr.strip()}", path=state["mountpoint"])
        time.sleep(0.1)
    pid = int(state["pid"])
    deadline = time.monotonic() + 60
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
    os.rmdir(state["mountpoint"])
    os.unlink(state_path)
    if os.path.exists(state.get("log", "")):
        os.unlink(state["log"])
    return 0


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of another parent counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except FileNotFoundError:
        return False


def run_daemon(args: argparse.Namespace) -> int:
    from ..export.fuse import run_fuse

    vol = open_volume(args.volume)
    with vol.open(writable=not args.readonly and args.snapshot is None, snapshot=args.snapshot) as dev:
        try:
            run_fuse(dev, args.mountpoint, readonly=args.readonly or args.snapshot is not None)
        finally:
            dev.flush()
    return 0
