"""OCI manifests, configs and indexes for overlaybd snapshots (pure). Media types and annotations as the
reference convertor writes them.

Whatever a registry or a layout hands us is checked here, when it is parsed, before anything is downloaded or
named after it: documents of at most ``MAX_MANIFEST_BYTES`` (containerd's 4 MiB), digests of the form
``sha256:<64 lowercase hex>`` (never a path: ``../../x`` is refused), sizes from 0 to ``MAX_BLOB_SIZE``, configs
of at most ``MAX_CONFIG_BYTES``, and at most ``MAX_LAYERS`` (255, the LSMT stack limit) layers in a manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, LimitError, UnsupportedError
from ..formats.lsmt.spec import MAX_LAYERS
from .errors import InvalidDigestError

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


MAX_MANIFEST_BYTES = 4 << 20  # a manifest or an index, as containerd limits them
MAX_CONFIG_BYTES = 4 << 20  # an image config
MAX_BLOB_SIZE = 1 << 53  # 8 PiB: beyond it a JSON number no longer holds the size exactly, and no blob is that big
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_DECIMAL = re.compile(r"[0-9]{1,19}")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_digest(value: object, what: str = "digest", *, path: str | None = None) -> str:
    """``value`` if it is ``sha256:`` and 64 lowercase hex digits; else a one-line typed error naming ``what``."""
    if isinstance(value, str) and _SHA256.fullmatch(value):
        return value
    if isinstance(value, str) and _ANY_DIGEST.fullmatch(value) and not value.startswith("sha256:"):
        raise UnsupportedError(f"{what}: digest algorithm {_shown(value.partition(':')[0])} is not supported "
                               "(sha256 only)", path=path)
    raise InvalidDigestError(f"{what}: {_shown(value)} is not a digest (sha256:<64 hex digits>)", path=path)


def check_size(value: object, what: str = "size", *, limit: int = MAX_BLOB_SIZE, path: str | None = None) -> int:
    """A declared size: an integer from 0 to ``limit``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{what}: {_shown(value)} is not a size in bytes", path=path)
    if value < 0:
        raise FormatError(f"{what}: negative size {value}", path=path)
    if value > limit:
        raise LimitError(f"{what}: {value} bytes is more than the {limit} allowed", path=path)
    return value


def _string_map(value: object, what: str, path: str | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError(f"{what}: not a map of strings", path=path)
    return dict(value)


def _load_object(raw: bytes, what: str, path: str | None) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise LimitError(f"{what} of {len(raw)} bytes is more than the {MAX_MANIFEST_BYTES} allowed", path=path)
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"not an {what}: {str(exc)[:200]}", path=path) from None
    if not isinstance(obj, dict):
        raise FormatError(f"not an {what}: a JSON {type(obj).__name__}, not an object", path=path)
    return obj


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
    def from_json(cls, obj: object, what: str = "descriptor", *, path: str | None = None,
                  size_limit: int = MAX_BLOB_SIZE) -> Descriptor:
        """A descriptor, checked: a digest, a size in range, string media type and annotations."""
        if not isinstance(obj, dict):
            raise FormatError(f"{what}: not a descriptor object", path=path)
        media = obj.get("mediaType", "")
        if not isinstance(media, str):
            raise FormatError(f"{what}: mediaType {_shown(media)} is not a string", path=path)
        if "digest" not in obj or "size" not in obj:
            raise FormatError(f"{what}: a descriptor needs a digest and a size", path=path)
        digest = check_digest(obj["digest"], f"{what} digest", path=path)
        size = check_size(obj["size"], f"{what} size", limit=size_limit, path=path)
        annotations = _string_map(obj.get("annotations"), f"{what} annotations", path)
        if ANN_DIGEST in annotations:
            check_digest(annotations[ANN_DIGEST], f"{what} annotation {ANN_DIGEST}", path=path)
        if ANN_SIZE in annotations:
            text = annotations[ANN_SIZE]
            check_size(int(text) if _DECIMAL.fullmatch(text) else text, f"{what} annotation {ANN_SIZE}", path=path)
        platform = obj.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise FormatError(f"{what}: platform is not an object", path=path)
        return cls(media, digest, size, annotations, platform)

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
    def parse(cls, raw: bytes, *, path: str | None = None) -> Manifest:
        """An image manifest, checked (see the module's docstring); ``path`` names where it came from."""
        obj = _load_object(raw, "image manifest", path)
        layers = obj.get("layers")
        if "config" not in obj or not isinstance(layers, list):
            raise FormatError("not an image manifest: it needs a config and a list of layers", path=path)
        if len(layers) > MAX_LAYERS:
            raise LimitError(f"the manifest lists {len(layers)} layers; an overlaybd stack holds at most "
                             f"{MAX_LAYERS}", path=path)
        config = Descriptor.from_json(obj["config"], "config", path=path, size_limit=MAX_CONFIG_BYTES)
        return cls(config, [Descriptor.from_json(d, f"layer {n}", path=path) for n, d in enumerate(layers)],
                   _string_map(obj.get("annotations"), "manifest annotations", path))


def parse_index(raw: bytes, *, path: str | None = None) -> list[Descriptor]:
    """The manifests an image index lists, checked (each at most ``MAX_MANIFEST_BYTES``)."""
    obj = _load_object(raw, "image index", path)
    entries = obj.get("manifests")
    if not isinstance(entries, list):
        raise FormatError("not an image index: it needs a list of manifests", path=path)
    return [Descriptor.from_json(d, f"index entry {n}", path=path, size_limit=MAX_MANIFEST_BYTES)
            for n, d in enumerate(entries)]


def is_index(raw: bytes, media_type: str) -> bool:
    return media_type in INDEX_TYPES or (not media_type and b'"manifests"' in raw)


def check_document(raw: bytes, media_type: str, *, path: str | None = None) -> None:
    """What a repository hands out as a manifest, checked before it goes further: an index or a manifest by its
    media type (or, without one, by its shape); other media types are left to whoever reads them."""
    if is_index(raw, media_type):
        parse_index(raw, path=path)
    elif media_type in MANIFEST_TYPES or not media_type:
        Manifest.parse(raw, path=path)


def pick_from_index(raw: bytes, *, os_name: str = "linux", architecture: str = "amd64",
                    path: str | None = None) -> Descriptor:
    """The manifest for a platform in an image index (the first overlaybd-looking one wins ties)."""
    entries = parse_index(raw, path=path)
    for d in entries:
        p = d.platform or {}
        if p.get("os", os_name) == os_name and p.get("architecture", architecture) == architecture:
            return d
    if not entries:
        raise FormatError("the image index lists no manifests", path=path)
    return entries[0]
