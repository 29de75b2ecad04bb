"""An OCI image-layout directory as a repository (the embedded default: no network)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from typing import Any

from ..errors import FormatError
from ..source.base import BlockSource
from ..source.file import FileSource
from .errors import DigestMismatchError, NotFoundError
from .oci import ANN_REF_NAME, INDEX_OCI, sha256_digest
from .repository import Progress

LAYOUT_FILE = "oci-layout"
INDEX = "index.json"


def hash_file(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def copy_verified(src: str, dest: str, digest: str, progress: Progress | None = None) -> None:
    """Copy to ``dest`` through a temporary name, hashing on the way; rename only if the digest matches."""
    folder = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=folder)
    try:
        h = hashlib.sha256()
        total = os.path.getsize(src)
        done = 0
        with open(src, "rb", buffering=0) as fin, os.fdopen(fd, "wb") as fout:
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


class OciLayout:
    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = os.path.abspath(path)
        self.name = f"oci:{self.path}"
        marker = os.path.join(self.path, LAYOUT_FILE)
        if not os.path.exists(marker):
            if not create:
                raise NotFoundError("not an OCI image layout (no oci-layout file)", path=self.path)
            os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
            with open(marker, "w") as f:
                json.dump({"imageLayoutVersion": "1.0.0"}, f)
            if not os.path.exists(os.path.join(self.path, INDEX)):
                self._write_index({"schemaVersion": 2, "mediaType": INDEX_OCI, "manifests": []})

    def _blob_path(self, digest: str) -> str:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            raise FormatError(f"bad digest {digest!r}", path=self.path)
        return os.path.join(self.path, "blobs", algo, hexdigest)

    def blob_size(self, digest: str) -> int | None:
        try:
            return os.path.getsize(self._blob_path(digest))
        except FileNotFoundError:
            return None

    def open_blob(self, digest: str, size: int) -> BlockSource:
        path = self._blob_path(digest)
        if not os.path.exists(path):
            raise NotFoundError(f"blob {digest} is not in the layout", path=self.path)
        src = FileSource(path)
        if src.size != size:
            src.close()
            raise DigestMismatchError(f"blob {digest} is {src.size} bytes, expected {size}", path=path)
        return src

    def fetch_blob(self, digest: str, size: int, dest: str, progress: Progress | None = None) -> None:
        path = self._blob_path(digest)
        if not os.path.exists(path):
            raise NotFoundError(f"blob {digest} is not in the layout", path=self.path)
        copy_verified(path, dest, digest, progress)

    def put_blob(self, path: str, digest: str, size: int, progress: Progress | None = None) -> str:
        dest = self._blob_path(digest)
        if os.path.exists(dest) and os.path.getsize(dest) == size:
            return "exists"
        try:
            os.link(path, dest + ".link")  # same filesystem: no copy; the digest is still checked below
            try:
                got = hash_file(dest + ".link")
                if got != digest:
                    raise DigestMismatchError(f"content is {got}, expected {digest}", path=path)
                os.replace(dest + ".link", dest)
            finally:
                if os.path.exists(dest + ".link"):
                    os.unlink(dest + ".link")
        except OSError:
            copy_verified(path, dest, digest, progress)
        return "uploaded"

    def _read_index(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.path, INDEX)) as f:
                data: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as exc:
            raise FormatError(f"unreadable index.json: {exc}", path=self.path) from None
        return data

    def _write_index(self, index: dict[str, Any]) -> None:
        tmp = os.path.join(self.path, INDEX + ".tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, INDEX))

    def get_manifest(self, selector: str) -> tuple[bytes, str, str]:
        if selector.startswith("sha256:"):
            digest, media = selector, ""
        else:
            hits = [m for m in self._read_index().get("manifests", [])
                    if (m.get("annotations") or {}).get(ANN_REF_NAME) == selector]
            if not hits:
                raise NotFoundError(f"no tag {selector!r} in the layout", path=self.path)
            digest, media = hits[-1]["digest"], hits[-1].get("mediaType", "")
        path = self._blob_path(digest)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise NotFoundError(f"manifest {digest} is not in the layout", path=self.path) from None
        if sha256_digest(raw) != digest:
            raise DigestMismatchError(f"manifest blob does not hash to {digest}", path=path)
        if not media:
            media = json.loads(raw).get("mediaType", "")
        return raw, media, digest

    def put_manifest(self, raw: bytes, media_type: str, tag: str | None) -> str:
        digest = sha256_digest(raw)
        path = self._blob_path(digest)
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as f:
                f.write(raw)
            os.replace(path + ".tmp", path)
        lock = os.open(os.path.join(self.path, INDEX + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read_index()
            entries = [m for m in index.get("manifests", [])
                       if not tag or (m.get("annotations") or {}).get(ANN_REF_NAME) != tag]
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
