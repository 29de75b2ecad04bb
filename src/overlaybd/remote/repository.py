"""What a repository offers, whatever it is (an OCI layout directory, a registry)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..source.base import BlockSource

Progress = Callable[[int, int], None]


class Repository(Protocol):
    name: str

    def blob_size(self, digest: str) -> int | None:
        """Size of a blob that is there; None if it is not."""

    def open_blob(self, digest: str, size: int) -> BlockSource:
        """Random access to a blob (range reads for a registry)."""

    def fetch_blob(self, digest: str, size: int, dest: str, progress: Progress | None = None) -> None:
        """Download a whole blob to ``dest``, verifying its sha256; nothing is left at ``dest`` on failure."""

    def read_metadata_blob(self, digest: str, size: int) -> bytes:
        """A config (or another small JSON blob) whole, verified; refused beyond ``oci.MAX_CONFIG_BYTES``."""

    def put_blob(self, path: str, digest: str, size: int, progress: Progress | None = None) -> str:
        """Upload a blob unless it is there; returns "exists", "mounted" or "uploaded"."""

    def get_manifest(self, selector: str) -> tuple[bytes, str, str]:
        """(raw bytes, media type, digest) of a manifest or index, by tag or digest: at most
        ``oci.MAX_MANIFEST_BYTES``, its digest and descriptors checked (``oci.check_document``)."""

    def put_manifest(self, raw: bytes, media_type: str, tag: str | None) -> str:
        """Store a manifest (and tag it); returns its digest."""

    def blob_url(self) -> str:
        """What the volume's config.json records as ``repoBlobUrl`` for lazy reads."""
