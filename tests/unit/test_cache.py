"""The persistent block cache: fetch on demand, LRU bound, damage repair, invalidation, several processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlaybd.cache import cached, store
from overlaybd.cache.cached import CachedSource
from overlaybd.cache.folder import origin_key
from overlaybd.cache.planning import chunk_span, plan_fetches
from overlaybd.cache.store import BlobCache, CachePolicy
from overlaybd.source.base import BlockSource
from overlaybd.source.file import MemorySource

from ..native import require_extension

CHUNK = 64 * 1024
ORIGIN = "https://registry.test/v2/team/vol/blobs"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def make_cache(root: Path | str, *, max_bytes: int = 1 << 30, readahead: int = 0, chunk: int = CHUNK) -> BlobCache:
    return BlobCache(str(root), policy=CachePolicy(chunk=chunk, max_bytes=max_bytes, readahead_chunks=readahead))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entry_paths(cache: BlobCache, digest: str, origin: str = ORIGIN) -> tuple[str, str]:
    """An origin entry's data and map files."""
    base = os.path.join(cache.root, "origins", origin_key(origin), digest.split(":")[1])
    return base + ".data", base + ".map"


def open_src(cache: BlobCache, data: bytes, up: BlockSource | None = None, *, origin: str = ORIGIN,
             digest: str | None = None) -> CachedSource:
    return cache.source(digest or sha(data), len(data), up or Counting(data), origin=origin)


class Counting(BlockSource):
    def __init__(self, data: bytes) -> None:
        self.inner = MemorySource(data)
        self.size = len(data)
        self.name = "upstream"
        self.reads: list[tuple[int, int]] = []

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.reads.append((offset, len(buf)))
        self.inner.readinto(offset, buf)


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
    # the map is read from the first chunk of the read on: present[i] is chunk first + i
    assert plan_fetches(bytes([1, 0, 0, 0]), 5, 7, readahead=1, nchunks=20, max_run=16) == [(6, 2)]


def test_reads_fetch_once_then_come_from_the_cache(tmp_path: Path) -> None:
    data = os.urandom(20 * CHUNK + 123)
    up = Counting(data)
    cache = make_cache(tmp_path, readahead=2)
    src = open_src(cache, data, up)
    assert src.pread(CHUNK + 5, 100) == data[CHUNK + 5 : CHUNK + 105]
    assert up.reads == [(CHUNK, CHUNK)]  # a random read: its chunk only, no read-ahead
    assert src.pread(CHUNK + 105, 1000) == data[CHUNK + 105 : CHUNK + 1105]
    assert len(up.reads) == 1  # already there
    assert src.pread(CHUNK + 1105, CHUNK) == data[CHUNK + 1105 : 2 * CHUNK + 1105]
    assert up.reads[1:] == [(2 * CHUNK, 3 * CHUNK)]  # sequential: the missing chunk plus two ahead, one request
    assert src.pread(3 * CHUNK, CHUNK) == data[3 * CHUNK : 4 * CHUNK]
    assert len(up.reads) == 2
    assert src.pread(len(data) - 200, 200) == data[-200:]  # the short last chunk
    again = open_src(cache, data, Counting(data))  # a new opener (another volume of the same repository) shares it
    assert again.pread(CHUNK, 3 * CHUNK) == data[CHUNK : 4 * CHUNK]
    assert [(e.digest, e.origin) for e in cache.entries()] == [(sha(data), ORIGIN)]


def test_a_miss_is_fetched_straight_into_the_read(tmp_path: Path) -> None:
    data = os.urandom(8 * CHUNK)
    up = Counting(data)
    src = open_src(make_cache(tmp_path), data, up)
    buf = bytearray(2 * CHUNK)
    src.readinto(2 * CHUNK, buf)
    assert bytes(buf) == data[2 * CHUNK : 4 * CHUNK] and up.reads == [(2 * CHUNK, 2 * CHUNK)]
    assert src.pread(2 * CHUNK + 7, 10) == data[2 * CHUNK + 7 : 2 * CHUNK + 17] and len(up.reads) == 1


