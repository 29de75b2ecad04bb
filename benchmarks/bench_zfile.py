"""ZFile compress and decompress throughput beside the raw codec on the same blocks, in the same run.

Data: SIZE bytes in 1 KiB pieces, half random bytes and half repetitive log-like text (compressed size about
0.52-0.59 of the original, depending on codec and block size).

* ours, compress: ``formats.zfile.writer.write_zfile`` from a ``MemorySource`` into a file (page cache), with
  ``threads`` = 1 or 2; per-block CRC on (the default).
* ours, decompress: a ``ZFileSource`` over that file read whole in 1 MiB ``readinto`` calls into a reused
  page-aligned buffer: sequentially from 1 thread, or the two halves from 2 threads.
* raw (the target's peer): ``lz4.block.compress(b, store_size=False)`` / ``ZstdCompressor(level=3).compress(b)``
  of each block in a loop, results dropped; decompress: ``lz4.block.decompress(c, uncompressed_size=bs)`` /
  ``ZstdDecompressor().decompress(c, max_output_size=bs)``. 2 threads: a ThreadPoolExecutor running the two
  halves of the block list.
* codec in C (a stricter peer, when the C block path is built): the same codec called from C in one tight loop
  per thread (the extension's run functions, CRC off, memory to memory): what the codec itself does with no
  Python per block, no CRC and no file. ours/C shows what the CRC, the reads and the writes cost.

Throughput is original bytes / wall time (MB = 10^6 bytes). Repeats are interleaved and the best is reported.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import lz4.block
import numpy as np
import zstandard
from common import MiB, aligned_buffer, base_parser, emit_json, log, machine, table, versions, warm, workdir

from overlaybd.formats.zfile import blocks
from overlaybd.formats.zfile.reader import ZFileSource
from overlaybd.formats.zfile.spec import ALGO_BY_NAME
from overlaybd.formats.zfile.writer import write_zfile
from overlaybd.source.file import FileSource, MemorySource

READ_CHUNK = 1 * MiB
ZSTD_LEVEL = 3


def make_data(size: int, seed: int, piece: int = 1024) -> bytes:
    """Half random 1 KiB pieces, half repetitive text, shuffled."""
    rng = np.random.default_rng(seed)
    lines = [f"2026-11-28 12:00:{k % 60:02d} INFO registry: GET /v2/library/ubuntu/blobs/sha256 status=200 "
             f"n={k % 100}\n" for k in range(20000)]
    text = np.frombuffer("".join(lines).encode(), np.uint8)
    out = rng.integers(0, 256, size, dtype=np.uint8)
    n = size // piece
    is_text = rng.random(n) < 0.5
    starts = rng.integers(0, text.size - piece, n)
    for k in np.flatnonzero(is_text).tolist():
        s = int(starts[k])
        out[k * piece : (k + 1) * piece] = text[s : s + piece]
    return out.tobytes()


# -- raw codec peers -------------------------------------------------------------------------------------


def raw_compressor(algo: str) -> Callable[[memoryview], bytes]:
    if algo == "lz4":
        return lambda b: lz4.block.compress(b, store_size=False)
    zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # one per thread: a ZstdCompressor is not thread-safe
    return zc.compress


def raw_decompressor(algo: str, bs: int) -> Callable[[bytes], bytes]:
    if algo == "lz4":
        return lambda c: lz4.block.decompress(c, uncompressed_size=bs)
    zd = zstandard.ZstdDecompressor()
    return lambda c: zd.decompress(c, max_output_size=bs)


def raw_compress_part(algo: str, blocks: list[memoryview]) -> int:
    comp = raw_compressor(algo)
    n = 0
    for b in blocks:
        n += len(comp(b))
    return n


def raw_decompress_part(algo: str, bs: int, blocks: list[bytes]) -> int:
    dec = raw_decompressor(algo, bs)
    n = 0
    for c in blocks:
        n += len(dec(c))
    return n


class CodecInC:
    """The codec from C in one call per thread over its half of the blocks (CRC off, in memory)."""

    def __init__(self, algo: str, bs: int, data: bytes, threads: int) -> None:
        native = blocks.NATIVE
        assert native is not None
        self.native, self.code, self.bs = native, ALGO_BY_NAME[algo], bs
        per = -(-len(data) // bs // threads) * bs
        self.parts = [memoryview(data)[i : i + per] for i in range(0, len(data), per)]
        self.threads = threads
        self.outs, self.lengths, self.starts, self.plain = [], [], [], []
        for part in self.parts:
            n = -(-len(part) // bs)
            out = bytearray(n * native.compress_bound(self.code, bs))
            lengths = np.empty(n, dtype="<u4")
            native.compress(self.code, part, bs, False, out, lengths, 1 << 30)
            starts = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=starts[1:])
            self.outs.append(out)
            self.lengths.append(lengths)
            self.starts.append(starts)
            self.plain.append(bytearray(n * bs))

    def _compress(self, k: int) -> None:
        self.native.compress(self.code, self.parts[k], self.bs, False, self.outs[k], self.lengths[k], 1 << 30)

    def _decompress(self, k: int) -> None:
        n = self.lengths[k].size
        last = len(self.parts[k]) - (n - 1) * self.bs
        done = self.native.decompress(self.code, self.outs[k], self.starts[k], 0, n, 0, self.plain[k], self.bs,
                                      last, False)
        assert done[1] == 0, done

    def compress(self) -> None:
        run_threads(self.threads, self._compress, list(range(len(self.parts))))

    def decompress(self) -> None:
        run_threads(self.threads, self._decompress, list(range(len(self.parts))))


def split(items: list[Any], parts: int) -> list[list[Any]]:
    k = -(-len(items) // parts)
    return [items[i : i + k] for i in range(0, len(items), k)]


def run_threads(threads: int, fn: Callable[..., Any], chunks: list[Any]) -> None:
    if threads == 1:
        for c in chunks:
            fn(c)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(fn, c) for c in chunks]:
            f.result()


# -- ours ------------------------------------------------------------------------------------------------


def ours_compress(src: MemorySource, path: str, algo: str, bs: int, threads: int, crc: bool) -> float:
    """Seconds for ``write_zfile`` alone: the old output is removed and the new one opened before the clock
    starts (truncating a page-cached file costs milliseconds that are not the writer's)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        t0 = time.perf_counter()
        write_zfile(src, fd, algo=algo, block_size=bs, verify=crc, threads=threads)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def read_range(z: ZFileSource, start: int, end: int, check: bytes | None = None) -> int:
    buf = aligned_buffer(READ_CHUNK)
    view = memoryview(buf)
    bad = 0
    pos = start
    while pos < end:
        n = min(READ_CHUNK, end - pos)
        v = view[:n]
        z.readinto(pos, v)
        if check is not None and v != memoryview(check)[pos : pos + n]:
            bad += 1
        pos += n
    v = view = None  # type: ignore[assignment]
    buf.close()
    return bad


def ours_decompress(z: ZFileSource, threads: int) -> None:
    if threads == 1:
        read_range(z, 0, z.size)
        return
    half = -(-z.size // threads // READ_CHUNK) * READ_CHUNK
    ts = [threading.Thread(target=read_range, args=(z, i * half, min(z.size, (i + 1) * half)))
          for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def timeit(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile(data: bytes, work: str, algo: str, bs: int, crc: bool, top: int = 15) -> None:
    """cProfile of ours (1 thread), compress then decompress, by own time. cProfile inflates per-call costs of
    small calls; read it for the split, the table for the speed."""
    import cProfile
    import pstats

    src = MemorySource(data)
    path = os.path.join(work, "profile.zfile")
    ours_compress(src, path, algo, bs, 1, crc)  # warm-up
    for what, fn in (("compress", partial(ours_compress, src, path, algo, bs, 1, crc)), ("decompress", None)):
        with FileSource(path) as f:
            z = ZFileSource(f)
            run: Callable[[], object] = fn or partial(ours_decompress, z, 1)
            warm([path])
            prof = cProfile.Profile()
            prof.enable()
            run()
            prof.disable()
        print(f"\n== cProfile: ours {what}, {algo}, {bs // 1024} KiB blocks, 1 thread, {len(data) >> 20} MiB ==")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def write_cost(data: bytes, work: str, algos: list[str], block_sizes: list[int], thread_counts: list[int],
               repeats: int, crc: bool) -> None:
    """What writing the ZFile costs: ours into a new page-cached file, ours into /dev/null (the same work but
    the copy into the page cache), and the codec in C, interleaved, best of ``repeats``."""
    src = MemorySource(data)
    path = os.path.join(work, "cost.zfile")
    rows = []
    for algo in algos:
        for bs in block_sizes:
            for threads in thread_counts:
                in_c = CodecInC(algo, bs, data, threads) if blocks.NATIVE is not None else None
                best: dict[str, float] = {}
                for _ in range(repeats):
                    t = {"file": ours_compress(src, path, algo, bs, threads, crc)}
                    fd = os.open(os.devnull, os.O_WRONLY)
                    try:
                        t["null"] = timeit(partial(write_zfile, src, fd, algo=algo, block_size=bs, verify=crc,
                                                   threads=threads))
                    finally:
                        os.close(fd)
                    if in_c is not None:
                        t["c"] = timeit(in_c.compress)
                    for k, v in t.items():
                        best[k] = min(best.get(k, float("inf")), v)
                mbps = {k: len(data) / v / 1e6 for k, v in best.items()}
                rows.append([algo, f"{bs // 1024} KiB", threads, mbps["file"], mbps["null"], mbps.get("c", "n/a"),
                             mbps["file"] / mbps["c"] if "c" in mbps else "n/a",
                             mbps["null"] / mbps["c"] if "c" in mbps else "n/a"])
    print(table(["algo", "block", "threads", "ours -> file MB/s", "ours -> /dev/null MB/s", "codec in C MB/s",
                 "file/C", "/dev/null/C"], rows,
                title=f"What writing costs: ZFile compress of {len(data) >> 20} MiB, best of {repeats}"))


# -- main ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--size-mib", type=int, help="data size (default 128; --quick 16)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats, best reported (default 3; --quick 2)")
    ap.add_argument("--algos", default="lz4,zstd")
    ap.add_argument("--block-sizes", default="4096,65536")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--profile", metavar="ALGO:BS", help="instead of the table: cProfile ours for one setting, "
                    "e.g. lz4:4096")
    ap.add_argument("--no-crc", action="store_true", help="write ZFiles without per-block CRCs")
    ap.add_argument("--write-cost", action="store_true", help="instead of the table: ours into a file, ours into "
                    "/dev/null and the codec in C, to show what the page-cache writes cost")
    ap.add_argument("--python-blocks", action="store_true", help="ours on the pure-Python block path (as "
                    "OVERLAYBD_NATIVE=0), e.g. to compare it with the C one")
    args = ap.parse_args()
    if args.python_blocks:
        blocks.ACTIVE = blocks.PYTHON
    log(f"ZFile blocks: {blocks.describe()}")
    size_mib = args.size_mib or (16 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 3)
    algos = args.algos.split(",")
    block_sizes = [int(x) for x in args.block_sizes.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]
    crc = not args.no_crc
    size = size_mib * MiB
    t_start = time.perf_counter()
    data = make_data(size, args.seed)
    src = MemorySource(data)
    mv = memoryview(data)
    results: list[dict[str, Any]] = []
    bad_total = 0
    with workdir(args.workdir, args.keep, "bench-zfile-") as work:
        if args.profile:
            p_algo, p_bs = args.profile.split(":")
            profile(data, work, p_algo, int(p_bs), crc)
            return 0
        if args.write_cost:
            write_cost(data, work, algos, block_sizes, thread_counts, repeats, crc)
            return 0
        for algo in algos:
            for bs in block_sizes:
                block_views = [mv[i : i + bs] for i in range(0, size, bs)]
                comp_c = raw_compressor(algo)
                comp_blocks = [comp_c(b) for b in block_views]
                raw_ratio = sum(map(len, comp_blocks)) / size
                path = os.path.join(work, f"data.{algo}.{bs}.zfile")
                ours_compress(src, path, algo, bs, 1, crc)
                zlen = os.path.getsize(path)
                with FileSource(path) as f:
                    z = ZFileSource(f)
                    bad = read_range(z, 0, z.size, check=data)
                bad_total += bad
                for threads in thread_counts:
                    best: dict[str, float] = {}
                    bchunks = split(block_views, threads)
                    cchunks = split(comp_blocks, threads)
                    in_c = CodecInC(algo, bs, data, threads) if blocks.NATIVE is not None else None
                    for _ in range(repeats):
                        t = {
                            "ours_c": ours_compress(src, path, algo, bs, threads, crc),
                            "raw_c": timeit(partial(run_threads, threads, partial(raw_compress_part, algo), bchunks)),
                        }
                        with FileSource(path) as f:
                            z = ZFileSource(f)
                            warm([path])
                            t["ours_d"] = timeit(partial(ours_decompress, z, threads))
                        t["raw_d"] = timeit(partial(run_threads, threads, partial(raw_decompress_part, algo, bs),
                                                    cchunks))
                        if in_c is not None:
                            t["c_c"] = timeit(in_c.compress)
                            t["c_d"] = timeit(in_c.decompress)
                        for k, v in t.items():
                            best[k] = min(best.get(k, float("inf")), v)
                    row = {"algo": algo, "block_size": bs, "threads": threads,
                           **{f"{k}_MBps": size / v / 1e6 for k, v in best.items()},
                           "zfile_ratio": zlen / size, "raw_ratio": raw_ratio, "bad_chunks": bad}
                    row["compress_ratio"] = row["ours_c_MBps"] / row["raw_c_MBps"]
                    row["decompress_ratio"] = row["ours_d_MBps"] / row["raw_d_MBps"]
                    if in_c is not None:
                        row["compress_vs_c"] = row["ours_c_MBps"] / row["c_c_MBps"]
                        row["decompress_vs_c"] = row["ours_d_MBps"] / row["c_d_MBps"]
                    results.append(row)
                    log(f"{algo} {bs // 1024} KiB x{threads}: compress ours {row['ours_c_MBps']:.0f} raw "
                        f"{row['raw_c_MBps']:.0f} MB/s ({row['compress_ratio']:.2f}); decompress ours "
                        f"{row['ours_d_MBps']:.0f} raw {row['raw_d_MBps']:.0f} MB/s ({row['decompress_ratio']:.2f})")
                os.unlink(path)
    headers = ["algo", "block", "threads", "ours compress MB/s", "raw compress MB/s", "ours/raw",
               "codec in C MB/s", "ours/C", "ours decompress MB/s", "raw decompress MB/s", "ours/raw",
               "codec in C MB/s", "ours/C", "ZFile size ratio"]
    rows = [[r["algo"], f"{r['block_size'] // 1024} KiB", r["threads"], r["ours_c_MBps"], r["raw_c_MBps"],
             r["compress_ratio"], r.get("c_c_MBps", "n/a"), r.get("compress_vs_c", "n/a"), r["ours_d_MBps"],
             r["raw_d_MBps"], r["decompress_ratio"], r.get("c_d_MBps", "n/a"), r.get("decompress_vs_c", "n/a"),
             r["zfile_ratio"]]
            for r in results]
    print(table(headers, rows, title=f"ZFile throughput, {size_mib} MiB of mixed data, best of {repeats}, "
                                     f"CRC {'on' if crc else 'off'}"))
    checks = [(r, what, r[f"{what}_ratio"]) for r in results for what in ("compress", "decompress")]
    missed = [(r, what, x) for r, what, x in checks if x < 0.85]
    print(f"\ntarget ours/raw >= 0.85 (same threads): met in {len(checks) - len(missed)} of {len(checks)} comparisons")
    for r, what, x in missed:
        print(f"  missed: {what} {r['algo']} {r['block_size'] // 1024} KiB x{r['threads']}: {x:.2f}")
    print(f"correctness: {bad_total} decompressed 1 MiB chunks differ from the original")
    print(f"total {time.perf_counter() - t_start:.0f} s\n")
    emit_json({"benchmark": "zfile", "quick": args.quick, "size_mib": size_mib, "repeats": repeats, "crc": crc,
               "seed": args.seed, "results": results, "targets_missed": len(missed), "bad_chunks": bad_total,
               "blocks": blocks.describe(), "versions": versions(), "machine": machine()}, args.json)
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
