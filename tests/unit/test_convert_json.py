"""Manifests, configs and indexes as the reference convertor (Go ``encoding/json`` over image-spec structs) reads
and writes them: byte-for-byte against its conversion of hello-world, and Go's rules one by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overlaybd.convert import gojson, imagespec
from overlaybd.convert.imagespec import Blob
from overlaybd.errors import FormatError

HELLO_LAYER = Blob("sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d", 642560)


def blob(real_dir: Path, digest: str) -> bytes:
    return (real_dir / "hello-world-oci" / "blobs" / "sha256" / digest.split(":")[-1]).read_bytes()


def test_hello_world_config_and_manifest_are_the_reference_bytes(real_dir: Path) -> None:
    # the reference converted the Docker amd64 image (config 9c7a54a9, manifest 7e9b6e7b) with --oci into layer
    # 022231c3, config b67b1f12 and manifest 42caa56a: the same inputs give the same bytes here
    config = imagespec.read_config(blob(real_dir, "9c7a54a9a43cca047013b82af109fe963fde787f63f9e016fdc3384500c2823d"),
                                   "config")
    out = imagespec.converted_config(config, [HELLO_LAYER])
    assert out == blob(real_dir, "b67b1f1224de620e9a932ab7ff0e819d7dd9d236605dd8027e5ecf2df650e65e")
    manifest = imagespec.read_manifest(
        blob(real_dir, "7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"), "manifest")
    raw = imagespec.converted_manifest(manifest, Blob(imagespec.sha256_digest(out), len(out)), [HELLO_LAYER], True)
    assert raw == blob(real_dir, "42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88")


def test_docker_media_types_by_default() -> None:
    mf = imagespec.read_manifest(json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:aa", "size": 1},
                                             "layers": []}).encode(), "m")
    raw = imagespec.converted_manifest(mf, Blob("sha256:c", 3), [Blob("sha256:l", 9)], False)
    assert raw == (b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
                   b'"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:c",'
                   b'"size":3},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar","digest":'
                   b'"sha256:l","size":9,"annotations":{"containerd.io/snapshot/overlaybd/blob-digest":"sha256:l",'
                   b'"containerd.io/snapshot/overlaybd/blob-size":"9","containerd.io/snapshot/overlaybd/version":'
                   b'"0.1.0"}}]}')


def convert_config(doc: object) -> dict[str, object]:
    config = imagespec.read_config(json.dumps(doc).encode(), "config")
    out: dict[str, object] = json.loads(imagespec.converted_config(config, [Blob("sha256:x", 1)]))
    return out


def test_config_fields_as_go_reads_them() -> None:
    out = convert_config({
        "Architecture": "arm64", "OS": "linux", "variant": "v8", "container_config": {"Hostname": "h"},
        "config": {"ENV": ["A=1"], "Healthcheck": {"Test": ["NONE"]}, "ExposedPorts": {"80/tcp": {}, "443/tcp": None},
                   "Labels": {}, "Entrypoint": None, "Cmd": ["x"], "ArgsEscaped": True,
                   "Volumes": {"/b": {}, "/a": {}}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:old"]},
        "history": [{"created": "2024-01-02T03:04:05.500000000+08:00", "empty_layer": False},
                    {"created": "2024-01-02T03:04:05+00:00", "created_by": "x"}],
    })
    assert list(out) == ["architecture", "os", "variant", "config", "rootfs", "history"]
    assert out["config"] == {"ExposedPorts": {"443/tcp": {}, "80/tcp": {}}, "Env": ["A=1"], "Cmd": ["x"],
                             "Volumes": {"/a": {}, "/b": {}}, "ArgsEscaped": True}
    assert out["history"] == [{"created": "2024-01-02T03:04:05.5+08:00"},
                              {"created": "2024-01-02T03:04:05Z", "created_by": "x"}]
    assert out["rootfs"] == {"type": "layers", "diff_ids": ["sha256:x"]}


def test_repeated_keys_the_go_way() -> None:
    raw = b'{"os":"a","os":"b","config":{"Labels":{"x":"1"},"Labels":{"y":"2"},"Env":["A"],"Env":["B"]}}'
    out = json.loads(imagespec.converted_config(imagespec.read_config(raw, "c"), []))
    assert out["os"] == "b"
    assert out["config"] == {"Env": ["B"], "Labels": {"x": "1", "y": "2"}}  # a list is replaced, a map merged


def test_go_escaping() -> None:
    assert gojson.dumps({"k": "a<b>&c\u2028\u2029\b\f\n\x01\x7fé"}) == \
        b'{"k":"a\\u003cb\\u003e\\u0026c\\u2028\\u2029\\b\\f\\n\\u0001\x7f\xc3\xa9"}'
    assert gojson.dumps({"b": 1, "a": [True, None]}) == b'{"b":1,"a":[true,null]}'


def test_invalid_utf8_and_lone_surrogates_become_replacement_characters() -> None:
    doc = imagespec.read_config(b'{"os":"a\xe2\x82b","architecture":"\\ud800x"}', "c")
    assert doc["os"] == "a\ufffd\ufffdb" and doc["architecture"] == "\ufffdx"  # one per invalid byte, as Go


@pytest.mark.parametrize("raw", [
    b'{"config":{"Env":"x"}}', b'{"os":1}', b'{"history":[{"created":"yesterday"}]}', b'[1]', b'{"os":NaN}',
    b'{"rootfs":{"diff_ids":[1]}}', b'{"created":"2024-13-01T00:00:00Z"}', b'{', b'{"config":{"Labels":{"a":1}}}',
])
def test_what_go_refuses_is_refused(raw: bytes) -> None:
    with pytest.raises(FormatError):
        imagespec.read_config(raw, "config")


def test_time_formats() -> None:
    t = gojson.parse_time("2023-05-04T17:37:03.872958712Z", "t")
    assert t.format() == "2023-05-04T17:37:03.872958712Z"
    nine = gojson.parse_time("2023-05-04T17:37:03.1234567891-05:30", "t")
    assert nine.format() == "2023-05-04T17:37:03.123456789-05:30"
    assert gojson.parse_time("2023-05-04T17:37:03.000Z", "t").format() == "2023-05-04T17:37:03Z"


def test_chain_ids_and_layer_uuids() -> None:
    diff = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
    chain = imagespec.chain_ids(diff)
    assert chain[0] == diff[0]
    assert chain[1] == imagespec.sha256_digest(f"{diff[0]} {diff[1]}".encode())
    assert imagespec.chain_uuid(chain[0]) == "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"


def test_index_keeps_platforms_and_drops_attestations() -> None:
    index = imagespec.read_index(json.dumps({
        "schemaVersion": 2, "mediaType": imagespec.INDEX_DOCKER, "manifests": [
            {"mediaType": imagespec.MANIFEST_DOCKER, "digest": "sha256:a", "size": 1,
             "platform": {"architecture": "arm", "os": "linux", "variant": "v7"}},
            {"mediaType": imagespec.MANIFEST_OCI, "digest": "sha256:b", "size": 2,
             "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
             "platform": {"architecture": "unknown", "os": "unknown"}}]}).encode(), "index")
    assert [imagespec.is_attestation(m) for m in index["manifests"]] == [False, True]
    raw = imagespec.converted_index(index, {0: (imagespec.MANIFEST_OCI, Blob("sha256:c", 5))}, oci=True)
    assert raw == (b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{'
                   b'"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:c","size":5,'
                   b'"platform":{"architecture":"arm","os":"linux","variant":"v7"}}]}')
