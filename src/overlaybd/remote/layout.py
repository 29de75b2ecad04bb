"""An OCI image-layout directory as a repository (the embedded default: no network).

Every file this writes (blobs, ``index.json``, ``oci-layout``) gets the same mode: 0644 less the umask, as an
ordinary file gets, whatever its source's mode (a hard link is made only when the source already has that mode).
Every file it reads is checked as a registry's answers are: manifests and ``index.json`` at most
``MAX_MANIFEST_BYTES``, configs at most ``MAX_CONFIG_BYTES``, digests checked before they name a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from typing import Any

from ..errors import FormatError, LimitError
from ..source.base import BlockSource
from ..source.file import FileSource
from .errors import DigestMismatchError, NotFoundError
from .oci import (
    ANN_REF_NAME,
    INDEX_OCI,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    check_digest,
    check_document,
    check_size,
    sha256_digest,
)
from .repository import Progress

LAYOUT_FILE = "oci-layout"
INDEX = "index.json"
FILE_MODE = 0o644  # less the umask, as open() would


def hash_file(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def create_temporary(folder: str, prefix: str) -> tuple[int, str]:
    """A new file in ``folder`` with a name no one else has, mode FILE_MODE less the umask: (fd, path)."""
    while True:
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(8)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE), path
        except FileExistsError:
            continue


def new_file_mode(folder: str) -> int:
    """The permission bits a file created in ``folder`` gets (FILE_MODE less the umask, or what an ACL says)."""
    fd, path = create_temporary(folder, ".mode-")
    try:
        return os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
        os.unlink(path)


def write_file(path: str, data: bytes) -> None:
    """``path`` holds ``data``, durably, or is untouched: written under a temporary name and renamed."""
    fd, tmp = create_temporary(os.path.dirname(path), "." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def copy_verified(src: str, dest: str, digest: str, progress: Progress | None = None,
                  size: int | None = None) -> None:
    """Copy to ``dest`` through a temporary name, hashing on the way; rename only if the digest (and ``size``, when
    given: checked before anything is copied) match."""
    fd, tmp = create_temporary(os.path.dirname(os.path.abspath(dest)), ".download-")
    try:
        h = hashlib.sha256()
        with open(src, "rb", buffering=0) as fin, os.fdopen(fd, "wb") as fout:
            total = os.fstat(fin.fileno()).st_size
            if size is not None and total != size:
                raise DigestMismatchError(f"content is {total} bytes, expected {size}", path=src)
            done = 0
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while n := fin.readinto(buf):
                h.update(view[:n])
                fout.write(view[:n])
                done += n
                if progress:
                    progress(done, total)
            fout.flush()
            os.fsync(fout.fileno())
        got = "sha256:" + h.hexdigest()
        if got != digest:
            raise DigestMismatchError(f"content is {got}, expected {digest}", path=src)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_limited(path: str, limit: int, what: str) -> bytes:
    """A small file whole, refused (LimitError) before reading when it is larger than ``limit``."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise LimitError(f"{what} of {size} bytes is more than the {limit} allowed", path=path)
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise LimitError(f"{what}: more than the {limit} bytes allowed", path=path)
    return raw


