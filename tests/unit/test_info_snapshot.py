"""``overlaybd info VOL@SNAP``: a snapshot of a volume described as the stack of its layers up to it, the snapshot
named as ``log``, ``cat`` and ``export`` name it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from overlaybd.volume import Volume

OVERLAYBD = [sys.executable, "-m", "overlaybd.cli.main"]


def _info(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERLAYBD, "info", *args, "--output", "json"], capture_output=True, text=True,
                          timeout=60)


def test_info_describes_a_snapshot_of_a_volume(tmp_path: Path) -> None:
    vol = Volume.create(str(tmp_path / "vol"), 16 << 20)
    for off, n in ((0, 4096), (8192, 8192), (1 << 20, 65536)):
        with vol.open(writable=True) as dev:
            dev.pwrite(off, b"x" * n)
        vol.snapshot(f"at {off}")
    for ref, layers, data in (("0", 1, 4096), ("1", 2, 12288), ("HEAD", 3, 12288 + 65536), ("HEAD~2", 1, 4096)):
        out = _info(f"{vol.path}@{ref}")
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        assert (got["snapshot"], len(got["layers"]), got["bytes"]["data"]) == (layers - 1, layers, data), ref
    whole = json.loads(_info(vol.path).stdout)
    assert "snapshot" not in whole and len(whole["layers"]) == 3


def test_info_of_a_snapshot_that_is_not_there_is_a_one_line_error(tmp_path: Path) -> None:
    vol = Volume.create(str(tmp_path / "vol"), 1 << 20)
    out = _info(f"{vol.path}@5")
    assert out.returncode != 0 and out.stderr.startswith("overlaybd: error:") and len(out.stderr.splitlines()) == 1
    out = _info(f"{tmp_path / 'nothing'}@1")
    assert out.returncode != 0 and "is not a volume" in out.stderr and len(out.stderr.splitlines()) == 1
