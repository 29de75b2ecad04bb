"""Rebuild the reference's writable layers from MANIFEST.json ``layer_ops`` with our own writer.

The reference made each layer with a small program linked against its library ("obd-writer"): create the pair,
apply the writes and discards, then ``overlaybd-commit``. The case ``commands`` in MANIFEST.json record the
arguments (virtual size, uuid, parent uuid, sparse or not); we parse them from there rather than restate them.
We do the same with ``overlaybd.create`` / ``open_layer(..., writable=True)`` / ``commit`` and expect:

(a) every rebuilt device (alone and stacked) hashes to ``ground_truth``;
(b) committing them gives the reference's committed files byte for byte;
(c) the rebuilt writable pair of layer ``a`` is byte-identical to the reference's ``a/rw.data`` + ``a/rw.index``;
(d) the same for the sparse layer and its commit.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import overlaybd

from .payloads import apply_ops, device_sha256

NULL = "-"  # obd-writer's "no parent uuid"


@dataclass(frozen=True)
class Create:
    """``obd-writer create DATA INDEX VSIZE UUID PARENT|- SPARSE``"""

    ops: str  # layer_ops key
    virtual_size: int
    uuid: str
    parent_uuid: str | None
    sparse: bool


@dataclass(frozen=True)
class Commit:
    """``overlaybd-commit DATA INDEX OUT --uuid U [-p PARENT]``"""

    ops: str
    out: str
    uuid: str | None
    parent_uuid: str | None


def _creates(manifest: dict[str, Any]) -> dict[str, Create]:
    out: dict[str, Create] = {}
    for case in manifest["cases"]:
        for cmd in case["commands"]:
            argv = shlex.split(cmd)
            if argv[:2] != ["obd-writer", "create"]:
                continue
            _data, _index, vsize, uuid, parent, sparse = argv[2:8]
            key = case["layers_ops"][-1]
            out[key] = Create(key, int(vsize), uuid, None if parent == NULL else parent, sparse == "1")
    return out


def _commits(manifest: dict[str, Any]) -> dict[str, Commit]:
    out: dict[str, Commit] = {}
    for case in manifest["cases"]:
        for cmd in case["commands"]:
            argv = shlex.split(cmd)
            if argv[0] != "overlaybd-commit" or any(a.startswith("--seal") or a.startswith("--commit_sealed")
                                                    for a in argv):
                continue
            positional = [a for k, a in enumerate(argv[1:], 1)
                          if not a.startswith("-") and not argv[k - 1].startswith("-")]
            opts = {argv[k]: argv[k + 1] for k in range(1, len(argv) - 1) if argv[k].startswith("-")}
            key = case["layers_ops"][-1]
            out[key] = Commit(key, positional[2], opts.get("--uuid"), opts.get("-p") or opts.get("--parent-uuid"))
    return out


def test_manifest_commands_agree_with_uuids_and_sizes(manifest: dict[str, Any]) -> None:
    creates, commits = _creates(manifest), _commits(manifest)
    assert sorted(creates) == sorted(commits) == ["a", "b1", "b2", "b3", "sparse"]
    uuids, sizes = manifest["uuids"], manifest["virtual_sizes"]
    for key, c in creates.items():
        assert c.uuid == uuids[key] == commits[key].uuid
        assert c.virtual_size == sizes[key if key in sizes else "b"]
        assert c.sparse is (key == "sparse")
    assert creates["b2"].parent_uuid == uuids["b1"] == commits["b2"].parent_uuid
    assert creates["b3"].parent_uuid == uuids["b2"] == commits["b3"].parent_uuid
    assert creates["a"].parent_uuid is None and commits["a"].parent_uuid is None


def _build(manifest: dict[str, Any], key: str, folder: Path) -> tuple[str, str]:
    """Create the writable layer ``key`` as the manifest's create command did, and apply its operations."""
    c = _creates(manifest)[key]
    data, index = str(folder / f"{key}.data"), str(folder / f"{key}.index")
    overlaybd.create(data, index, c.virtual_size, uuid=c.uuid, parent_uuid=c.parent_uuid, sparse=c.sparse)
    with overlaybd.open_layer(data, index, writable=True) as layer:
        apply_ops(layer, manifest["layer_ops"][key])
        layer.flush()
    return data, index


