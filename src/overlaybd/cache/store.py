"""A persistent cache of remote blob bytes: shared by all volumes on the machine, keyed by blob digest,
size-bounded with LRU eviction, safe for several processes at once.

```
CACHE/blobs/<hex>.data   sparse file, the blob's size; fetched chunks are where they belong
CACHE/blobs/<hex>.map    one byte per chunk: 1 = present and complete
CACHE/cache.lock         held (exclusively) by whoever evicts
CACHE/generation         a counter, odd while someone drops cached bytes (mapped shared by every process)
```

Bytes are never dropped under a reader. Eviction, invalidation and resets hold the blob's map exclusively (``flock``)
and the generation lock, and move the generation to odd before they change anything and to even after. A read
goes one of two ways. Lock-free (``_hits.c``, where built): note the generation, check the map, copy the bytes,
and keep them only if the generation was even and has not moved. Locked (this file, always there): hold the map
shared while checking it and copying. Fetching only adds bytes, data before map, under the shared lock. A map or data
file that does not fit (wrong size, unknown byte values) is reset at open: a damaged cache costs refetching,
never a failed start or wrong bytes. Nothing fetched is trusted beyond what the layers above check: a ZFile block
whose CRC fails is invalidated here and fetched again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .. import native
from ..errors import LayerIOError, OverlaybdError
from ..formats.lsmt.writable import punch_hole
from ..source.base import BlockSource
from ..source.file import write_all
from .planning import chunk_span, plan_fetches

log = logging.getLogger(__name__)

# the lock-free hit path in C (_hits.c), where it was built; the locked path below serves without it
_hits: Any = native.load("overlaybd.cache._hits")
GENERATION_SIZE = 4096


def describe_reads() -> str:
    """How cache hits are read here."""
    if _hits is not None:
        return "lock-free (C, generation-checked)"
    return f"locked (Python; {native.why_not()})"

CHUNK = 64 * 1024  # small enough that a random read fetches little more than it needs (benchmarks/RESULTS_REMOTE)
DEFAULT_MAX_BYTES = 4 << 30
READAHEAD_CHUNKS = 48  # 3 MiB ahead, only for reads that continue where the last one ended
MAX_RUN_CHUNKS = 64  # one range request fetches at most 4 MiB
CONCURRENCY = 4
TOUCH_EVERY = 1.0


class CacheError(OverlaybdError):
    """The cache cannot serve a read (its folder is unusable)."""


def default_dir() -> str:
    env = os.environ.get("OVERLAYBD_CACHE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/overlaybd"
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "overlaybd")


def default_max_bytes() -> int:
    env = os.environ.get("OVERLAYBD_CACHE_SIZE")
    if env:
        from ..cli.common import parse_size

        return parse_size(env)
    return DEFAULT_MAX_BYTES


@dataclass(frozen=True, slots=True)
class Entry:
    digest: str
    size: int
    cached_bytes: int
    last_used: float


class BlobCache:
    def __init__(self, root: str | None = None, *, max_bytes: int | None = None, chunk: int | None = None) -> None:
        self.root = os.path.abspath(root or default_dir())
        self.max_bytes = max_bytes if max_bytes is not None else default_max_bytes()
        self.chunk = chunk or CHUNK
        self.blobs = os.path.join(self.root, "blobs")
        try:
            os.makedirs(self.blobs, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the cache folder: {exc.strerror}", path=self.blobs) from None
        self._fetched_since_check = 0
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="cache-fetch")
        self._generation_fd, self.generation = self._open_generation()

    def _open_generation(self) -> tuple[int, mmap.mmap | None]:
        """CACHE/generation, mapped. Without it (an odd file system, a read-only folder) writers cannot announce
        their changes, so nobody may read lock-free: a missing mapping sends every read the locked way, and a
        writer that cannot open the file fails (CacheError) rather than change anything unannounced."""
        path = os.path.join(self.root, "generation")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        """Around any change that drops cached bytes (held inside the blob's exclusive map lock): the generation
        is odd while it lasts, so lock-free readers throw away what they copied meanwhile."""
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

    def paths(self, digest: str) -> tuple[str, str]:
        hexdigest = digest.split(":", 1)[-1]
        if len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            raise CacheError(f"bad digest {digest!r}")
        base = os.path.join(self.blobs, hexdigest)
        return base + ".data", base + ".map"

    def source(self, digest: str, size: int, upstream: BlockSource, *, readahead: int | None = None
               ) -> CachedSource:
        """``readahead``: chunks fetched ahead of a sequential read (default READAHEAD_CHUNKS)."""
        return CachedSource(self, digest, size, upstream,
                            readahead=READAHEAD_CHUNKS if readahead is None else readahead)

    # -- housekeeping ------------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        out = []
        for name in sorted(os.listdir(self.blobs)):
            if not name.endswith(".map"):
                continue
            hexdigest = name[:-4]
            data, mp = self.paths(hexdigest)
            try:
                size = os.path.getsize(data)
                with open(mp, "rb") as f:
                    present = f.read().count(1)
                used = os.path.getmtime(mp)
            except OSError:
                continue
            out.append(Entry(f"sha256:{hexdigest}", size, min(size, present * self.chunk), used))
        return out

    def usage(self) -> int:
        return sum(e.cached_bytes for e in self.entries())

    def evict(self, digest: str) -> int:
        """Drop everything cached of one blob; returns the bytes freed. The files stay (empty and sparse), so
        processes that have the blob open go on working: they simply fetch again."""
        data, mp = self.paths(digest)
        if not os.path.exists(mp):
            return 0
        with _locked(mp, fcntl.LOCK_EX) as fd, self.dropping():
            mapped = os.pread(fd, 1 << 30, 0)
            present = mapped.count(1)
            os.pwrite(fd, bytes(len(mapped)), 0)
            try:
                size = os.path.getsize(data)
                dfd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                return present * self.chunk
            try:
                if size:
                    punch_hole(dfd, 0, size, data)
            finally:
                os.close(dfd)
        return present * self.chunk

    def prune(self, max_bytes: int | None = None) -> int:
        """Evict least recently used blobs until the cache holds at most ``max_bytes`` (default: the bound)."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        lock = os.open(os.path.join(self.root, "cache.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # someone else is evicting
            entries = sorted(self.entries(), key=lambda e: e.last_used)
            total = sum(e.cached_bytes for e in entries)
            freed = 0
            for e in entries:
                if total - freed <= limit:
                    break
                freed += self.evict(e.digest)
            return freed
        finally:
            os.close(lock)

    def _fetched(self, n: int) -> None:
        with self._lock:
            self._fetched_since_check += n
            due = self._fetched_since_check > max(self.chunk, self.max_bytes // 16)
            if due:
                self._fetched_since_check = 0
        if due and self.usage() > self.max_bytes:
            try:
                self.prune(int(self.max_bytes * 0.9))
            except CacheError as exc:  # over its bound for now; the read that fetched is not at fault
                log.warning("cache not pruned: %s", exc)

    def verify(self) -> list[tuple[Entry, str]]:
        """Hash every fully cached blob; a mismatch is evicted. Returns (entry, "ok"|"corrupt, evicted"|"partial")."""
        out = []
        for e in self.entries():
            if e.cached_bytes < e.size:
                out.append((e, "partial"))
                continue
            data, mp = self.paths(e.digest)
            with _locked(mp, fcntl.LOCK_SH):
                h = hashlib.sha256()
                with open(data, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
            if "sha256:" + h.hexdigest() == e.digest:
                out.append((e, "ok"))
            else:
                self.evict(e.digest)
                out.append((e, "corrupt, evicted"))
        return out


@contextmanager
def _locked(path: str, mode: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


class CachedSource(BlockSource):
    """A filter: reads come from the cache, missing chunks are fetched from ``upstream`` (concurrently, with
    read-ahead) and kept."""

    def __init__(self, cache: BlobCache, digest: str, size: int, upstream: BlockSource, *, readahead: int) -> None:
        self.cache = cache
        self.digest = digest
        self.size = size
        self.block_size = 1
        self.upstream = upstream
        self.name = upstream.name
        self.readahead = readahead
        self.data_path, self.map_path = cache.paths(digest)
        self.nchunks = -(-size // cache.chunk)
        self._touched = 0.0
        self._next_offset = -1  # where a sequential reader would read next (a first read is not one: it is a header)
        self._local = threading.local()
        self._map_fds: list[int] = []
        self._fds_lock = threading.Lock()
        self._prepare()
        self.data_fd = os.open(self.data_path, os.O_RDWR | os.O_CLOEXEC)

    def _prepare(self) -> None:
        """Create, or check and if needed reset, this blob's files (never fails on a damaged cache)."""
        with _locked(self.map_path, fcntl.LOCK_EX) as fd:
            try:
                mp = os.pread(fd, self.nchunks + 1, 0)
                data_ok = os.path.exists(self.data_path) and os.path.getsize(self.data_path) == self.size
            except OSError:
                mp, data_ok = b"", False
            if len(mp) == self.nchunks and data_ok and not mp.translate(None, b"\x00\x01"):
                return
            if mp:
                log.warning("%s: cache entry damaged (map %d/%d bytes, data size ok: %s); rebuilding",
                            self.digest, len(mp), self.nchunks, data_ok)
            with self.cache.dropping():
                os.ftruncate(fd, 0)
                os.ftruncate(fd, self.nchunks)
                with open(self.data_path, "wb") as f:
                    f.truncate(self.size)

    def _map_fd(self) -> int:
        """This thread's own descriptor of the map: ``flock`` belongs to an open file description, so threads
        sharing one would unlock each other."""
        fd: int | None = getattr(self._local, "fd", None)
        if fd is None:
            fd = self._local.fd = os.open(self.map_path, os.O_RDWR | os.O_CLOEXEC)
            with self._fds_lock:
                self._map_fds.append(fd)
        return fd

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        chunk = self.cache.chunk
        n = len(buf)
        first = offset // chunk
        last = -(-(offset + n) // chunk)
        sequential = offset == self._next_offset
        self._next_offset = offset + n
        readahead = self.readahead if sequential else 0
        try:
            fd = self._local.fd
        except AttributeError:
            fd = self._map_fd()
        flock, pread, want = fcntl.flock, os.pread, last - first
        generation = self.cache.generation
        if _hits is not None and generation is not None:  # lock-free; a miss or a moved generation goes on below
            if _hits.read_present(generation, fd, self.data_fd, first, want, buf, offset) == _hits.HIT:
                now = time.monotonic()
                if now - self._touched > TOUCH_EVERY:
                    self._touch(now)
                return
        for _attempt in range(4):
            flock(fd, fcntl.LOCK_SH)
            try:
                end = min(self.nchunks, last + readahead)
                present = pread(fd, end - first, first)
                # the hit path: every chunk present, the bytes copied out under the shared lock
                if len(present) == end - first and present.find(0, 0, want) < 0:
                    if os.preadv(self.data_fd, [buf], offset) != n:
                        self._copy_out(offset, buf)
                    now = time.monotonic()
                    if now - self._touched > TOUCH_EVERY:
                        self._touch(now)
                    return
            finally:
                flock(fd, fcntl.LOCK_UN)
            padded = bytes(first) + present if len(present) == end - first else bytes(end)
            runs = plan_fetches(padded, first, last, readahead=readahead, nchunks=self.nchunks,
                                max_run=MAX_RUN_CHUNKS)
            if len(runs) > 1:
                list(self.cache.pool.map(self._fetch, runs))  # concurrent range requests
            elif runs:
                self._fetch(runs[0])
        # other processes keep evicting what we fetch (a cache much smaller than the working set): read through
        log.debug("%s: [%d, +%d) evicted under us repeatedly; reading past the cache", self.digest, offset, len(buf))
        self.upstream.readinto(offset, buf)

    def _copy_out(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.data_fd, [buf[done:]], offset + done)
            if n <= 0:
                raise LayerIOError("cache data file is short", path=self.data_path, offset=offset + done)
            done += n

    def _fetch(self, run: tuple[int, int]) -> None:
        chunk = self.cache.chunk
        start, count = run
        off = start * chunk
        n = min(count * chunk, self.size - off)
        data = self.upstream.pread(off, n)
        # data and map change together under the shared lock: an eviction (exclusive) cannot punch the data
        # between the two and leave the map claiming bytes that are gone
        with _locked(self.map_path, fcntl.LOCK_SH) as fd:
            write_all(self.data_fd, data, off, self.data_path)
            os.pwrite(fd, b"\x01" * count, start)
        self.cache._fetched(n)

    def _touch(self, now: float) -> None:
        """Mark the entry used (its map's mtime orders LRU eviction), at most once every TOUCH_EVERY seconds."""
        self._touched = now
        try:
            os.utime(self.map_path)
        except OSError:
            pass

    def invalidate(self, offset: int, length: int) -> None:
        first, last = chunk_span(offset, length, self.cache.chunk)
        with _locked(self.map_path, fcntl.LOCK_EX) as fd, self.cache.dropping():
            os.pwrite(fd, bytes(last - first), first)
            start = first * self.cache.chunk
            punch_hole(self.data_fd, start, min(last * self.cache.chunk, self.size) - start, self.data_path)

    def close(self) -> None:
        if self.data_fd >= 0:
            os.close(self.data_fd)
            self.data_fd = -1
        with self._fds_lock:
            for fd in self._map_fds:
                os.close(fd)
            self._map_fds.clear()
        self._local = threading.local()