class OciLayout:
    """An OCI image-layout directory used as a repository: ``oci-layout``, ``index.json`` (the tags, as
    ``org.opencontainers.image.ref.name`` annotations) and ``blobs/sha256/HEX``. It has the registry's methods
    (blob reads, whole fetches verified against the digest, manifest resolve/put), so push and pull work on it
    unchanged; ``create`` makes the directory and its files when absent."""

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.name = f"oci:{self.path}"
        marker = os.path.join(self.path, LAYOUT_FILE)
        if not os.path.exists(marker):
            if not create:
                raise NotFoundError("not an OCI image layout (no oci-layout file)", path=self.path)
            os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
            write_file(marker, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
            if not os.path.exists(os.path.join(self.path, INDEX)):
                self._write_index({"schemaVersion": 2, "mediaType": INDEX_OCI, "manifests": []})

    def _blob_path(self, digest: str) -> str:
        algo, _, hexdigest = check_digest(digest, "blob digest", path=self.path).partition(":")
        return os.path.join(self.path, "blobs", algo, hexdigest)

    def _existing_blob(self, digest: str, size: int) -> str:
        path = self._blob_path(digest)
        check_size(size, f"blob {digest}", path=self.path)
        if not os.path.exists(path):
            raise NotFoundError(f"blob {digest} is not in the layout", path=self.path)
        return path

    def blob_size(self, digest: str) -> int | None:
        try:
            return os.path.getsize(self._blob_path(digest))
        except FileNotFoundError:
            return None

    def open_blob(self, digest: str, size: int) -> BlockSource:
        path = self._existing_blob(digest, size)
        src = FileSource(path)
        if src.size != size:
            src.close()
            raise DigestMismatchError(f"blob {digest} is {src.size} bytes, expected {size}", path=path)
        return src

    def fetch_blob(self, digest: str, size: int, dest: str, progress: Progress | None = None) -> None:
        copy_verified(self._existing_blob(digest, size), dest, digest, progress, size=size)

    def read_metadata_blob(self, digest: str, size: int) -> bytes:
        """A config (or another small JSON blob), whole: at most ``MAX_CONFIG_BYTES``, verified."""
        check_size(size, f"blob {digest}", limit=MAX_CONFIG_BYTES, path=self.path)
        path = self._existing_blob(digest, size)
        raw = read_limited(path, MAX_CONFIG_BYTES, f"blob {digest}")
        if len(raw) != size or sha256_digest(raw) != digest:
            raise DigestMismatchError(f"content is {len(raw)} bytes hashing to {sha256_digest(raw)}; expected "
                                      f"{size} bytes, {digest}", path=path)
        return raw

    def put_blob(self, path: str, digest: str, size: int, progress: Progress | None = None) -> str:
        dest = self._blob_path(digest)
        if os.path.exists(dest) and os.path.getsize(dest) == size:
            return "exists"
        if not self._link_verified(path, dest, digest):
            copy_verified(path, dest, digest, progress, size=size)
        return "uploaded"

    def _link_verified(self, path: str, dest: str, digest: str) -> bool:
        """Hard-link ``path`` in as the blob (same filesystem: no copy; the digest is still checked) when it already
        has the mode a new blob gets: a link shares the inode, and someone else's file is never chmod'ed."""
        folder = os.path.dirname(dest)
        try:
            if os.stat(path).st_mode & 0o7777 != new_file_mode(folder):
                return False
            link = os.path.join(folder, f".link-{secrets.token_hex(8)}.tmp")
            os.link(path, link)
        except OSError:
            return False
        try:
            got = hash_file(link)
            if got != digest:
                raise DigestMismatchError(f"content is {got}, expected {digest}", path=path)
            os.replace(link, dest)
        finally:
            if os.path.exists(link):
                os.unlink(link)
        return True

    def _read_index(self) -> dict[str, Any]:
        where = os.path.join(self.path, INDEX)
        try:
            raw = read_limited(where, MAX_MANIFEST_BYTES, INDEX)
            data = json.loads(raw)
        except (OSError, ValueError, RecursionError) as exc:
            raise FormatError(f"unreadable {INDEX}: {exc}", path=self.path) from None
        if not isinstance(data, dict) or not isinstance(data.get("manifests", []), list):
            raise FormatError(f"{INDEX} is not an image index", path=self.path)
        return data

    def _write_index(self, index: dict[str, Any]) -> None:
        write_file(os.path.join(self.path, INDEX), json.dumps(index, indent=2).encode())

    def get_manifest(self, selector: str) -> tuple[bytes, str, str]:
        if ":" in selector:
            digest, media = check_digest(selector, "manifest digest", path=self.path), ""
        else:
            hits = [m for m in self._read_index().get("manifests", []) if _tag_of(m) == selector]
            if not hits:
                raise NotFoundError(f"no tag {selector!r} in the layout", path=self.path)
            digest = check_digest(hits[-1].get("digest"), f"{INDEX}: tag {selector!r}", path=self.path)
            media = hits[-1].get("mediaType", "")
            if not isinstance(media, str):
                raise FormatError(f"{INDEX}: tag {selector!r} has a mediaType that is not a string", path=self.path)
        path = self._blob_path(digest)
        try:
            raw = read_limited(path, MAX_MANIFEST_BYTES, "manifest")
        except FileNotFoundError:
            raise NotFoundError(f"manifest {digest} is not in the layout", path=self.path) from None
        if sha256_digest(raw) != digest:
            raise DigestMismatchError(f"manifest blob does not hash to {digest}", path=path)
        check_document(raw, media, path=path)
        if not media:
            found = json.loads(raw).get("mediaType", "")  # an object: check_document parsed it
            media = found if isinstance(found, str) else ""
        return raw, media, digest

    def put_manifest(self, raw: bytes, media_type: str, tag: str | None) -> str:
        digest = sha256_digest(raw)
        path = self._blob_path(digest)
        if not os.path.exists(path):
            write_file(path, raw)
        lock = os.open(os.path.join(self.path, INDEX + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read_index()
            entries = [m for m in index.get("manifests", []) if not tag or _tag_of(m) != tag]
            entry: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(raw)}
            if tag:
                entry["annotations"] = {ANN_REF_NAME: tag}
            index["manifests"] = entries + [entry]
            self._write_index(index)
        finally:
            os.close(lock)
        return digest

    def blob_url(self) -> str:
        return f"oci:{self.path}"


def _tag_of(entry: object) -> object:
    """The tag an index.json entry carries (None for entries without one, or not shaped as entries)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("annotations"), dict):
        return None
    return entry["annotations"].get(ANN_REF_NAME)
