"""Image manifests, configs and indexes as the reference convertor reads and writes them (pure): the Go structs of
``opencontainers/image-spec`` v1.1 (``specs.Manifest``, ``specs.Image``, ``specs.Index``), read and written by
``gojson``. What the convertor changes:

* manifest: its media type (Docker by default, OCI with ``oci``), the config descriptor (media type, digest, size
  and nothing else), every layer replaced by the overlaybd blob's descriptor with the three overlaybd annotations;
  the rest (schemaVersion, artifactType, subject, annotations) kept;
* config: re-encoded as an OCI image config (fields other than those of ``specs.Image`` are dropped, Docker's among
  them) with ``rootfs.diff_ids`` set to the layer blob digests;
* index: each manifest descriptor given the converted manifest's media type, digest and size (platform and
  annotations kept); attestation manifests dropped; its media type set to the OCI one with ``oci``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError
from . import gojson
from .gojson import BOOL, BYTES, INT, SET_MAP, STR_MAP, STRING, STRINGS, TIME, Field, Struct

MANIFEST_OCI = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
INDEX_OCI = "application/vnd.oci.image.index.v1+json"
INDEX_DOCKER = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_OCI = "application/vnd.oci.image.config.v1+json"
CONFIG_DOCKER = "application/vnd.docker.container.image.v1+json"
LAYER_OCI = "application/vnd.oci.image.layer.v1.tar"
LAYER_DOCKER = "application/vnd.docker.image.rootfs.diff.tar"
MANIFEST_TYPES = (MANIFEST_OCI, MANIFEST_DOCKER)
INDEX_TYPES = (INDEX_OCI, INDEX_DOCKER)

ANN_DIGEST = "containerd.io/snapshot/overlaybd/blob-digest"
ANN_SIZE = "containerd.io/snapshot/overlaybd/blob-size"
ANN_VERSION = "containerd.io/snapshot/overlaybd/version"
OVERLAYBD_VERSION = "0.1.0"
ATTESTATION_KEY = "vnd.docker.reference.type"
ATTESTATION_VALUE = "attestation-manifest"

PLATFORM_FIELDS = (Field("architecture", STRING), Field("os", STRING), Field("os.version", STRING, omitempty=True),
                   Field("os.features", STRINGS, omitempty=True), Field("variant", STRING, omitempty=True))
PLATFORM = Struct("Platform", PLATFORM_FIELDS)
DESCRIPTOR = Struct("Descriptor", (
    Field("mediaType", STRING), Field("digest", STRING), Field("size", INT), Field("urls", STRINGS, omitempty=True),
    Field("annotations", STR_MAP, omitempty=True), Field("data", BYTES, omitempty=True),
    Field("platform", PLATFORM, omitempty=True, pointer=True), Field("artifactType", STRING, omitempty=True)))
MANIFEST = Struct("Manifest", (
    Field("schemaVersion", INT), Field("mediaType", STRING, omitempty=True),
    Field("artifactType", STRING, omitempty=True), Field("config", DESCRIPTOR),
    Field("layers", DESCRIPTOR, many=True), Field("subject", DESCRIPTOR, omitempty=True, pointer=True),
    Field("annotations", STR_MAP, omitempty=True)))
INDEX = Struct("Index", (
    Field("schemaVersion", INT), Field("mediaType", STRING, omitempty=True),
    Field("artifactType", STRING, omitempty=True), Field("manifests", DESCRIPTOR, many=True),
    Field("subject", DESCRIPTOR, omitempty=True, pointer=True), Field("annotations", STR_MAP, omitempty=True)))
IMAGE_CONFIG = Struct("ImageConfig", (
    Field("User", STRING, omitempty=True), Field("ExposedPorts", SET_MAP, omitempty=True),
    Field("Env", STRINGS, omitempty=True), Field("Entrypoint", STRINGS, omitempty=True),
    Field("Cmd", STRINGS, omitempty=True), Field("Volumes", SET_MAP, omitempty=True),
    Field("WorkingDir", STRING, omitempty=True), Field("Labels", STR_MAP, omitempty=True),
    Field("StopSignal", STRING, omitempty=True), Field("ArgsEscaped", BOOL, omitempty=True)))
ROOTFS = Struct("RootFS", (Field("type", STRING), Field("diff_ids", STRINGS)))
HISTORY = Struct("History", (
    Field("created", TIME, omitempty=True, pointer=True), Field("created_by", STRING, omitempty=True),
    Field("author", STRING, omitempty=True), Field("comment", STRING, omitempty=True),
    Field("empty_layer", BOOL, omitempty=True)))
IMAGE = Struct("Image", (
    Field("created", TIME, omitempty=True, pointer=True), Field("author", STRING, omitempty=True),
    *PLATFORM_FIELDS, Field("config", IMAGE_CONFIG, omitempty=True), Field("rootfs", ROOTFS),
    Field("history", HISTORY, omitempty=True, many=True)))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def media_types(oci: bool) -> tuple[str, str, str]:
    """(manifest, config, layer) media types of a converted image."""
    return (MANIFEST_OCI, CONFIG_OCI, LAYER_OCI) if oci else (MANIFEST_DOCKER, CONFIG_DOCKER, LAYER_DOCKER)


@dataclass(frozen=True, slots=True)
class Blob:
    digest: str
    size: int


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: the first is the first diff ID, then sha256 of "<previous chain ID> <diff ID>"."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def chain_uuid(chain_id: str) -> str:
    """The layer uuid the reference derives from a chain ID: its first 32 hex digits as 8-4-4-4-12."""
    h = chain_id.split(":", 1)[1]
    if len(h) < 32:
        raise FormatError(f"chain ID {chain_id!r} is too short for a uuid")
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def layer_descriptor(blob: Blob, oci: bool) -> dict[str, Any]:
    return {"mediaType": media_types(oci)[2], "digest": blob.digest, "size": blob.size,
            "annotations": {ANN_VERSION: OVERLAYBD_VERSION, ANN_DIGEST: blob.digest, ANN_SIZE: str(blob.size)}}


def read_manifest(raw: bytes, where: str) -> dict[str, Any]:
    return gojson.decode(MANIFEST, raw, where)


def read_index(raw: bytes, where: str) -> dict[str, Any]:
    return gojson.decode(INDEX, raw, where)


def read_config(raw: bytes, where: str) -> dict[str, Any]:
    return gojson.decode(IMAGE, raw, where)


def is_attestation(descriptor: dict[str, Any]) -> bool:
    return bool((descriptor.get("annotations") or {}).get(ATTESTATION_KEY) == ATTESTATION_VALUE)


def converted_config(config: dict[str, Any], layers: list[Blob]) -> bytes:
    """The config with its diff IDs replaced by the overlaybd blob digests (the reference assigns them in place,
    so the source must list as many diff IDs as the image has layers; a base layer is put first by the caller)."""
    rootfs = dict(config.get("rootfs") or {})
    rootfs["diff_ids"] = [blob.digest for blob in layers]
    return gojson.encode(IMAGE, {**config, "rootfs": rootfs})


def converted_manifest(manifest: dict[str, Any], config: Blob, layers: list[Blob], oci: bool) -> bytes:
    mt, ct, _ = media_types(oci)
    out = dict(manifest)
    out["mediaType"] = mt
    out["config"] = {"mediaType": ct, "digest": config.digest, "size": config.size}
    out["layers"] = [layer_descriptor(blob, oci) for blob in layers]
    return gojson.encode(MANIFEST, out)


def converted_index(index: dict[str, Any], converted: dict[int, tuple[str, Blob]], oci: bool) -> bytes:
    """``converted``: position in the source index -> (media type, blob) of its converted manifest; the others
    (attestations) are dropped."""
    out = dict(index)
    manifests = []
    for n, descriptor in enumerate(index.get("manifests") or []):
        if n not in converted:
            continue
        media, blob = converted[n]
        manifests.append({**descriptor, "mediaType": media, "digest": blob.digest, "size": blob.size})
    out["manifests"] = manifests
    if oci:
        out["mediaType"] = INDEX_OCI
    return gojson.encode(INDEX, out)
