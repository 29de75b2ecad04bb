"""Blocks built to get past the ZFile screen (``BlockRuns.screen``): each does not fit a 64 KiB block compressed
as written, and each was cleared by the screen as it was first written (so the file cost a second pass); now the
screen finds every one, on both block paths, and the file is written once with 32 KiB blocks. Also: the screen's
arguments checked alike on both paths, and sources that lie, fail or change under the screen.

zstd stores a block raw (one byte a byte, more than 65,536 with its headers) unless its Huffman literals pass
zstd's own tests: the commonest byte must occur more than n/128 + 4 times, the commonest bytes of the first and
last 4 KiB must add up to more than 68, and the code must save n/64 + 2 bytes. An entropy estimate from every
16th byte missed all of these. LZ4 at acceleration 64 keeps older entries in its hash table (it skips positions)
and can find a repeat that LZ4 as written misses.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from overlaybd.errors import LayerIOError, OverlaybdError
from overlaybd.formats.zfile import blocks, writer
from overlaybd.formats.zfile.reader import ZFileSource
from overlaybd.formats.zfile.spec import ALGO_LZ4, ALGO_ZSTD, MAX_STORED_BLOCK
from overlaybd.formats.zfile.writer import ZFileResult, write_zfile
from overlaybd.source.base import Extent, ExtentKind
from overlaybd.source.file import FileSource, MemorySource

from .test_zfile_blocks import _native, mixed
from .test_zfile_incompressible import reference_tools

BLOCK = 65536


def stride16_flat(seed: int) -> bytes:
    """Every 16th byte one of 16 values, the others the 240 other values: the sample reads 4 bits a byte, the
    block holds every byte value exactly 256 times (8 bits a byte; zstd stores it raw)."""
    rng = np.random.default_rng(seed)
    sampled = np.repeat(np.arange(16, dtype=np.uint8), 256)
    rest = np.repeat(np.arange(16, 256, dtype=np.uint8), 256)
    rng.shuffle(sampled)
    rng.shuffle(rest)
    out = np.empty(BLOCK, dtype=np.uint8)
    at = np.zeros(BLOCK, dtype=bool)
    at[::16] = True
    out[at], out[~at] = sampled, rest
    return out.tobytes()


def skewed(seed: int) -> bytes:
    """Half the byte values three times as likely as the other half: 7.81 bits a byte, but no byte value occurs
    more than n/128 + 4 times, so zstd does not try Huffman."""
    weights = np.ones(256)
    weights[:128] = 3
    return np.random.default_rng(seed).choice(256, BLOCK, p=weights / weights.sum()).astype(np.uint8).tobytes()


def balanced_7bit(seed: int) -> bytes:
    """128 byte values, each exactly 512 times: 7 bits a byte, and the commonest one at zstd's limit."""
    out = np.repeat(np.arange(128, dtype=np.uint8), 512)
    np.random.default_rng(seed).shuffle(out)
    return out.tobytes()


def random_edges(seed: int) -> bytes:
    """6.9 bits a byte, but the first and last 4 KiB random: zstd samples those two and gives up."""
    rng = np.random.default_rng(seed)
    weights = np.ones(256)
    weights[:16] = 20
    out = rng.choice(256, BLOCK, p=weights / weights.sum()).astype(np.uint8)
    out[:4096] = rng.integers(0, 256, 4096)
    out[-4096:] = rng.integers(0, 256, 4096)
    return out.tobytes()


def flat_then_zeros(seed: int) -> bytes:
    """206 byte values evenly, then 818 zeros (data, then padding): zero is the commonest byte by far, but zstd
    takes the zeros as one repeat and finds the rest too even to code (found by a fuzz of mixed pieces)."""
    out = np.random.default_rng(seed).integers(0, 206, BLOCK).astype(np.uint8)
    out[-818:] = 0
    return out.tobytes()


