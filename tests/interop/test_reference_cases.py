"""Every image the reference C++ tools wrote reads here to the expected device bytes (MANIFEST.json ``cases``).

The expected size and sha256 of each case are ground truth computed from the operations, not read back from any
tool. Also: the fixture files are what MANIFEST.json ``files`` says (size and sha256), and ``overlaybd check``
finds nothing wrong with any layer file (every ZFile block CRC included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import overlaybd
from overlaybd.cli.main import main as cli_main
from overlaybd.formats.detect import peel
from overlaybd.formats.lsmt.writable import SparseLayer, WritableLayer
from overlaybd.inspection import check_layer
from overlaybd.source.file import FileSource

from ..conftest import REFERENCE
from .payloads import device_sha256, file_sha256

NOT_SHIPPED = "not shipped"


def _manifest_keys(section: str, key: str | None = None) -> list[str]:
    """Names to parametrize with, read at collection time; a placeholder when the fixtures are absent (the
    ``manifest`` fixture then skips the test with its reason)."""
    try:
        data = json.loads((REFERENCE / "MANIFEST.json").read_text())
    except FileNotFoundError:
        return ["<fixtures absent>"]
    items = data[section]
    return [item[key] for item in items] if key else list(items)


def _case(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in manifest["cases"] if c["name"] == name]
    assert len(found) == 1, f"case {name!r} appears {len(found)} times in MANIFEST.json"
    return found[0]


def _index_of(files: dict[str, str], reference_dir: Path) -> str | None:
    """The index of a ``data`` case, or None where MANIFEST.json says it was not shipped (a sparse layer)."""
    index = files.get("index")
    if index is None or NOT_SHIPPED in index:
        return None
    return str(reference_dir / index)


@pytest.mark.parametrize("name", _manifest_keys("cases", "name"))
def test_case_reads_to_expected_device(name: str, manifest: dict[str, Any], reference_dir: Path) -> None:
    case = _case(manifest, name)
    files = case["files"]
    want = (case["expected"]["size"], case["expected"]["sha256"])
    assert manifest["ground_truth"][case["expected_key"]] == case["expected"]
    if "layers" in files:
        paths = [str(reference_dir / p) for p in files["layers"]]
        with overlaybd.open_stack(paths) as stack:
            assert stack.depth == len(paths)
            assert device_sha256(stack) == want
    elif "data" in files:
        data = str(reference_dir / files["data"])
        index = _index_of(files, reference_dir)
        with overlaybd.open_layer(data, index) as layer:
            if index is None:
                # the sparse layer: its fixture copy lost the filesystem holes, so every range reads as
                # allocated; unwritten ranges are zeros in the file, so the device still hashes right
                assert isinstance(layer, SparseLayer)
            else:
                assert isinstance(layer, WritableLayer)
            assert device_sha256(layer) == want
        # the same pair as the only (upper) layer of a stack
        upper = (data, index) if index is not None else None
        with overlaybd.open_stack([] if upper else [data], upper=upper) as stack:
            assert device_sha256(stack) == want
    elif "zfile" in files:
        with FileSource(reference_dir / files["zfile"]) as f:
            peeled = peel(f)
            assert peeled.zfile is not None and not peeled.is_lsmt
            assert device_sha256(peeled.source) == want
    else:
        pytest.fail(f"case {name!r} names no files this test knows: {sorted(files)}")


@pytest.mark.parametrize("name", _manifest_keys("cases", "name"))
def test_case_zfile_decompresses_to_its_source(name: str, manifest: dict[str, Any], reference_dir: Path) -> None:
    """Where a case is a ZFile of a known file (``py_zfile_check``), the decompressed stream is that file."""
    case = _case(manifest, name)
    check = case.get("py_zfile_check")
    files = case["files"]
    paths = files.get("layers") or [files.get("zfile") or files.get("data")]
    if check is None:
        # not a ZFile case: the files must then not be ZFiles either
        for p in paths:
            with FileSource(reference_dir / p) as f:
                assert peel(f).zfile is None, f"{p} is a ZFile but its case has no py_zfile_check"
        return
    assert len(paths) == 1
    with FileSource(reference_dir / paths[0]) as f:
        peeled = peel(f)
        assert peeled.zfile is not None
        assert peeled.zfile.nblocks == check["blocks"]
        assert peeled.zfile.block_size == case.get("block_size", peeled.zfile.block_size)
        assert peeled.zfile.verify == case.get("crc", peeled.zfile.verify)
        if "algo" in case:
            assert peeled.zfile.info.algo_name == case["algo"]
        # max_compressed_block counts the compressed bytes only: the 4-byte CRC after each block is not in it
        crc_bytes = 4 if peeled.zfile.verify else 0
        assert max(peeled.zfile.stored_lengths()) - crc_bytes == check["max_compressed_block"]
        assert device_sha256(peeled.source) == (check["decompressed_size"], check["decompressed_sha256"])
    if "zfile_of_sha256" in case:
        assert check["decompressed_sha256"] == case["zfile_of_sha256"]


@pytest.mark.parametrize("path", _manifest_keys("files"))
def test_fixture_file_is_intact(path: str, manifest: dict[str, Any], reference_dir: Path) -> None:
    want = manifest["files"][path]
    f = reference_dir / path
    assert f.stat().st_size == want["size"]
    assert file_sha256(f) == want["sha256"]


def _layer_files(manifest: dict[str, Any], reference_dir: Path) -> dict[str, tuple[str | None, int | None]]:
    """Every layer file a case names: path -> (its index file or None, ZFile blocks from py_zfile_check)."""
    out: dict[str, tuple[str | None, int | None]] = {}
    for case in manifest["cases"]:
        files = case["files"]
        blocks = case.get("py_zfile_check", {}).get("blocks")
        if "layers" in files:
            for p in files["layers"]:
                prev = out.get(p, (None, None))[1]
                out[p] = (None, blocks if len(files["layers"]) == 1 else prev)
        if "data" in files:
            out[files["data"]] = (_index_of(files, reference_dir), None)
        if "zfile" in files:
            out[files["zfile"]] = (None, blocks)
    return out


def test_check_reports_no_errors_for_every_layer_file(manifest: dict[str, Any], reference_dir: Path) -> None:
    layers = _layer_files(manifest, reference_dir)
    assert len(layers) >= 18
    for rel, (index, blocks) in sorted(layers.items()):
        report = check_layer(str(reference_dir / rel), index)
        assert report["errors"] == [], rel
        if blocks is not None:
            assert report["blocks_checked"] == blocks, rel
            assert "zfile" in report["format"], rel
        else:
            assert "blocks_checked" not in report, rel
        if "lsmt" in report["format"]:
            assert report["records"] > 0 or "empty" in rel, rel
        else:
            assert report["format"] == "zfile" and "records" not in report, rel


def test_check_command_exits_zero_on_every_layer_file(manifest: dict[str, Any], reference_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    layers = _layer_files(manifest, reference_dir)
    sealed = [str(reference_dir / rel) for rel, (index, _) in sorted(layers.items()) if index is None]
    assert cli_main(["check", "--output", "json", *sealed]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in reports] == sealed
    assert all(r["errors"] == [] for r in reports)
    rw = next(rel for rel, (index, _) in layers.items() if index is not None)
    assert cli_main(["check", str(reference_dir / rw), "--index", str(layers[rw][0])]) == 0
    assert ": ok" in capsys.readouterr().out
