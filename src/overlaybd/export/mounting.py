"""A volume's ext4 mounted on a directory, and unmounted.

* as root (the default for root): the volume attached as ``/dev/loopN`` (``export.loop``) and mounted
  ``-o ro``; ``writable="overlay"`` puts an overlayfs upper over that read-only mount (what the reference
  snapshotter does by default), ``writable="volume"`` mounts it read-write so writes land in the volume's upper;
* rootless: the volume's single-file FUSE export served by a daemon of ours (no ``allow_other``), and ``fuse2fs``
  (e2fsprogs) mounting the ext4 in that file, ``-o ro,fakeroot`` (``writable="volume"``: read-write).

Each mount is recorded in ``HOME/mount.json`` (``HOME`` under ``$OVERLAYBD_MOUNTS``, else
``/var/lib/overlaybd/mounts`` as root, ``$XDG_DATA_HOME/overlaybd/mounts`` otherwise, one per mount directory), so
``umount`` undoes it in the order that works, and removes a volume the mount pulled for itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from ..errors import LayerIOError, UsageError
from . import loop

RECORD = "mount.json"
#: the rootless FUSE daemon: ``overlaybd mount-daemon VOLUME MOUNTPOINT [--writable]``
DAEMON = [sys.executable, "-m", "overlaybd.cli.main", "mount-daemon"]
WRITABLE_MODES = ("overlay", "volume")


@dataclass
class Mounted:
    directory: str
    home: str
    volume: str
    pulled: bool  # the volume is the mount's own (pulled for it): umount removes it
    mode: str  # "kernel" or "fuse2fs"
    writable: str | None
    device: str | None = None
    lower: str | None = None  # the read-only ext4 mount under an overlay
    fuse: str | None = None  # the FUSE export's mountpoint (rootless)
    daemon_pid: int | None = None


def mounts_root() -> str:
    env = os.environ.get("OVERLAYBD_MOUNTS")
    if env:
        return os.path.abspath(env)
    if os.geteuid() == 0:
        return "/var/lib/overlaybd/mounts"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "overlaybd", "mounts")


def home_for(directory: str) -> str:
    """The folder that holds what a mount on ``directory`` needs (its record, a pulled volume, an upper)."""
    key = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
    return os.path.join(mounts_root(), key)


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode:
        raise LayerIOError(f"{' '.join(cmd)}: {res.stderr.strip() or f'exit {res.returncode}'}")
    return res.stdout.strip()


def check_directory(directory: str) -> str:
    path = os.path.realpath(directory)
    if not os.path.isdir(path):
        raise UsageError("the mount point must be an existing directory", path=directory)
    if os.path.ismount(path):
        raise UsageError("something is mounted there already", path=directory)
    if os.path.exists(os.path.join(home_for(path), RECORD)):
        raise UsageError("overlaybd has a mount recorded there (overlaybd umount it first)", path=directory)
    return path


def mount(volume: str, directory: str, *, home: str, rootless: bool, writable: str | None, pulled: bool
          ) -> Mounted:
    """Mount ``volume``'s ext4 on ``directory`` (see the module docstring). ``home`` holds the record."""
    if writable not in (None, *WRITABLE_MODES):
        raise UsageError(f"writable: {writable!r} ({' or '.join(WRITABLE_MODES)})")
    if rootless and writable == "overlay":
        raise UsageError("an overlayfs upper needs root: use --writable volume with --rootless")
    if not rootless and os.geteuid() != 0:
        raise UsageError("mounting through the kernel needs root: use --rootless (fuse2fs)")
    path = os.path.realpath(directory)
    os.makedirs(home, exist_ok=True)
    done = Mounted(path, home, os.path.abspath(volume), pulled, "fuse2fs" if rootless else "kernel", writable)
    try:
        if rootless:
            _mount_fuse2fs(done)
        else:
            _mount_kernel(done)
    except BaseException:
        _undo(done)
        raise
    with open(os.path.join(home, RECORD), "w") as f:
        json.dump(asdict(done), f)
    return done


