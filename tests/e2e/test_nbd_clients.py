"""Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against ``overlaybd serve``, over unix and TCP."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

import overlaybd

from .nbd_helpers import require, run, served

pytestmark = pytest.mark.slow


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def b_layers(reference_dir: Path) -> list[str]:
    return [str(reference_dir / f"b/layer{i}.lsmt") for i in (1, 2, 3)]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qemu_img_reads_the_stack(tmp_path: Path, b_layers: list[str], manifest: dict[str, Any],
                                  transport: str) -> None:
    require("qemu-img")
    want = manifest["ground_truth"]["b123"]
    listen = None if transport == "unix" else "tcp:127.0.0.1:0"
    with served(b_layers, tmp_path, listen) as uri:
        info = json.loads(run("qemu-img", "info", "--output=json", uri))
        assert info["virtual-size"] == want["size"]
        run("qemu-img", "convert", "-O", "raw", uri, str(tmp_path / "out.raw"))
        assert sha(tmp_path / "out.raw") == want["sha256"]
        # map comes from base:allocation: what it calls data must be what the stack calls data
        mapped = json.loads(run("qemu-img", "map", "--output=json", uri))
        with overlaybd.open_stack(b_layers) as stack:
            ours = [(e.offset, e.length) for e in stack.extents() if e.kind is overlaybd.ExtentKind.DATA]
        # qemu calls a ZERO extent (zeroed record: allocated, reads as zeros) "data": true, "zero": true
        theirs = [(m["start"], m["length"]) for m in mapped if m["data"] and not m["zero"]]
        assert _union(theirs) == _union(ours)
        bench = run("qemu-img", "bench", "-f", "raw", "-c", "2000", "-d", "8", "-s", "4096", "-S", str(4096 * 104729),
                    uri)
        assert "Run completed" in bench
        flat = tmp_path / "flat.raw"
        run("qemu-img", "convert", "-O", "raw", uri, str(flat))
        assert "identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(flat), uri)


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def test_qemu_io_writes_discards_and_zeroes(tmp_path: Path, b_layers: list[str]) -> None:
    require("qemu-io")
    data, index = str(tmp_path / "up.data"), str(tmp_path / "up.index")
    overlaybd.create(data, index, 32 << 20)
    with served([*b_layers, "--upper", data, index], tmp_path) as uri:
        run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1000 5000", "-c", "write -P 0xcd 1048576 65536",
            "-c", "discard 2097152 131072", "-c", "write -z 4194304 8192", "-c", "flush", uri)
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1000 5000", "-c", "read -P 0xcd 1048576 65536",
                  "-c", "read -P 0 2097152 131072", "-c", "read -P 0 4194304 8192", uri)
        assert "Pattern verification failed" not in out
    # what was acknowledged is in the files: reopen without a server
    with overlaybd.open_stack(b_layers, upper=(data, index)) as stack:
        assert stack.pread(1000, 5000) == b"\xab" * 5000
        assert stack.pread(1048576, 65536) == b"\xcd" * 65536
        assert stack.pread(2097152, 131072) == bytes(131072)
        assert stack.pread(4194304, 8192) == bytes(8192)
        kinds = {e.kind for e in stack.extents(2097152, 131072)}
        assert kinds == {overlaybd.ExtentKind.ZERO}  # the discard is a zeroed record hiding the layers below


def test_readonly_export_refuses_writes(tmp_path: Path, b_layers: list[str]) -> None:
    require("qemu-io")
    with served(b_layers, tmp_path) as uri:
        out = subprocess_run_fail("qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", uri)
        assert "Operation not permitted" in out or "read-only" in out.lower() or "Permission" in out


def subprocess_run_fail(*cmd: str) -> str:
    import subprocess

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return res.stdout + res.stderr


def test_nbdinfo_and_nbdcopy(tmp_path: Path, b_layers: list[str], manifest: dict[str, Any]) -> None:
    require("nbdinfo")
    require("nbdcopy")
    with served(b_layers, tmp_path, "tcp:127.0.0.1:0") as uri:
        info = json.loads(run("nbdinfo", "--json", uri))
        export = info["exports"][0]
        assert export["export-size"] == manifest["ground_truth"]["b123"]["size"]
        assert "base:allocation" in export["contexts"]
        assert export["is_read_only"] is True
        listing = run("nbdinfo", "--list", uri)
        assert "export" in listing.lower()
        run("nbdcopy", uri, str(tmp_path / "copy.raw"))
        assert sha(tmp_path / "copy.raw") == manifest["ground_truth"]["b123"]["sha256"]
        status = run("nbdinfo", "--map", uri)
        assert "hole" in status and "data" in status
