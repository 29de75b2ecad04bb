"""A volume that has been written to for a long time, served read-write: ``overlaybd serve`` on a volume whose
writable upper holds about a million records, beside ``qemu-nbd`` on the same bytes as a qcow2 image and as a raw
file, with the same clients, in the same run.

Data: a volume (1 GiB; quick 64 MiB) with a 1 MiB snapshot below, then N random 512-byte writes into its upper
(1,000,000; quick 20,000), each its own record (a VM disk after months of small writes). Peers: ``overlaybd export``
of it as a raw file, and that raw file converted to qcow2 (``qemu-img convert -O qcow2``); every export is checked to
read the same (SHA-256 of ``nbdcopy --no-extents URI -``) before the measurements.

Measured, interleaved in rounds (3; quick 1), page cache re-warmed before each:
1. Start: from ``overlaybd serve`` (or ``qemu-nbd``) started to its socket answering (ours replays the upper's
   index of N records when the volume opens).
2. ``fio --ioengine=nbd --rw=randrw --rwmixread=50 --bs=4k --iodepth=1|16`` for 8 s (quick 2): reads and writes a
   second, each server's CPU time per request. The writes go into each image (they stay, for the rounds after).

``--baseline-cmd CMD`` adds another build of ours (the same volume copied), measured beside it.

    .venv/bin/python benchmarks/bench_nbd_upper.py [--quick] [--workdir DIR] [--repeats N] [--records N]
        [--baseline-cmd CMD] [--json FILE]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from common import emit_json, log, median, table, warm, workdir
from nbd_common import (
    OVERLAYBD,
    SERVER_PIDS,
    MiB,
    base_parser,
    cpu_seconds,
    fio,
    need,
    overlaybd_server,
    qemu_nbd,
    run,
    versions,
)


def build(vol: str, size: int, records: int, seed: int) -> float:
    """The volume: 1 MiB of data in a snapshot, then ``records`` random 512-byte writes into the upper. Seconds."""
    from overlaybd.volume import Volume

    t0 = time.perf_counter()
    run([*OVERLAYBD, "create", vol, "--size", str(size)])
    v = Volume(vol)
    with v.open(writable=True) as dev:
        dev.pwrite(0, random.Random(seed).randbytes(MiB))
    v.snapshot("base")
    rng = random.Random(seed + 1)
    sectors = size // 512
    with v.open(writable=True) as dev:
        for _ in range(records):
            dev.pwrite(rng.randrange(sectors) * 512, rng.randbytes(512))
        dev.flush()
    return time.perf_counter() - t0


def digest(uri: str) -> str:
    out = subprocess.run(["nbdcopy", "--no-extents", uri, "-"], capture_output=True, check=True, timeout=1800).stdout
    return hashlib.sha256(out).hexdigest()


@contextlib.contextmanager
def timed_start(ctx: contextlib.AbstractContextManager[str], starts: list[float]) -> Any:
    t0 = time.perf_counter()
    with ctx as uri:
        starts.append(time.perf_counter() - t0)
        yield uri


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--records", type=int, help="random 512-byte writes in the upper (1000000; quick 20000)")
    ap.add_argument("--baseline-cmd", help="command that stands for 'overlaybd' in a second server of ours")
    args = ap.parse_args()
    need("qemu-nbd", "qemu-img", "nbdcopy", "fio")
    size = (64 if args.quick else 1024) * MiB
    records = args.records or (20_000 if args.quick else 1_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    runtime = 2 if args.quick else 8
    baseline = shlex.split(args.baseline_cmd) if args.baseline_cmd else None
    info = versions()
    log(f"bench_nbd_upper: {info}")
    result: dict[str, Any] = {"benchmark": "bench_nbd_upper", "quick": args.quick, "records": records,
                              "size": size, "repeats": repeats, "versions": info}
    with workdir(args.workdir, args.keep, "bench-nbd-upper-") as wd:
        vol, raw, qcow = os.path.join(wd, "vol"), os.path.join(wd, "disk.raw"), os.path.join(wd, "disk.qcow2")
        log(f"building: {records:,} records in {build(vol, size, records, args.seed):.1f} s")
        run([*OVERLAYBD, "export", vol, raw])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow])
        names = ["ours", "qemu-nbd qcow2", "qemu-nbd raw"]
        files = {"ours": vol, "qemu-nbd qcow2": qcow, "qemu-nbd raw": raw}
        commands: dict[str, list[str] | None] = {"ours": None}
        if baseline:
            shutil.copytree(vol, os.path.join(wd, "vol-base"), ignore=shutil.ignore_patterns("*.sock"))
            names.insert(1, "base")
            files["base"] = os.path.join(wd, "vol-base")
            commands["base"] = baseline
        starts: dict[str, list[float]] = {n: [] for n in names}
        res: dict[int, dict[str, list[dict[str, float]]]] = {d: {n: [] for n in names} for d in (1, 16)}
        for rep in range(repeats):
            for n in names if rep % 2 == 0 else names[::-1]:
                warm([files[n]])
                sock = os.path.join(wd, f"{n.replace(' ', '-')}.sock")
                server = overlaybd_server(files[n], sock, readonly=False, command=commands[n]) if n in commands \
                    else qemu_nbd(files[n], "qcow2" if n.endswith("qcow2") else "raw", sock, readonly=False)
                with timed_start(server, starts[n]) as uri:
                    if rep == 0:
                        result.setdefault("sha256", {})[n] = digest(uri)
                    for d in (1, 16):
                        pid = SERVER_PIDS[uri]
                        c0 = cpu_seconds(pid)
                        got = fio(["--name=upper", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw",
                                   "--rwmixread=50", "--bs=4k", f"--iodepth={d}", f"--runtime={runtime}",
                                   "--time_based", f"--size={size}", f"--randseed={args.seed + rep}"])
                        ops = (got["read_iops"] + got["write_iops"]) * runtime
                        got["cpu_us"] = (cpu_seconds(pid) - c0) / max(ops, 1) * 1e6
                        res[d][n].append(got)
            log(f"round {rep + 1}/{repeats} done")
        if len(set(result["sha256"].values())) != 1:
            raise SystemExit(f"MISMATCH: the exports do not read the same: {result['sha256']}")
    rows = [[n, median(starts[n]), *(median([r["read_iops"] for r in res[d][n]]) for d in (1, 16)),
             *(median([r["write_iops"] for r in res[d][n]]) for d in (1, 16)),
             *(median([r["cpu_us"] for r in res[d][n]]) for d in (1, 16))] for n in names]
    print(table(["server", "start, s", "reads/s QD1", "reads/s QD16", "writes/s QD1", "writes/s QD16",
                 "CPU µs/request QD1", "CPU µs/request QD16"], rows,
                title=f"fio randrw 50/50 4 KiB on a volume whose upper holds {records:,} records "
                      f"({size // MiB} MiB; median of {repeats})"))
    print()
    ratios = []
    for peer in names[1:]:
        for d in (1, 16):
            ours = [r["read_iops"] + r["write_iops"] for r in res[d]["ours"]]
            theirs = [r["read_iops"] + r["write_iops"] for r in res[d][peer]]
            ratios.append([f"ours / {peer}", f"QD{d}", median(ours) / median(theirs),
                           [round(a / b, 2) for a, b in zip(ours, theirs, strict=True)]])
    print(table(["", "depth", "requests/s, median", "per round"], ratios, title="Ratios (requests a second)"))
    result["start_s"] = starts
    result["fio"] = {f"qd{d}": res[d] for d in (1, 16)}
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