def _mount_kernel(m: Mounted) -> None:
    m.device = loop.attach(m.volume, readonly=m.writable != "volume").device
    if m.writable == "overlay":
        m.lower = os.path.join(m.home, "lower")
        for sub in ("lower", "upper", "work"):
            os.makedirs(os.path.join(m.home, sub), exist_ok=True)
        _run(["mount", "-t", "ext4", "-o", "ro", m.device, m.lower])
        _run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={m.lower},upperdir={m.home}/upper,"
              f"workdir={m.home}/work", m.directory])
    else:
        _run(["mount", "-t", "ext4", "-o", "rw" if m.writable == "volume" else "ro", m.device, m.directory])


def _mount_fuse2fs(m: Mounted, timeout: float = 30.0) -> None:
    if shutil.which("fuse2fs") is None:
        raise UsageError("a rootless mount needs fuse2fs (Debian package fuse2fs)")
    m.fuse = os.path.join(m.home, "disk")
    os.makedirs(m.fuse, exist_ok=True)
    log_path = os.path.join(m.home, "daemon.log")
    cmd = [*DAEMON, m.volume, m.fuse] + (["--writable"] if m.writable == "volume" else [])
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    m.daemon_pid = daemon.pid
    disk = os.path.join(m.fuse, "disk")
    deadline = time.monotonic() + timeout
    while not os.path.exists(disk):
        if daemon.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            raise LayerIOError("the FUSE export did not start: " + (lines[-1] if lines else "no output"),
                               path=m.volume)
        time.sleep(0.05)
    options = ("rw" if m.writable == "volume" else "ro") + ",fakeroot"
    _run(["fuse2fs", disk, m.directory, "-o", options])


def recorded(directory: str) -> Mounted:
    path = os.path.join(home_for(directory), RECORD)
    try:
        with open(path) as f:
            return Mounted(**json.load(f))
    except FileNotFoundError:
        raise UsageError("no overlaybd mount is recorded there", path=directory) from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"unreadable mount record: {exc}", path=path) from None


def umount(directory: str) -> Mounted:
    """Undo ``mount``: the file system, then what serves it; then the record (and a volume pulled for it)."""
    m = recorded(directory)
    _undo(m)
    return m


def _undo(m: Mounted, timeout: float = 30.0) -> None:
    if m.mode == "kernel":
        _undo_kernel(m)
    else:
        _undo_rootless(m, timeout)
    _forget(m)


def _undo_kernel(m: Mounted) -> None:
    """The ext4 (and the overlay's lower) unmounted, then the loop device detached unless it is gone already."""
    if os.path.ismount(m.directory):
        _run(["umount", m.directory])
    if m.lower and os.path.ismount(m.lower):
        _run(["umount", m.lower])
    if m.device:
        try:
            loop.attachment(m.device)
        except UsageError:
            return  # detached already
        loop.detach(m.device)


def _undo_rootless(m: Mounted, timeout: float) -> None:
    """fuse2fs unmounted, then our FUSE export (retried while fuse2fs lets go of the file as it exits), then its
    daemon waited for."""
    if os.path.ismount(m.directory):
        _run(["fusermount", "-u", m.directory])
    if m.fuse:
        deadline = time.monotonic() + timeout
        while os.path.ismount(m.fuse):
            res = subprocess.run(["fusermount3", "-u", m.fuse], capture_output=True, text=True)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LayerIOError(f"cannot unmount the FUSE export: {res.stderr.strip()}", path=m.fuse)
            time.sleep(0.1)
    if m.daemon_pid:
        _wait_gone(m.daemon_pid, timeout)


def _forget(m: Mounted) -> None:
    """The mount's own files removed: its whole folder when the volume was pulled for it, else only what the
    mount made (the record last, so an interrupted umount can be run again)."""
    if m.pulled:
        shutil.rmtree(m.home, ignore_errors=True)
        return
    if os.path.exists(os.path.join(m.home, "daemon.log")):
        os.unlink(os.path.join(m.home, "daemon.log"))
    for sub in ("lower", "work", "disk"):
        if os.path.isdir(os.path.join(m.home, sub)):
            shutil.rmtree(os.path.join(m.home, sub), ignore_errors=True)
    record = os.path.join(m.home, RECORD)
    if os.path.exists(record):
        os.unlink(record)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            pass
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1][:1] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)


def remove_home(home: str) -> None:
    """Remove a mount's folder (a mount that failed after pulling its volume there)."""
    shutil.rmtree(home, ignore_errors=True)
