"""The OCI layout directory: one file mode for everything it writes; bounded, checked reads of what it holds."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlaybd.errors import FormatError, LimitError
from overlaybd.remote.errors import DigestMismatchError, InvalidDigestError
from overlaybd.remote.layout import OciLayout
from overlaybd.remote.oci import MANIFEST_OCI, MAX_MANIFEST_BYTES, sha256_digest
from overlaybd.remote.reference import parse_reference
from overlaybd.remote.transfer import pull, push
from overlaybd.volume import Volume

MiB = 1 << 20


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_every_file_of_a_pushed_layout_has_one_mode(tmp_path: Path, umask: None, mask: int) -> None:
    vol = Volume.create(str(tmp_path / "vol"), 8 * MiB)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, b"layout modes".ljust(65536, b"."))
        dev.flush()
    vol.snapshot("one")
    os.umask(mask)
    push(vol, parse_reference(f"oci:{tmp_path / 'layout'}:v1"))
    found = modes(tmp_path / "layout")
    blobs = [name for name in found if name.startswith("blobs/")]
    assert len(blobs) == 3 and "index.json" in found and "oci-layout" in found  # layer, config, manifest
    assert set(found.values()) == {0o644 & ~mask}, found
    # pulling it back (a copy of each blob) gives the volume's layer files the same rule's mode, and works
    assert pull(parse_reference(f"oci:{tmp_path / 'layout'}:v1"), str(tmp_path / "back")).volume.snapshots()


def test_a_source_with_another_mode_is_copied_not_linked(tmp_path: Path, umask: None) -> None:
    layout = OciLayout(str(tmp_path / "layout"), create=True)
    src = tmp_path / "blob"
    src.write_bytes(b"secret-ish")
    src.chmod(0o600)
    digest = sha256_digest(b"secret-ish")
    assert layout.put_blob(str(src), digest, 10) == "uploaded"
    blob = tmp_path / "layout" / "blobs" / "sha256" / digest.split(":")[1]
    assert stat.S_IMODE(blob.stat().st_mode) == 0o644
    assert stat.S_IMODE(src.stat().st_mode) == 0o600  # the source was not chmod'ed ...
    assert blob.stat().st_ino != src.stat().st_ino  # ... because it was copied
    other = tmp_path / "same-mode"
    other.write_bytes(b"linked")
    other.chmod(0o644)
    d2 = sha256_digest(b"linked")
    layout.put_blob(str(other), d2, 6)
    assert (tmp_path / "layout" / "blobs" / "sha256" / d2.split(":")[1]).stat().st_ino == other.stat().st_ino
    with pytest.raises(DigestMismatchError):
        layout.put_blob(str(other), sha256_digest(b"else"), 6)
    assert not [p for p in (tmp_path / "layout").rglob("*.tmp")]


def test_bad_digests_in_index_json_never_name_a_file(tmp_path: Path) -> None:
    layout = OciLayout(str(tmp_path / "layout"), create=True)
    (tmp_path / "secret").write_text("{}")
    for bad in ("../../../secret", "sha256:../../../secret", 12):
        index = {"schemaVersion": 2, "manifests": [{"mediaType": MANIFEST_OCI, "digest": bad, "size": 2,
                                                    "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
        (tmp_path / "layout" / "index.json").write_text(json.dumps(index))
        with pytest.raises(InvalidDigestError, match="index.json"):
            layout.get_manifest("v1")
    for bad in ("../../x", "sha256:" + "0" * 63):
        with pytest.raises(InvalidDigestError):
            layout.blob_size(bad)
        with pytest.raises(InvalidDigestError):
            layout.fetch_blob(bad, 1, str(tmp_path / "out"))
    with pytest.raises(InvalidDigestError):
        layout.get_manifest("sha256:../../../secret")


def test_oversized_index_and_manifests_are_refused_before_reading(tmp_path: Path) -> None:
    layout = OciLayout(str(tmp_path / "layout"), create=True)
    with open(tmp_path / "layout" / "index.json", "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(LimitError, match="index.json"):
        layout.get_manifest("v1")
    raw = json.dumps({"pad": "x" * MAX_MANIFEST_BYTES}).encode()
    digest = sha256_digest(raw)
    (tmp_path / "layout" / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(raw)
    with pytest.raises(LimitError, match="manifest"):
        layout.get_manifest(digest)
    with pytest.raises(LimitError):
        layout.read_metadata_blob(digest, len(raw))
    (tmp_path / "layout" / "index.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="not an image index"):
        layout.get_manifest("v1")


def test_blob_size_declared_wrong_is_a_mismatch_before_copying(tmp_path: Path) -> None:
    layout = OciLayout(str(tmp_path / "layout"), create=True)
    src = tmp_path / "b"
    src.write_bytes(b"0123456789")
    digest = sha256_digest(b"0123456789")
    layout.put_blob(str(src), digest, 10)
    with pytest.raises(DigestMismatchError, match="10 bytes, expected 4"):
        layout.fetch_blob(digest, 4, str(tmp_path / "out"))
    with pytest.raises(FormatError, match="negative"):
        layout.fetch_blob(digest, -1, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert layout.read_metadata_blob(digest, 10) == b"0123456789"
    with pytest.raises(DigestMismatchError):
        layout.read_metadata_blob(digest, 9)
