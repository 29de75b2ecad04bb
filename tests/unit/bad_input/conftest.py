"""Fixtures of the bad-input tests: the unmutated baselines (checked against the manifest) and a tiny file system."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ...oracle import (
    BytesImage,
    LsmtImage,
    Reads,
    expect_lsmt_file,
    expect_writable,
    parse_zfile,
    pax_record_span,
    zfile_decompress,
)
from .common import (
    RAW_LSMT,
    RAW_ZFILE,
    TAR,
    ZFILES,
    Baseline,
    device_sha,
)


@pytest.fixture(scope="session")
def baselines(reference_dir: Path, manifest: dict[str, Any]) -> dict[str, Baseline]:
    out: dict[str, Baseline] = {}
    for rel in (*RAW_LSMT, *ZFILES, TAR):
        path = reference_dir / rel
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][rel]["sha256"], rel
        b = Baseline(rel, path, data)
        inner = data
        if rel == TAR:
            start, end = pax_record_span(data)
            size = int(data[start:end].split(b"size=")[1])
            b.zlayout = parse_zfile(data, 1536, size)
        elif rel in ZFILES:
            b.zlayout = parse_zfile(data)
        if b.zlayout is not None:
            inner = zfile_decompress(data, b.zlayout)
            b.stream = BytesImage(inner)
        if rel != RAW_ZFILE:
            exp = expect_lsmt_file(inner)
            assert isinstance(exp, Reads) and isinstance(exp.image, LsmtImage), (rel, exp)
            b.device = exp.image
            assert hashlib.sha256(b.device.render()).hexdigest() == device_sha(manifest, rel), rel
        else:
            assert hashlib.sha256(inner).hexdigest() == device_sha(manifest, rel)
        out[rel] = b
    return out


@pytest.fixture(scope="session")
def rw_pair(reference_dir: Path, manifest: dict[str, Any]) -> tuple[bytes, bytes]:
    data = (reference_dir / "a/rw.data").read_bytes()
    index = (reference_dir / "a/rw.index").read_bytes()
    exp = expect_writable(data, index)
    assert isinstance(exp, Reads) and isinstance(exp.image, LsmtImage)
    want = next(c["expected"]["sha256"] for c in manifest["cases"] if c["name"] == "a_rw")
    assert hashlib.sha256(exp.image.render()).hexdigest() == want
    return data, index


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs (needs root)."""
    where = tmp_path / "tiny"
    where.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                              text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if proc.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs on {where}: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
