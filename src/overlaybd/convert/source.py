"""The image to convert, read from a repository (an OCI layout directory or a registry): its top manifest or index,
its configs and its layer blobs, each verified against its digest."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, UnsupportedError, UsageError
from ..remote.errors import NotFoundError
from ..remote.repository import Progress, Repository
from . import imagespec

MAX_JSON = 16 << 20  # configs and manifests larger than this are refused


@dataclass(frozen=True, slots=True)
class Top:
    """What a reference resolves to: a manifest or an index."""

    raw: bytes
    media_type: str
    digest: str

    @property
    def is_index(self) -> bool:
        if self.media_type in imagespec.INDEX_TYPES:
            return True
        if self.media_type in imagespec.MANIFEST_TYPES:
            return False
        if self.media_type == imagespec.MANIFEST_DOCKER_V1:
            raise UnsupportedError("a Docker schema 1 manifest: convert images with schema 2 or OCI manifests")
        try:
            doc = json.loads(self.raw)
        except ValueError:
            raise FormatError(f"manifest {self.digest} is not JSON") from None
        if not isinstance(doc, dict):
            raise FormatError(f"manifest {self.digest} is not a JSON object")
        declared = doc.get("mediaType")
        if declared in imagespec.INDEX_TYPES or (declared is None and "manifests" in doc):
            return True
        if "layers" in doc or declared in imagespec.MANIFEST_TYPES:
            return False
        raise UnsupportedError(f"{self.digest} is neither an image manifest nor an index "
                               f"(media type {self.media_type or declared!r})")


def resolve(repo: Repository, selector: str) -> Top:
    raw, media, digest = repo.get_manifest(selector)
    return Top(raw, media, digest)


def fetch_json(repo: Repository, descriptor: dict[str, Any], folder: str, what: str) -> bytes:
    """A small blob (a config), downloaded and checked against its digest."""
    digest, size = str(descriptor.get("digest", "")), int(descriptor.get("size") or 0)
    if size > MAX_JSON:
        raise FormatError(f"{what} {digest} is {size} bytes: too large")
    dest = os.path.join(folder, digest.replace(":", "-") + ".json")
    fetch_blob(repo, descriptor, dest, what=what)
    with open(dest, "rb") as f:
        raw = f.read()
    os.unlink(dest)
    return raw


def fetch_blob(repo: Repository, descriptor: dict[str, Any], dest: str, *, what: str,
               progress: Progress | None = None) -> None:
    digest, size = str(descriptor.get("digest", "")), int(descriptor.get("size") or 0)
    if not digest.startswith("sha256:"):
        raise UnsupportedError(f"{what} has digest {digest!r}: only sha256 is supported")
    try:
        repo.fetch_blob(digest, size, dest, progress)
    except NotFoundError:
        if descriptor.get("urls"):
            raise UnsupportedError(f"{what} {digest} is a foreign layer (only at {descriptor['urls'][0]}): "
                                   "not supported") from None
        raise


def child_manifest(repo: Repository, descriptor: dict[str, Any]) -> Top:
    """A manifest an index lists, by digest (its bytes checked against the digest)."""
    digest = str(descriptor.get("digest", ""))
    if not digest.startswith("sha256:"):
        raise UsageError(f"index entry with digest {digest!r}: only sha256 is supported")
    top = resolve(repo, digest)
    if imagespec.sha256_digest(top.raw) != digest:
        raise FormatError(f"manifest {digest} does not hash to its digest")
    return Top(top.raw, top.media_type or str(descriptor.get("mediaType", "")), digest)
