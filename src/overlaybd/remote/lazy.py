"""Opening a layer that lives in a repository: its blob through the cache, peeled and opened as LSMT; and the
volume layer opener that does so for snapshots pulled lazily.

A registry with mirrors (hosts.toml) serves a blob from several hosts: :class:`MirroredSource` reads it from the
first that has not failed it, each host through the cache under an origin of its own, so a mirror's bytes never
serve a read through another host until the whole blob has matched its digest. A host that refuses the blob (404,
auth), whose cached entry fails its whole-blob check, or whose bytes fail a check above the cache (a ZFile block's
CRC) is left for the next one, for that blob; one whose connection fails (passed over for a while) or that is
still fetching the blob (a cold pull-through cache) leaves only that read to the next host."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from ..cache.store import BlobCache, default_dir
from ..errors import DigestMismatchError, FormatError, OverlaybdError
from ..formats.detect import peel
from ..formats.lsmt.layer import LsmtLayer
from ..layerstore import LayerStore
from ..source.base import BlockSource
from ..source.file import FileSource
from ..source.filter import Filter
from ..volume import Layer, LocalLayers, Volume
from .errors import RangeRefusedError, RemoteError, TransportError
from .layout import OciLayout
from .oci import sha256_digest
from .registry import Endpoint, RegistryRepository
from .repository import Repository

log = logging.getLogger(__name__)
PROVE_FIRST = 4 << 20  # a mirror's blob this small is checked whole before it serves a read
_CACHES: dict[str, BlobCache] = {}
_CACHES_LOCK = threading.Lock()


def repository_for(blob_url: str) -> Repository:
    """A volume's ``repoBlobUrl`` -> the repository it names."""
    if blob_url.startswith("oci:"):
        return OciLayout(blob_url[4:])
    if blob_url.startswith(("http://", "https://")):
        return RegistryRepository.from_blob_url(blob_url)
    raise RemoteError(f"the volume names no repository it can read from ({blob_url!r})")


def shared_cache() -> BlobCache:
    """The process's cache at the default folder (one per folder, shared by every layer opened)."""
    root = os.path.abspath(default_dir())
    with _CACHES_LOCK:
        if root not in _CACHES:
            _CACHES[root] = BlobCache(root)
        return _CACHES[root]


def use_cache(cache: BlobCache) -> None:
    """Make ``cache`` the process's cache for its folder (a policy of one's own: benchmarks, embedders)."""
    with _CACHES_LOCK:
        _CACHES[cache.root] = cache


def open_remote_blob(blob_url: str, digest: str, size: int, owned: ExitStack) -> BlockSource:
    """A blob of a repository, random access: a local file for an OCI layout, else range reads through the cache
    (its bytes kept apart as this repository's until the whole blob is proven)."""
    repo = repository_for(blob_url)
    if isinstance(repo, RegistryRepository) and len(repo.pull_endpoints()) > 1:
        return owned.enter_context(MirroredSource(repo, digest, size, shared_cache()))
    blob = owned.enter_context(repo.open_blob(digest, size))
    if isinstance(repo, OciLayout):
        return blob  # already a local file
    return owned.enter_context(shared_cache().source(digest, size, blob, origin=repo.blob_url()))


