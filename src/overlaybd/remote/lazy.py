"""Opening a layer that lives in a repository: its blob through the cache, peeled and opened as LSMT."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import ExitStack

from ..cache.store import BlobCache
from ..formats.detect import peel
from ..formats.lsmt.layer import LsmtLayer
from ..source.base import BlockSource
from ..source.file import FileSource
from .errors import RemoteError
from .layout import OciLayout
from .registry import RegistryRepository
from .repository import Repository

log = logging.getLogger(__name__)
_CACHES: dict[str, BlobCache] = {}


def repository_for(blob_url: str) -> Repository:
    """A volume's ``repoBlobUrl`` -> the repository it names."""
    if blob_url.startswith("oci:"):
        return OciLayout(blob_url[4:])
    if blob_url.startswith(("http://", "https://")):
        return RegistryRepository.from_blob_url(blob_url)
    raise RemoteError(f"the volume names no repository it can read from ({blob_url!r})")


def shared_cache() -> BlobCache:
    from .. import cache as _cache_pkg  # noqa: F401
    from ..cache.store import default_dir

    root = default_dir()
    if root not in _CACHES:
        _CACHES[root] = BlobCache(root)
    return _CACHES[root]


def open_remote_blob(blob_url: str, digest: str, size: int, owned: ExitStack) -> BlockSource:
    repo = repository_for(blob_url)
    blob = owned.enter_context(repo.open_blob(digest, size))
    if isinstance(repo, OciLayout):
        return blob  # already a local file
    return owned.enter_context(shared_cache().source(digest, size, blob))


def open_remote_layer(blob_url: str, digest: str, size: int, owned: ExitStack, *, name: str,
                      download_to: str | None = None) -> LsmtLayer:
    """The layer in a repository blob. With ``download_to``, the whole blob is also downloaded in the background
    (verified by sha256, as the reference's ``download`` option does) and reads then switch to the local copy."""
    src: BlockSource = open_remote_blob(blob_url, digest, size, owned)
    if download_to is not None:
        switch = SwitchSource(src)
        thread = threading.Thread(target=_download, args=(blob_url, digest, size, download_to, switch, owned),
                                  name=f"download-{digest[7:19]}", daemon=True)
        thread.start()
        src = switch
    peeled = peel(src)
    return LsmtLayer(peeled.source, name=name)


class SwitchSource(BlockSource):
    """A filter whose source can be swapped for one with the same bytes (a finished download)."""

    def __init__(self, inner: BlockSource) -> None:
        self.inner = inner
        self.size = inner.size
        self.name = inner.name
        self.block_size = 1

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.inner.readinto(offset, buf)

    def invalidate(self, offset: int, length: int) -> None:
        self.inner.invalidate(offset, length)

    def switch(self, inner: BlockSource) -> None:
        if inner.size != self.size:
            raise RemoteError(f"replacement is {inner.size} bytes, not {self.size}", path=inner.name)
        self.inner = inner


def _download(blob_url: str, digest: str, size: int, dest: str, switch: SwitchSource, owned: ExitStack) -> None:
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if not os.path.exists(dest):
            repository_for(blob_url).fetch_blob(digest, size, dest)
        local = FileSource(dest)
        owned.callback(local.close)
        switch.switch(local)
        log.info("%s: downloaded and verified; reads now come from %s", digest, dest)
    except Exception as exc:  # reads go on from the repository
        log.warning("background download of %s failed: %s", digest, exc)
