"""Starting ``overlaybd serve`` for tests, and requiring the real NBD clients."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

OVERLAYBD = [sys.executable, "-m", "overlaybd.cli.main"]


def require(tool: str) -> str:
    """Real clients are part of the test: a missing one fails the test (CI installs them), it does not skip."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run ./scripts/setup.sh (Debian qemu-utils / libnbd-bin)")
    return path


@dataclass
class Server:
    """A running ``overlaybd serve``: its NBD URI, its process, and the file its stderr goes to."""

    uri: str
    proc: subprocess.Popen[str]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        """Resident memory of the server process, bytes (``VmRSS`` of /proc/PID/status)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")


@contextmanager
def serving(args: list[str], tmp: Path, listen: str | None = None, name: str = "serve") -> Iterator[Server]:
    """Run ``overlaybd serve ARGS``; stop it with SIGTERM and check it exits cleanly, without a traceback."""
    listen = listen or f"unix:{tmp / 'nbd.sock'}"
    log_path = tmp / f"{name}.err"
    err = open(log_path, "w+")
    proc = subprocess.Popen([*OVERLAYBD, "serve", *args, "--listen", listen], stdout=subprocess.PIPE, stderr=err,
                            stdin=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri.startswith("nbd"):
            proc.wait(timeout=10)
            err.seek(0)
            pytest.fail(f"overlaybd serve did not start: {err.read()}")
        yield Server(uri, proc, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        err.seek(0)
        log = err.read()
        err.close()
        assert code == 0, f"overlaybd serve exited {code}: {log}"
        assert "Traceback" not in log, log


@contextmanager
def served(args: list[str], tmp: Path, listen: str | None = None) -> Iterator[str]:
    """Run ``overlaybd serve ARGS`` and yield its NBD URI; stop it with SIGTERM and check it exits cleanly."""
    with serving(args, tmp, listen) as server:
        yield server.uri


def wait_for(what: str, condition: Callable[[], bool], deadline: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it does not within ``deadline`` seconds (a guard
    against hanging, not a measure of speed)."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline:g} s")
        time.sleep(0.05)


def run(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}{out.stdout}"
    return out.stdout
