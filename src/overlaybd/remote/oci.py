"""OCI manifests, configs and indexes for overlaybd snapshots (pure). Media types and annotations as the
reference convertor writes them (spec §6)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

MANIFEST_OCI = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_OCI = "application/vnd.oci.image.index.v1+json"
INDEX_DOCKER = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_OCI = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MANIFEST_TYPES = (MANIFEST_OCI, MANIFEST_DOCKER)
INDEX_TYPES = (INDEX_OCI, INDEX_DOCKER)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))

ANN_DIGEST = "containerd.io/snapshot/overlaybd/blob-digest"
ANN_SIZE = "containerd.io/snapshot/overlaybd/blob-size"
ANN_VERSION = "containerd.io/snapshot/overlaybd/version"
ANN_FS_TYPE = "containerd.io/snapshot/overlaybd/blob-fs-type"
ANN_ACCELERATION = "containerd.io/snapshot/overlaybd/acceleration-layer"
OVERLAYBD_VERSION = "0.1.0"
ANN_MESSAGE = "io.pyoverlaybd.snapshot.message"
ANN_REF_NAME = "org.opencontainers.image.ref.name"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Descriptor:
        return cls(str(obj.get("mediaType", "")), str(obj["digest"]), int(obj["size"]),
                   dict(obj.get("annotations") or {}), obj.get("platform"))

    @property
    def is_overlaybd(self) -> bool:
        return ANN_DIGEST in self.annotations and ANN_SIZE in self.annotations


def layer_descriptor(digest: str, size: int, message: str = "") -> Descriptor:
    ann = {ANN_DIGEST: digest, ANN_SIZE: str(size), ANN_VERSION: OVERLAYBD_VERSION}
    if message:
        ann[ANN_MESSAGE] = message
    return Descriptor(LAYER_TAR, digest, size, ann)


def image_config(layer_digests: list[str], *, architecture: str = "amd64", os_name: str = "linux") -> bytes:
    """As the convertor: the config's diff_ids are the overlaybd blob digests themselves."""
    return canonical({"architecture": architecture, "os": os_name,
                      "rootfs": {"type": "layers", "diff_ids": layer_digests}, "config": {}})


def manifest(config: Descriptor, layers: list[Descriptor], annotations: dict[str, str] | None = None) -> bytes:
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": MANIFEST_OCI, "config": config.to_json(),
                           "layers": [d.to_json() for d in layers]}
    if annotations:
        obj["annotations"] = annotations
    return canonical(obj)


@dataclass(frozen=True, slots=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str]

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        from ..errors import FormatError

        try:
            obj = json.loads(raw)
            return cls(Descriptor.from_json(obj["config"]), [Descriptor.from_json(d) for d in obj["layers"]],
                       dict(obj.get("annotations") or {}))
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"not an image manifest: {exc}") from None


def pick_from_index(raw: bytes, *, os_name: str = "linux", architecture: str = "amd64") -> Descriptor:
    """The manifest for a platform in an image index (the first overlaybd-looking one wins ties)."""
    from ..errors import FormatError

    try:
        entries = [Descriptor.from_json(d) for d in json.loads(raw)["manifests"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"not an image index: {exc}") from None
    for d in entries:
        p = d.platform or {}
        if p.get("os", os_name) == os_name and p.get("architecture", architecture) == architecture:
            return d
    if not entries:
        raise FormatError("the image index lists no manifests")
    return entries[0]
