"""``nbdcopy URI null:`` with nbdcopy's own defaults, ours (``overlaybd serve``) beside ``qemu-nbd`` on the same
bytes, many short interleaved rounds: the one NBD cell whose rounds split into a slow and a fast kind.

nbdcopy's defaults: ``--connections=4`` (capped at the number of cores: 2 here), ``--requests=64`` a
connection, 256 KiB requests, and block status (``base:allocation``) asked for every 128 MiB segment before
reading it. The volume is the one ``bench_nbd.py`` reads sequentially (mixed data in one sealed snapshot, 1 GiB;
quick 256 MiB); the peer is ``qemu-nbd -r -t -e 8 -f raw`` on ``overlaybd export`` of it. Each round runs every
variant on every server, the order alternating, the page cache re-warmed before each run. Printed per variant:
MB/s (median, range), ours/qemu per round (median, range), and the servers' CPU seconds a run (user + system,
``/proc/PID/stat``); the 1-minute load average is printed before and after.

Variants (``--variants``, comma-separated): ``defaults`` (plain ``nbdcopy URI null:``), ``no-extents``
(``--no-extents``), ``1m`` (``--request-size=1048576``). ``--hog N`` keeps N busy-loop processes running
through the runs: the rounds where the servers share the CPUs with other work. Every export must first read
(``nbdcopy --no-extents URI -``) with the raw file's SHA-256, or the run fails.

    .venv/bin/python benchmarks/bench_nbdcopy.py [--quick] [--rounds N] [--variants defaults,no-extents]
        [--serve-cmd CMD] [--compare-cmd CMD] [--hog N] [--json FILE]

``--compare-cmd CMD`` adds a second server of ours run by CMD (e.g. the base commit's checkout) to every round:
its ratio to the first is printed too (an A/B in the same run).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench_nbd import check_same
from common import emit_json, log, median, table, warm, workdir
from nbd_common import (
    OVERLAYBD,
    SERVER_PIDS,
    MiB,
    base_parser,
    build_mixed_volume,
    cpu_seconds,
    need,
    overlaybd_server,
    qemu_nbd,
    run,
    versions,
)

VARIANTS = {
    "defaults": [],
    "no-extents": ["--no-extents"],
    "1m": ["--request-size=1048576"],
}


def load() -> float:
    return os.getloadavg()[0]


def one_run(uri: str, size: int, opts: list[str]) -> tuple[float, float]:
    """MB/s of ``nbdcopy OPTS URI null:`` and the server's CPU seconds meanwhile."""
    pid = SERVER_PIDS[uri]
    c0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    run(["nbdcopy", *opts, uri, "null:"])
    elapsed = time.perf_counter() - t0
    return size / elapsed / 1e6, cpu_seconds(pid) - c0


@contextlib.contextmanager
def busy_loop() -> Iterator[None]:
    """A process that only spins, as other work on the machine would (stopped at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def spread(xs: list[float]) -> str:
    return f"{median(xs):,.2f} ({min(xs):,.2f}-{max(xs):,.2f})"


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--size-mib", type=int, help="volume size (1024; quick 256)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (9; quick 3)")
    ap.add_argument("--variants", default="defaults,no-extents", help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--serve-cmd", help="command that stands for 'overlaybd' when serving (default: the venv's)")
    ap.add_argument("--compare-cmd", help="a second 'overlaybd' command to serve the same volume beside the first")
    ap.add_argument("--hog", type=int, default=0,
                    help="busy-loop processes kept running through the runs (other work on the machine; 0)")
    args = ap.parse_args()
    need("qemu-nbd", "nbdcopy")
    size = (args.size_mib or (256 if args.quick else 1024)) * MiB
    rounds = args.rounds or (3 if args.quick else 9)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
    names = ["ours", "qemu"] + (["ours (compare)"] if args.compare_cmd else [])
    result: dict[str, Any] = {"benchmark": "bench_nbdcopy", "size": size, "rounds": rounds, "versions": versions(),
                              "serve_cmd": args.serve_cmd, "compare_cmd": args.compare_cmd}
    with workdir(args.workdir, args.keep, "bench-nbdcopy-") as wd:
        vol = os.path.join(wd, "vol")
        raw = os.path.join(wd, "disk.raw")
        result["kinds"] = build_mixed_volume(vol, size, args.seed)
        run([*OVERLAYBD, "export", vol, raw])
        mbps: dict[str, dict[str, list[float]]] = {v: {n: [] for n in names} for v in variants}
        cpu: dict[str, dict[str, list[float]]] = {v: {n: [] for n in names} for v in variants}
        loads = [load()]
        with contextlib.ExitStack() as servers:
            for _ in range(args.hog):
                servers.enter_context(busy_loop())
            serve = shlex.split(args.serve_cmd) if args.serve_cmd else None
            uris = {"ours": servers.enter_context(overlaybd_server(vol, os.path.join(wd, "ours.sock"), readonly=True,
                                                                   command=serve)),
                    "qemu": servers.enter_context(qemu_nbd(raw, "raw", os.path.join(wd, "qemu.sock"), readonly=True))}
            if args.compare_cmd:
                uris["ours (compare)"] = servers.enter_context(overlaybd_server(
                    vol, os.path.join(wd, "cmp.sock"), readonly=True, command=shlex.split(args.compare_cmd)))
            files = {"ours": vol, "qemu": raw, "ours (compare)": vol}
            check_same(list(uris.values()), raw)  # every export reads as the raw file, byte for byte
            log("every export reads as the raw file")
            for rnd in range(rounds):
                order = names[rnd % len(names):] + names[: rnd % len(names)]
                for v in variants:
                    for n in order:
                        warm([files[n]])
                        rate, secs = one_run(uris[n], size, VARIANTS[v])
                        mbps[v][n].append(rate)
                        cpu[v][n].append(secs)
                loads.append(load())
                log(f"round {rnd + 1}/{rounds}: " + "; ".join(
                    f"{v}: " + ", ".join(f"{n} {mbps[v][n][-1]:,.0f}" for n in names) for v in variants)
                    + f" MB/s; load {loads[-1]:.2f}")
    rows = []
    for v in variants:
        ratios = [o / q for o, q in zip(mbps[v]["ours"], mbps[v]["qemu"], strict=True)]
        row = [v, spread(mbps[v]["ours"]), spread(mbps[v]["qemu"]), spread(ratios),
               f"{median(cpu[v]['ours']):.2f} / {median(cpu[v]['qemu']):.2f}"]
        if args.compare_cmd:
            ab = [o / c for o, c in zip(mbps[v]["ours"], mbps[v]["ours (compare)"], strict=True)]
            row += [spread(mbps[v]["ours (compare)"]), spread(ab), f"{median(cpu[v]['ours (compare)']):.2f}"]
        rows.append(row)
        result[v] = {"mbps": mbps[v], "cpu_s": cpu[v], "ratios": ratios}
    headers = ["nbdcopy", "ours MB/s", "qemu-nbd raw MB/s", "ours/qemu per round", "server CPU s a run: ours / qemu"]
    if args.compare_cmd:
        headers += ["compare MB/s", "ours/compare per round", "compare server CPU s"]
    print(table(headers, rows, title=f"nbdcopy URI null:, {size // MiB} MiB volume (mixed data, 1 snapshot), "
                                     f"{rounds} interleaved rounds: median (range); load {loads[0]:.2f} -> "
                                     f"{max(loads):.2f} max" + (f"; {args.hog} busy loop(s) running" if args.hog
                                                                  else "")))
    result["load"] = loads
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
