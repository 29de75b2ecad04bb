"""``info``, ``map``, ``check`` and ``cat`` on files that declare absurd sizes: one error line naming the file and
offset and exit 1 (``check``: the file is corrupt, exit 2), no traceback, nothing left behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from overlaybd.cli.main import main

from ...oracle import LSMT_HEADER, lsmt_record_patch
from .test_absurd import _huge_extended_header

pytestmark = pytest.mark.fixtures


def _lsmt(virtual_size: int, *, header: bool, trailer: bool) -> Callable[[Path, Path], Path]:
    def make(reference_dir: Path, tmp: Path) -> Path:
        data = bytearray((reference_dir / "b/layer2.lsmt").read_bytes())
        at = len(data) - LSMT_HEADER
        for where, wanted in ((0, header), (at, trailer)):
            if wanted:
                data[where : where + LSMT_HEADER] = lsmt_record_patch(data, where, virtual_size=virtual_size)
        path = tmp / "absurd.lsmt"
        path.write_bytes(bytes(data))
        return path

    return make


CASES: dict[str, Callable[[Path, Path], Path]] = {
    # the layer of issue 8 item 10: cat ended in an OverflowError traceback, check said ok
    "virtual-size-2^63": _lsmt(1 << 63, header=True, trailer=True),
    "trailer-virtual-size-2^64-1": _lsmt((1 << 64) - 1, header=False, trailer=True),
    "header-virtual-size-2^59+512": _lsmt((1 << 59) + 512, header=True, trailer=False),
    "tar-pax-1.5GiB": lambda _ref, tmp: _huge_extended_header(tmp, b"x"),
    "tar-gnu-long-name-1.5GiB": lambda _ref, tmp: _huge_extended_header(tmp, b"L"),
}


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_absurd_sizes_are_one_error_line(case: str, reference_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = CASES[case](reference_dir, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (["info", path], ["map", path], ["cat", path, "-o", out_dir / "device.raw"]):
        rc, out, err = _run(capsys, *argv)
        lines = err.splitlines()
        assert rc == 1 and len(lines) == 1, f"{argv[0]}: exit {rc}\n{err}"
        assert lines[0].startswith(f"overlaybd: error: {path}: offset "), lines[0]
        assert "Traceback" not in out + err
    assert os.listdir(out_dir) == []
    rc, out, err = _run(capsys, "check", path)
    assert rc == 2 and f"{path}: " in out and ": corrupt" in out and "offset" in out, out + err


def test_a_device_the_output_file_system_cannot_hold(reference_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A valid layer of 256 PiB: ``check`` is right to say ok; ``cat`` either writes the sparse file (a file system
    that holds it) or says in one line, before copying anything, that the output cannot be that large."""
    path = _lsmt(1 << 58, header=True, trailer=True)(reference_dir, tmp_path)
    rc, out, err = _run(capsys, "check", path)
    assert rc == 0 and ": ok" in out, out + err
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, out, err = _run(capsys, "cat", path, "-o", out_dir / "device.raw")
    if rc == 0:
        assert (out_dir / "device.raw").stat().st_size == 1 << 58
        return
    lines = err.splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"overlaybd: error: {out_dir / 'device.raw'}: "), err
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("content", [b"", b"L", bytes(8192), b"\x89PNG\r\n\x1a\n" + bytes(600)])
def test_check_of_a_file_without_any_magic_is_not_ok(content: bytes, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A layer whose magic is destroyed (or any other file) is no layer: ``check`` used to print 'raw: ok' for it
    while ``cat`` refused it."""
    path = tmp_path / "no-magic.bin"
    path.write_bytes(content)
    rc, out, err = _run(capsys, "check", path)
    assert rc == 2 and f"{path}: raw: corrupt" in out and "not an LSMT layer" in out, out + err
    rc, out, err = _run(capsys, "cat", path, "-o", tmp_path / "out.raw")
    assert rc == 1 and len(err.splitlines()) == 1 and "not an LSMT layer" in err, err
