"""Runs of ZFile blocks (formats.zfile.blocks): the C extension and the pure-Python path keep one contract.

Each contract test runs on both implementations. CI builds the extension, and ``OVERLAYBD_REQUIRE_NATIVE=1`` (set
by scripts/test.sh) turns its absence into a failure instead of a skip.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
from array import array
from collections.abc import Callable

import crc32c
import lz4.block
import numpy as np
import pytest
import zstandard

from overlaybd.errors import CorruptIndexError, LayerIOError, OverlaybdError
from overlaybd.formats.checksum import raw_crc32c
from overlaybd.formats.zfile import blocks, writeback
from overlaybd.formats.zfile.reader import ZFileSource
from overlaybd.formats.zfile.spec import ALGO_LZ4, ALGO_ZSTD, CRC_SIZE, MAX_STORED_BLOCK, ZFileHeader
from overlaybd.formats.zfile.writer import write_zfile
from overlaybd.source.file import MemorySource

from ..native import require_native

SEED = 100007


def _native() -> blocks.NativeRuns:
    if blocks.NATIVE is None:
        require_native()  # fails or skips, saying why
    assert blocks.NATIVE is not None
    return blocks.NATIVE


@pytest.fixture(params=["python", "native"])
def runs(request: pytest.FixtureRequest) -> blocks.BlockRuns:
    return blocks.PYTHON if request.param == "python" else _native()


def mixed(size: int, seed: int = 1) -> bytes:
    """Half random 1 KiB pieces, half text, so blocks compress to about half."""
    rnd = random.Random(seed)
    words = [b"alpha", b"beta", b"GET /v2/", b"200", b"layer", b"sha256:", b"0123456789"]
    out = bytearray()
    while len(out) < size:
        if rnd.random() < 0.5:
            out += rnd.randbytes(1024)
        else:
            out += b" ".join(rnd.choice(words) for _ in range(200))[:1024].ljust(1024, b".")
    return bytes(out[:size])


def compress_all(runs: blocks.BlockRuns, algo: int, data: bytes, bs: int, verify: bool) -> tuple[bytes, np.ndarray]:
    n = -(-len(data) // bs)
    out = bytearray(n * (runs.compress_bound(algo, bs) + CRC_SIZE))
    lengths = np.zeros(n, dtype="<u4")
    done, used, status, message = runs.compress(algo, data, bs, verify, out, lengths, MAX_STORED_BLOCK)
    assert (done, status, message) == (n, blocks.OK, None)
    assert int(lengths.sum()) == used
    return bytes(out[:used]), lengths


def starts_of(lengths: np.ndarray, base: int = 0) -> np.ndarray:
    starts = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts + base


# -- CRC32C --------------------------------------------------------------------------------------------------------


def test_native_crc32c_matches_the_crc32c_package_at_every_length_and_alignment() -> None:
    native = _native().module
    rnd = random.Random(7)
    # lengths around the 8-byte steps and the 3 x 256 and 3 x 8192 interleaved runs
    for n in [0, 1, 7, 8, 9, 255, 256, 767, 768, 769, 2400, 4096, 24575, 24576, 24577, 65536, 100003]:
        blob = rnd.randbytes(n + 8)
        for shift in range(8):
            data = memoryview(blob)[shift : shift + n]
            for seed in (0, SEED, 0xFFFFFFFF):
                want = crc32c.crc32c(data, value=seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
                assert native.crc32c_raw(data, seed) == want, (n, shift, seed)


# -- the contract, on both implementations -----------------------------------------------------------------------


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
@pytest.mark.parametrize("bs", [4096, 65536])
@pytest.mark.parametrize("verify", [True, False])
def test_compress_then_decompress_a_run(runs: blocks.BlockRuns, algo: int, bs: int, verify: bool) -> None:
    data = mixed(5 * bs + 1234)  # a short last block
    stored, lengths = compress_all(runs, algo, data, bs, verify)
    if verify:  # each block's CRC32C (seed 100007) follows it
        for a, b in zip(starts_of(lengths)[:-1], starts_of(lengths)[1:], strict=True):
            crc = crc32c.crc32c(stored[a : b - 4], value=SEED ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
            assert int.from_bytes(stored[b - 4 : b], "little") == crc
    # decompress the middle of the run from a buffer that starts at a file offset (base)
    base = 512
    starts = starts_of(lengths, base)
    first, count = 1, lengths.size - 1
    c0 = int(starts[first])
    out = bytearray(count * bs)
    result = runs.decompress(algo, stored[c0 - base :], starts, first, count, c0, out, bs, 1234, verify)
    assert result == (count, blocks.OK, 0, None)
    assert bytes(out[: (count - 1) * bs + 1234]) == data[bs:]


def test_native_and_python_write_the_same_lz4_bytes() -> None:
    """Both call LZ4_compress_default, as the reference does (the Python path the one inside python-lz4, through
    ctypes: python-lz4's own compress gives other bytes for some blocks)."""
    native = _native()
    data = mixed(300_000, seed=3)
    for bs in (4096, 65536):
        ours = compress_all(native, ALGO_LZ4, data, bs, True)[0]
        assert ours == compress_all(blocks.PYTHON, ALGO_LZ4, data, bs, True)[0]


def test_native_and_python_write_the_same_zstd_bytes() -> None:
    """Both call the same libzstd (the zstandard wheel's) when the extension found it."""
    native = _native()
    if native.module.zstd_version() != ".".join(map(str, zstandard.ZSTD_VERSION)):
        pytest.skip(f"the extension uses zstd {native.module.zstd_version()}, zstandard {zstandard.ZSTD_VERSION}")
    data = mixed(300_000, seed=3)
    for bs in (4096, 32768):
        ours = compress_all(native, ALGO_ZSTD, data, bs, True)[0]
        assert ours == compress_all(blocks.PYTHON, ALGO_ZSTD, data, bs, True)[0]


def test_the_python_path_reads_what_the_native_path_writes_and_back() -> None:
    native = _native()
    bs = 8192
    data = mixed(10 * bs + 77, seed=6)
    for algo in (ALGO_LZ4, ALGO_ZSTD):
        for writer, reader in ((native, blocks.PYTHON), (blocks.PYTHON, native)):
            stored, lengths = compress_all(writer, algo, data, bs, True)
            out = bytearray(11 * bs)
            result = reader.decompress(algo, stored, starts_of(lengths), 0, 11, 0, out, bs, 77, True)
            assert result == (11, blocks.OK, 0, None)
            assert bytes(out[: len(data)]) == data


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_a_crc_mismatch_stops_the_run_at_that_block(runs: blocks.BlockRuns, algo: int) -> None:
    bs = 4096
    data = mixed(6 * bs)
    stored, lengths = compress_all(runs, algo, data, bs, True)
    starts = starts_of(lengths)
    bad = bytearray(stored)
    bad[int(starts[3]) + 5] ^= 0x40  # inside block 3's payload
    out = bytearray(6 * bs)
    done, status, detail, message = runs.decompress(algo, bad, starts, 0, 6, 0, out, bs, bs, True)
    assert (done, status) == (3, blocks.CRC)
    a, b = int(starts[3]), int(starts[4]) - 4
    assert detail == crc32c.crc32c(bad[a:b], value=SEED ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    assert bytes(out[: 3 * bs]) == data[: 3 * bs], "the blocks before the bad one are delivered"


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_a_block_the_codec_rejects_stops_the_run(runs: blocks.BlockRuns, algo: int) -> None:
    bs = 4096
    data = mixed(4 * bs)
    stored, lengths = compress_all(runs, algo, data, bs, False)
    starts = starts_of(lengths)
    bad = bytearray(stored)
    a, b = int(starts[2]), int(starts[3])
    bad[a:b] = bytes(range(256)) * ((b - a) // 256) + bytes((b - a) % 256)  # garbage of the same length
    done, status, detail, message = runs.decompress(algo, bad, starts, 0, 4, 0, bytearray(4 * bs), bs, bs, False)
    assert done == 2
    assert status in (blocks.CODEC, blocks.LENGTH)
    assert message if status == blocks.CODEC else detail != bs


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_a_block_of_the_wrong_size_is_reported(runs: blocks.BlockRuns, algo: int) -> None:
    bs = 4096
    short = mixed(1000)
    stored, lengths = compress_all(runs, algo, short, bs, False)  # a block holding 1000 bytes
    done, status, detail, _ = runs.decompress(algo, stored, starts_of(lengths), 0, 1, 0, bytearray(bs), bs, bs, False)
    assert done == 0
    assert (status, detail) == (blocks.LENGTH, 1000) or status == blocks.CODEC


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_a_block_that_would_pass_the_stored_limit_stops_compression(runs: blocks.BlockRuns, algo: int) -> None:
    bs = 65536
    data = mixed(bs) + random.Random(5).randbytes(bs)  # block 1 cannot shrink
    out = bytearray(2 * (runs.compress_bound(algo, bs) + CRC_SIZE))
    lengths = np.zeros(2, dtype="<u4")
    done, used, status, _ = runs.compress(algo, data, bs, True, out, lengths, MAX_STORED_BLOCK)
    assert (done, status) == (1, blocks.TOO_BIG)
    assert used == int(lengths[0]) > 0


def test_native_refuses_runs_outside_its_buffers() -> None:
    native = _native()
    bs = 4096
    stored, lengths = compress_all(native, ALGO_LZ4, mixed(2 * bs), bs, True)
    starts = starts_of(lengths)
    with pytest.raises(ValueError, match="outside"):
        native.decompress(ALGO_LZ4, stored[:-1], starts, 0, 2, 0, bytearray(2 * bs), bs, bs, True)
    with pytest.raises(ValueError, match="outside"):
        native.decompress(ALGO_LZ4, stored, starts, 0, 2, 0, bytearray(2 * bs - 1), bs, bs, True)
    with pytest.raises(ValueError, match="starts"):
        native.decompress(ALGO_LZ4, stored, starts[:2], 0, 2, 0, bytearray(2 * bs), bs, bs, True)
    with pytest.raises(ValueError, match="starts"):
        native.decompress(ALGO_LZ4, stored, starts.astype(np.int32), 0, 2, 0, bytearray(2 * bs), bs, bs, True)
    with pytest.raises(ValueError, match="algorithm"):
        native.decompress(0, stored, starts, 0, 2, 0, bytearray(2 * bs), bs, bs, True)
    with pytest.raises(TypeError):
        native.decompress(ALGO_LZ4, stored, starts, 0, 2, 0, bytes(2 * bs), bs, bs, True)  # read-only out
    with pytest.raises(ValueError, match="room"):
        native.compress(ALGO_LZ4, mixed(bs), bs, True, bytearray(100), np.zeros(1, dtype="<u4"), MAX_STORED_BLOCK)


def test_choosing_the_zstd_library() -> None:
    module = _native().module
    with pytest.raises(OSError):
        module.use_zstd("/nonexistent/libzstd.so")
    with pytest.raises(OSError, match="ZSTD_"):
        module.use_zstd(lz4.block._block.__file__)  # a shared object without zstd in it
    assert blocks.NATIVE is not None
    compress_all(blocks.NATIVE, ALGO_ZSTD, mixed(4096), 4096, True)  # this thread now holds zstd state
    with pytest.raises(RuntimeError, match="contexts exist"):
        module.use_zstd("libzstd.so.1")
    version = module.zstd_version()
    assert version.count(".") == 2 and tuple(map(int, version.split("."))) >= (1, 4, 0)


def test_describe_names_the_path_in_use() -> None:
    text = blocks.describe()
    assert text.startswith(blocks.ACTIVE.name)
    if blocks.ACTIVE is blocks.NATIVE:
        assert "zstd" in text and "liblz4" in text


# -- the writer's threads ---------------------------------------------------------------------------------------


def write_bytes(src: MemorySource | object, **options: object) -> bytes:
    with tempfile.TemporaryFile() as f:
        result = write_zfile(src, f.fileno(), **options)  # type: ignore[arg-type]
        return os.pread(f.fileno(), result.length, 0)


@pytest.mark.parametrize("algo", ["lz4", "zstd"])
def test_one_two_and_three_threads_write_the_same_file(algo: str) -> None:
    data = mixed((5 << 20) + 4321, seed=9)  # several 1 MiB batches and a short one
    files = [write_bytes(MemorySource(data), algo=algo, block_size=8192, threads=t) for t in (1, 2, 3)]
    assert files[0] == files[1] == files[2]
    assert ZFileSource(MemorySource(files[1])).pread(0, len(data)) == data


class FailingSource(MemorySource):
    """Reads fail from ``fail_at`` on, as a disk that went away would."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def readinto(self, offset: int, buf: memoryview) -> None:  # type: ignore[override]
        if offset + len(buf) > self.fail_at:
            raise LayerIOError("read failed: Input/output error", path="failing", offset=offset)
        super().readinto(offset, buf)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_read_error_in_any_batch_ends_the_write_with_that_error(threads: int) -> None:
    data = mixed(8 << 20, seed=4)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            write_bytes(FailingSource(data, fail_at=(5 << 20) + 1), algo="lz4", threads=threads)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "write_zfile hung after a worker's read failed"
    assert isinstance(outcome[0], LayerIOError) and outcome[0].offset == 5 << 20


# -- one verdict on damaged blocks and files, whichever path reads them ---------------------------------------------

_SKIPPABLE = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"


def _rle_bomb(blocks_of_128k: int) -> bytes:
    """A zstd frame with no content size whose RLE blocks (4 bytes each) decompress to 128 KiB apiece."""
    frame = bytearray((0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 0x38]))  # no FCS; 128 KiB window
    for k in range(blocks_of_128k):
        last = int(k == blocks_of_128k - 1)
        frame += (last | 1 << 1 | (128 << 10) << 3).to_bytes(3, "little") + b"\xaa"
    return bytes(frame)


def _compressor(algo: int) -> Callable[[bytes], bytes]:
    if algo == ALGO_ZSTD:
        return zstandard.ZstdCompressor(level=3).compress

    def lz4_block(d: bytes) -> bytes:
        return lz4.block.compress(d, mode="default", store_size=False)  # type: ignore[no-any-return]

    return lz4_block


#: damage after which a block may still decode, to other bytes: nothing but a CRC could tell
MAY_DECODE_OTHERWISE = ("flip", "random")


def damaged_blocks(algo: int, plain: bytes, seed: int = 11) -> dict[str, bytes]:
    """The compressed block of ``plain`` (which is what it should decompress to), and damaged forms of it: trailing
    bytes, cuts, byte flips, frames of the wrong size, several frames, skippable frames, a decompression bomb."""
    rnd = random.Random(seed)
    comp = _compressor(algo)
    good = comp(plain)
    out = {"good": good, "short": comp(plain[:-1]), "long": comp(plain + b"x"), "empty-input": comp(b""),
           "random": rnd.randbytes(len(good)), "doubled": good + good}
    for tail in (b"\x00", b"abcd", b"abcde", b"abcdefgh", bytes(16)):
        out[f"trailing {tail!r}"] = good + tail
    positions = range(len(good)) if len(good) <= 200 else sorted(rnd.sample(range(len(good)), 200))
    for k in positions:
        for x in (0x01, 0x80, 0xFF):
            flipped = bytearray(good)
            flipped[k] ^= x
            out[f"flip byte {k} ^ {x:#x}"] = bytes(flipped)
        out[f"cut to {k} bytes"] = good[: max(k, 1)]
    if algo == ALGO_ZSTD:
        out["two frames"] = comp(plain[:1000]) + comp(plain[1000:])
        out["two frames, one byte too many"] = comp(plain[:1000]) + comp(plain[1000:] + b"x")
        out["skippable after"] = good + _SKIPPABLE
        out["skippable before"] = _SKIPPABLE + good
        out["skippable cut"] = good + _SKIPPABLE[:-1]
        out["skippable only"] = _SKIPPABLE
        unsized = zstandard.ZstdCompressor(level=3, write_content_size=False, write_checksum=True)
        out["no content size, checksum"] = unsized.compress(plain)
        out["no content size, too long"] = unsized.compress(plain + b"x")
        bad_sum = bytearray(unsized.compress(plain))
        bad_sum[-1] ^= 1
        out["bad frame checksum"] = bytes(bad_sum)
        out["RLE bomb, 128 MiB"] = _rle_bomb(1024)
    return out


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
def test_both_paths_give_one_verdict_on_damaged_blocks(algo: int) -> None:
    """The C and the Python path accept the same blocks, with the same bytes, and refuse the others with the
    same status (CODEC or LENGTH): the Python path used to take a zstd frame followed by anything for a good block."""
    native = _native()
    differ = []
    corpus = {**damaged_blocks(algo, mixed(4096, 11)), **{f"zeros: {k}": v for k, v in
                                                          damaged_blocks(algo, bytes(4096)).items()}}
    for name, block in corpus.items():
        starts = np.array([0, len(block)], dtype=np.int64)
        verdicts = []
        for runs in (blocks.PYTHON, native):
            out = bytearray(4096)
            done, status, detail, _message = runs.decompress(algo, block, starts, 0, 1, 0, out, 4096, 4096, False)
            verdicts.append((done, status, detail if status == blocks.LENGTH else 0,
                             bytes(out) if status == blocks.OK else b""))
        if verdicts[0] != verdicts[1]:
            differ.append(f"{name}: python {verdicts[0][:3]}, native {verdicts[1][:3]}")
    assert not differ, "\n".join(differ)


def _assemble(stored: list[bytes], algo: int, bs: int, size: int, verify: bool) -> bytes:
    """A ZFile (header, blocks, jump table, trailer with index CRC) around stored blocks, whatever they hold."""
    table = np.array([len(b) for b in stored], dtype="<u4").tobytes()
    index_offset = 512 + sum(len(b) for b in stored)
    head = ZFileHeader(flags=0x13, block_size=bs, algo=algo, verify=verify).pack()
    trailer = ZFileHeader(flags=0x16, index_offset=index_offset, index_size=len(stored), original_file_size=size,
                          index_crc=crc32c.crc32c(table, value=0xFFFFFFFF) ^ 0xFFFFFFFF, block_size=bs, algo=algo,
                          verify=verify).pack()
    return head + b"".join(stored) + table + trailer


def _with_crc(payload: bytes) -> bytes:
    return payload + (crc32c.crc32c(payload, value=SEED ^ 0xFFFFFFFF) ^ 0xFFFFFFFF).to_bytes(4, "little")


def damaged_files(algo: int, verify: bool) -> tuple[bytes, dict[str, bytes]]:
    """The plain bytes, and ZFiles of them each damaged once: every damaged form of block 3 from
    :func:`damaged_blocks` (its CRC made to match, so the damage reaches the codec), damaged last blocks, and
    jump-table edits that move bytes from one block to the next (index CRC matching)."""
    bs = 4096
    data = mixed(8 * bs + 700, seed=21)
    comp = _compressor(algo)
    pieces = [comp(data[a : a + bs]) for a in range(0, len(data), bs)]

    def stored(p: bytes) -> bytes:
        return _with_crc(p) if verify else p

    def file_with(k: int, block: bytes) -> bytes:
        return _assemble([stored(block) if j == k else stored(p) for j, p in enumerate(pieces)], algo, bs,
                         len(data), verify)

    files = {"intact": file_with(-1, b"")}
    for name, block in damaged_blocks(algo, data[3 * bs : 4 * bs]).items():
        files[f"block 3: {name}"] = file_with(3, block)
    last = len(pieces) - 1
    for name, block in (("a full block", pieces[0]), ("one byte more", pieces[last] + b"\x00"),
                        ("cut by one", pieces[last][:-1]), ("good", comp(data[last * bs :]))):
        files[f"last block: {name}"] = file_with(last, block)
    for shift in (1, 2, 5, -1, -3):
        moved = [stored(p) for p in pieces]
        joined = moved[3] + moved[4]
        cut = len(moved[3]) + shift
        moved[3], moved[4] = joined[:cut], joined[cut:]
        files[f"{shift:+d} byte(s) moved between blocks 3 and 4"] = _assemble(moved, algo, bs, len(data), verify)
    if verify:
        crc_off = [stored(p) for p in pieces]
        crc_off[5] = crc_off[5][:-1] + bytes([crc_off[5][-1] ^ 1])
        files["block 5: CRC off by a bit"] = _assemble(crc_off, algo, bs, len(data), verify)
    return data, files


def _verdict(z: bytes, runs: blocks.BlockRuns, monkeypatch: pytest.MonkeyPatch) -> tuple[object, ...]:
    monkeypatch.setattr(blocks, "ACTIVE", runs)
    try:
        src = ZFileSource(MemorySource(z, name="damaged.zfile"))
        return ("read", src.pread(0, src.size))
    except OverlaybdError as exc:  # the kind of error and where: the codec's own wording may differ
        return (type(exc).__name__, exc.offset, getattr(exc, "block", None),
                str(exc).split(" does not decompress")[0])


@pytest.mark.parametrize("algo", [ALGO_LZ4, ALGO_ZSTD])
@pytest.mark.parametrize("verify", [True, False])
def test_both_paths_give_one_verdict_on_damaged_files(algo: int, verify: bool, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """Every damaged file read whole on the C path and on the Python path: the same bytes or the same error at
    the same offset; and whatever is read is the original, never other bytes."""
    native = _native()
    data, files = damaged_files(algo, verify)
    problems = []
    for name, z in files.items():
        python, c = _verdict(z, blocks.PYTHON, monkeypatch), _verdict(z, native, monkeypatch)
        if python != c:
            problems.append(f"{name}: python {python[:4] if python[0] != 'read' else 'read'}, "
                            f"native {c[:4] if c[0] != 'read' else 'read'}")
        elif python[0] == "read" and python[1] != data and not name.startswith(
                tuple(f"block 3: {d}" for d in MAY_DECODE_OTHERWISE)):
            problems.append(f"{name}: both paths read other bytes than were compressed")
    assert files and not problems, "\n".join(problems)


def test_both_paths_read_a_jump_table_alike() -> None:
    """``block_starts``: the running sum from ``first``, or the first length out of (floor, ceiling]."""
    rng = random.Random(11)
    native = _native()
    for n in (0, 1, 7, 5000):
        lengths = [rng.randrange(5, 4200) for _ in range(n)]
        raw = b"".join(x.to_bytes(4, "little") for x in lengths)
        outs = []
        for runs in (native, blocks.PYTHON):
            out = array("q", bytes(8 * (n + 1)))
            assert runs.block_starts(raw, 40, 4, 4200, out) == -1
            outs.append(list(out))
        want = [40]
        for x in lengths:
            want.append(want[-1] + x)
        assert outs[0] == outs[1] == want
        for bad in ({0: 4, n // 2: 4201, n - 1: 0} if n else {}).items():
            broken = lengths[:]
            broken[bad[0]] = bad[1]
            raw = b"".join(x.to_bytes(4, "little") for x in broken)
            for runs in (native, blocks.PYTHON):
                assert runs.block_starts(raw, 40, 4, 4200, array("q", bytes(8 * (n + 1)))) == bad[0]
    with pytest.raises(ValueError):
        native.block_starts(b"\0" * 8, 0, 0, 10, array("q", [0, 0]))  # room for one block only


def test_writeback_thread_makes_every_call_before_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Writeback``: ranges are handed to its thread, in order; ``close`` returns only once every call is made,
    so the writer may close its descriptor then (a late call would start writeback on a reused number)."""
    made: list[tuple[int, int, int]] = []
    slow = threading.Event()

    def record(fd: int, offset: int, length: int) -> None:
        slow.wait(0.01)  # a disk queue that is full for a moment
        made.append((fd, offset, length))

    monkeypatch.setattr(writeback, "start_writeback", record)
    with writeback.Writeback(7) as wb:
        for k in range(20):
            wb.start(k << 20, 1 << 20)
    assert made == [(7, k << 20, 1 << 20) for k in range(20)]
    wb.close()  # twice is harmless


def test_write_zfile_starts_writeback_of_what_it_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[int, int]] = []
    monkeypatch.setattr(writeback, "start_writeback", lambda fd, offset, length: made.append((offset, length)))
    data = mixed(5 * (1 << 20) + 4321, 3)
    with tempfile.TemporaryFile() as f:
        for threads in (1, 2):
            made.clear()
            res = write_zfile(MemorySource(data), f.fileno(), algo="lz4", block_size=4096, threads=threads)
            covered = sorted(made)
            assert covered[0][0] == 512 and sum(n for _, n in covered) == res.header.index_offset - 512
            assert all(a + n == b for (a, n), (b, _) in zip(covered, covered[1:], strict=False))


@pytest.mark.parametrize("length", [3, 0, MAX_STORED_BLOCK + 1])
def test_a_jump_table_length_out_of_range_is_corruption_at_its_place(length: int) -> None:
    """A stored length no block can have, in a jump table whose CRC matches (rewritten to): CorruptIndexError
    naming the block and the offset of its entry, on both block paths."""
    data = mixed(6 * 4096 + 100, 5)
    with tempfile.TemporaryFile() as f:
        write_zfile(MemorySource(data), f.fileno(), algo="lz4", block_size=4096)
        f.seek(0)
        raw = bytearray(f.read())
    trailer = ZFileHeader.unpack(bytes(raw[-512:]), path="z", offset=len(raw) - 512)
    at = trailer.index_offset + 4 * 2
    raw[at : at + 4] = length.to_bytes(4, "little")
    table = bytes(raw[trailer.index_offset : trailer.index_offset + 4 * trailer.index_size])
    raw[-512:] = trailer.with_(index_crc=raw_crc32c(table)).pack()
    for runs in (_native(), blocks.PYTHON):
        saved, blocks.ACTIVE = blocks.ACTIVE, runs
        try:
            with pytest.raises(CorruptIndexError) as err:
                ZFileSource(MemorySource(bytes(raw)))
        finally:
            blocks.ACTIVE = saved
        assert err.value.offset == at and "block 2 has stored length" in str(err.value)
