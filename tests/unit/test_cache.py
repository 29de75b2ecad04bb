"""The persistent block cache: fetch on demand, LRU bound, damage repair, invalidation, several processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlaybd.cache.planning import chunk_span, plan_fetches
from overlaybd.cache.store import BlobCache
from overlaybd.source.base import BlockSource
from overlaybd.source.file import MemorySource

from ..native import require_extension

CHUNK = 64 * 1024


class Counting(BlockSource):
    def __init__(self, data: bytes) -> None:
        self.inner = MemorySource(data)
        self.size = len(data)
        self.name = "upstream"
        self.reads: list[tuple[int, int]] = []

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.reads.append((offset, len(buf)))
        self.inner.readinto(offset, buf)


def digest_of(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def test_planning_groups_missing_chunks_and_reads_ahead() -> None:
    assert chunk_span(100, 1, 64) == (1, 2)
    assert chunk_span(64, 64, 64) == (1, 2)
    present = bytearray(10)
    present[2] = 1
    assert plan_fetches(present, 0, 4, readahead=0, nchunks=10, max_run=16) == [(0, 2), (3, 1)]
    assert plan_fetches(present, 0, 4, readahead=3, nchunks=10, max_run=16) == [(0, 2), (3, 4)]
    assert plan_fetches(present, 0, 4, readahead=3, nchunks=5, max_run=16) == [(0, 2), (3, 2)]
    assert plan_fetches(bytearray(40), 0, 40, readahead=0, nchunks=40, max_run=16) == [(0, 16), (16, 16), (32, 8)]
    assert plan_fetches(bytes([1] * 4), 0, 4, readahead=2, nchunks=4, max_run=16) == []


def test_reads_fetch_once_then_come_from_the_cache(tmp_path: Path) -> None:
    data = os.urandom(20 * CHUNK + 123)
    up = Counting(data)
    cache = BlobCache(str(tmp_path), max_bytes=1 << 30, chunk=CHUNK)
    src = cache.source(digest_of(1), len(data), up, readahead=2)
    assert src.pread(CHUNK + 5, 100) == data[CHUNK + 5 : CHUNK + 105]
    assert up.reads == [(CHUNK, CHUNK)]  # a random read: its chunk only, no read-ahead
    assert src.pread(CHUNK + 105, 1000) == data[CHUNK + 105 : CHUNK + 1105]
    assert len(up.reads) == 1  # already there
    assert src.pread(CHUNK + 1105, CHUNK) == data[CHUNK + 1105 : 2 * CHUNK + 1105]
    assert up.reads[1:] == [(2 * CHUNK, 3 * CHUNK)]  # sequential: the missing chunk plus two ahead, one request
    assert src.pread(3 * CHUNK, CHUNK) == data[3 * CHUNK : 4 * CHUNK]
    assert len(up.reads) == 2
    assert src.pread(len(data) - 200, 200) == data[-200:]  # the short last chunk
    again = cache.source(digest_of(1), len(data), Counting(data))  # a new opener (another volume) shares it
    assert again.pread(CHUNK, 3 * CHUNK) == data[CHUNK : 4 * CHUNK]
    assert [e.digest for e in cache.entries()] == [digest_of(1)]


def test_lru_eviction_keeps_the_bound(tmp_path: Path) -> None:
    cache = BlobCache(str(tmp_path), max_bytes=8 * CHUNK, chunk=CHUNK)
    blobs = {n: os.urandom(6 * CHUNK) for n in range(3)}
    for n, data in blobs.items():
        src = cache.source(digest_of(n), len(data), Counting(data), readahead=0)
        assert src.pread(0, len(data)) == data
        os.utime(cache.paths(digest_of(n))[1], (1000 + n, 1000 + n))  # n=0 is the least recently used
    cache.prune()
    assert cache.usage() <= 8 * CHUNK  # the reads pruned on the way; prune() found the bound kept
    assert digest_of(2) in {e.digest for e in cache.entries() if e.cached_bytes}
    assert [e.cached_bytes for e in cache.entries() if e.digest == digest_of(0)] == [0]
    # an evicted blob is simply fetched again
    data = blobs[0]
    up = Counting(data)
    assert cache.source(digest_of(0), len(data), up).pread(0, 100) == data[:100] and up.reads


def test_damaged_entries_are_rebuilt_not_trusted(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    cache = BlobCache(str(tmp_path), chunk=CHUNK)
    cache.source(digest_of(7), len(data), Counting(data)).pread(0, len(data))
    data_path, map_path = cache.paths(digest_of(7))
    Path(map_path).write_bytes(b"\x07garbage")  # a torn or foreign map
    up = Counting(data)
    assert cache.source(digest_of(7), len(data), up).pread(0, len(data)) == data
    assert up.reads  # fetched again, not served from the damaged entry
    with open(data_path, "r+b") as f:
        f.truncate(10)  # a data file of the wrong size
    up = Counting(data)
    assert cache.source(digest_of(7), len(data), up).pread(CHUNK, 10) == data[CHUNK : CHUNK + 10]
    assert up.reads


def test_invalidate_drops_the_range(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    cache = BlobCache(str(tmp_path), chunk=CHUNK)
    up = Counting(data)
    src = cache.source(digest_of(9), len(data), up, readahead=0)
    src.pread(0, len(data))
    n = len(up.reads)
    src.invalidate(CHUNK + 10, 5)
    assert src.pread(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
    assert up.reads[n:] == [(CHUNK, CHUNK)]


def test_verify_evicts_a_corrupt_whole_blob(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 * CHUNK)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache = BlobCache(str(tmp_path), chunk=CHUNK)
    cache.source(digest, len(data), Counting(data)).pread(0, len(data))
    assert [state for _, state in cache.verify()] == ["ok"]
    with open(cache.paths(digest)[0], "r+b") as f:
        f.seek(100)
        f.write(b"X")
    assert [state for _, state in cache.verify()] == ["corrupt, evicted"]
    assert [e.cached_bytes for e in cache.entries()] == [0]


def test_several_processes_share_one_cache(tmp_path: Path) -> None:
    script = f"""
