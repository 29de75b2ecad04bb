"""A volume as a kernel block device: a FUSE daemon exposes it as ``MOUNT/disk``, and a loop device (``losetup
--direct-io=on``) is bound to that file. Each attachment is recorded in ``/run/overlaybd/loopN.json``; ``detach``
undoes it in the order that works: the loop device first, then the FUSE mount (the daemon then flushes and exits).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from ..errors import LayerIOError, UsageError

STATE = "/run/overlaybd"
#: the daemon: ``overlaybd fuse-daemon VOLUME MOUNTPOINT [--readonly] [--snapshot N] [--metrics HOST:PORT]``
DAEMON = [sys.executable, "-m", "overlaybd.cli.main", "fuse-daemon"]
METRICS_AT = "overlaybd: metrics at "  # how the daemon's log line with its metrics URL starts


@dataclass(frozen=True, slots=True)
class Attachment:
    device: str
    mountpoint: str
    pid: int
    volume: str
    snapshot: int | None
    readonly: bool
    log: str
    metrics: str | None = None  # the daemon's metrics URL (attach --metrics)


def require_root() -> None:
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


def attach(volume: str, *, snapshot: int | None = None, readonly: bool = False, timeout: float = 30.0,
           metrics: str | None = None) -> Attachment:
    """Start the FUSE daemon for ``volume`` (a snapshot is always read-only), bind a loop device to its file.
    ``metrics`` (HOST:PORT): the daemon counts its requests and serves the figures there for Prometheus."""
    require_root()
    readonly = readonly or snapshot is not None
    os.makedirs(STATE, exist_ok=True)
    mnt = tempfile.mkdtemp(prefix="fuse-", dir=STATE)
    log_path = mnt + ".log"
    cmd = [*DAEMON, volume, mnt] + (["--readonly"] if readonly else [])
    if snapshot is not None:
        cmd += ["--snapshot", str(snapshot)]
    if metrics is not None:
        cmd += ["--metrics", metrics]
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    disk = os.path.join(mnt, "disk")
    deadline = time.monotonic() + timeout
    while not os.path.exists(disk):
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            os.rmdir(mnt)
            with open(log_path) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            os.unlink(log_path)
            raise LayerIOError("the FUSE export did not start: " + (lines[-1] if lines else "no output"),
                               path=volume)
        time.sleep(0.05)
    try:
        device = _run(["losetup", "-f", "--show", "--direct-io=on"] + (["-r"] if readonly else []) + [disk])
    except BaseException:
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        daemon.wait(30)
        os.rmdir(mnt)
        raise
    done = Attachment(device, mnt, daemon.pid, volume, snapshot, readonly, log_path, _metrics_url(log_path))
    with open(_state_path(device), "w") as f:
        json.dump(asdict(done), f)
    return done


def _metrics_url(log_path: str) -> str | None:
    """The URL the daemon said it serves its metrics at (it says so before its file appears)."""
    with open(log_path) as f:
        for line in f:
            if line.startswith(METRICS_AT):
                return line[len(METRICS_AT):].strip()
    return None


def _state_path(device: str) -> str:
    return os.path.join(STATE, os.path.basename(device) + ".json")


def attachment(device: str) -> Attachment:
    """What ``attach`` recorded for ``device``."""
    path = _state_path(device)
    try:
        with open(path) as f:
            return Attachment(**json.load(f))
    except FileNotFoundError:
        raise UsageError(f"{device} was not attached by overlaybd", path=path) from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"unreadable attachment record: {exc}", path=path) from None


def detach(device: str, *, timeout: float = 30.0) -> None:
    """Free the loop device, unmount the FUSE export, wait for the daemon to flush and exit."""
    require_root()
    state = attachment(device)
    name = os.path.basename(device)
    holders = f"/sys/block/{name}/holders"
    if os.path.isdir(holders) and os.listdir(holders):
        raise UsageError(f"{device} is in use by {', '.join(os.listdir(holders))}")
    if os.path.exists(f"/sys/block/{name}/loop/backing_file"):
        _run(["losetup", "-d", device])
    # the loop device lets go of the file asynchronously; the FUSE mount is busy until it does
    deadline = time.monotonic() + timeout
    while True:
        res = subprocess.run(["fusermount3", "-u", state.mountpoint], capture_output=True, text=True)
        if res.returncode == 0 or not os.path.ismount(state.mountpoint):
            break
        if time.monotonic() > deadline:
            raise LayerIOError(f"cannot unmount the FUSE export: {res.stderr.strip()}", path=state.mountpoint)
        time.sleep(0.1)
    deadline = time.monotonic() + 2 * timeout
    while _alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(state.pid):
        os.kill(state.pid, signal.SIGTERM)
    os.rmdir(state.mountpoint)
    _forget(device, state)
    if os.path.exists(state.log):
        os.unlink(state.log)


def _forget(device: str, state: Attachment) -> None:
    """Remove ``device``'s record if it is still ours: once the loop device was freed, another ``attach`` may
    have taken the same device and written its own record, which must stay."""
    try:
        if attachment(device).mountpoint != state.mountpoint:
            return
        os.unlink(_state_path(device))
    except (UsageError, FileNotFoundError):
        pass


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
