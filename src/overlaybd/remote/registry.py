"""A repository in an OCI distribution registry: range reads, whole blobs, chunked uploads, mounts, manifests.

Every request goes to one of the repository's endpoints (``scheme://host/v2/REPO`` on a host, each with its own
client: tokens are per host), one retry loop per operation (:mod:`.http`). The endpoints are the registry's hosts
as its hosts.toml lists them (:mod:`.hosts`: mirrors in order, then the server; without one, the server alone).
Pulling (manifests by digest, configs, blobs, ranges) and resolving (manifests by tag) go to the hosts with that
capability in order: a mirror that fails (connection, 5xx, 404, auth, timeout) or sends bytes that do not match
their digest is skipped, for that operation and then for a while (:data:`MIRROR_REST`; for that digest, for the
rest of the process), and the next host is asked; the last one's error is the operation's. Pushing goes to the
first host that may push. One repository object per (client, repository name, hosts) in the process
(:meth:`RegistryRepository.shared`, :meth:`RegistryRepository.from_blob_url`), so every layer of an image shares
its clients' tokens and connections, and the blob redirects they learnt. Lazy reads through mirrors keep each
host's bytes apart in the cache (:meth:`RegistryRepository.origin_of`; :mod:`.lazy` picks the host).

What comes back is checked before it is used: manifests and configs are read up to ``MAX_MANIFEST_BYTES`` /
``MAX_CONFIG_BYTES`` (refused from Content-Length when it says more, and no further than that when it does not
say), digests are checked wherever they enter (descriptors, ``Docker-Content-Digest``, ``repoBlobUrl`` layers), a
whole blob is read no further than its declared size and verified, and a digest mismatch is final.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlencode, urljoin

import requests

from ..errors import FormatError, UsageError
from ..source.base import BlockSource
from . import hosts as hosts_toml
from .bodies import Download, body_chunks, declared_length, read_capped
from .client import Extras, RegistryClient
from .errors import DigestMismatchError, NotFoundError, RangeRefusedError, RemoteError, TransportError
from .hosts import HostsConfig, RegistryHost
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

__all__ = ["Endpoint", "HttpBlobSource", "RegistryClient", "RegistryRepository"]

log = logging.getLogger(__name__)
T = TypeVar("T")
MIRROR_REST = 30.0  # seconds a mirror whose connection failed is passed over
MIRROR_ATTEMPTS = 2  # attempts one operation makes at a mirror before the next host is asked
MIRROR_SKIP = 1 << 20  # a mirror's whole-blob answer to a range read is read through to the range up to this far
REFUSED_WAIT = (0.5, 8.0)  # a mirror that refused ranges of a blob is asked again after 0.5 s, doubling up to 8 s
_bundles: dict[tuple[str, ...], str] = {}
_bundles_lock = threading.Lock()

UPLOAD_CHUNK = 32 << 20
REDIRECT_TTL = 300.0  # keep a blob's redirect URL this long (signed URLs usually last longer)
READ_CHUNK = 1 << 20
PROGRESS = 8 << 20  # a cut download attempt that got this much further counts as progress (see http.Operation)


def _scope(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


@dataclass(eq=False)
class Endpoint:
    """One host a repository's requests may go to: its client and the repository's URL there."""

    client: RegistryClient
    base: str  # scheme://host/v2/REPO (or the host's overridden API root, then /REPO)
    capabilities: frozenset[str] = hosts_toml.ALL
    mirror: bool = False
    resting_until: float = 0.0  # a mirror whose connection failed is passed over until then
    namespace: str = ""  # a mirror's requests to read carry ?ns=THIS: the registry the reference names

    def url(self, suffix: str, method: str) -> str:
        """The URL of ``suffix`` (``/blobs/...``, ``/manifests/...``) here; reads from a mirror name the registry
        they are for, as containerd's do."""
        url = self.base + suffix
        if self.namespace and method in ("GET", "HEAD"):
            url += ("&" if "?" in suffix else "?") + urlencode({"ns": self.namespace})
        return url

    @property
    def origin(self) -> str:
        """What the cache binds this host's bytes of the repository to (the server's is the ``repoBlobUrl``)."""
        return self.base + "/blobs"

    def resting(self) -> bool:
        return self.mirror and self.resting_until > time.monotonic()