import os, sys, random
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "src")!r})
from overlaybd.cache.store import BlobCache
from overlaybd.source.file import MemorySource
data = bytes(random.Random(5).randbytes(64 * {CHUNK}))
cache = BlobCache({str(tmp_path)!r}, max_bytes=24 * {CHUNK}, chunk={CHUNK})
src = cache.source("sha256:" + "ab" * 32, len(data), MemorySource(data))
rng = random.Random(int(sys.argv[1]))
for _ in range(300):
    off = rng.randrange(len(data) - 1); n = rng.randrange(1, min(3 * {CHUNK}, len(data) - off))
    assert src.pread(off, n) == data[off:off + n], (off, n)
    if rng.random() < 0.05:
        cache.prune(8 * {CHUNK})
print("ok")
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err


def test_bad_digest_is_refused(tmp_path: Path) -> None:
    from overlaybd.cache.store import CacheError

    with pytest.raises(CacheError):
        BlobCache(str(tmp_path)).paths("sha256:../../etc/passwd")


def test_cache_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from overlaybd.cli.main import main

    data = os.urandom(5 * CHUNK)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache = BlobCache(str(tmp_path), chunk=CHUNK)
    cache.source(digest, len(data), Counting(data)).pread(0, len(data))
    assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--output", "json"]) == 0
    listed = __import__("json").loads(capsys.readouterr().out)
    assert listed[0]["digest"] == digest and listed[0]["cached"] == len(data)
    assert main(["cache", "verify", "--cache-dir", str(tmp_path)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--max-size", "0"]) == 0
    assert "freed" in capsys.readouterr().out and cache.usage() == 0


# -- the generation: lock-free readers never keep bytes dropped under them ------------------------------------------


def generation(cache: BlobCache) -> int:
    return int.from_bytes(Path(cache.root, "generation").read_bytes()[:8], "little")


def test_dropping_bytes_moves_the_generation_to_odd_then_even(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    cache = BlobCache(str(tmp_path), chunk=CHUNK)
    src = cache.source(digest_of(3), len(data), Counting(data), readahead=0)
    src.pread(0, len(data))
    g0 = generation(cache)
    assert g0 % 2 == 0
    with cache.dropping():
        assert generation(cache) == g0 + 1  # odd while the change lasts
    assert generation(cache) == g0 + 2
    src.invalidate(0, 10)
    assert generation(cache) == g0 + 4
    cache.evict(digest_of(3))
    assert generation(cache) == g0 + 6
    assert src.pread(0, len(data)) == data


def test_reads_while_bytes_are_being_dropped_go_the_locked_way(tmp_path: Path) -> None:
    from overlaybd.cache import store

    data = os.urandom(4 * CHUNK)
    cache = BlobCache(str(tmp_path), chunk=CHUNK)
    up = Counting(data)
    src = cache.source(digest_of(4), len(data), up, readahead=0)
    src.pread(0, len(data))
    fetched = len(up.reads)
    with cache.dropping():  # odd: a lock-free read must not keep what it copied
        if store._hits is not None and cache.generation is not None:
            map_fd = os.open(cache.paths(digest_of(4))[1], os.O_RDONLY)
            try:
                out = bytearray(CHUNK)
                assert store._hits.read_present(cache.generation, map_fd, src.data_fd, 1, 1, out, CHUNK) == \
                    store._hits.MOVED
            finally:
                os.close(map_fd)
        # the read itself still succeeds, through the shared lock, from the cache
        assert src.pread(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
    assert len(up.reads) == fetched


def test_a_generation_left_odd_by_a_dead_writer_is_put_right(tmp_path: Path) -> None:
    cache = BlobCache(str(tmp_path), chunk=CHUNK)
    g0 = generation(cache)
    BlobCache._bump(cache.generation, cache._generation_fd)  # a writer that died half-way
    assert generation(cache) == g0 + 1
    BlobCache(str(tmp_path), chunk=CHUNK)  # the next process to open the cache
    assert generation(cache) == g0 + 2


def test_readers_never_keep_bytes_evicted_under_them(tmp_path: Path) -> None:
    """Processes read and check random ranges while another evicts the blob over and over: every read must come
    back right (a lock-free reader that kept a copy made during an eviction would see zeros)."""
    blob = 48 * CHUNK
    reader = f"""
import os, sys, random, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "src")!r})
from overlaybd.cache import store
from overlaybd.cache.store import BlobCache
from overlaybd.source.file import MemorySource
data = bytes(random.Random(9).randbytes({blob}))
cache = BlobCache({str(tmp_path)!r}, chunk={CHUNK})
src = cache.source("sha256:" + "cd" * 32, len(data), MemorySource(data), readahead=0)
rng = random.Random(int(sys.argv[1]))
reads = 0
end = time.monotonic() + 3
while time.monotonic() < end:
    off = rng.randrange(len(data) - 1); n = rng.randrange(1, min(2 * {CHUNK}, len(data) - off))
    got = src.pread(off, n)
    assert got == data[off:off + n], (off, n)
    reads += 1
print("ok", reads, "lock-free" if store._hits is not None and cache.generation is not None else "locked")
"""
    evictor = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "src")!r})
from overlaybd.cache.store import BlobCache
cache = BlobCache({str(tmp_path)!r}, chunk={CHUNK})
evictions = 0
end = time.monotonic() + 3
while time.monotonic() < end:
    cache.evict("sha256:" + "cd" * 32)
    evictions += 1
print("ok", evictions)
"""
    procs = [subprocess.Popen([sys.executable, "-c", reader, str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    procs.append(subprocess.Popen([sys.executable, "-c", evictor], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.startswith("ok"), err
        outs.append(out.split())
    assert all(int(o[1]) > 100 for o in outs), outs  # both sides really ran side by side


def test_the_lock_free_path_is_there_where_ci_builds_it() -> None:
    from overlaybd.cache import store

    require_extension(store._hits, "overlaybd.cache._hits")
    assert store.describe_reads().startswith("lock-free")