class MirroredSource(BlockSource):
    """A registry blob that several hosts serve (mirrors in order, then the server), each host's bytes through the
    cache under that host's own origin. Reads go to the current host; when it refuses them (404, auth) or a check
    above finds its bytes wrong (``invalidate``: a ZFile block's CRC), the next host becomes current for this blob,
    and the read is made again there; a connection failure or a refused range sends only that read on. A host
    caught with other bytes for the whole blob (its cached entry condemned, or a digest mismatch) is left the same
    way if it served no read here; if it did, what was read from it (the layer's index, its ZFile jump table) may
    belong to another blob, so every later read fails (``DigestMismatchError``) and the next opening of the layer
    reads from the next host. A blob of at most ``PROVE_FIRST`` bytes (one that a layer's opening may read whole)
    is read whole from a mirror and checked before any read of it is served. The last host's errors are final."""

    def __init__(self, repo: RegistryRepository, digest: str, size: int, cache: BlobCache) -> None:
        self.repo = repo
        self.digest = digest
        self.size = size
        self.block_size = 1
        self.name = f"{repo.name}@{digest}"
        self.cache = cache
        self.endpoints = repo.pull_endpoints()
        self._opened: dict[int, BlockSource] = {}
        self._current = 0
        self._served: set[int] = set()  # hosts that served a read here
        self._proven: set[int] = set()  # mirrors whose whole (small) blob matched the digest
        self.failure: DigestMismatchError | None = None
        self._lock = threading.Lock()

    def _source(self, n: int) -> BlockSource:
        with self._lock:
            found = self._opened.get(n)
            if found is None:
                e: Endpoint = self.endpoints[n]
                blob = self.repo.open_blob(self.digest, self.size, e)
                found = self._opened[n] = self.cache.source(self.digest, self.size, blob,
                                                            origin=self.repo.origin_of(e))
            if n == len(self.endpoints) - 1 or self.size > PROVE_FIRST or n in self._proven:
                return found
        if sha256_digest(found.pread(0, self.size)) != self.digest:  # a small blob: checked whole before use
            raise DigestMismatchError(f"{self.endpoints[n].client.host} sent {self.size} bytes that do not hash "
                                      "to the digest", path=self.digest)
        with self._lock:
            self._proven.add(n)
        return found

    @property
    def current(self) -> Endpoint:
        return self.endpoints[self._current]

    def _leave(self, n: int, why: object) -> None:
        with self._lock:
            if self._current == n and n < len(self.endpoints) - 1:
                self._current = n + 1
                log.warning("%s: %s failed this blob (%s); reading it from %s now", self.name,
                            self.endpoints[n].client.host, why, self.endpoints[n + 1].client.host)

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        n = self._current
        last = len(self.endpoints) - 1
        while True:
            if self.failure is not None:
                raise self.failure
            try:
                self._source(n).readinto(offset, buf)
            except (RangeRefusedError, TransportError):  # a mirror still fetching the blob, or failing for now
                if n == last:  # (passed over for a while): the next host serves this read, the mirror stays
                    raise
                n += 1
                continue
            except DigestMismatchError as exc:
                if n == last:
                    raise
                self._caught(n, exc)
            except (RemoteError, FormatError) as exc:
                if n == last:
                    raise
                self._leave(n, exc)
            else:
                if n not in self._served:
                    with self._lock:
                        self._served.add(n)
                return
            n = max(n + 1, self._current)

    def _caught(self, n: int, exc: DigestMismatchError) -> None:
        """Host ``n`` sent other bytes for this blob: left at once if it served no read here, else reads stop."""
        self.repo.mark_bad(self.endpoints[n], self.digest)
        with self._lock:
            served = n in self._served
        if not served:
            self._leave(n, exc)
            return
        self.failure = DigestMismatchError(
            f"{self.endpoints[n].client.host} served bytes of another blob ({exc.message}); what was read from it "
            "may be wrong, so reads of this layer stop here; opened again, it is read from "
            f"{self.endpoints[n + 1].client.host}", path=self.digest)
        log.warning("%s", self.failure)
        raise self.failure

    def invalidate(self, offset: int, length: int) -> None:
        """A check above found these bytes wrong: the current host's are dropped, and the next host serves this
        blob from now on (the last host's are dropped and fetched again, as without mirrors)."""
        n = self._current
        self._source(n).invalidate(offset, length)
        if n < len(self.endpoints) - 1:
            self.repo.mark_bad(self.endpoints[n], self.digest)
        self._leave(n, f"bytes at {offset} failed a check")

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, {}
        for src in opened.values():
            src.close()

    def describe(self) -> dict[str, object]:
        return {"digest": self.digest, "hosts": [e.client.host for e in self.endpoints],
                "current": self.current.client.host}


