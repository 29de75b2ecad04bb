"""Manifests and indexes are checked when parsed: digests, sizes, layer counts, document sizes, shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from overlaybd.errors import FormatError, LimitError, OverlaybdError, UnsupportedError
from overlaybd.remote.errors import InvalidDigestError
from overlaybd.remote.oci import (
    ANN_DIGEST,
    ANN_SIZE,
    CONFIG_OCI,
    INDEX_OCI,
    LAYER_TAR,
    MANIFEST_OCI,
    MAX_BLOB_SIZE,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    Manifest,
    check_digest,
    check_document,
    parse_index,
    pick_from_index,
)

D = "sha256:" + "ab" * 32


def desc(digest: object = D, size: object = 10, **extra: Any) -> dict[str, Any]:
    return {"mediaType": LAYER_TAR, "digest": digest, "size": size, **extra}


def manifest(layers: list[Any], config: Any = None, **extra: Any) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_OCI,
                       "config": config if config is not None else {"mediaType": CONFIG_OCI, "digest": D, "size": 2},
                       "layers": layers, **extra}).encode()


def index(entries: list[Any]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": INDEX_OCI, "manifests": entries}).encode()


def test_real_manifests_and_index_parse(real_dir: Path) -> None:
    layout = real_dir / "hello-world-oci"
    entries = parse_index((layout / "index.json").read_bytes())
    assert len(entries) == 11
    seen = 0
    for d in entries:
        blob = layout / "blobs" / "sha256" / d.digest.split(":")[1]
        if not blob.exists():
            continue
        raw = blob.read_bytes()
        check_document(raw, d.media_type)
        seen += 1
    assert seen >= 5
    mf = Manifest.parse((layout / "blobs/sha256/42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88")
                        .read_bytes())
    assert mf.layers[0].is_overlaybd and mf.layers[0].size == 642560


@pytest.mark.parametrize("bad", ["../../x", "sha256:../../x", "sha256:" + "AB" * 32, "sha256:" + "a" * 63,
                                 "sha256:" + "a" * 65, "sha256:" + "a" * 64 + "\n", " sha256:" + "a" * 64,
                                 "sha256:" + "a" * 64 + "/..", "", None, 5, ["sha256:" + "a" * 64]])
def test_bad_digests_are_typed_one_line_errors(bad: object) -> None:
    with pytest.raises(InvalidDigestError) as exc:
        Manifest.parse(manifest([desc(bad)]), path="reg/repo")
    text = str(exc.value)
    assert "\n" not in text and text.startswith("reg/repo: layer 0 digest")
    assert len(text) < 200


def test_other_digest_algorithms_are_unsupported_not_invalid() -> None:
    with pytest.raises(UnsupportedError, match="sha512"):
        check_digest("sha512:" + "a" * 128)


def test_config_and_annotation_digests_are_checked() -> None:
    with pytest.raises(InvalidDigestError, match="config digest"):
        Manifest.parse(manifest([], config={"mediaType": CONFIG_OCI, "digest": "../x", "size": 2}))
    with pytest.raises(InvalidDigestError, match="blob-digest"):
        Manifest.parse(manifest([desc(annotations={ANN_DIGEST: "../../x", ANN_SIZE: "10"})]))
    with pytest.raises(FormatError, match="blob-size"):
        Manifest.parse(manifest([desc(annotations={ANN_DIGEST: D, ANN_SIZE: "-5"})]))


@pytest.mark.parametrize("size,error", [(-1, FormatError), (MAX_BLOB_SIZE + 1, LimitError), (1 << 63, LimitError),
                                        (1.5, FormatError), ("10", FormatError), (True, FormatError),
                                        (None, FormatError)])
def test_absurd_sizes_are_refused(size: object, error: type[OverlaybdError]) -> None:
    with pytest.raises(error, match="layer 0 size"):
        Manifest.parse(manifest([desc(size=size)]))


def test_size_limits_hold_at_their_edges() -> None:
    assert Manifest.parse(manifest([desc(size=MAX_BLOB_SIZE), desc(size=0)])).layers[0].size == MAX_BLOB_SIZE
    big_config = {"mediaType": CONFIG_OCI, "digest": D, "size": MAX_CONFIG_BYTES + 1}
    with pytest.raises(LimitError, match="config size"):
        Manifest.parse(manifest([], config=big_config))
    with pytest.raises(LimitError, match="index entry 0 size"):
        parse_index(index([desc(size=MAX_MANIFEST_BYTES + 1)]))


def test_255_layers_parse_256_are_refused() -> None:
    assert len(Manifest.parse(manifest([desc()] * 255)).layers) == 255
    with pytest.raises(LimitError, match="256 layers; an overlaybd stack holds at most 255"):
        Manifest.parse(manifest([desc()] * 256))
    with pytest.raises(LimitError):  # counted before any descriptor is looked at
        Manifest.parse(manifest([None] * 100000))


def test_documents_over_4mib_are_refused_whole() -> None:
    raw = manifest([desc()], annotations={"pad": "x" * MAX_MANIFEST_BYTES})
    with pytest.raises(LimitError, match="4194304"):
        Manifest.parse(raw)
    with pytest.raises(LimitError):
        check_document(raw, MANIFEST_OCI)


@pytest.mark.parametrize("raw", [b"", b"[]", b"null", b"{", b"[" * 100000 + b"]" * 100000, b'{"layers": {}}',
                                 b'{"config": 1, "layers": []}', b'{"config": {}, "layers": []}',
                                 json.dumps({"config": {"digest": D, "size": 1}, "layers": [],
                                             "annotations": {"a": 1}}).encode(),
                                 json.dumps({"config": {"digest": D, "size": 1, "mediaType": 3},
                                             "layers": []}).encode(),
                                 json.dumps({"config": {"digest": D, "size": 1, "platform": "x"},
                                             "layers": []}).encode()])
def test_misshapen_manifests_are_format_errors(raw: bytes) -> None:
    with pytest.raises(FormatError):
        Manifest.parse(raw)


def test_index_checks_and_platform_pick() -> None:
    amd = desc(platform={"os": "linux", "architecture": "amd64"}, mediaType=MANIFEST_OCI)
    arm = desc(digest="sha256:" + "cd" * 32, platform={"os": "linux", "architecture": "arm64"})
    assert pick_from_index(index([arm, amd])).digest == D
    with pytest.raises(InvalidDigestError, match="index entry 1 digest"):
        pick_from_index(index([amd, desc("../../x")]), path="oci:/x")
    with pytest.raises(FormatError, match="lists no manifests"):
        pick_from_index(index([]))
    with pytest.raises(FormatError):
        parse_index(b'{"manifests": 5}')
    check_document(index([amd]), "")  # no media type: told by its shape
    with pytest.raises(InvalidDigestError):
        check_document(index([desc("x")]), "")
    check_document(b"not json at all", "application/vnd.example.other")  # not ours to judge