def flat_with_short_zero_runs(seed: int) -> bytes:
    """200 byte values evenly, and 150 runs of 8 zeros, 15 in each edge 4 KiB: what the count sees is zeros
    enough for Huffman; zstd takes every run as a repeat (each saving a few bytes) and the rest is too even."""
    rng = np.random.default_rng(seed)
    out = rng.integers(1, 201, BLOCK).astype(np.uint8)
    edge = np.arange(0, 4096 - 8, 4096 // 15)
    runs = list(rng.choice(edge, 15, replace=False)) + list(BLOCK - 4096 + rng.choice(edge, 15, replace=False))
    runs += list(rng.choice(np.arange(4096, BLOCK - 4096 - 8, 16), 120, replace=False))
    for at in runs:
        out[at : at + 8] = 0
    return out.tobytes()


def lz4_late_repeat(seed: int) -> bytes:
    """Random bytes whose last 2 KiB repeat 2 KiB from the middle: LZ4 at acceleration 64 finds the repeat (its
    sparse hash table still holds the first copy) and fits; LZ4 as written misses it and does not."""
    data = bytearray(random.Random(seed).randbytes(BLOCK))
    data[-2048:] = data[17970 : 17970 + 2048]
    return bytes(data)


ZSTD_ATTACKS: list[Callable[[int], bytes]] = [stride16_flat, skewed, balanced_7bit, random_edges,
                                              flat_then_zeros]
ATTACKS = [(ALGO_ZSTD, f) for f in ZSTD_ATTACKS] + [(ALGO_LZ4, lz4_late_repeat)]
IDS = [f"{'lz4' if a == ALGO_LZ4 else 'zstd'}-{f.__name__}" for a, f in ATTACKS]


@pytest.fixture(params=["python", "native"])
def runs(request: pytest.FixtureRequest) -> blocks.BlockRuns:
    return blocks.PYTHON if request.param == "python" else _native()


def screen(runs: blocks.BlockRuns, algo: int, data: bytes, block_size: int = BLOCK) -> blocks.ScreenResult:
    scratch = bytearray(runs.compress_bound(algo, block_size) + 4)
    return runs.screen(algo, data, block_size, True, scratch, MAX_STORED_BLOCK, writer.SCREEN)


def fits(algo: int, block: bytes) -> bool:
    scratch = bytearray(2 * BLOCK)
    lengths = np.empty(1, dtype="<u4")
    return _native().compress(algo, block, BLOCK, True, scratch, lengths, MAX_STORED_BLOCK)[2] == blocks.OK


def write(tmp_path: Path, data: bytes | MemorySource, algo: int, threads: int = 2) -> tuple[Path, ZFileResult]:
    path = tmp_path / "z"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        src = data if isinstance(data, MemorySource) else MemorySource(data)
        res = write_zfile(src, fd, algo=algo, block_size=BLOCK, threads=threads)
    finally:
        os.close(fd)
    return path, res


def read_back(path: Path) -> bytes:
    with FileSource(str(path)) as f:
        z = ZFileSource(f)
        assert max(z.stored_lengths()) <= MAX_STORED_BLOCK
        return z.pread(0, z.size)


@pytest.mark.parametrize(("algo", "attack"), ATTACKS, ids=IDS)
def test_the_attack_block_does_not_fit_and_the_screen_finds_it(algo: int, attack: Callable[[int], bytes],
                                                               runs: blocks.BlockRuns) -> None:
    for seed in (1, 2, 3):
        block = attack(seed)
        assert len(block) == BLOCK and not fits(algo, block)
        found, tested, status, _ = screen(runs, algo, mixed(3 * BLOCK, seed) + block)
        assert (found, status) == (3, blocks.OK) and tested >= 1


@pytest.mark.parametrize(("algo", "attack"), ATTACKS, ids=IDS)
def test_a_file_holding_the_attack_block_is_written_once_with_32k_blocks(tmp_path: Path, algo: int,
                                                                         attack: Callable[[int], bytes],
                                                                         runs: blocks.BlockRuns,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocks, "ACTIVE", runs)
    data = mixed(7 * BLOCK, 4) + attack(4) + mixed(4 * BLOCK + 999, 5)
    path, res = write(tmp_path, data, algo)
    assert (res.block_size, res.passes) == (32768, 1)
    assert read_back(path) == data


@pytest.mark.parametrize("threads", [1, 2])
def test_short_runs_that_zstd_takes_as_repeats_still_get_past_the_count_and_the_net_holds(
        tmp_path: Path, threads: int) -> None:
    """Known: the count does not see which bytes zstd will take as repeats. Many short runs of one byte in
    otherwise even data look like a byte zstd can code in fewer bits, but zstd takes each run as a repeat and
    stores the rest raw. Such a block is missed, and the writer meets it: the file is written again with 32 KiB
    blocks and is whole."""
    block = flat_with_short_zero_runs(1)
    assert not fits(ALGO_ZSTD, block)
    assert screen(_native(), ALGO_ZSTD, block)[0] == screen(blocks.PYTHON, ALGO_ZSTD, block)[0] == -1
    data = mixed(3 * BLOCK, 1) + block + mixed(BLOCK, 2)
    path, res = write(tmp_path, data, ALGO_ZSTD, threads)
    assert (res.block_size, res.passes) == (32768, 2)
    assert read_back(path) == data


def test_blocks_that_fit_are_still_cleared_without_compressing_them() -> None:
    """The screen stays cheap where it can: text, and random bytes of 5 bits, are cleared by the count."""
    rng = np.random.default_rng(8)
    cases = [mixed(BLOCK, 8), (rng.integers(0, 32, BLOCK, dtype=np.uint8) * 7).tobytes(),
             b"".join(b"%d " % i for i in range(20000))[:BLOCK]]
    for data in cases:
        assert fits(ALGO_ZSTD, data)
        assert screen(_native(), ALGO_ZSTD, data)[:2] == (-1, 0)


def _fuzz_block(rng: np.random.Generator) -> bytes:
    """64 KiB of pieces of random kinds (random, few values, skewed, zeros, strided constants, balanced,
    repeated, two-level), sometimes with a piece copied elsewhere."""
    parts: list[np.ndarray] = []
    left = BLOCK
    while left > 0:
        n = min(left, int(rng.integers(1, BLOCK + 1)))
        kind = int(rng.integers(0, 7))
        if kind == 0:
            part = rng.integers(0, 256, n, dtype=np.uint8)
        elif kind == 1:
            part = rng.integers(0, int(rng.integers(2, 257)), n).astype(np.uint8)
        elif kind == 2:
            w = rng.random(256) ** float(rng.uniform(0.1, 4))
            part = rng.choice(256, n, p=w / w.sum()).astype(np.uint8)
        elif kind == 3:
            part = np.zeros(n, dtype=np.uint8)
        elif kind == 4:
            part = rng.integers(0, 256, n, dtype=np.uint8)
            part[:: int(rng.integers(2, 33))] = int(rng.integers(0, 4))
        elif kind == 5:
            m = int(rng.integers(16, 200))
            part = np.repeat(np.arange(m, dtype=np.uint8), n // m + 1)[:n]
            rng.shuffle(part)
        else:
            w = np.ones(256)
            w[: int(rng.integers(1, 256))] = float(rng.uniform(1, 5))
            part = rng.choice(256, n, p=w / w.sum()).astype(np.uint8)
        parts.append(part)
        left -= n
    block = np.concatenate(parts)
    if rng.random() < 0.3:
        a = int(rng.integers(0, BLOCK - 64))
        length = int(rng.integers(8, min(8192, BLOCK - a)))
        to = int(rng.integers(0, BLOCK - length))
        block[to : to + length] = block[a : a + length].copy()
    return block.tobytes()


def test_a_fuzz_of_mixed_blocks_gets_nothing_past_the_screen_and_both_paths_agree() -> None:
    """300 blocks of random pieces (a short run of the fuzz that found flat_head_skewed_tail): every block
    the screen clears fits, and the C screen and its Python twin give the same answers."""
    rng = np.random.default_rng(11)
    native = _native()
    for _ in range(300):
        block = _fuzz_block(rng)
        for algo in (ALGO_LZ4, ALGO_ZSTD):
            got = screen(native, algo, block)
            assert got == screen(blocks.PYTHON, algo, block)
            assert (got[0] == -1) == fits(algo, block), (algo, got)


# -- arguments, on both paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_odd_sizes_screen_alike_on_both_paths(algo: int) -> None:
    noise = random.Random(3).randbytes(3 * BLOCK + 100)
    cases = [(b"", BLOCK), (noise[:100], BLOCK), (mixed(2 * BLOCK + 100, 3), BLOCK), (noise[:5000], 1),
             (noise[: 2 * BLOCK + 77], BLOCK), (mixed(BLOCK, 2) + noise[:BLOCK - 4], BLOCK),
             (noise[:8191], 8191), (noise[:8192], 8192), (noise[:40000], 40960)]
    for data, block_size in cases:
        got = screen(_native(), algo, data, block_size)
        assert got == screen(blocks.PYTHON, algo, data, block_size), (len(data), block_size)
        assert got[2] == blocks.OK


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_bad_arguments_are_refused_alike(algo: int, runs: blocks.BlockRuns) -> None:
    data = mixed(BLOCK, 1)
    big = bytearray(2 * BLOCK)
    bad: list[tuple[int, int, blocks.Screen, bytearray]] = [
        (0, MAX_STORED_BLOCK, writer.SCREEN, big), (BLOCK + 1, MAX_STORED_BLOCK, writer.SCREEN, big),
        (-BLOCK, MAX_STORED_BLOCK, writer.SCREEN, big), (BLOCK, 0, writer.SCREEN, big),
        (BLOCK, 1 << 31, writer.SCREEN, big), (BLOCK, (1 << 32) + MAX_STORED_BLOCK, writer.SCREEN, big),
        (BLOCK, MAX_STORED_BLOCK, blocks.Screen(prefix=-1, margin=512), big),
        (BLOCK, MAX_STORED_BLOCK, blocks.Screen(prefix=4096, margin=-1), big),
        (BLOCK, MAX_STORED_BLOCK, blocks.Screen(prefix=4096, margin=(1 << 32) + 100), big),
        (BLOCK, MAX_STORED_BLOCK, writer.SCREEN, bytearray(BLOCK)),  # scratch below a block's worst case
    ]
    for block_size, max_stored, how, scratch in bad:
        with pytest.raises(ValueError):
            runs.screen(algo, data, block_size, True, scratch, max_stored, how)


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_a_margin_beyond_max_stored_clears_nothing(algo: int) -> None:
    """Every block compressed exactly (before, the C path wrapped round and cleared blocks)."""
    data = bytes(2 * BLOCK) + mixed(BLOCK, 1)
    for margin in (MAX_STORED_BLOCK, MAX_STORED_BLOCK + 1, (1 << 31) - 1):
        how = blocks.Screen(prefix=4096, margin=margin)
        got = [r.screen(algo, data, BLOCK, True, bytearray(2 * BLOCK), MAX_STORED_BLOCK, how)
               for r in (_native(), blocks.PYTHON)]
        assert got[0] == got[1] == (-1, 3, blocks.OK, None)


def test_buffers_and_context_are_checked() -> None:
    module = _native().module
    ctx = module.new_context()
    good = (2, 3, mixed(BLOCK, 1), BLOCK, True, bytearray(2 * BLOCK), MAX_STORED_BLOCK, 512, 4096)
    assert module.screen_blocks(ctx, *good)[0] == -1
    with pytest.raises(ValueError):
        module.screen_blocks(object(), *good)  # not a context
    with pytest.raises(BufferError):
        module.screen_blocks(ctx, *good[:5], bytes(2 * BLOCK), *good[6:])  # scratch read-only
    with pytest.raises(BufferError):
        module.screen_blocks(ctx, *good[:2], memoryview(bytearray(2 * BLOCK))[::2], *good[3:])
    with pytest.raises(ValueError):
        module.screen_blocks(ctx, 3, *good[1:])  # no such codec
    assert module.screen_blocks(ctx, *good)[0] == -1  # the context is free again after each refusal


# -- sources that lie, fail or change -----------------------------------------------------------------------


class LyingExtents(MemorySource):
    """Says every range is zeros, whatever it holds."""

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        yield Extent(offset, length, ExtentKind.ZERO)


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_extents_that_hide_data_cost_a_second_pass_not_a_bad_file(tmp_path: Path, algo: int) -> None:
    data = mixed(5 * BLOCK, 1) + random.Random(1).randbytes(BLOCK) + mixed(BLOCK, 2)
    path, res = write(tmp_path, LyingExtents(data), algo)
    assert (res.block_size, res.passes) == (32768, 2)
    assert read_back(path) == data


class FailingSource(MemorySource):
    """Reading at or after ``bad`` fails; counts the reads."""

    def __init__(self, data: bytes, bad: int) -> None:
        super().__init__(data)
        self.bad = bad
        self.reads = 0
        self._lock = threading.Lock()

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        with self._lock:
            self.reads += 1
        if offset + len(buf) > self.bad:
            raise LayerIOError("read failed: injected", path="failing", offset=offset)
        super().readinto(offset, buf)


@pytest.mark.parametrize("threads", [1, 2, 16])
def test_a_read_that_fails_mid_screen_stops_the_screen_with_a_typed_error(tmp_path: Path, threads: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "SCREEN_CHUNK", BLOCK)  # one block a chunk: 200 chunks
    src = FailingSource(mixed(200 * BLOCK, 6), 3 * BLOCK)
    fd = os.open(tmp_path / "z", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with pytest.raises(LayerIOError) as err:
            write_zfile(src, fd, algo="zstd", block_size=BLOCK, threads=threads)
    finally:
        os.close(fd)
    assert isinstance(err.value, OverlaybdError) and "failing" in str(err.value)
    assert src.reads < 3 + 2 * threads + 4  # the chunks after the failure are skipped, not read


class ChangingSource(MemorySource):
    """Holds ``first`` for its first ``reads`` reads (the screen's), then ``later``, which has a block that does
    not fit."""

    def __init__(self, first: bytes, later: bytes, reads: int) -> None:
        super().__init__(first)
        self.later = later
        self.left = reads
        self._lock = threading.Lock()

    def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        with self._lock:
            self.left -= 1
            if self.left == -1:
                self._data = self.later
        super().readinto(offset, buf)


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_a_source_that_changes_after_the_screen_is_caught_by_the_net(tmp_path: Path, threads: int) -> None:
    first = mixed(12 * BLOCK, 7)
    later = first[: 9 * BLOCK] + stride16_flat(7) + first[10 * BLOCK :]
    src = ChangingSource(first, later, reads=1)  # 768 KiB: the screen reads it in one chunk
    path, res = write(tmp_path, src, ALGO_ZSTD, threads)
    assert (res.block_size, res.passes) == (32768, 2)
    assert read_back(path) == later


# -- the command ----------------------------------------------------------------------------------------------


def test_the_cli_writes_a_late_attack_block_once_and_the_reference_reads_it(tmp_path: Path) -> None:
    data = mixed(40 * BLOCK, 9) + stride16_flat(9) + mixed(3 * BLOCK + 17, 10)
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    out = tmp_path / "out.zfile"
    done = subprocess.run([sys.executable, "-m", "overlaybd", "zfile", "compress", "--algorithm", "zstd", "--bs",
                           "64", "--output", "json", str(plain), str(out)], capture_output=True, text=True,
                          check=True)
    assert "writing the file again" not in done.stderr
    with FileSource(str(out)) as f:
        z = ZFileSource(f)
        assert z.block_size == 32768 and z.pread(0, len(data)) == data
    assert json.loads(done.stdout)  # a JSON result
    tools = reference_tools()
    dumped = tmp_path / "theirs.raw"
    subprocess.run([str(tools / "obd-writer"), "dump-zfile", str(dumped), str(out)], check=True,
                   capture_output=True)
    assert dumped.read_bytes() == data