def open_remote_layer(blob_url: str, digest: str, size: int, owned: ExitStack, *, name: str,
                      download_to: str | None = None) -> LsmtLayer:
    """The layer in a repository blob. With ``download_to``, the whole blob is also downloaded in the background
    (verified by sha256, as the reference's ``download`` option does) and reads then switch to the local copy; a
    download whose bytes do not match the digest stops reads of that blob from the repository (they fail)."""
    src: BlockSource = open_remote_blob(blob_url, digest, size, owned)
    if download_to is not None:
        switch = SwitchSource(src)
        thread = threading.Thread(target=_download, args=(blob_url, digest, size, download_to, switch, owned),
                                  name=f"download-{digest[7:19]}", daemon=True)
        thread.start()
        src = switch
    peeled = peel(src)
    return LsmtLayer(peeled.source, name=name)


class RemoteLayers(LocalLayers):
    """A volume's snapshots: local files where they are, else from the volume's repository (``repoBlobUrl``),
    opened concurrently (each costs round trips for its index)."""

    def open_lowers(self, volume: Volume, numbers: Sequence[int], owned: ExitStack) -> list[Layer]:
        numbers = list(numbers)
        remote = [n for n in numbers if not os.path.exists(volume.lowers[n])]
        if len(remote) < 2:
            return [self._open(volume, n, owned) for n in numbers]
        stacks = {n: ExitStack() for n in numbers}
        try:
            with ThreadPoolExecutor(max_workers=min(8, len(numbers)), thread_name_prefix="open-layer") as pool:
                layers = list(pool.map(lambda n: self._open(volume, n, stacks[n]), numbers))
        except BaseException:
            for st in stacks.values():
                st.close()
            raise
        for n in numbers:
            owned.enter_context(stacks[n])
        return layers

    def _open(self, volume: Volume, n: int, owned: ExitStack) -> Layer:
        path = volume.lowers[n]
        entry = volume.config["lowers"][n]
        if os.path.exists(path) or "digest" not in entry:
            return self.open_local(volume, n, owned)
        download = bool((volume.config.get("download") or {}).get("enable"))
        return open_remote_layer(entry.get("repoBlobUrl") or volume.config.get("repoBlobUrl", ""), entry["digest"],
                                 int(entry["size"]), owned,
                                 name=path, download_to=path if download else None)


class SwitchSource(Filter):
    """A filter whose source can be swapped for one with the same bytes (a finished download), or cut off (a
    download that proved the repository's bytes wrong)."""

    def switch(self, inner: BlockSource) -> None:
        if inner.size != self.size:
            raise RemoteError(f"replacement is {inner.size} bytes, not {self.size}", path=inner.name)
        self.inner = inner


class FailedSource(Filter):
    """Every read fails with the error that cut the source off."""

    def __init__(self, inner: BlockSource, error: OverlaybdError) -> None:
        super().__init__(inner)
        self.error = error

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        raise self.error


def _keep_in_store(digest: str, path: str) -> None:
    """A downloaded (verified) layer joins the machine's layer store, for the next volume that needs it."""
    try:
        store = LayerStore()
        try:
            store.adopt(digest, path)
        finally:
            store.close()
    except (OverlaybdError, OSError) as exc:
        log.info("%s: not kept in the layer store: %s", digest, exc)


def _download(blob_url: str, digest: str, size: int, dest: str, switch: SwitchSource, owned: ExitStack) -> None:
    repo = None
    try:
        repo = repository_for(blob_url)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if not os.path.exists(dest):
            repo.fetch_blob(digest, size, dest)
        local = FileSource(dest)
        owned.callback(local.close)
        switch.switch(local)
        if not isinstance(repo, OciLayout):
            shared_cache().adopt(digest, dest)  # proven: every repository's readers may share it now
        _keep_in_store(digest, dest)
        log.info("%s: downloaded and verified; reads now come from %s", digest, dest)
    except DigestMismatchError as exc:
        origin = repo.blob_url() if repo is not None else blob_url
        if not isinstance(repo, OciLayout):
            shared_cache().condemn(digest, origin, str(exc))
        error = DigestMismatchError(f"the background download from {origin} does not match the digest ({exc}); "
                                    "reads of this layer are stopped", path=digest)
        switch.switch(FailedSource(switch.inner, error))
        log.warning("%s", error)
    except Exception as exc:  # reads go on from the repository
        log.warning("background download of %s failed: %s", digest, exc)
