"""The mutational fuzzer, in a child process whose address space is capped (a huge allocation fails there as a
MemoryError, which is a finding) and watched for hangs.

* ``test_regressions``: every problem ever found (``regressions.py``), replayed.
* ``test_random_mutants``: seeded random mutants for ``OVERLAYBD_FUZZ_SECONDS`` (default 40) from
  ``OVERLAYBD_FUZZ_SEED`` (default fixed, so a CI run is repeatable); ``OVERLAYBD_FUZZ_HEAVY=1`` adds the 4.7 MB
  ext4 base layer. A longer local run: ``OVERLAYBD_FUZZ_SECONDS=600 OVERLAYBD_FUZZ_SEED=$RANDOM pytest
  tests/fuzz -k random``. Each problem is printed with its ``(seed, steps)``, ready for ``regressions.py``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from overlaybd.formats.zfile import blocks

from ..conftest import FIXTURES, PROJECT
from ..native import require_extension
from .regressions import REGRESSIONS

pytestmark = pytest.mark.fixtures

MEMORY = 1 << 30  # beyond the child's start-up size
HANG = 120.0  # seconds without a word from the child: the mutant in progress hangs
DEFAULT_SEED = 20261203


@pytest.fixture
def fixtures() -> Path:
    if not (FIXTURES / "reference" / "MANIFEST.json").exists():
        pytest.skip(f"{FIXTURES} is absent: the fuzzer mutates the reference fixtures from ../shared/fixtures")
    require_extension(blocks.NATIVE, "overlaybd.formats.zfile._blocks")  # the two paths are compared
    return FIXTURES


def run_worker(job: dict[str, Any], workdir: Path, timeout: float) -> tuple[list[str], dict[str, Any]]:
    """Problems found (each with its mutant), and the worker's closing counts."""
    job = {**job, "fixtures": str(FIXTURES), "workdir": str(workdir), "memory": MEMORY}
    errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child never blocks on it
    proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker"], cwd=PROJECT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=errors, bufsize=0)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(job).encode())
    proc.stdin.close()
    problems: list[str] = []
    current: Any = None
    end: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    pending = b""
    try:
        while True:  # unbuffered: a line the child wrote is seen as soon as it is written
            ready, _, _ = select.select([proc.stdout], [], [], HANG)
            if not ready or time.monotonic() > deadline:
                proc.kill()
                problems.append(f"no answer for {HANG:.0f} s (a hang?) while running {json.dumps(current)}")
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                event = json.loads(line)
                if event["event"] == "start":
                    current = event["entry"]
                elif event["event"] == "done" and event["problems"]:
                    problems.append(f"mutant {json.dumps(current)}:\n  " + "\n  ".join(event["problems"]))
                elif event["event"] == "baseline":
                    problems.append(f"unmutated seed {event['seed']}:\n  " + "\n  ".join(event["problems"]))
                elif event["event"] in ("paths", "end"):
                    end.update(event)
    finally:
        proc.wait(timeout=30)
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")[-20000:]
        errors.close()
    if proc.returncode not in (0, -9):
        problems.append(f"the worker died (exit {proc.returncode}) while running {json.dumps(current)}:\n{stderr}")
    return problems, end


def test_regressions(fixtures: Path, tmp_path: Path) -> None:
    problems, end = run_worker({"replay": REGRESSIONS}, tmp_path, timeout=600)
    assert not problems, "\n".join(problems)
    assert end.get("count") == len(REGRESSIONS) and end.get("paths") == ["native", "python"], end


def test_random_mutants(fixtures: Path, tmp_path: Path) -> None:
    seconds = float(os.environ.get("OVERLAYBD_FUZZ_SECONDS", "40"))
    seed = int(os.environ.get("OVERLAYBD_FUZZ_SEED", str(DEFAULT_SEED)))
    heavy = os.environ.get("OVERLAYBD_FUZZ_HEAVY") == "1"
    problems, end = run_worker({"seed": seed, "seconds": seconds, "heavy": heavy}, tmp_path,
                               timeout=seconds + 600)
    summary = f"seed {seed}, {end.get('count')} mutants in {seconds:.0f} s"
    print(summary, json.dumps(end.get("stats", {}), indent=1, sort_keys=True))
    assert not problems, summary + "\n" + "\n".join(problems[:30])
    assert end.get("count", 0) > 0 and end.get("paths") == ["native", "python"], end