def test_lru_eviction_keeps_the_bound(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, max_bytes=8 * CHUNK)
    blobs = [os.urandom(6 * CHUNK) for _ in range(3)]
    for n, data in enumerate(blobs):
        src = open_src(cache, data)
        assert src.pread(0, 5 * CHUNK) == data[: 5 * CHUNK]  # not whole: stays this repository's entry
        os.utime(entry_paths(cache, sha(data))[1], (1000 + n, 1000 + n))  # n=0 is the least recently used
    cache.prune()
    assert cache.usage() <= 8 * CHUNK  # the reads pruned on the way; prune() found the bound kept
    assert sha(blobs[2]) in {e.digest for e in cache.entries() if e.cached_bytes}
    assert [e.cached_bytes for e in cache.entries() if e.digest == sha(blobs[0])] == [0]
    # an evicted blob is simply fetched again
    up = Counting(blobs[0])
    assert open_src(cache, blobs[0], up).pread(0, 100) == blobs[0][:100] and up.reads


def test_damaged_entries_are_rebuilt_not_trusted(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    cache = make_cache(tmp_path)
    open_src(cache, data).pread(0, 3 * CHUNK)
    data_path, map_path = entry_paths(cache, sha(data))
    Path(map_path).write_bytes(b"\x07garbage")  # a torn or foreign map
    up = Counting(data)
    assert open_src(cache, data, up).pread(0, 3 * CHUNK) == data[: 3 * CHUNK]
    assert up.reads  # fetched again, not served from the damaged entry
    with open(data_path, "r+b") as f:
        f.truncate(10)  # a data file of the wrong size
    up = Counting(data)
    assert open_src(cache, data, up).pread(CHUNK, 10) == data[CHUNK : CHUNK + 10]
    assert up.reads


def test_invalidate_drops_the_range(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    up = Counting(data)
    src = open_src(make_cache(tmp_path), data, up)
    src.pread(0, 3 * CHUNK)
    n = len(up.reads)
    src.invalidate(CHUNK + 10, 5)
    assert src.pread(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
    assert up.reads[n:] == [(CHUNK, CHUNK)]


# -- what the cache trusts: bytes are bound to their repository until the whole blob is proven ---------------------


class Lying(BlockSource):
    """A repository that serves other bytes (of the right size) under a digest."""

    def __init__(self, data: bytes) -> None:
        self.inner = Counting(data)
        self.size = len(data)
        self.name = "liar"

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.inner.readinto(offset, buf)


def test_bytes_from_one_repository_never_reach_a_reader_of_another(tmp_path: Path) -> None:
    genuine = os.urandom(6 * CHUNK)
    other = os.urandom(6 * CHUNK)
    cache = make_cache(tmp_path)
    liar = open_src(cache, genuine, Counting(other), origin="https://evil.test/v2/x/blobs", digest=sha(genuine))
    assert liar.pread(0, 2 * CHUNK) == other[: 2 * CHUNK]  # what that registry sent, to its own readers only
    up = Counting(genuine)
    honest = open_src(cache, genuine, up)
    assert honest.pread(0, 2 * CHUNK) == genuine[: 2 * CHUNK]
    assert up.reads == [(0, 2 * CHUNK)]  # fetched from its own repository, not served from the liar's bytes
    assert {e.origin for e in cache.entries()} == {ORIGIN, "https://evil.test/v2/x/blobs"}


def test_a_whole_proven_blob_is_shared_by_every_repository(tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 17)
    cache = make_cache(tmp_path)
    src = open_src(cache, data)
    assert src.pread(0, len(data)) == data
    cache.wait_verified()
    assert [(e.state, e.origin) for e in cache.entries()] == [("verified", "")]
    assert os.path.getsize(os.path.join(cache.root, "blobs", sha(data)[7:])) == len(data)
    assert src.pread(100, CHUNK) == data[100 : 100 + CHUNK]  # its own entry became the blob: reads go on
    up = Counting(data)
    elsewhere = open_src(cache, data, up, origin="https://mirror.test/v2/team/vol/blobs")
    assert elsewhere.pread(0, len(data)) == data and up.reads == []  # from the verified blob, nothing fetched
    # a damaged verified copy (a check above failed) is dropped, never punched: readers go back to their repository
    elsewhere.invalidate(0, 10)
    assert not os.path.exists(os.path.join(cache.root, "blobs", sha(data)[7:]))
    assert elsewhere.pread(0, CHUNK) == data[:CHUNK] and up.reads == [(0, CHUNK)]
    assert src.pread(0, len(data)) == data  # the other reader's open copy is intact


def test_a_repository_caught_lying_is_read_no_more(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from overlaybd.errors import DigestMismatchError

    genuine = os.urandom(4 * CHUNK)
    other = os.urandom(4 * CHUNK)
    cache = make_cache(tmp_path)
    evil = "https://evil.test/v2/x/blobs"
    src = open_src(cache, genuine, Counting(other), origin=evil, digest=sha(genuine))
    assert src.pread(0, len(genuine)) == other  # lazily, before it is whole, nothing can tell
    cache.wait_verified()
    assert "do not match" in caplog.text
    with pytest.raises(DigestMismatchError, match="evil.test"):
        src.pread(0, 100)
    again = open_src(cache, genuine, Counting(other), origin=evil, digest=sha(genuine))
    with pytest.raises(DigestMismatchError):
        again.pread(0, 100)  # a new reader of that blob from that repository too
    assert [e.state for e in cache.entries() if e.cached_bytes or e.state == "bad"] == ["bad"]
    # the genuine repository is not affected, and prune (as the CLI runs it) clears the mark
    assert open_src(cache, genuine).pread(0, 100) == genuine[:100]
    cache.prune(clear_bad=True)
    assert open_src(cache, genuine, Counting(genuine), origin=evil).pread(0, 100) == genuine[:100]


def test_entries_of_the_first_layout_are_dropped_not_trusted(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / (sha(data)[7:] + ".data")).write_bytes(b"x" * len(data))  # bytes of unknown origin
    (blobs / (sha(data)[7:] + ".map")).write_bytes(b"\x01\x01")
    cache = make_cache(tmp_path)
    assert not list(blobs.iterdir())
    up = Counting(data)
    assert open_src(cache, data, up).pread(0, 100) == data[:100] and up.reads


def test_verify_promotes_good_blobs_and_evicts_corrupt_ones(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK)
    cache = make_cache(tmp_path)
    src = open_src(cache, data)
    src.pread(0, len(data))
    cache.wait_verified()
    assert [state for _, state in cache.verify()] == ["ok"]
    with open(os.path.join(cache.root, "blobs", sha(data)[7:]), "r+b") as f:  # rot on disk
        f.seek(100)
        f.write(b"X")
    assert [state for _, state in cache.verify()] == ["corrupt, evicted"]
    assert cache.entries() == []


def test_several_processes_share_one_cache(tmp_path: Path) -> None:
    script = f"""
import hashlib, os, sys, random
sys.path.insert(0, {SRC!r})
from overlaybd.cache.store import BlobCache, CachePolicy
from overlaybd.source.file import MemorySource
data = bytes(random.Random(5).randbytes(64 * {CHUNK}))
cache = BlobCache({str(tmp_path)!r}, policy=CachePolicy(max_bytes=24 * {CHUNK}, chunk={CHUNK}))
src = cache.source("sha256:" + hashlib.sha256(data).hexdigest(), len(data), MemorySource(data), origin="o")
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
        make_cache(tmp_path).source("sha256:../../etc/passwd", 10, MemorySource(b"x" * 10), origin=ORIGIN)


def test_cache_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from overlaybd.cli.main import main

    data = os.urandom(5 * CHUNK)
    cache = make_cache(tmp_path)
    open_src(cache, data).pread(0, 4 * CHUNK)
    assert main(["cache", "ls", "--cache-dir", str(tmp_path), "--output", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["digest"] == sha(data) and listed[0]["cached"] == 4 * CHUNK
    assert listed[0]["origin"] == ORIGIN and listed[0]["state"] == "partial"
    open_src(cache, data).pread(0, len(data))
    cache.wait_verified()
    assert main(["cache", "verify", "--cache-dir", str(tmp_path)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--max-size", "0"]) == 0
    assert "freed" in capsys.readouterr().out and cache.usage() == 0


# -- the cache folder: one's own, and nothing followed through a symlink ---------------------------------------------


def test_a_cache_folder_of_another_user_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from overlaybd.cache.store import CacheError
    from overlaybd.cli.main import main

    if os.geteuid() != 0:
        pytest.skip("needs root, to give a folder to another user (CI runs as root)")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # nobody
    with pytest.raises(CacheError, match="belongs to uid 65534"):
        make_cache(theirs)
    assert main(["cache", "ls", "--cache-dir", str(theirs)]) == 1
    assert "belongs to uid 65534" in capsys.readouterr().err
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a world-writable folder, like /tmp
    with pytest.raises(CacheError, match="writable by others"):
        make_cache(shared)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "mine")
    os.lchown(link, 65534, 65534)  # a symlink another user planted where the cache should be
    with pytest.raises(CacheError, match="symlink owned by uid 65534"):
        make_cache(link)


def test_another_users_planted_symlink_is_refused(tmp_path: Path) -> None:
    """The attack itself: ``nobody`` makes the cache folder root is told to use (a shared, world-writable place)
    and plants symlinks to a root-owned file where cache files go. Root refuses the folder; the file is intact."""
    import shutil

    runuser = shutil.which("runuser")
    if os.geteuid() != 0 or runuser is None:
        pytest.skip("needs root and runuser (util-linux), to act as nobody (CI runs as root)")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="overlaybd-test-"))  # under /tmp: pytest's own folders are root's alone
    try:
        os.chmod(base, 0o755)
        victim = base / "root-owned"
        victim.write_bytes(b"precious")
        shared = base / "shared"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        plant = (f"mkdir -p {shared}/cache/blobs {shared}/cache/origins && chmod -R 777 {shared}/cache && "
                 f"ln -s {victim} {shared}/cache/generation && ln -s {victim} {shared}/cache/layout")
        subprocess.run([runuser, "-u", "nobody", "--", "sh", "-c", plant], check=True)
        from overlaybd.cache.store import CacheError

        with pytest.raises(CacheError, match="belongs to uid 65534"):
            make_cache(shared / "cache")
        with pytest.raises(CacheError, match="writable by others"):
            make_cache(shared)
        assert victim.read_bytes() == b"precious"
    finally:
        shutil.rmtree(base)


def test_a_symlink_planted_in_the_cache_is_never_followed(tmp_path: Path) -> None:
    """As nobody could not plant one in a folder that is ours alone, the planting is simulated; what matters is
    that the cache never writes through it."""
    data = os.urandom(2 * CHUNK)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    cache = make_cache(tmp_path / "cache")
    data_path, map_path = entry_paths(cache, sha(data))
    os.makedirs(os.path.dirname(data_path), exist_ok=True)
    os.symlink(victim, data_path)
    os.symlink(victim, map_path)
    assert open_src(cache, data).pread(0, CHUNK) == data[:CHUNK]
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(data_path) and not os.path.islink(map_path)
    blob = os.path.join(cache.root, "blobs", sha(data)[7:])
    os.symlink(victim, blob)  # a link where a verified blob would be is not taken for one
    up = Counting(data)
    assert open_src(cache, data, up).pread(0, len(data)) == data
    assert victim.read_bytes() == b"precious"


# -- the generation: lock-free readers never keep bytes dropped under them ------------------------------------------


def generation(cache: BlobCache) -> int:
    return int.from_bytes(Path(cache.root, "generation").read_bytes()[:8], "little")


def test_dropping_bytes_moves_the_generation_to_odd_then_even(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    cache = make_cache(tmp_path)
    src = open_src(cache, data)
    src.pread(0, 3 * CHUNK)
    g0 = generation(cache)
    assert g0 % 2 == 0
    with cache.dropping():
        assert generation(cache) == g0 + 1  # odd while the change lasts
    assert generation(cache) == g0 + 2
    src.invalidate(0, 10)
    assert generation(cache) == g0 + 4
    cache.evict(sha(data))
    assert generation(cache) == g0 + 6
    assert src.pread(0, 3 * CHUNK) == data[: 3 * CHUNK]


def test_reads_while_bytes_are_being_dropped_go_the_locked_way(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    cache = make_cache(tmp_path)
    up = Counting(data)
    src = open_src(cache, data, up)
    src.pread(0, 3 * CHUNK)
    fetched = len(up.reads)
    with cache.dropping():  # odd: a lock-free read must not keep what it copied
        if cached._hits is not None and cache.generation is not None:
            map_fd = os.open(entry_paths(cache, sha(data))[1], os.O_RDONLY)
            data_fd = os.open(entry_paths(cache, sha(data))[0], os.O_RDONLY)
            try:
                out = bytearray(CHUNK)
                assert cached._hits.read_present(cache.generation, map_fd, data_fd, 1, 1, out, CHUNK) == \
                    cached._hits.MOVED
            finally:
                os.close(map_fd)
                os.close(data_fd)
        # the read itself still succeeds, through the shared lock, from the cache
        assert src.pread(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]
    assert len(up.reads) == fetched


def test_a_generation_left_odd_by_a_dead_writer_is_put_right(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    g0 = generation(cache)
    BlobCache._bump(cache.generation, cache._generation_fd)  # a writer that died half-way
    assert generation(cache) == g0 + 1
    make_cache(tmp_path)  # the next process to open the cache
    assert generation(cache) == g0 + 2


def test_readers_never_keep_bytes_evicted_under_them(tmp_path: Path) -> None:
    """Processes read and check random ranges while another evicts the blob over and over: every read must come
    back right (a lock-free reader that kept a copy made during an eviction would see zeros)."""
    blob = 48 * CHUNK
    reader = f"""
import os, sys, random, time
sys.path.insert(0, {SRC!r})
from overlaybd.cache import store
from overlaybd.cache.store import BlobCache, CachePolicy
from overlaybd.source.file import MemorySource
data = bytes(random.Random(9).randbytes({blob}))
cache = BlobCache({str(tmp_path)!r}, policy=CachePolicy(chunk={CHUNK}, readahead_chunks=0))
src = cache.source("sha256:" + "cd" * 32, len(data), MemorySource(data), origin="o")
rng = random.Random(int(sys.argv[1]))
reads = 0
end = time.monotonic() + 3
while time.monotonic() < end:
    off = rng.randrange(len(data) - 2 * {CHUNK}); n = rng.randrange(1, {CHUNK})  # never the last chunk: never whole
    got = src.pread(off, n)
    assert got == data[off:off + n], (off, n)
    reads += 1
print("ok", reads, "lock-free" if store._hits is not None and cache.generation is not None else "locked")
"""
    evictor = f"""
import sys, time
sys.path.insert(0, {SRC!r})
from overlaybd.cache.store import BlobCache, CachePolicy
cache = BlobCache({str(tmp_path)!r}, policy=CachePolicy(chunk={CHUNK}))
evictions = 0
end = time.monotonic() + 3
while time.monotonic() < end:
    cache.evict("sha256:" + "cd" * 32, "o")
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
    require_extension(cached._hits, "overlaybd.cache._hits")
    assert store.describe_reads().startswith("lock-free")
