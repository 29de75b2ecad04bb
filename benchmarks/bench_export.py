"""``overlaybd export VOL DST -O raw`` and ``overlaybd cat LAYERS -o DST`` beside ``qemu-img convert -O raw`` of the
same content as a qcow2 backing chain, in the same run.

Images (built here, 1 GiB each; quick: 256 MiB):

* sparse: an ext4 (``mkfs.ext4`` on a sparse raw file) and two rounds of files written into it with ``debugfs
  -w`` (``--file-mib`` MiB each, 3), every state imported as a snapshot (``overlaybd import``: the blocks that
  differ), so 3 layers holding a few MiB; the peer chain is ``qemu-img convert -O qcow2 [-B previous]`` of the
  same three raw states.
* dense: a base snapshot of random bytes over the whole device and 63 snapshots of random writes (4-256 KiB,
  1/64 of the device each), and the same as a 64-image qcow2 chain (default clusters, ``qemu-io`` writes).
* fragmented: 64 snapshots, each writing a random share of the 4 KiB blocks (every block written once, by one
  layer), and the same as a 64-image qcow2 chain of 4 KiB clusters: the worst case for both.

Timed, interleaved (each round starting one command later than the one before), ``--rounds`` times (3; quick
1), page cache warm, the output removed before each run:
ours ``overlaybd export VOL out.raw`` and ``overlaybd cat L0 .. Ln -o out.raw`` (both write a temporary file,
fsync it once and rename it), from the checkout and from a copy of the package with compiled bytecode ("(.pyc)",
as a wheel is installed; this environment's checkout compiles our modules at each start); the peer ``qemu-img
convert -O raw TOP out.raw`` and the same followed by ``sync out.raw`` (an fsync of that file: ours syncs its
output; qemu-img convert makes no fsync or fdatasync, ``strace -f -c`` shows). Bounds under ours: ``python -c
'import numpy'`` (what the full path loads), ``python -c pass``, ``python -c 'import argparse'`` and ``overlaybd
--version`` (the interpreter, the argument parser, our command line's start), and the numpy-free export run
without the command line (our modules, the copy and the fsync, no argparse). A small stack (the sparse image)
goes the numpy-free way (``formats.lsmt.small_stack``). CPU time (user + system, from ``wait4``) is shown
beside wall time: on a loaded machine it shows the work apart from waiting. Every output is checked equal to
the peer's (``cmp``) and its allocated size (``st_blocks``) shown: holes stay holes.

``--records N,N,..``: instead, both ways of copying a stack out (numpy-free, full), each in a fresh interpreter,
over 3 layers of N records each (4 KiB at random offsets), the copy and the merge alone: where
``small_stack.SMALL_STACK_RECORDS`` belongs.

    .venv/bin/python benchmarks/bench_export.py [--quick] [--rounds N] [--only sparse|dense|fragmented]
        [--before SRC] [--records N,N,..] [--json FILE]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from bench_startup import compiled_copy
from common import (
    base_parser,
    emit_json,
    fmt,
    log,
    machine,
    median,
    table,
    versions,
    warm,
    workdir,
    write_committed_layer,
)
from nbd_common import OVERLAYBD, build_layered_volume, build_qcow2_chain, need, run

from overlaybd.cli.exporting import small_volume
from overlaybd.volume import Volume

MiB = 1 << 20
GiB = 1 << 30


def build_sparse(folder: str, size: int, file_mib: int, seed: int) -> tuple[str, str]:
    """The 3-snapshot ext4 volume and the top of its qcow2 chain."""
    rng = np.random.default_rng([seed, 3])
    raw = os.path.join(folder, "ext4.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", raw])
    vol = os.path.join(folder, "sparse-vol")
    prev: str | None = None
    for n in range(3):
        if n:
            src = os.path.join(folder, f"file{n}")
            with open(src, "wb") as f:
                f.write(rng.integers(0, 256, file_mib * MiB, dtype=np.uint8).tobytes())
            run(["debugfs", "-w", "-R", f"write {src} f{n}", raw])
        run([*OVERLAYBD, "import", raw, vol, "-m", f"state {n}"])
        img = os.path.join(folder, f"ext4-{n}.qcow2")
        backing = ["-B", os.path.basename(prev), "-F", "qcow2"] if prev else []
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", *backing, raw, img], check=True, cwd=folder)
        prev = img
    assert prev is not None
    return vol, prev


def build_dense(folder: str, size: int, depth: int, seed: int) -> tuple[str, str]:
    """A base snapshot of random bytes over the whole device, then ``depth - 1`` snapshots of random writes
    (4-256 KiB at 4 KiB-aligned random offsets, each filled with one byte; ``size / depth`` bytes a snapshot);
    the same as a qcow2 chain (default 64 KiB clusters): ``qemu-img convert`` of the base, then ``qemu-io``
    writes into each overlay."""
    rng = np.random.default_rng([seed, depth])
    raw = os.path.join(folder, "dense-base.raw")
    with open(raw, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(rng.integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes())
    vol = os.path.join(folder, "dense-vol")
    run([*OVERLAYBD, "import", raw, vol, "-m", "base"])
    chain = os.path.join(folder, "dense-chain")
    os.makedirs(chain)
    prev = os.path.join(chain, "L00.qcow2")
    run(["qemu-img", "convert", "-O", "qcow2", raw, prev])
    os.unlink(raw)
    v = Volume(vol)
    for n in range(1, depth):
        pieces = []
        total = 0
        while total < size // depth:
            length = int(rng.integers(1, 65)) * 4096
            pieces.append((int(rng.integers(0, (size - length) // 4096)) * 4096, length))
            total += length
        with v.open(writable=True) as dev:
            for off, length in pieces:
                dev.pwrite(off, bytes([n]) * length)
            dev.flush()
        v.snapshot(f"writes {n}")
        img = os.path.join(chain, f"L{n:02d}.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(prev), "-F", "qcow2", img])
        run(["qemu-io", "-t", "unsafe", "-f", "qcow2", img],
            stdin="".join(f"write -q -P {n} {off} {length}\n" for off, length in pieces) + "quit\n")
        prev = img
    return vol, prev


def build_fragmented(folder: str, size: int, depth: int, seed: int) -> tuple[str, str]:
    """Every 4 KiB block written once, by one of ``depth`` snapshots (a random share each): the worst case of
    fragmentation, for both formats (qcow2 clusters of 4 KiB)."""
    vol = os.path.join(folder, "fragmented-vol")
    build_layered_volume(vol, size, depth, seed)
    from common import shares

    parts, _ = shares(size // 4096, depth, seed)
    return vol, build_qcow2_chain(os.path.join(folder, "fragmented-chain"), parts, size)


def built(folder: str, name: str) -> tuple[str, str]:
    """The volume and the top of the qcow2 chain of image ``name`` built earlier in ``folder``."""
    chain = {"sparse": "", "dense": "dense-chain", "fragmented": "fragmented-chain"}[name]
    tops = sorted(f for f in os.listdir(os.path.join(folder, chain)) if f.endswith(".qcow2"))
    return os.path.join(folder, f"{name}-vol"), os.path.join(folder, chain, tops[-1])


def timed_run(cmd: Sequence[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command's and its children's) of one run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def measure(name: str, vol: str, top: str, folder: str, rounds: int, before: str | None, site: str
            ) -> dict[str, Any]:
    layers = Volume(vol).lowers
    out = os.path.join(folder, f"{name}-out.raw")
    peer = os.path.join(folder, f"{name}-peer.raw")
    compiled = ["env", f"PYTHONPATH={site}", *OVERLAYBD]
    cmds: dict[str, list[str]] = {
        "overlaybd export": [*OVERLAYBD, "export", vol, out, "--force"],
        "overlaybd cat": [*OVERLAYBD, "cat", *layers, "-o", out, "--force"],
        "overlaybd export (.pyc)": [*compiled, "export", vol, out, "--force"],
        "overlaybd cat (.pyc)": [*compiled, "cat", *layers, "-o", out, "--force"],
        "qemu-img convert": ["qemu-img", "convert", "-O", "raw", top, peer],
        "qemu-img convert + sync": ["sh", "-c", f"qemu-img convert -O raw {top} {peer} && sync {peer}"],
        "bound: python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
        "bound: python -c pass": [sys.executable, "-c", "pass"],
        "bound: python -c 'import argparse'": [sys.executable, "-c", "import argparse"],
        "bound: overlaybd --version": [*OVERLAYBD, "--version"],
        "bound: overlaybd --version (.pyc)": [*compiled, "--version"],
        "bound: the numpy-free export without the command line (.pyc)": [
            "env", f"PYTHONPATH={site}", sys.executable, "-c", WITHOUT_CLI, vol, out],
    }
    if small_volume(vol, None) is None:  # the full readers' path: no floor of the numpy-free one to show
        del cmds["bound: the numpy-free export without the command line (.pyc)"]
    if before is not None:  # another checkout's code (its src/ with its extensions built), on the same images
        cmds["overlaybd export (--before)"] = ["env", f"PYTHONPATH={before}", sys.executable, "-m",
                                               "overlaybd.cli.main", "export", vol, out, "--force"]
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpus: dict[str, list[float]] = {k: [] for k in cmds}
    checked: dict[str, int] = {}
    size = 0
    names = list(cmds)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:  # each round starts one command later
            cmd = cmds[k]
            for p in (out, peer):
                if os.path.exists(p):
                    os.unlink(p)
            warm([vol, os.path.dirname(top)])
            wall, cpu = timed_run(cmd)
            times[k].append(wall)
            cpus[k].append(cpu)
            if k.startswith("bound") and "export" not in k:
                continue
            made = peer if k.startswith("qemu") else out
            checked[k] = allocated(made)
            if not k.startswith("qemu"):
                subprocess.run(["qemu-img", "convert", "-O", "raw", top, peer], check=True)
                subprocess.run(["cmp", out, peer], check=True)
                size = os.path.getsize(out)
    return {"times": times, "cpu": cpus, "allocated": checked, "size": size}


# the two ways a stack is copied out, each a fresh interpreter (imports included), whatever the records; with
# "plan" as first argument, only the stack's data runs are found (the merge without the copy)
SMALL_PATH = """import sys
from overlaybd.formats.lsmt import glance, small_stack
from overlaybd.formats.rawout import copy_pieces, joined_runs
glance.SMALL_INDEX_RECORDS = small_stack.SMALL_STACK_RECORDS = 1 << 40
s = small_stack.open_small(sys.argv[2:])
if sys.argv[1] == "plan":
    list(joined_runs(s.pieces()))
