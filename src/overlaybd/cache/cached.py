"""The cache as a filter in front of a remote blob (``BlobCache.source``)."""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import metrics, native
from ..errors import DigestMismatchError, LayerIOError
from ..source.base import BlockSource
from ..source.file import punch_hole, write_all
from ..source.filter import Filter
from .folder import OriginFolder, hex_of, lock_entry, open_file, same_file
from .planning import chunk_span, plan_fetches

if TYPE_CHECKING:
    from .store import BlobCache

log = logging.getLogger(__name__)

# the lock-free hit path in C (_hits.c), where it was built; the locked path serves without it
_hits: Any = native.load(native.HITS)


class _EntryGone(Exception):
    """This repository's entry was promoted to the verified blob (or removed) under us: look again."""


class _Binding:
    """The entry files a source reads and fills: its repository's data file (and map, opened per thread)."""

    __slots__ = ("data_fd", "serial")

    def __init__(self, data_fd: int, serial: int) -> None:
        self.data_fd = data_fd
        self.serial = serial


class CachedSource(Filter):
    """Reads come from the verified blob when the cache has one, else from this repository's entry; missing chunks
    are fetched from ``inner`` (concurrently, with read-ahead) into that entry. When the entry is whole, its
    sha256 is checked in the background: it becomes the verified blob, or the repository is caught serving other
    bytes and every later read fails with ``DigestMismatchError``."""

    def __init__(self, cache: BlobCache, digest: str, size: int, upstream: BlockSource, folder: OriginFolder,
                 origin: str) -> None:
        super().__init__(upstream, size=size)
        self.cache = cache
        self.policy = cache.policy
        self.digest = digest
        self.hex = hex_of(digest)
        self.folder = folder
        self.origin = origin
        self.data_name, self.map_name, _bad = folder.names(self.hex)
        self.nchunks = -(-size // self.policy.chunk)
        self.failure: DigestMismatchError | None = None
        self._touched = 0.0
        self._next_offset = -1  # where a sequential reader would read next (a first read is not one: a header)
        self._local = threading.local()
        self._fds: list[int] = []  # every descriptor opened, closed at close() (a reader may still hold one)
        self._fds_lock = threading.Lock()
        self._checking = False
        self.verified_fd = cache.open_verified(digest, size)
        self._binding: _Binding | None = None
        if self.verified_fd >= 0:
            self._keep(self.verified_fd)
        else:
            self._bind()

    def _keep(self, fd: int) -> int:
        with self._fds_lock:
            self._fds.append(fd)
        return fd

    # -- the entry -----------------------------------------------------------------------------------------------
    def _bind(self) -> _Binding:
        """Open (create, or check and if needed reset) this repository's entry; never fails on a damaged one."""
        folder = self.folder
        fd = lock_entry(folder.fd, self.map_name, fcntl.LOCK_EX, folder.where, create=True)
        try:
            try:
                mp = os.pread(fd, self.nchunks + 1, 0)
                st = os.stat(self.data_name, dir_fd=folder.fd, follow_symlinks=False)
                data_ok = st.st_size == self.size
            except OSError:
                mp, data_ok = b"", False
            dfd = self._keep(open_file(folder.fd, self.data_name, os.O_RDWR, folder.where, create=True))
            if not (len(mp) == self.nchunks and data_ok and not mp.translate(None, b"\x00\x01")):
                if mp:
                    log.warning("%s: cache entry damaged (map %d/%d bytes, data size ok: %s); rebuilding",
                                self.digest, len(mp), self.nchunks, data_ok)
                with self.cache.dropping():
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, self.nchunks)
                    os.ftruncate(dfd, 0)
                    os.ftruncate(dfd, self.size)
        finally:
            os.close(fd)
        serial = self._binding.serial + 1 if self._binding is not None else 0
        self._binding = _Binding(dfd, serial)
        return self._binding

    def _map_fd(self, binding: _Binding) -> int:
        """This thread's own descriptor of the map: ``flock`` belongs to an open file description, so threads
        sharing one would unlock each other."""
        mine: tuple[int, int] | None = getattr(self._local, "map", None)
        if mine is not None and mine[0] == binding.serial:
            return mine[1]
        try:
            fd = self._keep(open_file(self.folder.fd, self.map_name, os.O_RDWR, self.folder.where))
        except FileNotFoundError:
            raise _EntryGone from None
        self._local.map = (binding.serial, fd)
        return fd

    def _follow(self) -> None:
        """The entry moved: read the verified blob if it is there now, else a fresh entry."""
        with self._fds_lock:
            fd = self.cache.open_verified(self.digest, self.size)
            if fd >= 0:
                self._fds.append(fd)
                self.verified_fd = fd
                return
        self._bind()

    # -- reading -------------------------------------------------------------------------------------------------
    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        for _attempt in range(4):
            if self.failure is not None:
                raise self.failure
            vfd = self.verified_fd
            if vfd >= 0:
                _read_all(vfd, buf, offset, self.data_name)
                self._touch_verified()
                metrics.current().cache_hit()
                return
            try:
                self._read_entry(offset, buf)
                return
            except _EntryGone:
                self._follow()
        metrics.current().cache_miss()
        self.inner.readinto(offset, buf)  # the entry keeps moving under us: read past the cache

    def _read_entry(self, offset: int, buf: memoryview) -> None:
        chunk = self.policy.chunk
        n = len(buf)
        first, last = chunk_span(offset, n, chunk)
        sequential = offset == self._next_offset or self.policy.readahead_always
        self._next_offset = offset + n
        readahead = self.policy.readahead_chunks if sequential else 0
        want = last - first
        for attempt in range(4):
            binding = self._binding
            assert binding is not None
            fd = self._map_fd(binding)
            generation = self.cache.generation
            if _hits is not None and generation is not None:  # lock-free; a miss or a moved generation goes on
                if _hits.read_present(generation, fd, binding.data_fd, first, want, buf, offset) == _hits.HIT:
                    self._touch()
                    metrics.current().cache_hit()
                    return
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                end = min(self.nchunks, last + readahead)
                present = os.pread(fd, end - first, first)
                if len(present) == end - first and present.find(0, 0, want) < 0:
                    _read_all(binding.data_fd, buf, offset, self.data_name)
                    self._touch()
                    metrics.current().cache_hit()
                    return
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._refuse_if_condemned()
            if len(present) != end - first:
                present = bytes(end - first)
            runs = plan_fetches(present, first, last, readahead=readahead, nchunks=self.nchunks,
                                max_run=self.policy.max_run_chunks)
            whole = sum(min(start + count, last) - start for start, count in runs if start < last) == want
            recorder = metrics.current()
            if not attempt:
                recorder.cache_miss()
            if len(runs) > 1:  # the pool's threads count where this one does
                fetch = functools.partial(_counted, recorder, self._fetch, binding)
                list(self.cache.pool.map(fetch, runs, [offset] * len(runs), [buf] * len(runs)))
            elif runs:
                self._fetch(binding, runs[0], offset, buf)
            if whole:  # every chunk of the read was fetched, and copied into buf on the way
                return
        # other processes keep evicting what we fetch (a cache much smaller than the working set): read through
        log.debug("%s: [%d, +%d) evicted under us repeatedly; reading past the cache", self.digest, offset, n)
        self.inner.readinto(offset, buf)

    def _fetch(self, binding: _Binding, run: tuple[int, int], offset: int, buf: memoryview) -> None:
        """Fetch chunks ``run`` into the entry, and the part of them the read wants into ``buf``."""
        chunk = self.policy.chunk
        start, count = run
        pos = start * chunk
        n = min(count * chunk, self.size - pos)
        if pos == offset and n == len(buf):
            data: memoryview = buf  # the read is exactly this run: fetch straight into the caller's buffer
            self.inner.readinto(pos, data)
        else:
            data = memoryview(bytearray(n))
            self.inner.readinto(pos, data)
            lo, hi = max(pos, offset), min(pos + n, offset + len(buf))
            if lo < hi:
                buf[lo - offset : hi - offset] = data[lo - pos : hi - pos]
        fd = self._map_fd(binding)
        # data and map change together under the shared lock: an eviction (exclusive) cannot punch the data
        # between the two and leave the map claiming bytes that are gone
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if not same_file(binding.data_fd, self.folder.fd, self.data_name):
                return  # the entry was promoted or replaced meanwhile: never write into a verified blob
            write_all(binding.data_fd, data, pos, self.data_name)
            os.pwrite(fd, b"\x01" * count, start)
            whole = os.pread(fd, self.nchunks, 0).find(0) < 0
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self.cache.fetched(n)
        if whole:
            self._check_whole()

    def _check_whole(self) -> None:
        """The entry is whole: have its sha256 checked (in the background; once per source)."""
        with self._fds_lock:
            if self._checking:
                return
            self._checking = True
        self.cache.verify_later(self._promote)

    def _promote(self) -> None:
        try:
            state = self.cache.promote(self.folder, self.digest, self.size, self.origin)
        except Exception as exc:  # a check that could not run costs nothing: the entry stays as it is
            log.warning("%s: could not check the cached blob: %s", self.digest, exc)
            state = "failed"
        if state == "condemned":
            self._refuse_if_condemned()
        with self._fds_lock:
            self._checking = False

    def _refuse_if_condemned(self) -> None:
        reason = self.folder.bad_reason(self.hex)
        if reason is not None:
            self.failure = DigestMismatchError(
                f"{self.origin} served bytes that do not match this digest ({reason}); reads of it from there are "
                "stopped (overlaybd cache prune clears this)", path=self.digest)
            raise self.failure

    def _touch(self) -> None:
        """Mark the entry used (its map's mtime orders eviction), at most once every ``touch_every`` seconds."""
        now = time.monotonic()
        if now - self._touched > self.policy.touch_every:
            self._touched = now
            try:
                os.utime(self.map_name, dir_fd=self.folder.fd, follow_symlinks=False)
            except OSError:
                pass

    def _touch_verified(self) -> None:
        now = time.monotonic()
        if now - self._touched > self.policy.touch_every:
            self._touched = now
            try:
                os.utime(self.hex, dir_fd=self.cache.blobs_fd, follow_symlinks=False)
            except OSError:
                pass

    def invalidate(self, offset: int, length: int) -> None:
        """A check above found these bytes corrupt: drop them, so that the next read fetches them again."""
        if self.verified_fd >= 0 or not self._still_the_entry():
            # the verified blob itself is damaged (on disk): its name goes, and reads go back to the repository
            fd = self.verified_fd if self.verified_fd >= 0 else self._binding.data_fd  # type: ignore[union-attr]
            log.warning("%s: the cache's verified copy failed a check; removed", self.digest)
            self.cache._unlink_verified(self.hex, only_if=fd)
            self._bind()
            self.verified_fd = -1
            return
        binding = self._binding
        assert binding is not None
        first, last = chunk_span(offset, length, self.policy.chunk)
        try:
            fd = lock_entry(self.folder.fd, self.map_name, fcntl.LOCK_EX, self.folder.where)
        except FileNotFoundError:  # promoted meanwhile: the next read finds where the bytes are now
            self._follow()
            return
        try:
            if not same_file(binding.data_fd, self.folder.fd, self.data_name):
                self._bind()
                return
            with self.cache.dropping():
                os.pwrite(fd, bytes(last - first), first)
                start = first * self.policy.chunk
                punch_hole(binding.data_fd, start, min(last * self.policy.chunk, self.size) - start, self.data_name)
        finally:
            os.close(fd)

    def _still_the_entry(self) -> bool:
        binding = self._binding
        return binding is not None and same_file(binding.data_fd, self.folder.fd, self.data_name)

    def close(self) -> None:
        with self._fds_lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        self.verified_fd = -1
        self._binding = None
        self._local = threading.local()

    def describe(self) -> dict[str, Any]:
        return {"digest": self.digest, "origin": self.origin, "verified": self.verified_fd >= 0}


def _counted(recorder: metrics.Recorder, fetch: Any, *args: Any) -> None:
    """``fetch(*args)`` in a pool thread, its registry traffic counted by ``recorder``."""
    metrics.bind(recorder)
    try:
        fetch(*args)
    finally:
        metrics.bind(None)


def _read_all(fd: int, buf: memoryview, offset: int, name: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise LayerIOError("cache data file is short", path=name, offset=offset + done)
        done += n
