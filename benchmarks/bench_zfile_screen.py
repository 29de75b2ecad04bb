"""What deciding the block size before writing costs: the screen of every 64 KiB block against the ZFile write it
protects, in the same run (issue 11: "a block that does not compress never costs a rewrite of the whole file").

Data: a tar of /usr cut to SIZE bytes (as bench_zfile_peers.py builds it, or --data), and "fits": the same tar's
64 KiB blocks that fit compressed by both codecs, one after another to SIZE bytes, so that the screen must look
at every block and find none (its worst case: it reads and looks at everything, and compresses exactly every
block the cheap look does not clear).

For each codec at 64 KiB blocks (CRC on, 2 threads), rounds interleaved, median and range:

* screen: ``writer._oversized_block`` alone (the decision);
* write: ``writer._write`` alone (one pass, the block size given: no screen);
* ours: ``write_zfile`` (screen, then write), and ours / write: what the guarantee costs;
* on the tar, which holds blocks that do not fit: ``write_zfile`` (decides 32 KiB first, writes once) against the
  net alone (the screen switched off: the writer meets the block, then writes the whole file again with 32 KiB
  blocks, as before the screen existed), net / ours: what the screen saves.

Checks: the screen finds nothing on "fits" and something on the tar, ``write_zfile`` writes the tar once with
32 KiB blocks and the net twice, and every file decompresses to its input.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_zfile_peers import make_data
from common import MiB, base_parser, emit_json, log, machine, table, versions, workdir

from overlaybd.formats.zfile import blocks, writer
from overlaybd.formats.zfile.reader import ZFileSource
from overlaybd.formats.zfile.spec import ALGO_BY_NAME, MAX_STORED_BLOCK
from overlaybd.source.file import FileSource

BLOCK = 64 * 1024
THREADS = 2


def make_fits(tar: Path, out: Path, size: int) -> None:
    """The tar's 64 KiB blocks that fit compressed by both codecs, repeated in order up to ``size`` bytes."""
    runs = blocks.ACTIVE
    scratch = bytearray(2 * BLOCK)
    lengths = np.empty(1, dtype="<u4")
    kept: list[bytes] = []
    with open(tar, "rb") as f:
        while block := f.read(BLOCK):
            if len(block) == BLOCK and all(
                    runs.compress(ALGO_BY_NAME[a], block, BLOCK, True, scratch, lengths, MAX_STORED_BLOCK)[2]
                    == blocks.OK for a in ("lz4", "zstd")):
                kept.append(block)
    with open(out, "wb") as f:
        for i in range(size // BLOCK):
            f.write(kept[i % len(kept)])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def write_into(path: Path, fn: Callable[[int], Any]) -> tuple[float, Any]:
    """Seconds for ``fn(fd)`` on a fresh file at ``path`` (opened before the clock starts)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return timed(lambda: fn(fd))
    finally:
        os.close(fd)


def same_content(zfile: Path, plain: Path) -> bool:
    with FileSource(str(zfile)) as f, open(plain, "rb") as p:
        z = ZFileSource(f)
        step = 16 * MiB
        return all(z.pread(off, min(step, z.size - off)) == p.read(step) for off in range(0, z.size, step))


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": float(np.median(xs)), "min": min(xs), "max": max(xs)}


def run_codec(algo: str, tar: Path, fits: Path, work: Path, rounds: int) -> dict[str, Any]:
    code = ALGO_BY_NAME[algo]
    out = work / f"out.{algo}"
    t: dict[str, list[float]] = {k: [] for k in ("screen", "write", "ours", "tar_screen", "tar_ours", "tar_net")}
    checks: dict[str, bool] = {}
    with FileSource(str(fits)) as f_src, FileSource(str(tar)) as t_src:
        for r in range(rounds):
            log(f"{algo} round {r + 1}/{rounds}: load {os.getloadavg()[0]:.2f}")
            s, found = timed(lambda: writer._oversized_block(f_src, code, BLOCK, True, THREADS))
            t["screen"].append(s)
            checks["fits: screen finds nothing"] = found is None
            t["write"].append(write_into(out, lambda fd: writer._write(f_src, fd, 0, code, BLOCK, True, THREADS,
                                                                        False, None, "fits"))[0])
            s, res = write_into(out, lambda fd: writer.write_zfile(f_src, fd, algo=code, block_size=BLOCK,
                                                                   threads=THREADS))
            t["ours"].append(s)
            checks["fits: written once with 64 KiB blocks"] = (res.block_size, res.passes) == (BLOCK, 1)
            if r == 0:
                checks["fits: round trip"] = same_content(out, fits)
            s, found = timed(lambda: writer._oversized_block(t_src, code, BLOCK, True, THREADS))
            t["tar_screen"].append(s)
            checks["tar: screen finds a block"] = found is not None
            s, res = write_into(out, lambda fd: writer.write_zfile(t_src, fd, algo=code, block_size=BLOCK,
                                                                   threads=THREADS))
            t["tar_ours"].append(s)
            checks["tar: written once with 32 KiB blocks"] = (res.block_size, res.passes) == (BLOCK // 2, 1)
            screen = writer._oversized_block
            writer._oversized_block = lambda *_: None  # the net alone
            try:
                s, res = write_into(out, lambda fd: writer.write_zfile(t_src, fd, algo=code, block_size=BLOCK,
                                                                       threads=THREADS))
            finally:
                writer._oversized_block = screen
            t["tar_net"].append(s)
            checks["tar: the net writes twice"] = res.passes == 2
            if r == 0:
                checks["tar: round trip"] = same_content(out, tar)
    out.unlink(missing_ok=True)
    med = {k: float(np.median(v)) for k, v in t.items()}
    return {"algo": algo, "times": {k: stats(v) for k, v in t.items()}, "checks": checks,
            "ours_over_write": med["ours"] / med["write"], "screen_over_write": med["screen"] / med["write"],
            "net_over_ours": med["tar_net"] / med["tar_ours"]}


def rng(v: dict[str, float]) -> str:
    return f"{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})"


def main() -> int:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", help="the tar to use (default: a tar of /usr built in the work folder)")
    args = ap.parse_args()
    size = (64 if args.quick else args.size_mib) * MiB
    rounds = 2 if args.quick else args.rounds
    with workdir(args.workdir, args.keep, "zfile-screen-") as wd:
        work = Path(wd)
        tar = Path(args.data) if args.data else work / "usr.tar"
        if not args.data:
            make_data(tar, size)
        fits = work / "fits"
        make_fits(tar, fits, os.path.getsize(tar))
        tar.read_bytes(), fits.read_bytes()  # into the page cache
        load = os.getloadavg()[0]
        cases = [run_codec(a, tar, fits, work, rounds) for a in ("zstd", "lz4")]
        rows = []
        for c in cases:
            tt = c["times"]
            rows.append([c["algo"], rng(tt["screen"]), rng(tt["write"]), rng(tt["ours"]), f"{c['ours_over_write']:.3f}",
                         rng(tt["tar_screen"]), rng(tt["tar_ours"]), rng(tt["tar_net"]), f"{c['net_over_ours']:.2f}"])
        print(table(["64 KiB blocks", "fits: screen s", "write s", "ours s", "ours / write", "tar: screen s",
                     "tar: ours s", "tar: net s", "net / ours"], rows,
                    title=f"{os.path.getsize(tar) / MiB:.0f} MiB, {THREADS} threads; load {load:.2f} -> "
                          f"{os.getloadavg()[0]:.2f}"))
        ok = all(v for c in cases for v in c["checks"].values())
        print()
        print("checks:", {c["algo"]: c["checks"] for c in cases})
        emit_json({"machine": machine(), "versions": versions(), "block_path": blocks.describe(), "cases": cases,
                   "load_before": load, "load_after": os.getloadavg()[0]}, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
