"""``check VOL`` checks each layer of a volume (its snapshots, then its upper); ``info VOL`` describes its device."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from overlaybd.cli.main import main
from overlaybd.volume import Volume


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _volume(path: Path) -> Volume:
    vol = Volume.create(str(path), 1 << 20)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, b"a" * 8192)
    vol.snapshot("one")
    with vol.open(writable=True) as dev:
        dev.pwrite(4096, b"b" * 4096)
    return vol


def test_check_of_a_volume_checks_each_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol = _volume(tmp_path / "vol")
    rc, out, err = _run(capsys, "check", vol.path)
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2, out + err
    assert lines[0].startswith(f"{vol.lowers[0]}: lsmt") and lines[0].endswith("ok (1 records)")
    assert lines[1].startswith(f"{vol.upper[0]}: lsmt-writable: ok (1 records)")
    rc, out, err = _run(capsys, "info", vol.path)
    assert rc == 0 and "format: lsmt-stack" in out and vol.lowers[0] in out and vol.upper[0] in out, out + err


def test_check_of_a_volume_reports_a_corrupt_or_missing_layer(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    vol = _volume(tmp_path / "vol")
    layer = vol.lowers[0]
    os.truncate(layer, os.path.getsize(layer) - 100)  # the trailer and index cut short
    rc, out, _ = _run(capsys, "check", vol.path)
    assert rc == 2 and f"{layer}: " in out and ": corrupt" in out and f"{vol.upper[0]}: lsmt-writable: ok" in out
    os.unlink(layer)
    rc, out, _ = _run(capsys, "check", vol.path)
    assert rc == 2 and f"{layer}: ?: corrupt" in out and "snapshot 0: layer file is missing" in out, out
    config = json.loads(Path(vol.path, "config.json").read_text())  # as a lazy pull records it
    config["lowers"][0]["digest"] = "sha256:" + "0" * 64
    Path(vol.path, "config.json").write_text(json.dumps(config))
    rc, out, _ = _run(capsys, "check", vol.path)
    assert rc == 0 and f"{layer}: remote: ok" in out and "in its repository (pulled lazily): not checked" in out


def test_check_of_a_directory_that_is_no_volume_is_one_error(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "check", tmp_path)
    assert rc == 1 and out == ""
    assert err.splitlines() == [f"overlaybd: error: {tmp_path}: not a volume (no config.json)"]


@pytest.mark.parametrize("which", [0, 1])
def test_check_of_a_volume_reports_a_missing_upper_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       which: int) -> None:
    """A missing data or index file of the upper is corruption of the volume, as a missing snapshot is: the
    other layers are still checked and the exit status is 2 (not one error line and status 1)."""
    vol = _volume(tmp_path / "vol")
    gone = vol.upper[which]
    os.unlink(gone)
    rc, out, err = _run(capsys, "check", vol.path)
    assert rc == 2, out + err
    assert out.splitlines()[0].endswith("ok (1 records)")  # the snapshot
    assert f"error: upper: {gone}: file is missing" in out, out