def _ca_bundle(paths: Sequence[str]) -> str | None:
    """One file for a host's CA certificates (``requests`` takes one): the file itself, or the files joined into a
    file of this process (removed at exit)."""
    if not paths:
        return None
    if len(paths) == 1:
        return paths[0]
    key = tuple(paths)
    with _bundles_lock:
        if key not in _bundles:
            fd, name = tempfile.mkstemp(prefix="overlaybd-ca-", suffix=".pem")
            with os.fdopen(fd, "wb") as out:
                for path in paths:
                    try:
                        with open(path, "rb") as f:
                            out.write(f.read() + b"\n")
                    except OSError as exc:
                        raise UsageError(f"CA certificate: {exc.strerror}", path=path) from None
            atexit.register(os.unlink, name)
            _bundles[key] = name
        return _bundles[key]


def _client_for(server: RegistryClient, h: RegistryHost) -> RegistryClient:
    """The client for one host of ``server``'s hosts.toml: a mirror's own, or the server's (the same client unless
    hosts.toml gives the server certificates, headers or a proxy)."""
    for pair in h.client:
        for path in filter(None, pair):
            if not os.path.isfile(path):
                raise UsageError("client certificate or key in hosts.toml: no such file", path=path)
    extras = Extras(h.client, h.header, h.proxy)
    ca = _ca_bundle(h.ca)
    if not h.mirror and h.scheme == "" and extras == Extras() and ca is None and h.skip_verify is None \
            and h.dial_timeout is None:
        return server
    host = server.host if not h.mirror and h.scheme == "" else h.host
    plain = server.scheme == "http" if h.scheme == "" else h.scheme == "http"
    if h.mirror:  # its own settings only: the server's --insecure or CA bundle are not the mirror's
        verify_off = bool(h.skip_verify)
        policy = dataclasses.replace(server.policy, attempts=min(MIRROR_ATTEMPTS, server.policy.attempts))
    else:
        verify_off = bool(h.skip_verify) if h.skip_verify is not None else server.verify is False
        ca = ca or (server.verify if isinstance(server.verify, str) else None)
        policy = server.policy
    if h.dial_timeout is not None:
        policy = dataclasses.replace(policy, connect_timeout=h.dial_timeout)
    return RegistryClient.shared(host, plain_http=plain, insecure=verify_off, ca_bundle=ca,
                                 credentials=server.credentials if host == server.host else None, policy=policy,
                                 extras=extras)


