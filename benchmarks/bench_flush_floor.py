"""What the flush pattern of ``fio --rw=randwrite --bs=4k --fsync=64`` costs in bare system calls, one thread, with
nothing of ours in between: the floor a block device's writes at that pattern stand on.

* raw (the plain loop device's file): 64 ``pwrite`` of 4 KiB at random places in a preallocated 1 GiB file, then
  one ``fdatasync``;
* log-structured (a writable LSMT layer): 64 appends of 4 KiB to a data file and of 16 bytes to an index file, then
  ``fdatasync`` of the data file and then of the index file (the order that keeps a durable record from pointing
  at data that is not durable).

Rounds interleaved; writes per second, median and range, and the ratio log-structured / raw per round. A ratio
above 1 says the format's own flush pattern is not what keeps a writable volume behind a raw file.

    .venv/bin/python benchmarks/bench_flush_floor.py [--rounds N] [--cycles N] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import random
import time

from common import emit_json, log, median, table, workdir

SIZE = 1 << 30
BLOCK = 4096
RECORD = 16
BATCH = 64  # writes between two flushes


def raw_pattern(folder: str, cycles: int, rng: random.Random) -> float:
    path = os.path.join(folder, "raw")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, SIZE)
        os.fsync(fd)
        buf = os.urandom(BLOCK)
        t0 = time.perf_counter()
        for _ in range(cycles):
            for _ in range(BATCH):
                os.pwrite(fd, buf, rng.randrange(SIZE // BLOCK) * BLOCK)
            os.fdatasync(fd)
        return cycles * BATCH / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)


def log_pattern(folder: str, cycles: int) -> float:
    paths = [os.path.join(folder, "data"), os.path.join(folder, "index")]
    data, index = (os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) for p in paths)
    try:
        buf, rec = os.urandom(BLOCK), os.urandom(RECORD)
        data_end = index_end = 0
        t0 = time.perf_counter()
        for _ in range(cycles):
            for _ in range(BATCH):
                os.pwrite(data, buf, data_end)
                os.pwrite(index, rec, index_end)
                data_end += BLOCK
                index_end += RECORD
            os.fdatasync(data)
            os.fdatasync(index)
        return cycles * BATCH / (time.perf_counter() - t0)
    finally:
        for fd, p in ((data, paths[0]), (index, paths[1])):
            os.close(fd)
            os.unlink(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=300, help="flushes per measurement (64 writes each)")
    ap.add_argument("--workdir", help="where the files go (default: $BENCH_TMPDIR or the temp folder)")
    ap.add_argument("--json", help="also write the result line here")
    args = ap.parse_args()
    rng = random.Random(20261203)
    raw: list[float] = []
    lsmt: list[float] = []
    load = os.getloadavg()
    with workdir(args.workdir, False, "bench-flush-") as wd:
        for n in range(args.rounds):
            raw.append(raw_pattern(wd, args.cycles, rng))
            lsmt.append(log_pattern(wd, args.cycles))
            log(f"round {n + 1}/{args.rounds} done")
    ratios = [b / a for a, b in zip(raw, lsmt, strict=True)]
    print(table(["pattern (64 writes of 4 KiB, then a flush)", "writes/s, median", "range"], [
        ["raw: random pwrite in a preallocated file, fdatasync", median(raw), f"{min(raw):,.0f}-{max(raw):,.0f}"],
        ["log-structured: append data + 16 B record, fdatasync data then index", median(lsmt),
         f"{min(lsmt):,.0f}-{max(lsmt):,.0f}"],
        ["log-structured / raw", median(ratios), f"{min(ratios):.2f}-{max(ratios):.2f}"],
    ]))
    print(f"load average before {load}, after {os.getloadavg()}")
    emit_json({"benchmark": "bench_flush_floor", "rounds": args.rounds, "cycles": args.cycles, "raw": raw,
               "log_structured": lsmt, "ratios": ratios, "load_before": load, "load_after": os.getloadavg()},
              args.json)


if __name__ == "__main__":
    main()
