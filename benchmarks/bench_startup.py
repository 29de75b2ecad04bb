"""Start-up of the command line: ``overlaybd --version``, ``overlaybd info LAYER`` and ``overlaybd log VOL``, beside
``qemu-img info`` in the same run, and the interpreter's own start (the bound under everything we run).

Data: a volume (1 GiB) of 3 snapshots, each of random 4-64 KiB writes (``--mib`` MiB a snapshot, 3 by default),
and a 1 GiB qcow2 for the peer. Each round runs every command once, in turn (so load from other work on the
machine falls on all of them alike); ``--rounds`` rounds (21; quick 5). Each command is measured as a child
process: wall time (fork to exit) and its peak RSS (``ru_maxrss`` from ``wait4``). Ours is run as the installed
console script and as ``python -m overlaybd``, from a copy of the package with compiled bytecode (``.pyc``, as a
wheel is installed) and from the checkout (compiled from source at each start where PYTHONDONTWRITEBYTECODE is
set, as in this environment). Figures: median and range over the rounds, and the ratio of the
medians to ``qemu-img info``. Peak RSS comes from a second run of each command under ``/usr/bin/time -f %M``;
CPU time (user + system, from ``wait4``) shows the work apart from waiting for a core on a loaded machine.

    .venv/bin/python benchmarks/bench_startup.py [--quick] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from common import base_parser, emit_json, fmt, log, machine, median, table, versions, workdir

from overlaybd.volume import Volume

MiB = 1 << 20
GiB = 1 << 30
VENV_BIN = os.path.dirname(sys.executable)
SCRIPT = os.path.join(VENV_BIN, "overlaybd")
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


def compiled_copy(folder: str) -> str:
    """A copy of the package with its bytecode compiled (as pip installs a wheel); its folder, to put first on
    PYTHONPATH. The checkout's own modules have no .pyc where PYTHONDONTWRITEBYTECODE is set: each start compiles
    them from source."""
    site = os.path.join(folder, "site")
    shutil.copytree(os.path.join(PACKAGE, "src", "overlaybd"), os.path.join(site, "overlaybd"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(site, "overlaybd")], check=True,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    return site


def run_once(cmd: Sequence[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of ``cmd``, its output thrown away."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def peak_rss(cmd: Sequence[str], scratch: str) -> int:
    """Peak RSS (bytes) of ``cmd`` from ``/usr/bin/time -f %M``. (``wait4`` on our own child would count the
    pages the child had between fork and exec: this process's, tens of MiB.)"""
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", scratch, *cmd], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    with open(scratch) as f:
        return int(f.read().split()[-1]) * 1024


def build(folder: str, mib: int, seed: int) -> tuple[str, str, str]:
    """The volume, its top layer file, and the peer's qcow2."""
    rng = random.Random(seed)
    vol = Volume.create(os.path.join(folder, "vol"), GiB)
    for n in range(3):
        with vol.open(writable=True) as dev:
            written = 0
            while written < mib * MiB:
                length = rng.randrange(1, 17) * 4096
                dev.pwrite(rng.randrange(0, (GiB - length) // 4096) * 4096, rng.randbytes(length))
                written += length
            dev.flush()
        vol.snapshot(f"snapshot {n}")
    qcow2 = os.path.join(folder, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, str(GiB)], check=True)
    return vol.path, vol.lowers[-1], qcow2


def commands(vol: str, layer: str, qcow2: str, site: str) -> dict[str, list[str]]:
    py = sys.executable
    compiled = ["env", f"PYTHONPATH={site}"]  # env(1): a few hundred microseconds, shown by its own row
    return {
        "overlaybd --version (.pyc)": [*compiled, SCRIPT, "--version"],
        "overlaybd info LAYER (.pyc)": [*compiled, SCRIPT, "info", layer],
        "overlaybd log VOL (.pyc)": [*compiled, SCRIPT, "log", vol],
        "python -m overlaybd --version (.pyc)": [*compiled, py, "-m", "overlaybd", "--version"],
        "python -m overlaybd info LAYER (.pyc)": [*compiled, py, "-m", "overlaybd", "info", layer],
        "python -m overlaybd log VOL (.pyc)": [*compiled, py, "-m", "overlaybd", "log", vol],
        "overlaybd --version (source)": [SCRIPT, "--version"],
        "overlaybd info LAYER (source)": [SCRIPT, "info", layer],
        "overlaybd log VOL (source)": [SCRIPT, "log", vol],
        "env python -c pass": [*compiled, py, "-c", "pass"],
        "qemu-img info (peer)": ["qemu-img", "info", qcow2],
        "python -I -S -c pass": [py, "-I", "-S", "-c", "pass"],
        "python -I -c pass": [py, "-I", "-c", "pass"],
        "python -c pass (venv site)": [py, "-c", "pass"],
        "python -c 'import argparse'": [py, "-c", "import argparse"],
    }


def spread(xs: Sequence[float], scale: float) -> str:
    return f"{fmt(median(xs) * scale, 1)} ({fmt(min(xs) * scale, 1)}-{fmt(max(xs) * scale, 1)})"


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--rounds", type=int, help="rounds (default 21; quick 5)")
    ap.add_argument("--mib", type=int, default=3, help="MiB written in each of the 3 snapshots")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 21)
    with workdir(args.workdir, args.keep, "bench-startup-") as folder:
        vol, layer, qcow2 = build(folder, args.mib, args.seed)
        cmds = commands(vol, layer, qcow2, compiled_copy(folder))
        for cmd in cmds.values():  # once each before measuring: files in the page cache, .pyc written
            run_once(cmd)
        load_before = os.getloadavg()
        walls: dict[str, list[float]] = {name: [] for name in cmds}
        cpus: dict[str, list[float]] = {name: [] for name in cmds}
        rss: dict[str, list[float]] = {name: [] for name in cmds}
        scratch = os.path.join(folder, "time.out")
        for _ in range(rounds):
            for name, cmd in cmds.items():
                wall, cpu = run_once(cmd)
                walls[name].append(wall)
                cpus[name].append(cpu)
                rss[name].append(peak_rss(cmd, scratch))
        load_after = os.getloadavg()
    peer = "qemu-img info (peer)"
    rows: list[list[Any]] = []
    result: dict[str, Any] = {}
    for name in cmds:
        rows.append([name, spread(walls[name], 1e3), f"{fmt(median(walls[name]) / median(walls[peer]))}x",
                     spread(cpus[name], 1e3), spread(rss[name], 1 / MiB),
                     f"{fmt(median(rss[name]) / median(rss[peer]))}x"])
        result[name] = {"wall_s": walls[name], "cpu_s": cpus[name], "maxrss_bytes": rss[name]}
    print(table(["command", "wall ms: median (range)", "vs qemu-img", "CPU ms: median (range)",
                 "max RSS MiB: median (range)", "vs qemu-img"], rows, f"start-up, {rounds} rounds"))
    log(f"load average before {load_before}, after {load_after}")
    emit_json({"rounds": rounds, "results": result, "load_before": load_before, "load_after": load_after,
               "versions": versions(), "machine": machine()}, args.json)


if __name__ == "__main__":
    main()
