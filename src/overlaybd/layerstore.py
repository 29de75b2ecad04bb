"""The machine's layer store: each verified layer blob once, named by its digest, shared by every volume through
hard links.

```
STORE/sha256/<hex>     a blob whose sha256 was checked when it came in; never written again
STORE/gc.lock          flock: shared while a blob is linked into a volume, exclusive while gc runs
```

A volume's layer file is a hard link to the store's blob (same inode), so pulling, cloning or creating volumes
from the same layers never stores a blob twice, and a volume copied with ``cp -a`` or moved to another machine is
still whole (the copy has the bytes). Removing a store name never loses a volume's data: the volume's link keeps
the inode. ``gc`` removes the blobs no volume links any more (a link count of one), under the lock that linking
takes, so a blob being linked is never removed between the look-up and the link. Where a volume lives on another
file system than the store, its layers are copied (stored twice) and the store is not used for them.

Default folder: ``$OVERLAYBD_LAYER_STORE``, else ``layers/`` in the cache folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .cache.folder import CacheError, hash_fd, open_root, open_subdir
from .cache.policy import default_dir as default_cache_dir
from .errors import DigestMismatchError, OverlaybdError

_HEX = re.compile(r"^[0-9a-f]{64}$")


class StoreError(OverlaybdError):
    """The layer store cannot do what was asked."""


def default_dir() -> str:
    return os.environ.get("OVERLAYBD_LAYER_STORE") or os.path.join(default_cache_dir(), "layers")


@dataclass(frozen=True, slots=True)
class StoredBlob:
    digest: str
    size: int
    links: int  # volumes (hard links) besides the store's own name


def _hex(digest: str) -> str:
    algo, sep, hexdigest = digest.partition(":")
    if algo != "sha256" or not sep or not _HEX.match(hexdigest):
        raise StoreError(f"bad digest {digest!r} (expected sha256:<64 hex digits>)")
    return hexdigest


class LayerStore:
    """The content-addressed store of verified layer blobs (module docstring)."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_dir())
        try:
            self.root_fd = open_root(self.root)
            self.blobs_fd = open_subdir(self.root_fd, "sha256", self.root)
        except CacheError as exc:
            raise StoreError(exc.message, path=exc.path) from None
        self.blobs = os.path.join(self.root, "sha256")

    def path(self, digest: str) -> str:
        return os.path.join(self.blobs, _hex(digest))

    def close(self) -> None:
        for fd in (self.blobs_fd, self.root_fd):
            os.close(fd)

    # -- locking -------------------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        fd = os.open("gc.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.root_fd)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    # -- in and out ----------------------------------------------------------------------------------------------
    def has(self, digest: str, size: int | None = None) -> bool:
        try:
            st = os.stat(_hex(digest), dir_fd=self.blobs_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def link_into(self, digest: str, size: int, dest: str) -> bool:
        """Hard-link the stored blob to ``dest`` (a new name); False if the store does not have it (of that size)
        or ``dest`` is on another file system."""
        hexdigest = _hex(digest)
        with self._locked(fcntl.LOCK_SH):
            if not self.has(digest, size):
                return False
            try:
                os.link(hexdigest, dest, src_dir_fd=self.blobs_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    return False
                raise
        return True

    def adopt(self, digest: str, path: str, *, verify: bool = False) -> bool:
        """Take a blob a volume already holds (its digest already checked, or checked now with ``verify``) into
        the store by hard link; False where that cannot be (another file system). A blob the store already has
        stays as it is."""
        hexdigest = _hex(digest)
        if verify:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                got = hash_fd(fd, os.fstat(fd).st_size, path)
            finally:
                os.close(fd)
            if got != digest:
                raise DigestMismatchError(f"content is {got}, expected {digest}", path=path)
        with self._locked(fcntl.LOCK_SH):
            try:
                os.link(path, hexdigest, dst_dir_fd=self.blobs_fd, follow_symlinks=False)
            except FileExistsError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    return False
                raise
        return True

    def fetch(self, digest: str, size: int, download: Callable[[str], None]) -> str:
        """The stored blob, downloaded first if the store lacks it: ``download(dest)`` writes the verified blob to
        ``dest`` atomically (a repository's ``fetch_blob``). Returns its path in the store."""
        path = self.path(digest)
        if not self.has(digest, size):
            download(path)
        return path

    # -- housekeeping --------------------------------------------------------------------------------------------
    def entries(self) -> list[StoredBlob]:
        out = []
        for name in sorted(os.listdir(self.blobs_fd)):
            if not _HEX.match(name):
                continue
            try:
                st = os.stat(name, dir_fd=self.blobs_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append(StoredBlob(f"sha256:{name}", st.st_size, st.st_nlink - 1))
        return out

    def gc(self, *, dry_run: bool = False) -> list[StoredBlob]:
        """Remove the blobs no volume links any more (and downloads left by interrupted fetches); returns them."""
        removed = []
        with self._locked(fcntl.LOCK_EX):
            for name in os.listdir(self.blobs_fd):
                if name.startswith(".download-") and not dry_run:
                    os.unlink(name, dir_fd=self.blobs_fd)
            for blob in self.entries():
                if blob.links == 0:
                    removed.append(blob)
                    if not dry_run:
                        os.unlink(_hex(blob.digest), dir_fd=self.blobs_fd)
        return removed


def place(store: LayerStore | None, digest: str, size: int, dest: str, download: Callable[[str], None]) -> str:
    """Put the verified blob at ``dest`` (a volume's layer file): linked from the store, after fetching it into the
    store if it lacks it; straight into ``dest`` where there is no store or it is on another file system.
    Returns "linked" (the store had it: nothing fetched) or "fetched"."""
    if store is None:
        download(dest)
        return "fetched"
    if store.link_into(digest, size, dest):
        return "linked"
    if os.stat(store.blobs).st_dev == os.stat(os.path.dirname(os.path.abspath(dest))).st_dev:
        store.fetch(digest, size, download)
        if store.link_into(digest, size, dest):
            return "fetched"
    download(dest)
    return "fetched"
