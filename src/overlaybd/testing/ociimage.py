"""Ordinary container images written into an OCI layout directory, for tests and benchmarks: tar layers (gzip,
zstd or plain), a config with their diff IDs, a Docker or OCI manifest, and optionally a multi-arch index with an
attestation manifest beside the images."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import zstandard

LAYER_TYPES = {
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "tar"): "application/vnd.docker.image.rootfs.diff.tar",
    ("docker", "zstd"): "application/vnd.docker.image.rootfs.diff.tar.zstd",
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "tar"): "application/vnd.oci.image.layer.v1.tar",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass(frozen=True)
class Written:
    digest: str
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def _layout(path: str) -> None:
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    marker = os.path.join(path, "oci-layout")
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
    if not os.path.exists(os.path.join(path, "index.json")):
        with open(os.path.join(path, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": []}, f)


def put_blob(layout: str, data: bytes, media_type: str) -> Written:
    _layout(layout)
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return Written("sha256:" + digest, len(data), media_type)


def tag(layout: str, written: Written, name: str) -> None:
    index_path = os.path.join(layout, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["manifests"] = [m for m in index["manifests"]
                          if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") != name]
    index["manifests"].append(written.descriptor(annotations={"org.opencontainers.image.ref.name": name}))
    with open(index_path, "w") as f:
        json.dump(index, f)


def compress(tar: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


def write_image(layout: str, tars: list[bytes], *, compression: str = "gzip", flavour: str = "docker",
                config: dict[str, Any] | None = None, name: str | None = "latest",
                architecture: str = "amd64") -> Written:
    """An image of ``tars`` (bottom to top) in the layout; returns its manifest (tagged ``name`` if given)."""
    layers = [put_blob(layout, compress(t, compression), LAYER_TYPES[(flavour, compression)]) for t in tars]
    doc: dict[str, Any] = {"architecture": architecture, "os": "linux",
                           "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
                           "rootfs": {"type": "layers",
                                      "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]},
                           "history": [{"created": "2024-01-02T03:04:05.5Z", "created_by": f"layer {n} <&>"}
                                       for n in range(len(tars))]}
    doc.update(config or {})
    config_type = "application/vnd.docker.container.image.v1+json" if flavour == "docker" else \
        "application/vnd.oci.image.config.v1+json"
    cfg = put_blob(layout, json.dumps(doc).encode(), config_type)
    manifest_type = "application/vnd.docker.distribution.manifest.v2+json" if flavour == "docker" else \
        "application/vnd.oci.image.manifest.v1+json"
    manifest = {"schemaVersion": 2, "mediaType": manifest_type, "config": cfg.descriptor(),
                "layers": [layer.descriptor() for layer in layers]}
    if flavour == "oci":
        manifest["annotations"] = {"org.example.note": "kept <as> is"}
    written = put_blob(layout, json.dumps(manifest, indent=3).encode(), manifest_type)
    if name:
        tag(layout, written, name)
    return written


def write_index(layout: str, images: dict[str, Written], *, name: str = "latest", attestation: bool = True,
                flavour: str = "docker") -> Written:
    """A multi-arch index over ``images`` (architecture -> manifest), with a BuildKit attestation manifest."""
    entries = [m.descriptor(platform={"architecture": arch, "os": "linux"}) for arch, m in images.items()]
    if attestation:
        statement = put_blob(layout, b'{"_type":"https://in-toto.io/Statement/v0.1"}', "application/vnd.in-toto+json")
        empty = put_blob(layout, b"{}", "application/vnd.oci.image.config.v1+json")
        oci_manifest = "application/vnd.oci.image.manifest.v1+json"
        att = put_blob(layout, json.dumps({"schemaVersion": 2, "mediaType": oci_manifest, "config": empty.descriptor(),
                                           "layers": [statement.descriptor()]}).encode(), oci_manifest)
        first = next(iter(images.values()))
        entries.append(att.descriptor(platform={"architecture": "unknown", "os": "unknown"}, annotations={
            "vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": first.digest}))
    index_type = "application/vnd.docker.distribution.manifest.list.v2+json" if flavour == "docker" else \
        "application/vnd.oci.image.index.v1+json"
    written = put_blob(layout, json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": entries}).encode(),
                       index_type)
    tag(layout, written, name)
    return written
