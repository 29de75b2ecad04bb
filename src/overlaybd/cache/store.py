"""A persistent cache of remote blob bytes: shared by all volumes on the machine, bounded (LRU), safe for several
processes at once, and bound to where its bytes came from.

```
CACHE/blobs/<hex>                      verified blobs: whole, their sha256 checked against the digest; never written
CACHE/origins/<key>/origin             the repository the entries beside it came from (its blob URL)
CACHE/origins/<key>/<hex>.data|.map    bytes fetched from that repository, not yet proven: a sparse file of the blob's
                                       size, and one byte per chunk (1 = present and complete)
CACHE/origins/<key>/<hex>.bad          that repository served bytes that do not hash to the digest
CACHE/generation                       a counter, odd while someone drops cached bytes (mapped shared by all)
CACHE/cache.lock                       held by whoever prunes
```

**What the cache trusts.** Bytes fetched from a repository serve only volumes that read from that same repository
until they are proven: when an entry is complete, its sha256 is computed and, if it matches the digest, the data
file becomes the verified blob every origin shares; if not, the entry is dropped, marked bad, and every reader of that
blob from that repository gets a ``DigestMismatchError`` from then on (``overlaybd cache prune`` clears the mark).
A registry that serves other bytes under a known digest can therefore mislead only the volumes pulled from it, and
only until the blob is whole. Folders must be the user's own and not writable by others; files are opened without
following symlinks (``folder.py``).

**Several processes.** Bytes are never dropped under a reader. Eviction, invalidation and resets of an origin entry
hold its map exclusively (``flock``) and the generation lock, and move the generation to odd before they change
anything and to even after. A read goes one of two ways. Lock-free (``_hits.c``, where built): note the generation,
check the map, copy the bytes, and keep them only if the generation was even and has not moved. Locked (always
there): hold the map shared while checking it and copying. Fetching only adds bytes, data before map, under the
shared lock. A verified blob is never written: evicting it removes its name, and readers that have it open keep
reading it. A map or data file that does not fit is reset at open: a damaged cache costs refetching, never a failed
start or wrong bytes.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .. import native
from ..source.base import BlockSource
from ..source.file import punch_hole
from .cached import CachedSource, _hits
from .folder import (
    CacheError,
    OriginFolder,
    hash_fd,
    hex_of,
    is_hex_digest,
    lock_entry,
    open_file,
    open_root,
    open_subdir,
    origin_key,
    same_file,
)
from .policy import CachePolicy, default_dir

log = logging.getLogger(__name__)

__all__ = ["BlobCache", "CacheError", "CachePolicy", "CachedSource", "Entry", "default_dir", "describe_reads"]

GENERATION_SIZE = 4096
LAYOUT = "2"


def describe_reads() -> str:
    """How cache hits are read here."""
    return native.describe_hits()


@dataclass(frozen=True, slots=True)
class Entry:
    digest: str
    size: int
    cached_bytes: int
    last_used: float
    origin: str  # the repository its bytes came from; "" for a verified blob
    state: str  # "verified", "partial", "complete" (whole, not yet checked) or "bad"
    key: str = ""  # the origin's folder under CACHE/origins


class BlobCache:
    """The machine's cache of remote blob bytes: verified blobs shared by all, and unproven bytes kept apart per
    repository (module docstring). ``source()`` puts it in front of a remote blob."""

    def __init__(self, root: str | None = None, *, policy: CachePolicy | None = None) -> None:
        self.root = os.path.abspath(root or default_dir())
        self.policy = policy or CachePolicy()
        self.root_fd = open_root(self.root)
        self.blobs_fd = open_subdir(self.root_fd, "blobs", self.root)
        self.origins_fd = open_subdir(self.root_fd, "origins", self.root)
        self._origins: dict[str, OriginFolder] = {}
        self._fetched_since_check = 0
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=self.policy.concurrency, thread_name_prefix="cache-fetch")
        self._verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-verify")
        self._migrate()
        self._generation_fd, self.generation = self._open_generation()

    def _migrate(self) -> None:
        """Entries of the first layout (``blobs/<hex>.data|.map``) were not bound to a repository and were never
        proven: they are dropped, not trusted."""
        try:
            fd = open_file(self.root_fd, "layout", os.O_RDONLY, self.root)
        except FileNotFoundError:
            pass
        else:
            try:
                if os.read(fd, 16).decode(errors="replace").strip() == LAYOUT:
                    return
            finally:
                os.close(fd)
        for name in os.listdir(self.blobs_fd):
            if name.endswith((".data", ".map")):
                os.unlink(name, dir_fd=self.blobs_fd)
        fd = open_file(self.root_fd, "layout", os.O_WRONLY | os.O_TRUNC, self.root, create=True)
        try:
            os.write(fd, LAYOUT.encode() + b"\n")
        finally:
            os.close(fd)

    # -- the generation ----------------------------------------------------------------------------------------
    def _open_generation(self) -> tuple[int, mmap.mmap | None]:
        """CACHE/generation, mapped. Without it (an odd file system) writers cannot announce their changes, so
        nobody may read lock-free: a missing mapping sends every read the locked way, and a writer that cannot open
        the file fails (CacheError) rather than change anything unannounced."""
        try:
            fd = open_file(self.root_fd, "generation", os.O_RDWR, self.root, create=True)
        except OSError:
            return -1, None
        try:
            if os.fstat(fd).st_size < GENERATION_SIZE:
                os.ftruncate(fd, GENERATION_SIZE)  # only ever grows: a shrink would fault every mapping of it
            mapped = mmap.mmap(fd, GENERATION_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            return fd, None
        # a writer that died between its two moves left it odd: put it right, unless a writer is at work
        if int.from_bytes(mapped[:8], "little") & 1:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                try:
                    if int.from_bytes(mapped[:8], "little") & 1:
                        self._bump(mapped, fd)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        return fd, mapped

    @staticmethod
    def _bump(mapped: mmap.mmap | None, fd: int) -> None:
        if mapped is not None and _hits is not None:
            _hits.bump(mapped)
        else:  # without the extension: a plain read-modify-write, safe under the generation lock
            value = int.from_bytes(os.pread(fd, 8, 0).ljust(8, b"\0"), "little")
            os.pwrite(fd, (value + 1).to_bytes(8, "little"), 0)

    @contextmanager
    def dropping(self) -> Iterator[None]:
        """Around any change that drops cached bytes of an origin entry (inside its exclusive map lock): the
        generation is odd while it lasts, so lock-free readers throw away what they copied meanwhile."""
        fd = self._generation_fd
        if fd < 0:
            raise CacheError("cannot open the cache's generation file", path=os.path.join(self.root, "generation"))
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            self._bump(self.generation, fd)
            try:
                yield
            finally:
                self._bump(self.generation, fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    # -- entries -----------------------------------------------------------------------------------------------
    def origin(self, name: str) -> OriginFolder:
        """The folder of one repository's unproven entries (made on first use)."""
        folder = self._folder(origin_key(name))
        try:
            nfd = open_file(folder.fd, "origin", os.O_RDONLY, folder.where)
            os.close(nfd)
        except FileNotFoundError:
            nfd = open_file(folder.fd, "origin", os.O_WRONLY | os.O_TRUNC, folder.where, create=True)
            try:
                os.write(nfd, name.encode() + b"\n")
            finally:
                os.close(nfd)
        return folder

    def _folder(self, key: str) -> OriginFolder:
        with self._lock:
            folder = self._origins.get(key)
            if folder is not None:
                return folder
            fd = open_subdir(self.origins_fd, key, os.path.join(self.root, "origins"))
            folder = self._origins[key] = OriginFolder(self.root, key, fd)
        return folder

    def source(self, digest: str, size: int, upstream: BlockSource, *, origin: str) -> CachedSource:
        """``upstream`` (the blob as ``origin``, a repository's blob URL, serves it) through the cache."""
        return CachedSource(self, digest, size, upstream, self.origin(origin), origin)

    def open_verified(self, digest: str, size: int) -> int:
        """A descriptor of the verified blob, or -1 if there is none (one of the wrong size is removed)."""
        hexdigest = hex_of(digest)
        try:
            fd = open_file(self.blobs_fd, hexdigest, os.O_RDONLY, os.path.join(self.root, "blobs"))
        except FileNotFoundError:
            return -1
        except CacheError:
            os.unlink(hexdigest, dir_fd=self.blobs_fd)
            return -1
        if os.fstat(fd).st_size != size:
            os.close(fd)
            log.warning("%s: the verified copy in the cache has the wrong size; removed", digest)
            self._unlink_verified(hexdigest)
            return -1
        return fd

    def adopt(self, digest: str, path: str) -> bool:
        """Share a blob already verified elsewhere (a finished background download) as a verified blob: a hard
        link, no copy; False where that cannot be (another file system)."""
        hexdigest = hex_of(digest)
        try:
            os.link(path, hexdigest, dst_dir_fd=self.blobs_fd, follow_symlinks=False)
        except FileExistsError:
            return True
        except OSError:
            return False
        return True

    def _unlink_verified(self, hexdigest: str, *, only_if: int = -1) -> None:
        """Remove a verified blob's name (readers keep the file); with ``only_if``, only while the name still names
        that open file."""
        if only_if >= 0 and not same_file(only_if, self.blobs_fd, hexdigest):
            return
        try:
            os.unlink(hexdigest, dir_fd=self.blobs_fd)
        except FileNotFoundError:
            pass

    def verify_later(self, work: Any) -> Future[Any]:
        return self._verifier.submit(work)

    def wait_verified(self) -> None:
        """Until every check already asked for has run (tests; a clean exit)."""
        self._verifier.submit(lambda: None).result()

    # -- housekeeping ------------------------------------------------------------------------------------------
    def _origin_folders(self) -> Iterator[OriginFolder]:
        for key in sorted(os.listdir(self.origins_fd)):
            if len(key) != 32:
                continue
            try:
                yield self._folder(key)
            except CacheError as exc:
                log.warning("%s", exc)

    def entries(self) -> list[Entry]:
        out = []
        for name in sorted(os.listdir(self.blobs_fd)):
            if not is_hex_digest(name):
                continue
            try:
                st = os.stat(name, dir_fd=self.blobs_fd, follow_symlinks=False)
            except OSError:
                continue
            out.append(Entry(f"sha256:{name}", st.st_size, min(st.st_size, st.st_blocks * 512), st.st_mtime,
                             "", "verified"))
        for folder in self._origin_folders():
            out.extend(self._origin_entries(folder))
        return out

    def _origin_entries(self, folder: OriginFolder) -> Iterator[Entry]:
        try:
            fd = open_file(folder.fd, "origin", os.O_RDONLY, folder.where)
            try:
                name = os.read(fd, 4096).decode(errors="replace").strip()
            finally:
                os.close(fd)
        except (OSError, CacheError):
            name = f"(unknown origin {folder.key})"
        for entry in sorted(os.listdir(folder.fd)):
            hexdigest, _, kind = entry.partition(".")
            if not is_hex_digest(hexdigest) or kind not in ("map", "bad"):
                continue
            if kind == "bad":
                when = os.stat(entry, dir_fd=folder.fd, follow_symlinks=False).st_mtime
                yield Entry(f"sha256:{hexdigest}", 0, 0, when, name, "bad", folder.key)
                continue
            try:
                size = os.stat(hexdigest + ".data", dir_fd=folder.fd, follow_symlinks=False).st_size
                fd = open_file(folder.fd, entry, os.O_RDONLY, folder.where)
                try:
                    mp = os.pread(fd, 1 << 30, 0)
                    used = os.fstat(fd).st_mtime
                finally:
                    os.close(fd)
            except (OSError, CacheError):
                continue
            present = mp.count(1)
            state = "complete" if mp and present == len(mp) else "partial"
            yield Entry(f"sha256:{hexdigest}", size, min(size, present * self.policy.chunk), used, name, state,
                        folder.key)

    def usage(self) -> int:
        return sum(e.cached_bytes for e in self.entries())

    def evict(self, digest: str, origin: str | None = None) -> int:
        """Drop what is cached of one blob (from one origin, or everywhere: ``origin`` None, the verified blob
        included); returns the bytes freed. Origin entries keep their (emptied, sparse) files, so processes that
        have them open go on working: they simply fetch again."""
        hexdigest = hex_of(digest)
        freed = 0
        if origin is None:
            try:
                st = os.stat(hexdigest, dir_fd=self.blobs_fd, follow_symlinks=False)
                freed += min(st.st_size, st.st_blocks * 512)
                self._unlink_verified(hexdigest)
            except FileNotFoundError:
                pass
            folders = list(self._origin_folders())
        else:
            folders = [self.origin(origin)]
        for folder in folders:
            freed += self._empty(folder, hexdigest)
        return freed

    def _empty(self, folder: OriginFolder, hexdigest: str) -> int:
        data, mp, _bad = folder.names(hexdigest)
        try:
            fd = lock_entry(folder.fd, mp, fcntl.LOCK_EX, folder.where)
        except FileNotFoundError:
            return 0
        try:
            with self.dropping():
                present = os.pread(fd, 1 << 30, 0)
                count = present.count(1)
                os.pwrite(fd, bytes(len(present)), 0)
                try:
                    dfd = open_file(folder.fd, data, os.O_RDWR, folder.where)
                except (OSError, CacheError):
                    return count * self.policy.chunk
                try:
                    size = os.fstat(dfd).st_size
                    if size:
                        punch_hole(dfd, 0, size, os.path.join(folder.where, data))
                finally:
                    os.close(dfd)
        finally:
            os.close(fd)
        return count * self.policy.chunk

    def condemn(self, digest: str, origin: str, reason: str) -> None:
        """``origin`` served bytes that do not match ``digest``: drop them and refuse further reads of that blob
        from it (the ``.bad`` mark, cleared by ``overlaybd cache prune``)."""
        folder = self.origin(origin)
        hexdigest = hex_of(digest)
        fd = open_file(folder.fd, hexdigest + ".bad", os.O_WRONLY | os.O_TRUNC, folder.where, create=True)
        try:
            os.write(fd, reason.encode() + b"\n")
        finally:
            os.close(fd)
        self._empty(folder, hexdigest)
        log.warning("%s: %s served bytes that do not match the digest (%s); reads of it from there are stopped and "
                    "its bytes evicted", digest, origin, reason)

    def prune(self, max_bytes: int | None = None, *, clear_bad: bool = False) -> int:
        """Evict least recently used entries until the cache holds at most ``max_bytes`` (default: the bound);
        with ``clear_bad``, bad marks are cleared too (the repository may be read again). Returns the bytes
        freed."""
        limit = self.policy.max_bytes if max_bytes is None else max_bytes
        lock = open_file(self.root_fd, "cache.lock", os.O_RDWR, self.root, create=True)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # someone else is evicting
            entries = sorted(self.entries(), key=lambda e: e.last_used)
            for e in entries:
                if e.state == "bad" and clear_bad:
                    os.unlink(hex_of(e.digest) + ".bad", dir_fd=self._folder(e.key).fd)
            total = sum(e.cached_bytes for e in entries)
            freed = 0
            for e in entries:
                if total - freed <= limit:
                    break
                if e.state == "verified":
                    self._unlink_verified(hex_of(e.digest))
                    freed += e.cached_bytes
                elif e.cached_bytes:
                    freed += self._empty(self._folder(e.key), hex_of(e.digest))
            return freed
        finally:
            os.close(lock)

    def fetched(self, n: int) -> None:
        """Note ``n`` bytes newly cached; prune when the bound may have been passed."""
        with self._lock:
            self._fetched_since_check += n
            due = self._fetched_since_check > max(self.policy.chunk, self.policy.max_bytes // 16)
            if due:
                self._fetched_since_check = 0
        if due and self.usage() > self.policy.max_bytes:
            try:
                self.prune(int(self.policy.max_bytes * 0.9))
            except CacheError as exc:  # over its bound for now; the read that fetched is not at fault
                log.warning("cache not pruned: %s", exc)

    def verify(self) -> list[tuple[Entry, str]]:
        """Hash every whole blob: verified ones (removed if they no longer match) and complete origin entries
        (promoted, or condemned). Returns (entry, "ok" | "corrupt, evicted" | "partial" | "bad")."""
        out = []
        for e in self.entries():
            if e.state in ("partial", "bad"):
                out.append((e, e.state))
                continue
            hexdigest = hex_of(e.digest)
            if e.state == "verified":
                fd = self.open_verified(e.digest, e.size)
                if fd < 0:
                    continue
                try:
                    good = hash_fd(fd, e.size, os.path.join(self.root, "blobs", hexdigest)) == e.digest
                    if not good:
                        self._unlink_verified(hexdigest, only_if=fd)
                finally:
                    os.close(fd)
                out.append((e, "ok" if good else "corrupt, evicted"))
                continue
            state = self.promote(self._folder(e.key), e.digest, e.size, e.origin)
            out.append((e, {"promoted": "ok", "condemned": "corrupt, evicted"}.get(state, "partial")))
        return out

    def promote(self, folder: OriginFolder, digest: str, size: int, origin: str) -> str:
        """Check a complete origin entry against its digest: "promoted" (its data is now the verified blob),
        "condemned" (dropped and marked bad), or "incomplete" (not whole, or gone)."""
        hexdigest = hex_of(digest)
        data, mp, _bad = folder.names(hexdigest)
        try:
            fd = lock_entry(folder.fd, mp, fcntl.LOCK_EX, folder.where)
        except FileNotFoundError:
            return "incomplete"
        try:
            present = os.pread(fd, 1 << 30, 0)
            if not present or present.count(1) != len(present):
                return "incomplete"
            try:
                dfd = open_file(folder.fd, data, os.O_RDONLY, folder.where)
            except (OSError, CacheError):
                return "incomplete"
            try:
                got = hash_fd(dfd, size, os.path.join(folder.where, data))
            finally:
                os.close(dfd)
            if got == digest:
                os.rename(data, hexdigest, src_dir_fd=folder.fd, dst_dir_fd=self.blobs_fd)
                os.unlink(mp, dir_fd=folder.fd)
                log.info("%s: whole and verified; now shared by every repository", digest)
                return "promoted"
        finally:
            os.close(fd)
        self.condemn(digest, origin, f"whole blob hashes to {got}")
        return "condemned"

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self._verifier.shutdown(wait=True)
