"""Starting ``overlaybd serve`` for tests, and requiring the real NBD clients."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

OVERLAYBD = [sys.executable, "-m", "overlaybd.cli.main"]


def require(tool: str) -> str:
    """Real clients are part of the test: a missing one fails the test (CI installs them), it does not skip."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run ./scripts/setup.sh (Debian qemu-utils / libnbd-bin)")
    return path


@contextmanager
def served(args: list[str], tmp: Path, listen: str | None = None) -> Iterator[str]:
    """Run ``overlaybd serve ARGS`` and yield its NBD URI; stop it with SIGTERM and check it exits cleanly."""
    listen = listen or f"unix:{tmp / 'nbd.sock'}"
    err = open(tmp / "serve.err", "w+")
    proc = subprocess.Popen([*OVERLAYBD, "serve", *args, "--listen", listen], stdout=subprocess.PIPE, stderr=err,
                            stdin=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri.startswith("nbd"):
            proc.wait(timeout=10)
            err.seek(0)
            pytest.fail(f"overlaybd serve did not start: {err.read()}")
        yield uri
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


def run(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}{out.stdout}"
    return out.stdout