else:
    copy_pieces(sys.argv[1], s.size, s.files, s.pieces(), force=True)
"""
FULL_PATH = """import sys
from overlaybd.formats.output import copy_out, data_runs
from overlaybd.operations import open_stack
with open_stack(sys.argv[2:]) as stack:
    if sys.argv[1] == "plan":
        list(data_runs(stack))
    else:
        copy_out(sys.argv[1], stack, force=True)
"""


# the numpy-free export of a volume's device without argparse and the command line around it (the floor of that
# path: the interpreter, our modules, the copy, the fsync)
WITHOUT_CLI = """import os, sys
from overlaybd import volume_config
from overlaybd.formats.lsmt.small_stack import open_small
from overlaybd.formats.rawout import copy_pieces
vol = os.path.abspath(sys.argv[1])
config = volume_config.read_config(vol)
upper = (os.path.join(vol, config["upper"]["data"]), os.path.join(vol, config["upper"]["index"]))
s = open_small(volume_config.lower_paths(vol, config), upper, config[volume_config.META]["size"])
copy_pieces(sys.argv[2], s.size, s.files, s.pieces(), force=True)
"""


def build_records(folder: str, per_layer: int, seed: int) -> list[str]:
    """3 layers of ``per_layer`` records each (4 KiB of random bytes at random 4 KiB-aligned offsets of 1 GiB; the
    layers overlap at random), written directly (``write_committed_layer``)."""
    rng = np.random.default_rng([seed, per_layer])
    layers = []
    for n in range(3):
        blocks = np.sort(rng.choice(GiB // 4096, per_layer, replace=False)) * 8
        path = os.path.join(folder, f"records-{per_layer}-{n}.lsmt")
        write_committed_layer(path, blocks, np.full(per_layer, 8), np.zeros(per_layer, bool),
                              lambda k: rng.integers(1, 256, k, dtype=np.uint8).tobytes(), GiB)
        layers.append(path)
    return layers


def measure_records(folder: str, counts: Sequence[int], rounds: int, seed: int) -> dict[str, Any]:
    """Wall and CPU time of the numpy-free path and the full path over stacks of ``3 x count`` records, the copy
    and the merge alone: where the threshold ``small_stack.SMALL_STACK_RECORDS`` belongs."""
    out = os.path.join(folder, "records-out.raw")
    result: dict[str, Any] = {}
    for count in counts:
        layers = build_records(folder, count, seed)
        ways = {"numpy-free copy": [sys.executable, "-c", SMALL_PATH, out, *layers],
                "full copy": [sys.executable, "-c", FULL_PATH, out, *layers],
                "numpy-free merge": [sys.executable, "-c", SMALL_PATH, "plan", *layers],
                "full merge": [sys.executable, "-c", FULL_PATH, "plan", *layers]}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
        digests = set()
        names = list(ways)
        for r in range(rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                warm(layers)
                times[k].append(timed_run(ways[k]))
                if k.endswith("copy"):
                    digests.add(subprocess.run(["sha256sum", out], capture_output=True, text=True).stdout.split()[0])
        assert len(digests) == 1, "the two paths wrote different files"
        result[str(3 * count)] = times
        for p in layers:
            os.unlink(p)
    return result


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    ap.add_argument("--only", choices=("sparse", "dense", "fragmented"), action="append",
                    help="build and measure only these images (default: all)")
    ap.add_argument("--file-mib", type=int, default=3, help="MiB of each file written into the ext4")
    ap.add_argument("--depth", type=int, default=64, help="snapshots of the dense image")
    ap.add_argument("--before", metavar="SRC", help="also time `overlaybd export` of another checkout: its src "
                    "folder (e.g. the main branch's, to show what a change gained)")
    ap.add_argument("--records", metavar="N,N,...", help="instead of the images: time both copy paths (numpy-free, "
                    "full) over 3-layer stacks of N records a layer (where the small-stack threshold belongs)")
    ap.add_argument("--reuse", metavar="FOLDER", help="measure the images a run with --workdir and --keep built "
                    "in FOLDER (its bench-export-* folder) instead of building them")
    args = ap.parse_args()
    need("qemu-img", "qemu-io", "mkfs.ext4", "debugfs", "cmp")
    rounds = args.rounds or (1 if args.quick else 3)
    size = 256 * MiB if args.quick else GiB
    if args.records:
        records_table(args, rounds)
        return
    results: dict[str, Any] = {}
    with workdir(args.workdir, args.keep, "bench-export-") as scratch:
        folder = args.reuse or scratch
        builders: dict[str, Callable[[], tuple[str, str]]] = {
                    "sparse": lambda: build_sparse(folder, size, args.file_mib, args.seed),
                    "dense": lambda: build_dense(folder, size, args.depth, args.seed),
                    "fragmented": lambda: build_fragmented(folder, size, args.depth, args.seed)}
        images: dict[str, tuple[str, str]] = {}
        for name, build in builders.items():
            if args.reuse and (args.only is None or name in args.only):
                images[name] = built(folder, name)
            elif args.only is None or name in args.only:
                t0 = time.perf_counter()
                images[name] = build()
                log(f"{name} image built in {time.perf_counter() - t0:.1f} s")
        site = compiled_copy(scratch)
        load_before = os.getloadavg()
        for name, (vol, top) in images.items():
            results[name] = measure(name, vol, top, folder, rounds, args.before, site)
        load_after = os.getloadavg()
    rows = []
    for name, res in results.items():
        peer = median(res["times"]["qemu-img convert + sync"])
        for k, ts in res["times"].items():
            cpu = res["cpu"][k]
            rows.append([name, k, f"{fmt(median(ts), 3)} ({fmt(min(ts), 3)}-{fmt(max(ts), 3)})",
                         f"{fmt(median(ts) / peer)}x", f"{fmt(median(cpu), 3)} ({fmt(min(cpu), 3)}-{fmt(max(cpu), 3)})",
                         f"{fmt(res['allocated'][k] / MiB, 1)}" if k in res["allocated"] else "-"])
    print(table(["image", "command", "wall s: median (range)", "vs qemu-img + sync", "CPU s: median (range)",
                 "allocated MiB"], rows,
                f"export to raw, {rounds} rounds, {size // MiB} MiB devices"))
    log(f"load average before {load_before}, after {load_after}")
    emit_json({"rounds": rounds, "size": size, "results": results, "load_before": load_before,
               "load_after": load_after, "versions": versions(), "machine": machine()}, args.json)


def records_table(args: Any, rounds: int) -> None:
    counts = [int(c) for c in args.records.split(",")]
    with workdir(args.workdir, args.keep, "bench-export-records-") as folder:
        load_before = os.getloadavg()
        res = measure_records(folder, counts, rounds, args.seed)
        load_after = os.getloadavg()
    rows = []
    for total, times in res.items():
        for what in ("copy", "merge"):
            small, full = times[f"numpy-free {what}"], times[f"full {what}"]
            row: list[Any] = [total, what]
            for k in (0, 1):
                a, b = [t[k] for t in small], [t[k] for t in full]
                row += [f"{fmt(median(a), 3)} ({fmt(min(a), 3)}-{fmt(max(a), 3)})",
                        f"{fmt(median(b), 3)} ({fmt(min(b), 3)}-{fmt(max(b), 3)})", f"{fmt(median(a) / median(b))}x"]
            rows.append(row)
    print(table(["records (3 layers)", "what", "numpy-free wall s", "full wall s", "ratio", "numpy-free CPU s",
                 "full CPU s", "ratio"], rows, f"stack copied out (or only merged) by each path, {rounds} rounds"))
    log(f"load average before {load_before}, after {load_after}")
    emit_json({"rounds": rounds, "records": res, "load_before": load_before, "load_after": load_after,
               "versions": versions(), "machine": machine()}, args.json)


if __name__ == "__main__":
    main()
