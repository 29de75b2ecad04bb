"""The command line on bad input: one line on stderr, ``overlaybd: error: FILE: ...``, a non-zero exit (1 for
errors, 2 for bad usage), no traceback, and no half-written output. ``check`` and ``zfile verify`` report
corruption they find as their result (exit 2, the report names the file); an input they cannot even open is an
error like any other (exit 1), not corruption.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlaybd.cli.main import main

from ..oracle import parse_zfile

pytestmark = pytest.mark.fixtures


@dataclass(frozen=True)
class Inputs:
    good_lsmt: Path
    truncated_lsmt: Path
    truncated_zfile: Path
    flipped_zfile: Path  # a CRC'd LSMT ZFile with a byte of block FLIPPED_BLOCK flipped
    flipped_raw_zfile: Path  # a CRC'd ZFile of plain bytes, same block flipped
    missing: Path
    directory: Path
    random: Path
    out_dir: Path  # empty: outputs go here, and it must stay empty after a failure


FLIPPED_BLOCK = 5


def _flip_block(src: Path, dst: Path, block: int) -> None:
    data = bytearray(src.read_bytes())
    lay = parse_zfile(data)
    data[lay.starts[block] + 7] ^= 0xFF
    dst.write_bytes(bytes(data))


@pytest.fixture
def inputs(reference_dir: Path, tmp_path: Path) -> Inputs:
    good = tmp_path / "good.lsmt"
    shutil.copyfile(reference_dir / "b/layer2.lsmt", good)
    trunc = tmp_path / "truncated.lsmt"
    trunc.write_bytes((reference_dir / "a/committed.lsmt").read_bytes()[:200_000])
    ztrunc = tmp_path / "truncated.zfile"
    ztrunc.write_bytes((reference_dir / "c/layer1.lz4.bs4k.zfile").read_bytes()[:300_000])
    flipped = tmp_path / "flipped.zfile"
    _flip_block(reference_dir / "c/layer1.lz4.bs4k.zfile", flipped, FLIPPED_BLOCK)
    flipped_raw = tmp_path / "flipped_raw.zfile"
    _flip_block(reference_dir / "c/raw_odd.lz4.bs4k.zfile", flipped_raw, FLIPPED_BLOCK)
    directory = tmp_path / "a_directory"
    directory.mkdir()
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(random.Random(7).randbytes(65536))
    out = tmp_path / "out"
    out.mkdir()
    return Inputs(good, trunc, ztrunc, flipped, flipped_raw, tmp_path / "missing.lsmt", directory, rnd, out)


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(result: tuple[int, str, str], rc: int, *names: object) -> str:
    """Exit ``rc``; stderr is exactly one line ``overlaybd: error: ...`` naming each of ``names``."""
    code, out, err = result
    assert "Traceback" not in out + err, out + err
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr has {len(lines)} lines:\n{err}"
    assert lines[0].startswith("overlaybd: error: "), lines[0]
    for name in names:
        assert str(name) in lines[0], f"{name} not in: {lines[0]}"
    assert code == rc, f"exit {code}, expected {rc}: {lines[0]}"
    return lines[0]


def assert_left_nothing(where: Path) -> None:
    assert sorted(os.listdir(where)) == [], f"left behind in {where}: {os.listdir(where)}"


# -- corrupt inputs: exit 1 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["info", "{truncated_lsmt}"],
    ["info", "{truncated_zfile}"],
    ["map", "{truncated_lsmt}"],
    ["map", "{good_lsmt}", "{truncated_zfile}"],
    ["info", "{good_lsmt}", "{truncated_lsmt}"],
    ["map", "{random}"],
])
def test_corrupt_input_is_one_error_line(command: list[str], inputs: Inputs,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(**inputs.__dict__) for a in command]
    bad = next(a for a in argv[1:] if "good" not in a)
    assert_one_error(run(capsys, *argv), 1, bad)


@pytest.mark.parametrize("command", [
    ["cat", "{truncated_lsmt}", "-o", "{out}"],
    ["cat", "{good_lsmt}", "{flipped_zfile}", "-o", "{out}"],
    ["zfile", "decompress", "{flipped_raw_zfile}", "{out}"],
    ["zfile", "decompress", "{truncated_zfile}", "{out}"],
    ["layer", "commit", "{truncated_lsmt}", "{out}"],
    ["layer", "commit", "{flipped_zfile}", "{out}"],
    ["layer", "merge", "{good_lsmt}", "{truncated_lsmt}", "-o", "{out}"],
    ["layer", "merge", "{flipped_zfile}", "{good_lsmt}", "-o", "{out}"],
])
def test_corrupt_input_leaves_no_output(command: list[str], inputs: Inputs,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = inputs.out_dir / "result"
    fields = {**inputs.__dict__, "out": out}
    argv = [a.format(**fields) for a in command]
    bad = next(a for a in argv[1:] if "truncated" in a or "flipped" in a)
    line = assert_one_error(run(capsys, *argv), 1, bad)
    if "flipped" in bad:
        assert f"block {FLIPPED_BLOCK}" in line and "offset" in line, line
    assert_left_nothing(inputs.out_dir)


# -- check and zfile verify: corruption is their result (exit 2) -----------------------------------------------------


@pytest.mark.parametrize("which", ["flipped_zfile", "flipped_raw_zfile", "truncated_zfile", "truncated_lsmt"])
def test_check_reports_corruption(which: str, inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    path = getattr(inputs, which)
    rc, out, err = run(capsys, "check", path)
    assert "Traceback" not in out + err
    assert rc == 2, out + err
    report = [ln for ln in out.splitlines() if "error" in ln]
    assert report and str(path) in out, out
    if "flipped" in which:
        assert f"block {FLIPPED_BLOCK}" in out, out
    rc, out, err = run(capsys, "check", "--output", "json", path)
    assert rc == 2
    doc = json.loads(out)
    assert doc["errors"] and str(path) in doc["errors"][0], doc


@pytest.mark.parametrize("which", ["flipped_zfile", "flipped_raw_zfile", "truncated_zfile"])
def test_zfile_verify_reports_corruption(which: str, inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    path = getattr(inputs, which)
    rc, out, err = run(capsys, "zfile", "verify", path)
    assert "Traceback" not in out + err
    assert rc == 2, out + err
    assert str(path) in out and "corrupt" in out, out
    if "flipped" in which:
        assert f"block {FLIPPED_BLOCK}" in out, out
    rc, out, err = run(capsys, "zfile", "verify", "--output", "json", path)
    doc = json.loads(out)
    assert rc == 2 and doc["ok"] is False and str(path) in doc["error"], doc


@pytest.mark.parametrize("which", ["missing", "directory"])
def test_check_of_unopenable_input_is_an_error_not_corruption(which: str, inputs: Inputs,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """As ``qemu-img check``: 2 means "corruption found"; a file that cannot be read was not checked at all."""
    path = getattr(inputs, which)
    assert_one_error(run(capsys, "check", path), 1, path)


# -- inputs that are not files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["missing", "directory"])
@pytest.mark.parametrize("command", [
    ["info", "{p}"],
    ["map", "{p}"],
    ["cat", "{p}", "-o", "{out}"],
    ["zfile", "verify", "{p}"],
    ["zfile", "decompress", "{p}", "{out}"],
    ["zfile", "compress", "{p}", "{out}"],
    ["layer", "commit", "{p}", "{out}"],
])
def test_unopenable_input(which: str, command: list[str], inputs: Inputs,
                          capsys: pytest.CaptureFixture[str]) -> None:
    path = getattr(inputs, which)
    argv = [a.format(p=path, out=inputs.out_dir / "result") for a in command]
    assert_one_error(run(capsys, *argv), 1, path)
    assert_left_nothing(inputs.out_dir)


# -- usage errors: exit 2 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["10X", "1.5G", "-5", "", "G", "12 34"])
def test_bad_size_string(size: str, inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    data, index = inputs.out_dir / "l.data", inputs.out_dir / "l.index"
    line = assert_one_error(run(capsys, "layer", "create", data, index, size), 2)
    assert repr(size) in line or size in line, line
    assert_left_nothing(inputs.out_dir)


@pytest.mark.parametrize("command", [
    ["zfile", "compress", "{good_lsmt}", "{out}"],
    ["zfile", "decompress", "{flipped_zfile}", "{out}"],
    ["cat", "{good_lsmt}", "-o", "{out}"],
    ["layer", "commit", "{good_lsmt}", "{out}"],
    ["layer", "merge", "{good_lsmt}", "-o", "{out}"],
])
def test_existing_output_without_force(command: list[str], inputs: Inputs,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = inputs.out_dir / "precious"
    out.write_bytes(b"keep me")
    argv = [a.format(**{**inputs.__dict__, "out": out}) for a in command]
    line = assert_one_error(run(capsys, *argv), 2, out)
    assert "exists" in line, line
    assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(inputs.out_dir)) == ["precious"], os.listdir(inputs.out_dir)


@pytest.mark.parametrize("command", [
    ["zfile", "verify", "{good_lsmt}"],
    ["zfile", "decompress", "{good_lsmt}", "{out}"],
])
def test_not_a_zfile(command: list[str], inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(**{**inputs.__dict__, "out": inputs.out_dir / "result"}) for a in command]
    line = assert_one_error(run(capsys, *argv), 2, inputs.good_lsmt)
    assert "not a ZFile" in line, line
    assert_left_nothing(inputs.out_dir)


def test_output_in_missing_directory(inputs: Inputs, capsys: pytest.CaptureFixture[str]) -> None:
    out = inputs.out_dir / "no" / "such" / "dir" / "x.zfile"
    assert_one_error(run(capsys, "zfile", "compress", inputs.good_lsmt, out), 1, out.parent)


# -- the real executable -------------------------------------------------------------------------------------------


def _executable() -> list[str]:
    script = Path(sys.executable).parent / "overlaybd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "overlaybd.cli.main"]


@pytest.mark.parametrize("command, rc", [
    (["info", "{truncated_lsmt}"], 1),
    (["cat", "{flipped_zfile}", "-o", "{out}"], 1),
    (["zfile", "verify", "{flipped_raw_zfile}"], 2),
    (["check", "{missing}"], 1),
    (["layer", "create", "{out}", "{out}.index", "10X"], 2),
])
def test_executable(command: list[str], rc: int, inputs: Inputs) -> None:
    argv = [a.format(**{**inputs.__dict__, "out": inputs.out_dir / "result"}) for a in command]
    proc = subprocess.run(_executable() + argv, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode == rc, (proc.returncode, proc.stdout, proc.stderr)
    if rc == 1 or command[0] != "zfile":
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("overlaybd: error: "), proc.stderr
    assert_left_nothing(inputs.out_dir)
