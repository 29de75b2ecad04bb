"""A 64 KiB block that does not compress: the block size is decided before writing, on both block paths, and the
file written once, wherever the block sits and whatever makes it incompressible to the codec (random bytes; for
LZ4, which has no entropy coder, also random nibbles or base64 text); should the screen miss a block, the file is
written again (the safety net). The reference
reader reads what we write; the reference writer's own 64 KiB file is refused by its reader and read by ours.

The reference tests need the tools that ../shared/reference-tools/build.sh builds (OVERLAYBD_REFERENCE_TOOLS set
to their folder, or obd-writer on PATH); without them they skip, saying so.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlaybd.formats.zfile import blocks, writer
from overlaybd.formats.zfile.extract import decompress_to
from overlaybd.formats.zfile.reader import ZFileSource
from overlaybd.formats.zfile.spec import MAX_STORED_BLOCK
from overlaybd.formats.zfile.writer import ZFileResult, write_zfile
from overlaybd.source.base import Extent, ExtentKind
from overlaybd.source.file import FileSource, MemorySource

from .test_zfile_blocks import _native, mixed

BLOCK = 65536


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(BLOCK)


def five_bit_symbols(rng: random.Random) -> bytes:
    """5 bits a byte: zstd shrinks it by a third; LZ4 (no entropy coder, and few repeats to find) cannot."""
    return bytes(b & 0x1F for b in rng.randbytes(BLOCK))


def base64_text(rng: random.Random) -> bytes:
    """6 bits a byte, as in PEM files and mail: the same for LZ4."""
    return base64.b64encode(rng.randbytes(BLOCK))[:BLOCK]


def with_noise_at(k: int, nblocks: int = 12, seed: int = 5,
                  noise: Callable[[random.Random], bytes] = random_bytes) -> bytes:
    """``nblocks`` 64 KiB blocks that compress, but block ``k``: ``noise``."""
    data = bytearray(mixed(nblocks * BLOCK, seed))
    data[k * BLOCK : (k + 1) * BLOCK] = noise(random.Random(seed))
    return bytes(data)


def write(tmp_path: Path, data: bytes, algo: str, runs: blocks.BlockRuns, name: str = "z") -> tuple[Path, ZFileResult]:
    path = tmp_path / name
    saved = blocks.ACTIVE
    blocks.ACTIVE = runs
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            res = write_zfile(MemorySource(data), fd, algo=algo, block_size=BLOCK, threads=2)
        finally:
            os.close(fd)
    finally:
        blocks.ACTIVE = saved
    return path, res


@pytest.fixture(params=["python", "native"])
def runs(request: pytest.FixtureRequest) -> blocks.BlockRuns:
    return blocks.PYTHON if request.param == "python" else _native()


@pytest.mark.parametrize("k", [0, 1, 8, 9, 11])
@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_an_incompressible_block_anywhere_decides_32k_before_writing(tmp_path: Path, algo: str, k: int,
                                                                     runs: blocks.BlockRuns) -> None:
    data = with_noise_at(k)
    path, res = write(tmp_path, data, algo, runs)
    assert (res.block_size, res.passes) == (32768, 1)
    with FileSource(str(path)) as f:
        z = ZFileSource(f)
        assert z.block_size == 32768
        assert max(z.stored_lengths()) <= MAX_STORED_BLOCK
        assert z.pread(0, len(data)) == data


@pytest.mark.parametrize("noise", [five_bit_symbols, base64_text])
def test_lz4_low_entropy_blocks_it_cannot_shrink_are_screened(tmp_path: Path, noise: Callable[[random.Random], bytes],
                                                              runs: blocks.BlockRuns) -> None:
    data = with_noise_at(9, noise=noise)
    path, res = write(tmp_path, data, "lz4", runs)
    assert (res.block_size, res.passes) == (32768, 1)
    with FileSource(str(path)) as f:
        assert ZFileSource(f).pread(0, len(data)) == data
    _, res = write(tmp_path, data, "zstd", runs, "zstd")  # zstd codes these bytes in fewer bits: 64 KiB blocks
    assert (res.block_size, res.passes) == (BLOCK, 1)


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_a_block_the_screen_misses_is_caught_while_writing(tmp_path: Path, algo: str, runs: blocks.BlockRuns,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "_oversized_block", lambda *_: None)  # a screen that is wrong: the net still holds
    data = with_noise_at(9)
    path, res = write(tmp_path, data, algo, runs)
    assert (res.block_size, res.passes) == (32768, 2)
    with FileSource(str(path)) as f:
        assert ZFileSource(f).pread(0, len(data)) == data


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_a_short_last_block_that_does_not_fit_is_screened_too(tmp_path: Path, algo: str,
                                                              runs: blocks.BlockRuns) -> None:
    data = mixed(5 * BLOCK, 2) + random.Random(2).randbytes(BLOCK - 4)  # 65,532 random bytes do not fit either
    path, res = write(tmp_path, data, algo, runs)
    assert (res.block_size, res.passes) == (32768, 1)
    with FileSource(str(path)) as f:
        assert ZFileSource(f).pread(0, len(data)) == data


def test_an_empty_file_needs_no_screen(tmp_path: Path, runs: blocks.BlockRuns) -> None:
    _, res = write(tmp_path, b"", "zstd", runs)
    assert (res.block_size, res.passes, res.header.original_file_size) == (BLOCK, 1, 0)


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_compressible_64k_blocks_stay_64k(tmp_path: Path, algo: str, runs: blocks.BlockRuns) -> None:
    data = mixed(12 * BLOCK + 1000, 9)
    _, res = write(tmp_path, data, algo, runs)
    assert (res.block_size, res.passes) == (BLOCK, 1)


@pytest.mark.parametrize("k", [0, 8, 9])
@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_both_block_paths_write_the_same_bytes(tmp_path: Path, algo: str, k: int) -> None:
    data = with_noise_at(k)
    ours_c, _ = write(tmp_path, data, algo, _native(), "c")
    ours_py, _ = write(tmp_path, data, algo, blocks.PYTHON, "py")
    assert ours_c.read_bytes() == ours_py.read_bytes()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("algo", [1, 2])
def test_screen_finds_a_block_that_does_not_fit_in_any_chunk(runs: blocks.BlockRuns, algo: int, threads: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocks, "ACTIVE", runs)
    monkeypatch.setattr(writer, "SCREEN_CHUNK", 4 * BLOCK)  # 5 chunks of 4 blocks
    clean = mixed(20 * BLOCK, 3)
    assert writer._oversized_block(MemorySource(clean), algo, BLOCK, True, threads) is None
    for k in (0, 5, 19):
        data = with_noise_at(k, nblocks=20)
        assert writer._oversized_block(MemorySource(data), algo, BLOCK, True, threads) == k


def test_the_screen_reads_only_the_blocks_that_hold_data(tmp_path: Path) -> None:
    """A sparse file: the screen's chunks skip its holes, and a block that does not fit after a hole is found."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(64 * BLOCK)
        f.seek(3 * BLOCK + 100)
        f.write(mixed(BLOCK, 1))  # data in blocks 3 and 4
        f.seek(40 * BLOCK)
        f.write(random.Random(1).randbytes(BLOCK))  # block 40 does not fit
    with FileSource(str(path)) as src:
        if [e.kind.value for e in src.extents()] == ["data"]:
            pytest.skip("this filesystem does not report holes (SEEK_DATA)")
        chunks = writer._data_chunks(src, BLOCK, 4 * BLOCK)
        covered = {k for off, n in chunks for k in range(off // BLOCK, (off + n) // BLOCK)}
        assert {3, 4, 40} <= covered and len(covered) < 16  # only what the file system holds, rounded to pages
        assert all(off % BLOCK == 0 and n <= 4 * BLOCK for off, n in chunks)
        assert writer._oversized_block(src, 2, BLOCK, True, 2) == 40


def test_a_source_of_zeros_is_not_read_to_be_screened() -> None:
    class Zeros(MemorySource):
        def _extents(self, offset: int, length: int) -> Iterator[Extent]:
            yield Extent(offset, length, ExtentKind.ZERO)

        def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
            raise AssertionError("the screen read a range of zeros")

    assert writer._data_chunks(Zeros(bytes(8 * BLOCK)), BLOCK, 4 * BLOCK) == []
    assert writer._oversized_block(Zeros(bytes(8 * BLOCK)), 2, BLOCK, True, 2) is None


def test_both_block_paths_screen_alike() -> None:
    """The C screen and its Python twin clear, test and find the same blocks."""
    native = _native()
    scratch = bytearray(2 * BLOCK)
    cases = [mixed(8 * BLOCK, 1), with_noise_at(3, 8), with_noise_at(5, 8, noise=five_bit_symbols),
             with_noise_at(6, 8, noise=base64_text), bytes(8 * BLOCK)]
    for algo in (1, 2):
        for data in cases:
            args = (algo, data, BLOCK, True, scratch, MAX_STORED_BLOCK, writer.SCREEN)
            assert native.screen(*args) == blocks.PYTHON.screen(*args), (algo, cases.index(data))


@pytest.mark.parametrize("threads", [1, 2])
def test_decompress_to_writes_the_original_at_base(tmp_path: Path, threads: int) -> None:
    data = mixed(5 * (4 << 20) + 12345, 4)
    path, _ = write(tmp_path, data, "lz4", blocks.ACTIVE)
    out = tmp_path / "out"
    seen: list[int] = []
    with FileSource(str(path)) as f:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            n = decompress_to(ZFileSource(f), fd, 512, threads=threads, progress=lambda done, _: seen.append(done))
        finally:
            os.close(fd)
    assert n == len(data)
    assert out.read_bytes() == bytes(512) + data
    assert seen == sorted(seen) and seen[-1] == len(data)


# -- against the reference reader and writer ------------------------------------------------------------------


def reference_tools() -> Path:
    for candidate in (os.environ.get("OVERLAYBD_REFERENCE_TOOLS"), shutil.which("obd-writer")):
        if candidate:
            folder = Path(candidate) if Path(candidate).is_dir() else Path(candidate).parent
            if (folder / "obd-writer").exists() and (folder / "overlaybd-zfile").exists():
                return folder
    pytest.skip("the reference tools are not built (../shared/reference-tools/build.sh; then set "
                "OVERLAYBD_REFERENCE_TOOLS to their output folder)")


@pytest.mark.parametrize("k", [8, 9])
@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_the_reference_reader_reads_what_we_write(tmp_path: Path, algo: str, k: int) -> None:
    tools = reference_tools()
    data = with_noise_at(k)
    path, res = write(tmp_path, data, algo, blocks.ACTIVE)
    assert res.block_size == 32768
    out = tmp_path / "theirs.raw"
    subprocess.run([str(tools / "obd-writer"), "dump-zfile", str(out), str(path)], check=True,
                   capture_output=True)
    assert out.read_bytes() == data


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_the_reference_writes_64k_blocks_its_reader_refuses_and_ours_reads(tmp_path: Path, algo: str) -> None:
    tools = reference_tools()
    data = with_noise_at(8)
    src = tmp_path / "plain"
    src.write_bytes(data)
    theirs = tmp_path / "theirs.zfile"
    subprocess.run([str(tools / "overlaybd-zfile"), "--algorithm", algo, "--bs", "64", str(src), str(theirs)],
                   check=True, capture_output=True)
    with FileSource(str(theirs)) as f:
        z = ZFileSource(f)
        assert z.block_size == BLOCK and max(z.stored_lengths()) > MAX_STORED_BLOCK
        assert z.pread(0, len(data)) == data
    dumped = subprocess.run([str(tools / "obd-writer"), "dump-zfile", str(tmp_path / "out"), str(theirs)],
                            capture_output=True)
    assert dumped.returncode != 0
