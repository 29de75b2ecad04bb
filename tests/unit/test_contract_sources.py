"""The BlockSource contract (overlaybd.testing.contract) over every source the package has.

Each source is built once per session from a plain model (a bytearray the same operations were applied to); the
contract then opens it afresh for each check, so writes in one check never show in another. Reference fixtures
(../shared/fixtures) are checked against the manifest's ground-truth digests, read by an independent path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from overlaybd import operations
from overlaybd.formats.detect import open_layer, peel
from overlaybd.formats.lsmt.layer import LsmtLayer
from overlaybd.formats.lsmt.stack import LsmtStack
from overlaybd.formats.lsmt.writable import SparseLayer, WritableLayer
from overlaybd.formats.output import Compression
from overlaybd.formats.zfile.reader import ZFileSource
from overlaybd.formats.zfile.writer import write_zfile
from overlaybd.source.base import BlockSource, ExtentKind
from overlaybd.source.file import FileSource, MemorySource, RangeSource
from overlaybd.testing.contract import CHECKS, BlockSourceContract, SparseModel, Subject

Factory = Callable[[], Subject]

KiB = 1024
MiB = 1 << 20
VSIZE = 2 * MiB  # virtual size of the LSMT layers built here


def payload(rng: random.Random, n: int) -> bytes:
    """Random bytes mixed with runs of one byte (so compression has something to do)."""
    out = bytearray()
    while len(out) < n:
        k = min(n - len(out), rng.randint(1, 20000))
        out += rng.randbytes(k) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * k
    return bytes(out)


def apply_ops(dev: BlockSource, model: bytearray, rng: random.Random, count: int, *, discards: bool = True) -> None:
    """Writes at arbitrary offsets/lengths, overwrites, trims and zero writes, mirrored into ``model``."""
    size = len(model)
    for _ in range(count):
        n = rng.choice([1, 511, 512, 4096, 5000, rng.randint(1, 300 * KiB)])
        n = min(n, size)
        off = rng.randint(0, size - n)
        if rng.random() < 0.2:  # aligned, as the reference writes
            off -= off % 4096
        r = rng.random()
        if r < 0.65 or not discards:
            data = payload(rng, n)
            dev.pwrite(off, data)
            model[off : off + n] = data
        elif r < 0.85:
            dev.trim(off, n)
            model[off : off + n] = bytes(n)
        else:
            dev.write_zeroes(off, n)
            model[off : off + n] = bytes(n)


class Built:
    """Every on-disk artefact, built once; factories open them (or fresh copies, for writable sources)."""

    def __init__(self, root: Path, fresh: Callable[[], Path]) -> None:
        self.root = root
        self.fresh = fresh
        self.models: dict[str, bytes] = {}
        rng = random.Random(20240611)

        # plain files: dense and sparse
        self.raw = payload(rng, 300001)
        (root / "raw.bin").write_bytes(self.raw)
        sparse = bytearray(1 * MiB + 12345)
        with open(root / "sparse.bin", "wb") as f:
            f.truncate(len(sparse))
            for off in (8192, 300000, 700001):
                chunk = payload(rng, 9000)
                f.seek(off)
                f.write(chunk)
                sparse[off : off + len(chunk)] = chunk
        self.sparse_raw = bytes(sparse)

        # three writable layers over one virtual size; each committed
        model = bytearray(VSIZE)
        self.stack_models: list[bytes] = []
        for k in range(3):
            d, i = str(root / f"w{k}.data"), str(root / f"w{k}.index")
            operations.create(d, i, VSIZE)
            layer_model = bytearray(VSIZE)  # what this layer alone reads as
            with WritableLayer(d, i) as w:
                apply_ops(w, layer_model, rng, 12 + 4 * k)
                # the stack model: this layer's records on top of the previous ones
                for seg in w.segments().rows():
                    o, ln = seg[0] * 512, seg[1] * 512
                    model[o : o + ln] = layer_model[o : o + ln]
                w.flush()
                operations.commit(w, str(root / f"c{k}.lsmt"))
            self.models[f"w{k}"] = bytes(layer_model)
            self.stack_models.append(bytes(model))

        # compressed and wrapped commits of layer 0
        with WritableLayer(str(root / "w0.data"), str(root / "w0.index"), readonly=True) as w:
            operations.commit(w, str(root / "c0.zst.tar"), compression=Compression("zstd", 4096), tar=True)
            operations.commit(w, str(root / "c0.lz4.64k"), compression=Compression("lz4", 65536, verify=False))
            operations.commit(w, str(root / "c0.lz4.tar"), tar=True)

        # a sealed-in-place copy of layer 1
        shutil.copy(root / "w1.data", root / "s1.sealed")
        shutil.copy(root / "w1.index", root / "s1.index")
        operations.seal(str(root / "s1.sealed"), str(root / "s1.index"))

        # a sparse writable layer
        operations.create(str(root / "sp.data"), str(root / "sp.index"), VSIZE, sparse=True)
        sp_model = bytearray(VSIZE)
        with SparseLayer(str(root / "sp.data")) as sp:
            apply_ops(sp, sp_model, rng, 10, discards=False)
            sp.flush()
        self.models["sp"] = bytes(sp_model)

        # an empty writable upper, for stacks
        operations.create(str(root / "up.data"), str(root / "up.index"), VSIZE)

        # ZFiles of assorted sizes and settings
        self.zfiles: dict[str, tuple[Path, bytes]] = {}
        for name, size, algo, bs, verify, overwrite in [
            ("lz4-4k-crc-odd", 300001, "lz4", 4096, True, False),
            ("lz4-64k-nocrc", 200000, "lz4", 65536, False, False),
            ("zstd-4k-nocrc-odd", 123457, "zstd", 4096, False, False),
            ("zstd-64k-crc-odd", 262145, "zstd", 65536, True, False),
            ("lz4-16k-crc-overwrite", 65536 * 3, "lz4", 16384, True, True),
            ("zstd-32k-1byte", 1, "zstd", 32768, True, False),
            ("lz4-4k-empty", 0, "lz4", 4096, True, False),
            ("zstd-64k-random", 140000, "zstd", 65536, True, False),  # incompressible: written at 32 KiB
        ]:
            data = rng.randbytes(size) if "random" in name else payload(rng, size)
            path = root / f"{name}.zfile"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_zfile(MemorySource(data), fd, algo=algo, block_size=bs, verify=verify, threads=2,
                            overwrite_header=overwrite)
            finally:
                os.close(fd)
            self.zfiles[name] = (path, data)

    # -- copies for writable sources ------------------------------------------------------------------------
    def copy(self, *names: str) -> list[str]:
        folder = self.fresh()
        out = []
        for name in names:
            shutil.copy(self.root / name, folder / name)
            out.append(str(folder / name))
        return out

    def pair(self, data: str, index: str) -> tuple[str, str]:
        d, i = self.copy(data, index)
        return d, i


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return Built(tmp_path_factory.mktemp("contract"), lambda: tmp_path_factory.mktemp("rw"))


def _owned(open_: Callable[[ExitStack], BlockSource], expected: Any) -> Subject:
    owned = ExitStack()
    try:
        src = open_(owned)
    except BaseException:
        owned.close()
        raise
    return Subject(src, expected, owned.close)


def _file_range(path: Path, start: int, length: int, expected: bytes) -> Subject:
    f = FileSource(path)
    return Subject(RangeSource(f, start, length), expected, f.close)


def _zfile(path: Path, expected: bytes) -> Subject:
    f = FileSource(path)
    return Subject(ZFileSource(f), expected, f.close)


def _sources(b: Built) -> dict[str, tuple[Factory, bool]]:
    """name -> (factory, writable?)"""
    r = b.root
    m = b.models
    odd = b.raw[:100003]
    stack3 = b.stack_models[2]
    out: dict[str, tuple[Factory, bool]] = {
        "memory": (lambda: Subject(MemorySource(b.raw), b.raw), False),
        "memory-bs4k-odd": (lambda: Subject(MemorySource(odd, block_size=4096), odd), False),
        "memory-empty": (lambda: Subject(MemorySource(b""), b""), False),
        "memory-rw": (lambda: Subject(MemorySource(bytearray(b.raw)), b.raw), True),
        "memory-rw-bs512-odd": (lambda: Subject(MemorySource(bytearray(odd), block_size=512), odd), True),
        "file": (lambda: Subject(FileSource(r / "raw.bin"), b.raw), False),
        "file-sparse": (lambda: Subject(FileSource(r / "sparse.bin"), b.sparse_raw), False),
        "file-rw": (lambda: Subject(FileSource(b.copy("sparse.bin")[0], writable=True), b.sparse_raw), True),
        "range-memory": (lambda: Subject(RangeSource(MemorySource(b.raw), 777, 200001), b.raw[777:200778]), False),
        "range-file": (lambda: _file_range(r / "raw.bin", 4096, 150000, b.raw[4096:154096]), False),
        "range-empty": (lambda: Subject(RangeSource(MemorySource(b.raw), 300001, 0), b""), False),
        "lsmt-committed": (lambda: _owned(lambda o: LsmtLayer(o.enter_context(FileSource(r / "c1.lsmt"))),
                                          m["w1"]), False),
        "lsmt-sealed-in-place": (lambda: _owned(lambda o: open_layer(str(r / "s1.sealed"), owned=o), m["w1"]),
                                 False),
        "lsmt-zstd-tar": (lambda: _owned(lambda o: open_layer(str(r / "c0.zst.tar"), owned=o), m["w0"]), False),
        "lsmt-lz4-64k": (lambda: _owned(lambda o: open_layer(str(r / "c0.lz4.64k"), owned=o), m["w0"]), False),
        "lsmt-tar": (lambda: _owned(lambda o: open_layer(str(r / "c0.lz4.tar"), owned=o), m["w0"]), False),
        "writable-ro": (lambda: Subject(WritableLayer(str(r / "w2.data"), str(r / "w2.index"), readonly=True),
                                        m["w2"]), False),
        "writable-rw": (lambda: Subject(WritableLayer(*b.copy("w2.data", "w2.index")), m["w2"]), True),
        "sparse-ro": (lambda: Subject(SparseLayer(str(r / "sp.data"), readonly=True), m["sp"]), False),
        "sparse-rw": (lambda: Subject(SparseLayer(b.copy("sp.data")[0]), m["sp"]), True),
        "stack-1": (lambda: Subject(operations.open_stack([str(r / "c0.lsmt")]), b.stack_models[0]), False),
        "stack-3": (lambda: Subject(operations.open_stack([str(r / f"c{k}.lsmt") for k in range(3)]), stack3),
                    False),
        "stack-mixed-forms": (lambda: Subject(operations.open_stack(
            [str(r / "c0.zst.tar"), str(r / "s1.sealed"), str(r / "w2.data")]), stack3), False),
        "stack-3-upper": (lambda: Subject(operations.open_stack(
            [str(r / f"c{k}.lsmt") for k in range(3)], upper=b.pair("up.data", "up.index"),
            writable=True), stack3), True),
        "stack-2-live-upper": (lambda: Subject(operations.open_stack(
            [str(r / "c0.lsmt"), str(r / "c1.lsmt")], upper=b.pair("w2.data", "w2.index"),
            writable=True), stack3), True),
        "stack-upper-ro": (lambda: Subject(operations.open_stack(
            [str(r / "c0.lsmt"), str(r / "c1.lsmt")], upper=(str(r / "w2.data"), str(r / "w2.index"))), stack3),
            False),
    }
    for name, (path, data) in b.zfiles.items():
        out[f"zfile-{name}"] = (functools.partial(_zfile, path, data), False)
    return out


SOURCE_NAMES = [
    "memory", "memory-bs4k-odd", "memory-empty", "memory-rw", "memory-rw-bs512-odd", "file", "file-sparse", "file-rw",
    "range-memory", "range-file", "range-empty", "lsmt-committed", "lsmt-sealed-in-place", "lsmt-zstd-tar",
    "lsmt-lz4-64k", "lsmt-tar", "writable-ro", "writable-rw", "sparse-ro", "sparse-rw", "stack-1", "stack-3",
    "stack-mixed-forms", "stack-3-upper", "stack-2-live-upper", "stack-upper-ro",
    "zfile-lz4-4k-crc-odd", "zfile-lz4-64k-nocrc", "zfile-zstd-4k-nocrc-odd", "zfile-zstd-64k-crc-odd",
    "zfile-lz4-16k-crc-overwrite", "zfile-zstd-32k-1byte", "zfile-lz4-4k-empty", "zfile-zstd-64k-random",
]


@pytest.fixture(scope="session")
def sources(built: Built) -> dict[str, tuple[Factory, bool]]:
    table = _sources(built)
    assert sorted(table) == sorted(SOURCE_NAMES)
    return table


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_contract(sources: dict[str, tuple[Factory, bool]], name: str, check: str) -> None:
    factory, writable = sources[name]
    BlockSourceContract(factory, seed=zlib.crc32(name.encode()), writable=writable, label=name).check(check)


def test_built_sources_are_what_they_claim(built: Built) -> None:
    """Sanity of the set-up itself: the forms really are those forms."""
    r = built.root
    with ExitStack() as owned:
        layer = open_layer(str(r / "s1.sealed"), owned=owned)
        assert isinstance(layer, LsmtLayer) and layer.sealed_in_place
        tarred = open_layer(str(r / "c0.zst.tar"), owned=owned)
        assert isinstance(tarred, LsmtLayer)
        peeled = peel(owned.enter_context(FileSource(r / "c0.zst.tar")))
        assert peeled.wrappers == ["tar", "zfile"]
    with FileSource(r / "zstd-64k-random.zfile") as f:
        assert ZFileSource(f).block_size == 32768  # 64 KiB blocks of random data do not fit
    with FileSource(r / "sparse.bin") as f:
        kinds = {e.kind for e in f.extents()}
        assert ExtentKind.DATA in kinds
    with operations.open_stack([str(r / f"c{k}.lsmt") for k in range(3)]) as st:
        assert isinstance(st, LsmtStack) and st.depth == 3
        assert {e.layer for e in st.extents() if e.kind is not ExtentKind.HOLE} <= {0, 1, 2}


# -- filters added around remote layers: the block cache, the download switch, the trace recorder -----------


def _cached(b: Built, upstream: Callable[[], BlockSource], expected: bytes, *, warm: bool, chunk: int = 16384
            ) -> Subject:
    from overlaybd.cache.store import BlobCache, CachePolicy

    root = b.root / "cache-warm" if warm else b.fresh()
    cache = BlobCache(str(root), policy=CachePolicy(max_bytes=1 << 30, chunk=chunk))
    up = upstream()
    digest = "sha256:" + hashlib.sha256(expected).hexdigest()
    src = cache.source(digest, up.size, up, origin="https://registry.test/v2/contract/blobs")

    def release() -> None:
        up.close()
        cache.close()
    return Subject(src, expected, release)


def _cached_layer(b: Built, path: Path, expected: bytes) -> Subject:
    """An LSMT layer read through the cache, as a lazily pulled remote layer is (tar + ZFile peeled above it)."""
    sub = _cached(b, lambda: FileSource(path), path.read_bytes(), warm=False, chunk=4096)
    layer = LsmtLayer(peel(sub.source).source, name=str(path))
    cached = sub.source

    def release() -> None:
        cached.close()
        assert sub.cleanup is not None
        sub.cleanup()
    return Subject(layer, expected, release)


def _filters(b: Built) -> dict[str, Factory]:
    from overlaybd.remote.lazy import SwitchSource
    from overlaybd.trace import RecordingSource, TraceRecorder

    r = b.root
    m = b.models

    def switch() -> Subject:
        src = SwitchSource(MemorySource(b.raw))
        src.switch(FileSource(r / "raw.bin"))  # a finished download: same bytes, now from a file
        inner = src.inner
        return Subject(src, b.raw, inner.close)

    def recording() -> Subject:
        rec = TraceRecorder(str(b.fresh() / "trace"))
        return Subject(RecordingSource(MemorySource(b.raw), 0, rec), b.raw)

    return {
        "cache-cold": lambda: _cached(b, lambda: MemorySource(b.raw), b.raw, warm=False),
        "cache-warm": lambda: _cached(b, lambda: MemorySource(b.raw), b.raw, warm=True),
        "cache-zfile": lambda: _cached(b, lambda: FileSource(r / "zstd-64k-crc-odd.zfile"),
                                       (r / "zstd-64k-crc-odd.zfile").read_bytes(), warm=False),
        "cache-lsmt-zstd-tar": lambda: _cached_layer(b, r / "c0.zst.tar", m["w0"]),
        "switch": switch,
        "trace-recording": recording,
    }


FILTER_NAMES = ["cache-cold", "cache-warm", "cache-zfile", "cache-lsmt-zstd-tar", "switch", "trace-recording"]


@pytest.fixture(scope="session")
def filters(built: Built) -> dict[str, Factory]:
    table = _filters(built)
    assert sorted(table) == sorted(FILTER_NAMES)
    return table


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", FILTER_NAMES)
def test_contract_filters(filters: dict[str, Factory], name: str, check: str) -> None:
    BlockSourceContract(filters[name], seed=zlib.crc32(name.encode()), writable=False, label=name).check(check)


# -- reference fixtures ---------------------------------------------------------------------------------------

_TRUTH_CACHE: dict[str, bytes] = {}


def _read_verified(src: BlockSource, size: int, sha256: str, what: str) -> bytes:
    """The whole device, read once in full and checked against the manifest's ground truth, then chunked reads
    of odd sizes compared against the full read."""
    assert src.size == size, f"{what}: size {src.size}, manifest says {size}"
    full = src.pread(0, size)
    assert hashlib.sha256(full).hexdigest() == sha256, f"{what}: sha256 of the device differs from the manifest"
    for step in (MiB, 100003):
        pos = 0
        while pos < size:
            n = min(step, size - pos)
            assert src.pread(pos, n) == full[pos : pos + n], f"{what}: chunked read ({pos}, {n}) differs"
            pos += n
    return full


Opener = Callable[[], tuple[BlockSource, Callable[[], None]]]


def _truth(key: str, open_: Opener, size: int, sha256: str) -> bytes:
    if key not in _TRUTH_CACHE:
        src, release = open_()
        try:
            _TRUTH_CACHE[key] = _read_verified(src, size, sha256, key)
        finally:
            src.close()
            release()
    return _TRUTH_CACHE[key]


def _reference_cases(ref: Path, manifest: dict[str, Any], fresh: Callable[[], Path]
                     ) -> dict[str, tuple[Callable[[], Subject], bool]]:
    gt = manifest["ground_truth"]
    files = manifest["files"]

    def nothing() -> None:
        return None

    def stack(paths: list[str], key: str) -> Callable[[], Subject]:
        def opener() -> tuple[BlockSource, Callable[[], None]]:
            return operations.open_stack([str(ref / p) for p in paths]), nothing

        def make() -> Subject:
            truth = _truth(key, opener, gt[key]["size"], gt[key]["sha256"])
            return Subject(opener()[0], truth)
        return make

    def zfile(path: str, key: str, size: int, sha: str) -> Callable[[], Subject]:
        def opener() -> tuple[BlockSource, Callable[[], None]]:
            f = FileSource(ref / path)
            z = peel(f).zfile
            assert z is not None, f"{path} is not a ZFile"
            return z, f.close

        def make() -> Subject:
            truth = _truth(key, opener, size, sha)
            z, release = opener()
            return Subject(z, truth, release)
        return make

    def rw_copy(data: str, index: str | None, key: str) -> Callable[[], Subject]:
        def open_in(folder: Path, writable: bool) -> BlockSource:
            if index is None:
                return SparseLayer(str(folder / Path(data).name), readonly=not writable)
            return WritableLayer(str(folder / Path(data).name), str(folder / Path(index).name), readonly=not writable)

        def make() -> Subject:
            truth = _truth(key, lambda: (open_in(ref / Path(data).parent, False), nothing), gt[key]["size"],
                           gt[key]["sha256"])
            folder = fresh()
            for name in [data] + ([index] if index else []):
                shutil.copy(ref / name, folder / Path(name).name)
                os.chmod(folder / Path(name).name, 0o644)
            return Subject(open_in(folder, True), truth)
        return make

    layer1 = files["b/layer1.lsmt"]
    cases: dict[str, tuple[Callable[[], Subject], bool]] = {
        "b1": (stack(["b/layer1.lsmt"], "b1"), False),
        "b12": (stack(["b/layer1.lsmt", "b/layer2.lsmt"], "b12"), False),
        "b123": (stack(["b/layer1.lsmt", "b/layer2.lsmt", "b/layer3.lsmt"], "b123"), False),
        "d-merged": (stack(["d/merged.lsmt"], "b123"), False),
        "d-merged-zfile": (stack(["d/merged.zfile"], "b123"), False),
        "a-committed": (stack(["a/committed.lsmt"], "a"), False),
        "a-sealed": (stack(["a/sealed.lsmt"], "a"), False),
        "a-committed-from-sealed": (stack(["a/committed_from_sealed.lsmt"], "a"), False),
        "a-sparse-committed": (stack(["a/sparse_committed.lsmt"], "sparse"), False),
        "a-rw-writable-copy": (rw_copy("a/rw.data", "a/rw.index", "a"), True),
        "a-sparse-rw-writable-copy": (rw_copy("a/sparse_rw.data", None, "sparse"), True),
    }
    for p in sorted((ref / "c").glob("*.zfile*")):
        rel = f"c/{p.name}"
        if p.name.startswith("raw_odd"):
            cases[rel] = (zfile(rel, "raw_odd", gt["raw_odd"]["size"], gt["raw_odd"]["sha256"]), False)
        else:
            cases[rel] = (zfile(rel, "b/layer1.lsmt", layer1["size"], layer1["sha256"]), False)
            cases[rel + ":layer"] = (stack([rel], "b1"), False)
    return cases


REFERENCE_CASES = [
    "b1", "b12", "b123", "d-merged", "d-merged-zfile", "a-committed", "a-sealed", "a-committed-from-sealed",
    "a-sparse-committed", "a-rw-writable-copy", "a-sparse-rw-writable-copy",
]
REFERENCE_CHECKS = ("size", "exact_reads", "unaligned", "end_reads", "out_of_bounds", "readinto", "concurrent_reads",
                    "extents", "sub_extents", "read_only", "writes")


@pytest.fixture(scope="module")
def reference_cases(reference_dir: Path, manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
                    ) -> dict[str, tuple[Callable[[], Subject], bool]]:
    return _reference_cases(reference_dir, manifest, lambda: tmp_path_factory.mktemp("ref-rw"))


@pytest.mark.fixtures
@pytest.mark.parametrize("check", REFERENCE_CHECKS)
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_contract_reference(reference_cases: dict[str, tuple[Callable[[], Subject], bool]], case: str,
                            check: str) -> None:
    factory, writable = reference_cases[case]
    BlockSourceContract(factory, seed=len(case), writable=writable, label=case, random_reads=24,
                        reads_per_thread=12).check(check)


ZFILE_CHECKS = ("size", "exact_reads", "unaligned", "end_reads", "out_of_bounds", "readinto", "concurrent_reads",
                "extents", "sub_extents", "read_only")
# the ZFiles of c/ as shipped (README of the fixtures); each is also opened as an LSMT layer where it holds one
REFERENCE_ZFILES = [
    "c/layer1.lz4.bs4k.nocrc.zfile", "c/layer1.lz4.bs4k.zfile", "c/layer1.lz4.bs4k.zfile.tar",
    "c/layer1.lz4.bs64k.zfile", "c/layer1.zstd.bs4k.zfile", "c/layer1.zstd.bs64k.nocrc.zfile",
    "c/layer1.zstd.bs64k.zfile", "c/raw_odd.lz4.bs4k.zfile",
]
REFERENCE_ZFILE_CASES = REFERENCE_ZFILES + [n + ":layer" for n in REFERENCE_ZFILES if "layer1" in n]


@pytest.mark.fixtures
@pytest.mark.parametrize("check", ZFILE_CHECKS)
@pytest.mark.parametrize("case", REFERENCE_ZFILE_CASES)
def test_contract_reference_zfiles(reference_cases: dict[str, tuple[Callable[[], Subject], bool]], case: str,
                                   check: str) -> None:
    if case not in reference_cases:
        pytest.skip(f"{case} is not in the fixtures")
    factory, writable = reference_cases[case]
    BlockSourceContract(factory, seed=len(case), writable=writable, label=case, random_reads=16,
                        reads_per_thread=8).check(check)


def test_reference_zfiles_are_all_listed(reference_dir: Path) -> None:
    shipped = sorted(f"c/{p.name}" for p in (reference_dir / "c").glob("*.zfile*"))
    assert shipped == sorted(REFERENCE_ZFILES), "a ZFile was added to or removed from the fixtures: list it above"


@pytest.mark.fixtures
def test_empty_1g_digest_is_zeros(manifest: dict[str, Any]) -> None:
    gt = manifest["ground_truth"]["empty_1g"]
    zeros = hashlib.sha256()
    chunk = bytes(16 * MiB)
    for _ in range(gt["size"] // len(chunk)):
        zeros.update(chunk)
    assert zeros.hexdigest() == gt["sha256"], "the manifest's empty_1g digest is not that of zeros"


@pytest.mark.fixtures
@pytest.mark.parametrize("check", ["size", "exact_reads", "zero_length", "unaligned", "end_reads", "out_of_bounds",
                                   "concurrent_reads", "extents", "sub_extents", "read_only"])
def test_contract_reference_empty_1g(reference_dir: Path, manifest: dict[str, Any], check: str) -> None:
    """A 1 GiB empty writable layer, sampled (never read whole): the manifest's digest is that of zeros."""
    size = manifest["ground_truth"]["empty_1g"]["size"]

    def make() -> Subject:
        return Subject(WritableLayer(str(reference_dir / "a/empty_1g.data"), str(reference_dir / "a/empty_1g.index"),
                                     readonly=True), SparseModel(size))

    BlockSourceContract(make, writable=False, label="empty_1g", scan_limit=8 * MiB).check(check)


def test_manifest_cases_are_all_known(reference_dir: Path) -> None:
    """If the fixtures grow a new ZFile, it is picked up by the c/ glob above; the rest are named explicitly."""
    data = json.loads((reference_dir / "MANIFEST.json").read_text())
    assert {"b1", "b12", "b123", "a", "sparse", "raw_odd"} <= set(data["ground_truth"])