class RegistryRepository:
    """A repository inside a registry, reached through its hosts (mirrors, then the server)."""

    _shared: ClassVar[dict[tuple[RegistryClient, str, tuple[RegistryHost, ...]], RegistryRepository]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, client: RegistryClient, repo: str, endpoints: Sequence[Endpoint] = ()) -> None:
        if not is_repository_name(repo):
            raise UsageError(f"bad repository name {repo!r} (lowercase letters, digits, . _ - /)")
        self.client = client
        self.repo = repo
        self.name = f"{client.host}/{repo}"
        self.endpoints = tuple(endpoints) or (Endpoint(client, f"{client.base}/v2/{repo}"),)
        self._redirects: dict[tuple[str, str], tuple[str, float]] = {}  # (base, digest) -> (redirect URL, expiry)
        self._bad: set[tuple[int, str]] = set()  # (endpoint index, digest): that host sent other bytes
        self._refused: dict[tuple[int, str], tuple[float, float]] = {}  # (index, digest) -> (ask again at, wait)
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, client: RegistryClient, repo: str, config: HostsConfig | None = None) -> RegistryRepository:
        """The process's repository object for this client and name, through the hosts its registry's hosts.toml
        names (read now, from :func:`.hosts.hosts_dir`, unless ``config`` is given)."""
        config = config if config is not None else hosts_toml.load(client.host)
        for note in config.notes:
            log.info("%s: %s", config.folder, note)
        key = (client, repo, config.hosts)
        with cls._shared_lock:
            found = cls._shared.get(key)
        if found is not None:
            return found
        if not is_repository_name(repo):
            raise UsageError(f"bad repository name {repo!r} (lowercase letters, digits, . _ - /)")
        endpoints = []
        for h in config.hosts:
            c = _client_for(client, h)
            endpoints.append(Endpoint(c, f"{c.base}{h.path if h.scheme else '/v2'}/{repo}", h.capabilities, h.mirror,
                                      namespace=client.host if h.mirror else ""))
        with cls._shared_lock:
            return cls._shared.setdefault(key, cls(client, repo, endpoints))

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

    # -- which host ------------------------------------------------------------------------------------------------
    def pull_endpoints(self) -> tuple[Endpoint, ...]:
        """The hosts blobs are read from, in the order they are tried."""
        return tuple(e for e in self.endpoints if "pull" in e.capabilities)

    def origin_of(self, endpoint: Endpoint) -> str:
        """What the cache binds bytes read from ``endpoint`` to: the server's are this repository's blob URL,
        each mirror's its own."""
        return self.blob_url() if endpoint is self.endpoints[-1] and not endpoint.mirror else endpoint.origin

    def _push_endpoint(self) -> Endpoint:
        for e in self.endpoints:
            if "push" in e.capabilities:
                return e
        raise RemoteError("no host may push here (hosts.toml gives none the push capability)", path=self.name)

    def usable(self, endpoint: Endpoint, digest: str | None) -> None:
        """Raise at once if ``endpoint`` is a mirror passed over (resting, or caught with other bytes for
        ``digest``)."""
        if endpoint.resting():
            raise TransportError(f"mirror {endpoint.client.host} failed lately; passed over", path=self.name)
        if digest is not None and (self.endpoints.index(endpoint), digest) in self._bad:
            raise DigestMismatchError(f"mirror {endpoint.client.host} sent other bytes for {digest}", path=self.name)

    def mark_bad(self, endpoint: Endpoint, digest: str) -> None:
        """``endpoint`` sent bytes of ``digest`` that failed a check: it is not asked for that blob again in this
        process (the cache remembers a failed whole-blob check across processes)."""
        if endpoint.mirror:
            with self._lock:
                self._bad.add((self.endpoints.index(endpoint), digest))

    def _ranges_refused(self, endpoint: Endpoint, digest: str, refused: bool) -> None:
        """Note whether ``endpoint`` served a range of ``digest`` (a pull-through cache refuses them, sending the
        whole blob from its upstream, until it has the blob): while it refuses, it is asked again after a wait
        that doubles, so that a cold mirror is not made to stream the blob from its upstream for every read."""
        key = (self.endpoints.index(endpoint), digest)
        with self._lock:
            if not refused:
                self._refused.pop(key, None)
                return
            wait = self._refused.get(key, (0.0, REFUSED_WAIT[0] / 2))[1] * 2
            self._refused[key] = (time.monotonic() + min(wait, REFUSED_WAIT[1]), min(wait, REFUSED_WAIT[1]))

    def _check_ranges(self, endpoint: Endpoint, digest: str) -> None:
        with self._lock:
            found = self._refused.get((self.endpoints.index(endpoint), digest))
        if found is not None and found[0] > time.monotonic():
            raise RangeRefusedError(f"{endpoint.client.host} refused ranges of {digest} lately", path=self.name)

    def _failed(self, endpoint: Endpoint, exc: Exception, digest: str | None) -> None:
        if isinstance(exc, TransportError):
            endpoint.resting_until = time.monotonic() + MIRROR_REST
        elif isinstance(exc, FormatError) and digest is not None:
            with self._lock:
                self._bad.add((self.endpoints.index(endpoint), digest))

    def _over(self, capability: str, what: str, work: Callable[[Endpoint], T], digest: str | None = None) -> T:
        """``work`` at the hosts with ``capability`` in order, until one succeeds; the last host's error is final.
        Mirrors passed over are not asked (the last host always is)."""
        candidates = [e for e in self.endpoints if capability in e.capabilities]
        if not candidates:
            raise RemoteError(f"no host may {capability} here (hosts.toml gives none that capability)",
                              path=self.name)
        for n, endpoint in enumerate(candidates):
            last = n == len(candidates) - 1
            try:
                if not last:
                    self.usable(endpoint, digest)
                return work(endpoint)
            except (RemoteError, FormatError) as exc:
                if last:
                    raise
                self._failed(endpoint, exc, digest)
                log.warning("%s: %s from %s failed (%s); trying %s", self.name, what, endpoint.client.host, exc,
                            candidates[n + 1].client.host)
        raise AssertionError("unreachable")

    def _request(self, method: str, suffix: str, *, scope: str, endpoint: Endpoint | None = None,
                 **kwargs: Any) -> requests.Response:
        e = endpoint or self._push_endpoint()
        return e.client.request(method, e.url(suffix, method), scope=scope, path=self.name, **kwargs)

    def _run(self, endpoint: Endpoint, what: str, attempt: Callable[[Operation], T]) -> T:
        return endpoint.client.run(what, attempt, path=self.name)

    @contextmanager
    def _exchange(self, endpoint: Endpoint, op: Operation, method: str, suffix: str, *, scope: str, **kwargs: Any
                  ) -> Iterator[requests.Response]:
        with endpoint.client.exchange(op, method, endpoint.url(suffix, method), scope=scope, **kwargs) as r:
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

    def open_blob(self, digest: str, size: int, endpoint: Endpoint | None = None) -> BlockSource:
        """Range reads of a blob: from ``endpoint`` only, or from the hosts in order."""
        return HttpBlobSource(self, self._digest(digest), check_size(size, f"blob {digest}", path=self.name),
                              endpoint)

    # -- range reads -----------------------------------------------------------------------------------------------
    def read_range(self, digest: str, offset: int, buf: memoryview, endpoint: Endpoint | None = None) -> None:
        """Fill ``buf`` with the blob's bytes at ``offset``: a Range GET (redirects followed and remembered), at
        ``endpoint`` or at the pulling hosts in order. One operation per host: a dropped connection, a 5xx, a body
        cut short or a wrong Content-Range is retried in it."""
        digest = self._digest(digest)
        if endpoint is None:
            self._over("pull", f"range GET {digest}", lambda e: self._read_range_at(e, digest, offset, buf), digest)
            return
        if not endpoint.mirror:
            self._read_range_at(endpoint, digest, offset, buf)
            return
        self.usable(endpoint, digest)
        self._check_ranges(endpoint, digest)
        try:
            self._read_range_at(endpoint, digest, offset, buf)
        except RangeRefusedError:
            raise
        except (RemoteError, FormatError) as exc:
            self._failed(endpoint, exc, digest)
            raise

    def _read_range_at(self, endpoint: Endpoint, digest: str, offset: int, buf: memoryview) -> None:
        length = len(buf)
        want = f"bytes={offset}-{offset + length - 1}"

        def attempt(op: Operation) -> None:
            with self._open_range(endpoint, op, digest, want) as r:
                if r.status_code == 404:
                    raise NotFoundError(f"blob {digest} is not in {self.name}")
                if r.status_code == 206:
                    if endpoint.mirror:
                        self._ranges_refused(endpoint, digest, False)
                    got = r.headers.get("Content-Range", "")
                    if not got.startswith(f"bytes {offset}-{offset + length - 1}/"):
                        raise Retryable(f"asked for {want}, got Content-Range {got[:80]!r}")
                    skip = 0
                elif r.status_code == 200:  # a server that ignores Range: take our slice of the whole body
                    if endpoint.mirror:  # (a pull-through cache still fetching the blob does)
                        self._ranges_refused(endpoint, digest, True)
                        if offset > MIRROR_SKIP:
                            raise RangeRefusedError(f"{endpoint.client.host} answers a range read at {offset} "
                                                    f"with the whole blob {digest}", path=self.name)
                    skip = offset
                else:
                    raise TransportError(f"range GET of {digest}: HTTP {r.status_code}", path=self.name)
                self._read_body(r, op, buf, skip, digest)

        self._run(endpoint, f"range GET {digest} {want}", attempt)

    @contextmanager
    def _open_range(self, endpoint: Endpoint, op: Operation, digest: str, want: str) -> Iterator[requests.Response]:
        key = (endpoint.base, digest)
        url = self._remembered(key)
        if url is not None:
            with endpoint.client.exchange(op, "GET", url, scope="", headers={"Range": want}, authorize=False) as r:
                if r.status_code in (200, 206):
                    yield r
                    return
            with self._lock:
                self._redirects.pop(key, None)
        with self._exchange(endpoint, op, "GET", f"/blobs/{digest}", scope=_scope(self.repo, "pull"),
                            headers={"Range": want}) as r:
            if r.history and r.url and r.status_code in (200, 206):
                self._remember(key, r.url)
            yield r

    def _remembered(self, digest: tuple[str, str]) -> str | None:
        with self._lock:
            found = self._redirects.get(digest)
        return found[0] if found and found[1] > time.monotonic() else None

    def _remember(self, digest: tuple[str, str], url: str) -> None:
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
        self._over("pull", f"GET blob {digest}", lambda e: self._fetch_at(e, digest, size, dest, progress), digest)

    def _fetch_at(self, endpoint: Endpoint, digest: str, size: int, dest: str, progress: Progress | None) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=os.path.dirname(os.path.abspath(dest)))
        try:
            with os.fdopen(fd, "wb") as out:
                download = Download(out, size, progress)
                self._run(endpoint, f"GET blob {digest}",
                          lambda op: self._download_attempt(endpoint, op, digest, download))
                out.flush()
                os.fsync(out.fileno())
            got = download.digest()
            if got != digest:
                raise DigestMismatchError(f"downloaded {size} bytes from {endpoint.client.host} hashing to {got}; "
                                          f"expected {digest}", path=self.name)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _download_attempt(self, endpoint: Endpoint, op: Operation, digest: str, download: Download) -> None:
        resume = download.done
        headers = {"Range": f"bytes={resume}-"} if resume else {}
        with self._exchange(endpoint, op, "GET", f"/blobs/{digest}", scope=_scope(self.repo, "pull"),
                            headers=headers) as r:
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
        return self._over("pull", f"GET blob {digest}", lambda e: self._metadata_at(e, digest, size), digest)

    def _metadata_at(self, endpoint: Endpoint, digest: str, size: int) -> bytes:
        def attempt(op: Operation) -> bytes:
            with self._exchange(endpoint, op, "GET", f"/blobs/{digest}", scope=_scope(self.repo, "pull")) as r:
                if r.status_code == 404:
                    raise NotFoundError(f"blob {digest} is not in {self.name}")
                if r.status_code != 200:
                    raise TransportError(f"GET blob {digest}: HTTP {r.status_code}", path=self.name)
                return read_capped(r, op, size, f"blob {digest}", path=self.name, exact=True)

        raw = self._run(endpoint, f"GET blob {digest}", attempt)
        if sha256_digest(raw) != digest:
            raise DigestMismatchError(f"blob from {endpoint.client.host} hashes to {sha256_digest(raw)}, expected "
                                      f"{digest}", path=self.name)
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
                    self._push_endpoint().client.request("DELETE", self._location(loc), scope=push, path=self.name)
        return None

    def _location(self, location: str, current: str | None = None) -> str:
        return urljoin(current or self._push_endpoint().client.base + "/", location)

    def _upload(self, path: str, digest: str, size: int, progress: Progress | None) -> str:
        push = _scope(self.repo, "pull,push")
        client = self._push_endpoint().client
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
        return self._over("pull" if by_digest else "resolve", f"GET manifest {selector}",
                          lambda e: self._manifest_at(e, selector), selector if by_digest else None)

    def _manifest_at(self, endpoint: Endpoint, selector: str) -> tuple[bytes, str, str]:
        by_digest = ":" in selector

        def attempt(op: Operation) -> tuple[bytes, str, str | None]:
            with self._exchange(endpoint, op, "GET", f"/manifests/{selector}", scope=_scope(self.repo, "pull"),
                                headers={"Accept": ACCEPT}) as r:
                if r.status_code == 404:
                    raise NotFoundError(f"no manifest {selector!r} in {self.name}")
                if r.status_code != 200:
                    raise RemoteError(f"GET manifest {selector}: HTTP {r.status_code}", path=self.name)
                raw = read_capped(r, op, MAX_MANIFEST_BYTES, f"manifest {selector}", path=self.name)
                return raw, r.headers.get("Content-Type", "").split(";")[0].strip(), \
                    r.headers.get("Docker-Content-Digest")

        raw, media, claimed = self._run(endpoint, f"GET manifest {selector}", attempt)
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

    def __init__(self, repo: RegistryRepository, digest: str, size: int, endpoint: Endpoint | None = None) -> None:
        self.repo = repo
        self.digest = digest
        self.size = size
        self.block_size = 1
        self.endpoint = endpoint
        via = f" via {endpoint.client.host}" if endpoint is not None and endpoint.mirror else ""
        self.name = f"{repo.name}@{digest}{via}"

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.repo.read_range(self.digest, offset, buf, self.endpoint)
