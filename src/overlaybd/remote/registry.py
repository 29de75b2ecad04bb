"""A repository in an OCI distribution registry: range reads, whole blobs, chunked uploads, mounts, manifests.

Every request goes to the repository's base URL (``scheme://host/v2/REPO``) through its client, one retry loop
per operation (:mod:`.http`). One repository object per (client, repository name) in the process
(:meth:`RegistryRepository.shared`, :meth:`RegistryRepository.from_blob_url`), so every layer of an image shares
its client's tokens and connections, and the blob redirects it learnt. To put mirrors in front of a repository
later (containerd's hosts.toml: mirrors in order, then the server), :meth:`RegistryRepository._endpoint` is the one
place that picks the (client, base URL) a request goes to.

What comes back is checked before it is used: manifests and configs are read up to ``MAX_MANIFEST_BYTES`` /
``MAX_CONFIG_BYTES`` (refused from Content-Length when it says more, and no further than that when it does not
say), digests are checked wherever they enter (descriptors, ``Docker-Content-Digest``, ``repoBlobUrl`` layers), a
whole blob is read no further than its declared size and verified, and a digest mismatch is final.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar
from urllib.parse import urljoin

import requests

from ..errors import UsageError
from ..source.base import BlockSource
from .bodies import Download, body_chunks, declared_length, read_capped
from .client import RegistryClient
from .errors import DigestMismatchError, NotFoundError, RemoteError, TransportError
from .http import Operation, Retryable
from .oci import (
    ACCEPT,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    check_digest,
    check_document,
    check_size,
    sha256_digest,
)
from .reference import is_repository_name, is_tag
from .repository import Progress

__all__ = ["HttpBlobSource", "RegistryClient", "RegistryRepository"]

T = TypeVar("T")

UPLOAD_CHUNK = 32 << 20
REDIRECT_TTL = 300.0  # keep a blob's redirect URL this long (signed URLs usually last longer)
READ_CHUNK = 1 << 20
PROGRESS = 8 << 20  # a cut download attempt that got this much further counts as progress (see http.Operation)


def _scope(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


class RegistryRepository:
    """A repository inside a registry."""

    _shared: ClassVar[dict[tuple[RegistryClient, str], RegistryRepository]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, client: RegistryClient, repo: str) -> None:
        if not is_repository_name(repo):
            raise UsageError(f"bad repository name {repo!r} (lowercase letters, digits, . _ - /)")
        self.client = client
        self.repo = repo
        self.name = f"{client.host}/{repo}"
        self._redirects: dict[str, tuple[str, float]] = {}  # digest -> (URL the blob redirected to, expiry)
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, client: RegistryClient, repo: str) -> RegistryRepository:
        """The process's repository object for this client and name."""
        with cls._shared_lock:
            found = cls._shared.get((client, repo))
            if found is None:
                found = cls._shared[(client, repo)] = cls(client, repo)
            return found

    @classmethod
    def from_blob_url(cls, url: str, **settings: Any) -> RegistryRepository:
        """``http(s)://HOST/v2/REPO/blobs`` (the reference's ``repoBlobUrl``) -> the shared repository. ``settings``
        go to :meth:`RegistryClient.shared` (``insecure``, ``ca_bundle``, ``credentials``, ``policy``)."""
        scheme, _, rest = url.partition("://")
        host, _, path = rest.partition("/")
        if scheme not in ("http", "https") or not host or not path.startswith("v2/") or not path.endswith("/blobs"):
            raise RemoteError(f"not a registry blob URL: {url}")
        repo = path[3 : -len("/blobs")]
        if not is_repository_name(repo):
            raise RemoteError(f"not a registry blob URL (bad repository name {repo!r}): {url}")
        return cls.shared(RegistryClient.shared(host, plain_http=scheme == "http", **settings), repo)

    def blob_url(self) -> str:
        return f"{self.client.base}/v2/{self.repo}/blobs"

    def _endpoint(self) -> tuple[RegistryClient, str]:
        """Where this repository's requests go: a client and the repository's base URL on it."""
        return self.client, f"{self.client.base}/v2/{self.repo}"

    def _request(self, method: str, suffix: str, *, scope: str, **kwargs: Any) -> requests.Response:
        client, base = self._endpoint()
        return client.request(method, base + suffix, scope=scope, path=self.name, **kwargs)

    def _run(self, what: str, attempt: Callable[[Operation], T]) -> T:
        return self._endpoint()[0].run(what, attempt, path=self.name)

    @contextmanager
    def _exchange(self, op: Operation, method: str, suffix: str, *, scope: str, **kwargs: Any
                  ) -> Iterator[requests.Response]:
        client, base = self._endpoint()
        with client.exchange(op, method, base + suffix, scope=scope, **kwargs) as r:
            yield r

    def _digest(self, digest: str) -> str:
        return check_digest(digest, "blob digest", path=self.name)

    def blob_size(self, digest: str) -> int | None:
        r = self._request("HEAD", f"/blobs/{self._digest(digest)}", scope=_scope(self.repo, "pull"))
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RemoteError(f"HEAD blob {digest}: HTTP {r.status_code}", path=self.name)
        size = declared_length(r)
        if size is None:
            raise TransportError(f"HEAD blob {digest}: no usable Content-Length", path=self.name)
        return check_size(size, f"blob {digest}", path=self.name)

    def open_blob(self, digest: str, size: int) -> BlockSource:
        return HttpBlobSource(self, self._digest(digest), check_size(size, f"blob {digest}", path=self.name))

    # -- range reads -----------------------------------------------------------------------------------------------
    def read_range(self, digest: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the blob's bytes at ``offset``: a Range GET (redirects followed and remembered). One
        operation: a dropped connection, a 5xx, a body cut short or a wrong Content-Range is retried in it."""
        digest = self._digest(digest)
        length = len(buf)
        want = f"bytes={offset}-{offset + length - 1}"

        def attempt(op: Operation) -> None:
            with self._open_range(op, digest, want) as r:
                if r.status_code == 404:
                    raise NotFoundError(f"blob {digest} is not in {self.name}")
                if r.status_code == 206:
                    got = r.headers.get("Content-Range", "")
                    if not got.startswith(f"bytes {offset}-{offset + length - 1}/"):
                        raise Retryable(f"asked for {want}, got Content-Range {got[:80]!r}")
                    skip = 0
                elif r.status_code == 200:  # a server that ignores Range: take our slice of the whole body
                    skip = offset
                else:
                    raise TransportError(f"range GET of {digest}: HTTP {r.status_code}", path=self.name)
                self._read_body(r, op, buf, skip, digest)

        self._run(f"range GET {digest} {want}", attempt)

    @contextmanager
    def _open_range(self, op: Operation, digest: str, want: str) -> Iterator[requests.Response]:
        url = self._remembered(digest)
        if url is not None:
            client = self._endpoint()[0]
            with client.exchange(op, "GET", url, scope="", headers={"Range": want}, authorize=False) as r:
                if r.status_code in (200, 206):
                    yield r
                    return
            with self._lock:
                self._redirects.pop(digest, None)
        with self._exchange(op, "GET", f"/blobs/{digest}", scope=_scope(self.repo, "pull"),
                            headers={"Range": want}) as r:
            if r.history and r.url and r.status_code in (200, 206):
                self._remember(digest, r.url)
            yield r

    def _remembered(self, digest: str) -> str | None:
        with self._lock:
            found = self._redirects.get(digest)
        return found[0] if found and found[1] > time.monotonic() else None

    def _remember(self, digest: str, url: str) -> None:
        now = time.monotonic()
        with self._lock:
            for stale in [d for d, (_, expiry) in self._redirects.items() if expiry <= now]:
                del self._redirects[stale]
            self._redirects[digest] = (url, now + REDIRECT_TTL)

    def _read_body(self, r: requests.Response, op: Operation, buf: memoryview, skip: int, digest: str) -> None:
        pos = 0
        for chunk in body_chunks(r, op, digest, size=min(READ_CHUNK, max(skip, len(buf) - pos))):
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk = chunk[skip:]
                skip = 0
            n = min(len(chunk), len(buf) - pos)
            buf[pos : pos + n] = chunk[:n]
            pos += n
            if pos == len(buf):
                return
        raise Retryable(f"response for {digest} ended after {pos} of {len(buf)} bytes")

    # -- whole blobs -----------------------------------------------------------------------------------------------
    def fetch_blob(self, digest: str, size: int, dest: str, progress: Progress | None = None) -> None:
        """Download the blob to ``dest`` (through a temporary file, renamed when verified). A body cut short is
        resumed from where it stopped, within the operation's attempts; a server that sends more than ``size``
        bytes, or bytes that hash to something else, is an error at once (DigestMismatchError)."""
        digest = self._digest(digest)
        size = check_size(size, f"blob {digest}", path=self.name)
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=os.path.dirname(os.path.abspath(dest)))
        try:
            with os.fdopen(fd, "wb") as out:
                download = Download(out, size, progress)
                self._run(f"GET blob {digest}", lambda op: self._download_attempt(op, digest, download))
                out.flush()
                os.fsync(out.fileno())
            got = download.digest()
            if got != digest:
                raise DigestMismatchError(f"downloaded {size} bytes hashing to {got}; expected {digest}",
                                          path=self.name)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _download_attempt(self, op: Operation, digest: str, download: Download) -> None:
        resume = download.done
        headers = {"Range": f"bytes={resume}-"} if resume else {}
        with self._exchange(op, "GET", f"/blobs/{digest}", scope=_scope(self.repo, "pull"), headers=headers) as r:
            if r.status_code == 404:
                raise NotFoundError(f"blob {digest} is not in {self.name}")
            if r.status_code == 206 and resume:
                if not r.headers.get("Content-Range", "").startswith(f"bytes {resume}-"):
                    download.restart()  # not the rest we asked for: start again from the first byte
                    raise Retryable(f"asked for bytes {resume}-, got Content-Range "
                                    f"{r.headers.get('Content-Range', '')[:80]!r}")
            elif r.status_code == 200:
                download.restart()
            else:
                raise TransportError(f"GET blob {digest}: HTTP {r.status_code}", path=self.name)
            declared = declared_length(r)
            if declared is not None and download.done + declared != download.size:
                raise DigestMismatchError(f"the registry sends {download.done + declared} bytes for {digest}; its "
                                          f"descriptor says {download.size}", path=self.name)
            start = download.done
            for chunk in body_chunks(r, op, f"{digest} at {download.done}", size=READ_CHUNK, bounded=False):
                if download.done + len(chunk) > download.size:
                    raise DigestMismatchError(f"the registry sent more than the {download.size} bytes {digest} "
                                              "has", path=self.name)
                download.write(chunk)
                if download.done - start >= PROGRESS:
                    op.progressed()
        if download.done < download.size:
            raise Retryable(f"body of {digest} ended after {download.done} of {download.size} bytes")

    def read_metadata_blob(self, digest: str, size: int) -> bytes:
        """A config (or another small JSON blob), whole: at most ``MAX_CONFIG_BYTES``, verified."""
        digest = self._digest(digest)
        size = check_size(size, f"blob {digest}", limit=MAX_CONFIG_BYTES, path=self.name)

        def attempt(op: Operation) -> bytes:
            with self._exchange(op, "GET", f"/blobs/{digest}", scope=_scope(self.repo, "pull")) as r:
                if r.status_code == 404:
                    raise NotFoundError(f"blob {digest} is not in {self.name}")
                if r.status_code != 200:
                    raise TransportError(f"GET blob {digest}: HTTP {r.status_code}", path=self.name)
                return read_capped(r, op, size, f"blob {digest}", path=self.name, exact=True)

        raw = self._run(f"GET blob {digest}", attempt)
        if sha256_digest(raw) != digest:
            raise DigestMismatchError(f"blob hashes to {sha256_digest(raw)}, expected {digest}", path=self.name)
        return raw

    def put_blob(self, path: str, digest: str, size: int, progress: Progress | None = None,
                 mount_from: tuple[str, ...] = ()) -> str:
        found = self.exists_or_mount(digest, size, mount_from)
        if found:
            return found
        return self._upload(path, digest, size, progress)

    def exists_or_mount(self, digest: str, size: int, mount_from: tuple[str, ...] = ()) -> str | None:
        """"exists" or "mounted" if the blob is (now) in this repository without uploading; else None."""
        if self.blob_size(digest) == size:
            return "exists"
        push = _scope(self.repo, "pull,push")
        for source in mount_from:
            if source == self.repo or not is_repository_name(source):
                continue
            scope = f"{push} {_scope(source, 'pull')}"
            r = self._request("POST", f"/blobs/uploads/?mount={digest}&from={source}", scope=scope)
            if r.status_code == 201:
                return "mounted"
            if r.status_code == 202:  # mount refused: it opened an ordinary upload; abandon it
                loc = r.headers.get("Location")
                if loc:
                    self._endpoint()[0].request("DELETE", self._location(loc), scope=push, path=self.name)
        return None

    def _location(self, location: str, current: str | None = None) -> str:
        return urljoin(current or self._endpoint()[0].base + "/", location)

    def _upload(self, path: str, digest: str, size: int, progress: Progress | None) -> str:
        push = _scope(self.repo, "pull,push")
        client = self._endpoint()[0]
        r = self._request("POST", "/blobs/uploads/", scope=push)
        if r.status_code != 202 or "Location" not in r.headers:
            raise RemoteError(f"cannot start an upload: HTTP {r.status_code}", path=self.name)
        location = self._location(r.headers["Location"])
        done = 0
        with open(path, "rb") as f:
            while size - done > UPLOAD_CHUNK:
                chunk = f.read(UPLOAD_CHUNK)
                start = done

                def body(chunk: bytes = chunk) -> bytes:
                    return chunk

                r = client.request("PATCH", location, scope=push, body=body, path=self.name, headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{start}-{start + len(chunk) - 1}", "Content-Length": str(len(chunk))})
                if r.status_code != 202:
                    raise RemoteError(f"chunk upload at {start}: HTTP {r.status_code}", path=self.name)
                location = self._location(r.headers.get("Location", location), location)
                done += len(chunk)
                if progress:
                    progress(done, size)
            rest = f.read()
        sep = "&" if "?" in location else "?"
        r = client.request("PUT", f"{location}{sep}digest={digest}", scope=push, body=lambda: rest, path=self.name,
                           headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(rest))})
        if r.status_code != 201:
            raise RemoteError(f"finishing the upload of {digest}: HTTP {r.status_code}", path=self.name)
        if progress:
            progress(size, size)
        return "uploaded"

    # -- manifests -------------------------------------------------------------------------------------------------
    def get_manifest(self, selector: str) -> tuple[bytes, str, str]:
        """(raw, media type, digest) of a manifest or index by tag or digest: at most MAX_MANIFEST_BYTES, its
        digest checked against the one asked for and the registry's Docker-Content-Digest, its descriptors checked."""
        by_digest = ":" in selector
        if by_digest:
            check_digest(selector, "manifest digest", path=self.name)
        elif not is_tag(selector):
            raise UsageError(f"bad tag {selector[:80]!r}", path=self.name)

        def attempt(op: Operation) -> tuple[bytes, str, str | None]:
            with self._exchange(op, "GET", f"/manifests/{selector}", scope=_scope(self.repo, "pull"),
                                headers={"Accept": ACCEPT}) as r:
                if r.status_code == 404:
                    raise NotFoundError(f"no manifest {selector!r} in {self.name}")
                if r.status_code != 200:
                    raise RemoteError(f"GET manifest {selector}: HTTP {r.status_code}", path=self.name)
                raw = read_capped(r, op, MAX_MANIFEST_BYTES, f"manifest {selector}", path=self.name)
                return raw, r.headers.get("Content-Type", "").split(";")[0].strip(), \
                    r.headers.get("Docker-Content-Digest")

        raw, media, claimed = self._run(f"GET manifest {selector}", attempt)
        digest = sha256_digest(raw)
        if claimed is not None:
            claimed = check_digest(claimed.strip(), "Docker-Content-Digest header", path=self.name)
            if claimed != digest:
                raise DigestMismatchError(f"manifest hashes to {digest}, the registry says {claimed}", path=self.name)
        if by_digest and digest != selector:
            raise DigestMismatchError(f"manifest hashes to {digest}, asked for {selector}", path=self.name)
        check_document(raw, media, path=self.name)
        return raw, media, digest

    def put_manifest(self, raw: bytes, media_type: str, tag: str | None) -> str:
        digest = sha256_digest(raw)
        if tag is not None and not is_tag(tag):
            raise UsageError(f"bad tag {tag[:80]!r}", path=self.name)
        r = self._request("PUT", f"/manifests/{tag or digest}", scope=_scope(self.repo, "pull,push"),
                          body=lambda: raw, headers={"Content-Type": media_type})
        if r.status_code not in (200, 201):
            raise RemoteError(f"PUT manifest: HTTP {r.status_code}", path=self.name)
        return digest


class HttpBlobSource(BlockSource):
    """A registry blob read by Range requests (each read one operation of the repository's retry loop)."""

    def __init__(self, repo: RegistryRepository, digest: str, size: int) -> None:
        self.repo = repo
        self.digest = digest
        self.size = size
        self.block_size = 1
        self.name = f"{repo.name}@{digest}"

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.repo.read_range(self.digest, offset, buf)
