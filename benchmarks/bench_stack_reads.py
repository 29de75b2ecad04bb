"""Random 4 KiB reads through an N-layer stack (N = 1, 16, 64, 255) beside ``qemu-img bench`` on a qcow2 backing
chain of the same depth and content, measured in the same run.

Data: a disk of SIZE bytes whose 4 KiB blocks are a random permutation split into N shares;
layer i writes share i, every byte of it ``i+1``. Each block of the top view lives in exactly one layer.

* ours: each layer is built with ``overlaybd.create`` + ``open_layer(writable=True)`` + ``pwrite`` per block +
  ``overlaybd.commit`` (``--build direct`` writes committed files with ``write_compacted`` instead), then the
  stack is opened with ``overlaybd.open_stack``. Timed: ``stack.pread(offset, 4096)`` at random 4 KiB-aligned
  offsets (fixed seed), one thread, page cache warm. A separate sample of reads is checked against the pattern.
* qemu: ``qemu-img create -f qcow2 -o cluster_size=4096 [-b prev -F qcow2]`` then ``qemu-io -t unsafe`` with one
  ``write -q -P <byte> <off> 4k`` per block; measured with ``qemu-img bench -U -f qcow2 -t writeback -c COUNT -d 1
  -s 4096 -S $((4096*104729))`` (QD1, host page cache; the prime stride spreads the reads). A sample of blocks is
  checked with ``qemu-io -r`` ``read -P``.

Repeats are interleaved (ours, qemu, ours, qemu, ...) and the median is reported; the page cache is re-warmed
just before every measurement.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
from common import (
    MiB,
    base_parser,
    emit_json,
    fresh_dir,
    log,
    machine,
    median,
    shares,
    table,
    versions,
    warm,
    workdir,
    write_committed_layer,
)

import overlaybd

BLOCK = 4096
STRIDE_BLOCKS = 104729  # qemu-img bench -S $((4096*104729))


# -- data ------------------------------------------------------------------------------------------------




# -- ours ------------------------------------------------------------------------------------------------


def build_ours_api(folder: str, parts: list[np.ndarray], size: int) -> list[str]:
    paths = []
    for i, part in enumerate(parts):
        data, index, out = (os.path.join(folder, f"L{i:03d}.{ext}") for ext in ("data", "index", "lsmt"))
        overlaybd.create(data, index, size)
        block = bytes([i + 1]) * BLOCK
        with overlaybd.open_layer(data, index, writable=True) as rw:
            for b in part.tolist():
                rw.pwrite(b * BLOCK, block)
            rw.flush()
            overlaybd.commit(rw, out, message=f"bench layer {i}")
        os.unlink(data)
        os.unlink(index)
        paths.append(out)
    return paths


def build_ours_direct(folder: str, parts: list[np.ndarray], size: int) -> list[str]:
    paths = []
    for i, part in enumerate(parts):
        out = os.path.join(folder, f"L{i:03d}.lsmt")
        blocks = np.sort(part).astype(np.int64)
        write_committed_layer(out, blocks * (BLOCK // 512), np.full(blocks.size, BLOCK // 512),
                              np.zeros(blocks.size, bool), bytes([i + 1]), size)
        paths.append(out)
    return paths


def measure_paired(stack: Any, base: Any, offsets: list[int], bursts: int) -> dict[str, Any]:
    """Read ``offsets`` through ``stack`` and through the 1-layer ``base`` in alternating bursts (ABBA order), so
    that both see the same machine load. Per burst both wall time and this thread's CPU time are taken: on a
    shared machine the CPU-time ratio is not disturbed by the thread being descheduled."""
    k = -(-len(offsets) // bursts)
    chunks = [offsets[i : i + k] for i in range(0, len(offsets), k)]
    wall = {id(stack): 0.0, id(base): 0.0}
    cpu = {id(stack): 0.0, id(base): 0.0}
    wall_ratios: list[float] = []
    cpu_ratios: list[float] = []
    for i, chunk in enumerate(chunks):
        pair = (base, stack) if i % 2 == 0 else (stack, base)
        w: dict[int, float] = {}
        c: dict[int, float] = {}
        for s in pair:
            pread = s.pread
            c0 = time.thread_time()
            t0 = time.perf_counter()
            for off in chunk:
                pread(off, BLOCK)
            w[id(s)] = time.perf_counter() - t0
            c[id(s)] = time.thread_time() - c0
        for key in w:
            wall[key] += w[key]
            cpu[key] += c[key]
        wall_ratios.append(w[id(base)] / w[id(stack)])
        if c[id(stack)] > 0:
            cpu_ratios.append(c[id(base)] / c[id(stack)])
    n = sum(map(len, chunks))
    return {"stack": n / wall[id(stack)], "base": n / wall[id(base)], "stack_cpu": n / cpu[id(stack)],
            "base_cpu": n / cpu[id(base)], "wall_ratios": wall_ratios, "cpu_ratios": cpu_ratios}


def verify_ours(stack: Any, owner: np.ndarray, blocks: np.ndarray) -> int:
    """Number of sampled reads that do not hold the expected pattern."""
    bad = 0
    for b in blocks.tolist():
        if stack.pread(b * BLOCK, BLOCK) != bytes([int(owner[b]) + 1]) * BLOCK:
            bad += 1
    return bad


# -- qemu ------------------------------------------------------------------------------------------------


def build_qemu(folder: str, parts: list[np.ndarray], size: int, method: str = "backing") -> list[str]:
    """One qcow2 image per layer (4 KiB clusters), each backed by the one below.

    ``backing``: ``qemu-img create -b prev`` then ``qemu-io`` on the new top (each qemu-io opens
    the whole chain below, so building N layers costs O(N^2) opens). ``rebase``: write each image on its own,
    then attach the one below with ``qemu-img rebase -u``. Every write is a whole cluster, so no data is copied
    up from a backing file and both give the same images and reads.
    """
    paths: list[str] = []
    for i, part in enumerate(parts):
        path = os.path.join(folder, f"L{i:03d}.qcow2")
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"]
        if paths and method == "backing":
            cmd += ["-b", os.path.basename(paths[-1]), "-F", "qcow2"]
        subprocess.run(cmd + [path, str(size)], check=True, cwd=folder)
        script = "".join(f"write -q -P {i + 1} {b * BLOCK} 4k\n" for b in part.tolist()) + "quit\n"
        r = subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", path], input=script, text=True,
                           capture_output=True, cwd=folder)
        noise = (r.stdout + r.stderr).replace("qemu-io>", "").strip()
        if r.returncode or noise:
            raise RuntimeError(f"qemu-io failed on {path}: {noise[:500]}")
        if paths and method == "rebase":
            subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", os.path.basename(paths[-1]), "-F",
                            "qcow2", path], check=True, cwd=folder)
        paths.append(path)
    return paths


def verify_qemu(top: str, owner: np.ndarray, blocks: np.ndarray) -> int:
    script = "".join(f"read -q -P {int(owner[b]) + 1} {b * BLOCK} 4k\n" for b in blocks.tolist()) + "quit\n"
    r = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", top], input=script, text=True, capture_output=True)
    text = r.stdout + r.stderr
    return text.count("Pattern verification failed") + (1 if r.returncode else 0)


_RUN = re.compile(r"Run completed in ([0-9.]+) seconds")


def measure_qemu(top: str, count: int) -> float:
    cmd = ["qemu-img", "bench", "-U", "-f", "qcow2", "-t", "writeback", "-c", str(count), "-d", "1", "-s",
           str(BLOCK), "-S", str(BLOCK * STRIDE_BLOCKS), top]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = _RUN.search(r.stdout)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {r.stdout!r}")
    return count / float(m.group(1))


def qemu_open_seconds(top: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c", "quit", top], check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


# -- main ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--size-mib", type=int, help="disk size (default 256; --quick 32)")
    ap.add_argument("--depths", default="1,16,64,255", help="stack depths (default 1,16,64,255)")
    ap.add_argument("--qemu-depths", help="depths at which to build qcow2 chains (default: all)")
    ap.add_argument("--qemu-build", choices=("backing", "rebase"),
                    help="how to build qcow2 chains (default backing; --quick rebase, which is O(N) in opens)")
    ap.add_argument("--no-qemu", action="store_true", help="skip qemu (ours only)")
    ap.add_argument("--reads", type=int, help="timed reads per measurement (default 100000; --quick 20000)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats, median reported (default 3; --quick 1)")
    ap.add_argument("--bursts", type=int, default=20, help="bursts per run, alternating with the 1-layer stack")
    ap.add_argument("--verify", type=int, default=2000, help="sampled reads checked against the pattern")
    ap.add_argument("--build", choices=("api", "direct"), default="api",
                    help="api: create+pwrite+commit per layer (default); direct: write_compacted from numpy")
    args = ap.parse_args()
    size_mib = args.size_mib or (32 if args.quick else 256)
    reads = args.reads or (20000 if args.quick else 100000)
    repeats = args.repeats or (1 if args.quick else 3)
    depths = [int(x) for x in args.depths.split(",")]
    qemu_depths = [] if args.no_qemu else (
        [int(x) for x in args.qemu_depths.split(",")] if args.qemu_depths else list(depths))
    qemu_build = args.qemu_build or ("rebase" if args.quick else "backing")
    size = size_mib * MiB
    nblocks = size // BLOCK

    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    build = build_ours_api if args.build == "api" else build_ours_direct
    with workdir(args.workdir, args.keep, "bench-stack-") as work:
        # the 1-layer baseline stays open: every depth is measured in bursts alternating with it
        base_parts, base_owner = shares(nblocks, 1, args.seed)
        base_paths = build(fresh_dir(work, "base1"), base_parts, size)
        base = overlaybd.open_stack(base_paths)
        for depth in depths:
            parts, owner = shares(nblocks, depth, args.seed)
            rng = np.random.default_rng([args.seed, depth, 1])
            offsets = (rng.integers(0, nblocks, reads, dtype=np.int64) * BLOCK).tolist()
            sample = rng.integers(0, nblocks, args.verify, dtype=np.int64)
            row: dict[str, Any] = {"depth": depth}

            folder = fresh_dir(work, f"ours{depth}")
            t0 = time.perf_counter()
            layer_paths = build(folder, parts, size)
            row["ours_build_s"] = time.perf_counter() - t0
            log(f"depth {depth}: built {depth} LSMT layers ({args.build}) in {row['ours_build_s']:.1f} s")
            warm(layer_paths)
            t0 = time.perf_counter()
            stack = overlaybd.open_stack(layer_paths)
            row["ours_open_ms"] = (time.perf_counter() - t0) * 1e3
            row["merged_records"] = len(stack.lower_index)
            row["ours_bad_reads"] = verify_ours(stack, owner, sample)
            row["ours_verified"] = int(sample.size)

            top = None
            chain: list[str] = []
            if depth in qemu_depths:
                qfolder = fresh_dir(work, f"qemu{depth}")
                t0 = time.perf_counter()
                chain = build_qemu(qfolder, parts, size, qemu_build)
                row["qemu_build_s"] = time.perf_counter() - t0
                log(f"depth {depth}: built a {depth}-deep qcow2 chain ({qemu_build}) in {row['qemu_build_s']:.1f} s")
                top = chain[-1]
                qsample = sample[: min(sample.size, 500)]
                row["qemu_bad_reads"] = verify_qemu(top, owner, qsample)
                row["qemu_verified"] = int(qsample.size)
                row["qemu_open_ms"] = qemu_open_seconds(top) * 1e3

            runs: list[dict[str, Any]] = []
            qemu_runs: list[float] = []
            for _ in range(repeats):
                warm(layer_paths + base_paths)
                runs.append(measure_paired(stack, base, offsets, args.bursts))
                if top is not None:
                    warm(chain)
                    qemu_runs.append(measure_qemu(top, reads))
            stack.close()
            row["ours_reads_s"] = median([r["stack"] for r in runs])
            row["ours1_paired_reads_s"] = median([r["base"] for r in runs])
            row["ours_reads_per_cpu_s"] = median([r["stack_cpu"] for r in runs])
            row["ours_vs_ours1_wall"] = median([x for r in runs for x in r["wall_ratios"]])
            row["ours_vs_ours1"] = median([x for r in runs for x in r["cpu_ratios"]])
            row["ours_runs"] = [r["stack"] for r in runs]
            row["ours1_paired_runs"] = [r["base"] for r in runs]
            if qemu_runs:
                row["qemu_reads_s"] = median(qemu_runs)
                row["qemu_runs"] = qemu_runs
                row["ours_vs_qemu"] = row["ours_reads_s"] / row["qemu_reads_s"]
            log(f"depth {depth}: ours {row['ours_reads_s']:,.0f} reads/s (1 layer alongside: "
                f"{row['ours1_paired_reads_s']:,.0f}; paired ratio CPU {row['ours_vs_ours1']:.2f}, wall "
                f"{row['ours_vs_ours1_wall']:.2f})"
                + (f", qemu {row['qemu_reads_s']:,.0f} reads/s" if qemu_runs else ""))
            results.append(row)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
                shutil.rmtree(os.path.join(work, f"qemu{depth}"), ignore_errors=True)
        base.close()

    headers = ["layers", "merged records", "ours open ms", "qemu open ms", "ours reads/s", "ours(1) alongside",
               "ours(N)/ours(1) CPU", "ours(N)/ours(1) wall", "qemu reads/s", "ours/qemu", "ours bad/checked",
               "qemu bad/checked", "build ours s", "build qemu s"]
    rows = [[r["depth"], r["merged_records"], r["ours_open_ms"], r.get("qemu_open_ms"), r["ours_reads_s"],
             r["ours1_paired_reads_s"], r["ours_vs_ours1"], r["ours_vs_ours1_wall"], r.get("qemu_reads_s"),
             r.get("ours_vs_qemu"),
             f"{r['ours_bad_reads']}/{r['ours_verified']}",
             f"{r['qemu_bad_reads']}/{r['qemu_verified']}" if "qemu_verified" in r else "-",
             r["ours_build_s"], r.get("qemu_build_s")] for r in results]
    title = (f"Random 4 KiB reads, QD1, page cache warm; disk {size_mib} MiB ({nblocks:,} blocks), {reads:,} reads "
             f"per run, median of {repeats} runs; ours(N)/ours(1) = median over {args.bursts} x {repeats} bursts "
             f"alternating with the 1-layer stack, by thread CPU time and by wall time")
    print(table(headers, rows, title=title))
    skipped = [d for d in depths if d not in qemu_depths]
    if skipped and not args.no_qemu:
        print(f"\nqemu not measured at depth {', '.join(map(str, skipped))} (chain not built: --qemu-depths)")
    last = results[-1] if results else None
    target = None
    if last is not None:
        target = last["ours_vs_ours1"] >= 0.9
        print(f"\ntarget ours({last['depth']})/ours(1) >= 0.9 (paired, CPU time): {last['ours_vs_ours1']:.2f} "
              f"{'met' if target else 'MISSED'} (wall time: {last['ours_vs_ours1_wall']:.2f})")
    bad = sum(r["ours_bad_reads"] + r.get("qemu_bad_reads", 0) for r in results)
    print(f"correctness: {bad} sampled reads differ from the expected pattern")
    print(f"total {time.perf_counter() - t_start:.0f} s\n")
    emit_json({"benchmark": "stack_reads", "quick": args.quick, "size_mib": size_mib, "reads": reads,
               "repeats": repeats, "build": args.build, "qemu_build": qemu_build, "seed": args.seed,
               "results": results,
               "bursts": args.bursts, "target_ratio_met": target, "bad_reads": bad, "load1_start": load_start,
               "versions": versions(), "machine": machine()},
              args.json)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