@pytest.fixture(scope="module")
def rebuilt(manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """The log-structured layers a, b1, b2 and b3, rebuilt once (tests only read them)."""
    folder = tmp_path_factory.mktemp("rebuilt")
    return {key: _build(manifest, key, folder) for key in ("a", "b1", "b2", "b3")}


def _truth(manifest: dict[str, Any], key: str) -> tuple[int, str]:
    t = manifest["ground_truth"][key]
    return t["size"], t["sha256"]


def _commit(manifest: dict[str, Any], key: str, pair: tuple[str, str], out: Path) -> Path:
    c = _commits(manifest)[key]
    with overlaybd.open_layer(*pair) as layer:
        overlaybd.commit(layer, str(out), uuid=c.uuid, parent_uuid=c.parent_uuid)
    return out


# -- (a) ground truth ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "truth"), [("a", "a"), ("b1", "b1"), ("b2", "b2_alone"), ("b3", "b3_alone")])
def test_rebuilt_layer_hashes_to_ground_truth(key: str, truth: str, manifest: dict[str, Any],
                                              rebuilt: dict[str, tuple[str, str]]) -> None:
    with overlaybd.open_layer(*rebuilt[key]) as layer:
        assert device_sha256(layer) == _truth(manifest, truth)


def test_rebuilt_uppers_over_reference_lowers(manifest: dict[str, Any], reference_dir: Path,
                                              rebuilt: dict[str, tuple[str, str]]) -> None:
    b = reference_dir / "b"
    with overlaybd.open_stack([str(b / "layer1.lsmt")], upper=rebuilt["b2"]) as stack:
        assert device_sha256(stack) == _truth(manifest, "b12")
    with overlaybd.open_stack([str(b / "layer1.lsmt"), str(b / "layer2.lsmt")], upper=rebuilt["b3"]) as stack:
        assert device_sha256(stack) == _truth(manifest, "b123")


def test_rebuilt_layers_stacked_on_each_other(manifest: dict[str, Any], rebuilt: dict[str, tuple[str, str]],
                                              tmp_path: Path) -> None:
    # writable pairs as read-only lowers (their index found beside the data file) under a writable upper
    with overlaybd.open_stack([rebuilt["b1"][0]], upper=rebuilt["b2"]) as stack:
        assert device_sha256(stack) == _truth(manifest, "b12")
    with overlaybd.open_stack([rebuilt["b1"][0], rebuilt["b2"][0]], upper=rebuilt["b3"]) as stack:
        assert device_sha256(stack) == _truth(manifest, "b123")
    # our own committed layers
    committed = [str(_commit(manifest, key, rebuilt[key], tmp_path / f"{key}.lsmt")) for key in ("b1", "b2", "b3")]
    with overlaybd.open_stack(committed[:2]) as stack:
        assert device_sha256(stack) == _truth(manifest, "b12")
    with overlaybd.open_stack(committed) as stack:
        assert device_sha256(stack) == _truth(manifest, "b123")


# -- (b) commit ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["a", "b1", "b2", "b3"])
def test_commit_of_rebuilt_layer_matches_reference(key: str, manifest: dict[str, Any], reference_dir: Path,
                                                   rebuilt: dict[str, tuple[str, str]], tmp_path: Path) -> None:
    out = _commit(manifest, key, rebuilt[key], tmp_path / f"{key}.lsmt")
    reference = reference_dir / _commits(manifest)[key].out
    assert out.read_bytes() == reference.read_bytes(), f"commit of rebuilt {key} differs from {reference}"


# -- (c) the writable files themselves ----------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["data", "index"])
def test_rebuilt_writable_pair_is_byte_identical(part: str, reference_dir: Path,
                                                 rebuilt: dict[str, tuple[str, str]]) -> None:
    """Same uuid, same parent, same operations: the same log. Data file = header + every write's bytes
    appended in order (overwritten ones included); index file = header + one record per write piece / discard."""
    ours = Path(rebuilt["a"][0 if part == "data" else 1]).read_bytes()
    reference = (reference_dir / f"a/rw.{part}").read_bytes()
    assert len(ours) == len(reference)
    diff = [k for k in range(len(ours)) if ours[k] != reference[k]][:8]
    assert not diff, f"a.{part} differs from a/rw.{part} at bytes {diff}"


# -- (d) the sparse layer ----------------------------------------------------------------------------------------
def test_sparse_rebuild_and_commit(manifest: dict[str, Any], reference_dir: Path, tmp_path: Path) -> None:
    """Create sparse, apply the ``sparse`` operations (writes, and a discard that punches a hole), commit."""
    data, _index = _build(manifest, "sparse", tmp_path)
    with overlaybd.open_layer(data) as layer:
        assert device_sha256(layer) == _truth(manifest, "sparse")
    # the fixture's data file lost its holes, not its bytes: header + the raw device
    assert Path(data).read_bytes() == (reference_dir / "a/sparse_rw.data").read_bytes()
    out = _commit(manifest, "sparse", (data, _index), tmp_path / "sparse.lsmt")
    reference = reference_dir / _commits(manifest)["sparse"].out
    assert out.read_bytes() == reference.read_bytes(), f"commit of the rebuilt sparse layer differs from {reference}"
