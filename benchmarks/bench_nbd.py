"""The NBD server (``overlaybd serve``) beside ``qemu-nbd`` on the same bytes, with the same clients, in the same run.

1. Sequential 1 MiB reads of a volume (1 GiB; quick 256 MiB) of mixed data (50 % random, 30 % text, 10 % written
   zeros, 10 % never written, by 1 MiB piece) held in one sealed snapshot: ``nbdcopy --no-extents
   --request-size=1048576 --requests=R -C C URI null:``, ours vs ``qemu-nbd -r -t -f raw`` on
   ``overlaybd export VOL disk.raw``. Target: ours/qemu >= 0.8.
2. Random 4 KiB reads, ``qemu-img bench -f raw -c N -d 1|16 -s 4096 -S $((4096*104729)) URI``: ours on a
   64-snapshot volume (256 MiB; quick 32 MiB; a random permutation of its 4 KiB blocks split into 64 shares,
   snapshot i writes share i with byte i+1) and on a 1-snapshot volume holding its top view, vs
   qemu-nbd on the view as a raw file and on a 64-deep qcow2 chain (cluster_size=4096) of the same shares.
   Target: ours at 64 snapshots >= qemu-nbd on the 64-deep chain. Then block status on the same four exports:
   ``qemu-img map -f raw --max-length=16M URI`` (quick 4M) and ``nbdinfo --map URI``, in seconds.
3. Random 4 KiB writes with a flush every 64 writes, ours (a writable clone of the 1-snapshot volume) vs
   ``qemu-nbd -t -f raw`` on a copy of the raw view: ``fio --ioengine=nbd --rw=randwrite --bs=4k --fsync=64
   --iodepth=1|16``, and ``qemu-io -t writeback -f raw URI`` reading a stdin script (``write -q -P <b> <off> 4k``
   lines, ``flush`` every 64; without ``-t writeback`` qemu-io is writethrough and flushes after every write).
4. (``--only metrics``) What counting costs: random 4 KiB reads (``qemu-img bench`` as in 2, QD1 and QD16) on the
   deep volume, ``overlaybd serve`` with ``--metrics 127.0.0.1:0`` vs the same server without it, and vs a second
   server without it (how far two identical servers differ on this machine now), interleaved, in rounds (5;
   quick 3): IOPS and the server process's CPU time per request (``/proc/PID/stat``, less exposed to
   a busy machine than IOPS), per-round ratios, their median and range. And the time of what ``--metrics`` adds to
   each request (two clock reads and the recorder's update), timed in process, beside the server's CPU time for
   a QD1 request without it.

Every server listens on a Unix socket. Measurements are interleaved (ours, peer, ours, peer, ...), the page cache
is re-warmed right before each one (idle pages are reclaimed within about a minute), and the median is printed.
Correctness checks fail the run (timings never do): every export must read (``nbdcopy --no-extents URI -``) with
the same SHA-256 as the raw file, and after the same qemu-io write script ours must read as the qemu-nbd disk.

    .venv/bin/python benchmarks/bench_nbd.py [--quick] [--workdir DIR] [--repeats N] [--json FILE] [--only ...]
        [--write-runtime SECONDS] [--baseline-cmd CMD]

``--only write`` runs the write cells alone (3.), on a 1-snapshot volume built for them; ``--baseline-cmd`` adds a
second server of ours there and on the deep volume of 2. (another build: a change's before and after in the same
rounds).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np
from common import emit_json, log, median, shares, table, warm, workdir
from nbd_common import (
    BLOCK,
    OVERLAYBD,
    SERVER_PIDS,
    MiB,
    base_parser,
    build_layered_volume,
    build_mixed_volume,
    build_qcow2_chain,
    build_view_volume,
    cpu_seconds,
    fio,
    memory_kib,
    need,
    overlaybd_server,
    qemu_img_bench,
    qemu_nbd,
    run,
    versions,
    write_view_raw,
)

from overlaybd.export.prometheus import PrometheusMetrics

SERVE_CMD: list[str] | None = None  # --serve-cmd: what runs "serve" instead of overlaybd
BASELINE_CMD: list[str] | None = None  # --baseline-cmd: another build of ours for the write and read cells


def ours_server(vol: str, sock: str, *, readonly: bool) -> contextlib.AbstractContextManager[str]:
    return overlaybd_server(vol, sock, readonly=readonly, command=SERVE_CMD)


SEQ_SETTINGS = [  # (label, connections, requests in flight per connection); 0, 0: nbdcopy's defaults
    ("nbdcopy defaults (extents, 256 KiB requests)", 0, 0),
    ("1 conn, 1 in flight", 1, 1),
    ("1 conn, 16 in flight", 1, 16),
    ("4 conns, 16 in flight each", 4, 16),
]


def digest(uri_or_file: str) -> str:
    """SHA-256 of a whole disk: a raw file, or an export read with ``nbdcopy --no-extents URI -``. (Not
    ``qemu-img compare``: it asks for block status at every extent, which is quadratic on our server; see
    BENCHMARKS.md, Appendix A.)"""
    h = hashlib.sha256()
    if not uri_or_file.startswith("nbd"):
        with open(uri_or_file, "rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
        return h.hexdigest()
    proc = subprocess.Popen(["nbdcopy", "--no-extents", uri_or_file, "-"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while chunk := proc.stdout.read(4 * MiB):
        h.update(chunk)
    if proc.wait():
        raise RuntimeError(f"nbdcopy {uri_or_file} - failed with {proc.returncode}")
    return h.hexdigest()


def check_same(uris: list[str], reference: str) -> None:
    """Every export must read as ``reference`` byte for byte; a mismatch fails the run."""
    want = digest(reference)
    for uri in uris:
        if digest(uri) != want:
            raise SystemExit(f"MISMATCH: {uri} does not read as {reference}")


def nbdcopy_mbps(uri: str, size: int, conns: int, requests: int) -> float:
    """``nbdcopy --no-extents --request-size=1048576 --requests=R --connections=C URI null:``, or with
    ``conns`` 0 plain ``nbdcopy URI null:`` (its defaults: block status asked, 256 KiB requests)."""
    opts = ["--no-extents", "--request-size=1048576", f"--requests={requests}", f"--connections={conns}"] if conns \
        else []
    t0 = time.perf_counter()
    run(["nbdcopy", *opts, uri, "null:"])
    return size / (time.perf_counter() - t0) / 1e6


# -- 1. sequential -----------------------------------------------------------------------------------------


def bench_sequential(wd: str, size: int, repeats: int, seed: int) -> dict[str, Any]:
    vol = os.path.join(wd, "seqvol")
    raw = os.path.join(wd, "seq.raw")
    t0 = time.perf_counter()
    kinds = build_mixed_volume(vol, size, seed)
    run([*OVERLAYBD, "export", vol, raw])
    log(f"seq: built {size // MiB} MiB volume {kinds} and its raw export in {time.perf_counter() - t0:.1f} s")
    results: dict[str, dict[str, list[float]]] = {label: {"ours": [], "qemu": []} for label, _, _ in SEQ_SETTINGS}
    with contextlib.ExitStack() as servers:
        ours = servers.enter_context(ours_server(vol, os.path.join(wd, "seq-ours.sock"), readonly=True))
        peer = servers.enter_context(qemu_nbd(raw, "raw", os.path.join(wd, "seq-qemu.sock"), readonly=True))
        check_same([ours, peer], raw)
        log("seq: both exports are identical to the raw file")
        targets = {"ours": (ours, vol), "qemu": (peer, raw)}
        for rep in range(repeats):
            for label, conns, reqs in SEQ_SETTINGS:
                for name in (("ours", "qemu") if rep % 2 == 0 else ("qemu", "ours")):
                    uri, files = targets[name]
                    warm([files])
                    results[label][name].append(nbdcopy_mbps(uri, size, conns, reqs))
            log(f"seq: repeat {rep + 1}/{repeats} done")
    rows = []
    out = []
    for label, conns, reqs in SEQ_SETTINGS:
        o, q = median(results[label]["ours"]), median(results[label]["qemu"])
        rows.append([label, o, q, o / q, f"{min(results[label]['ours']) / max(results[label]['qemu']):.2f}-"
                     f"{max(results[label]['ours']) / min(results[label]['qemu']):.2f}",
                     "met" if o / q >= 1.0 else "missed"])
        out.append({"setting": label, "connections": conns, "requests": reqs, "ours_mbps": o, "qemu_mbps": q,
                    "ratio": o / q, "ours_all": results[label]["ours"], "qemu_all": results[label]["qemu"]})
    print(table(["nbdcopy (1M: --no-extents --request-size=1M)", "ours MB/s", "qemu-nbd raw MB/s", "ours/qemu",
                 "range", "target >= 1.0"], rows,
                title=f"Sequential 1 MiB reads of a {size // MiB} MiB volume (1 snapshot, mixed data), median of "
                      f"{repeats}"))
    print()
    return {"size": size, "kinds": kinds, "settings": out}


# -- 2. random reads ---------------------------------------------------------------------------------------


def bench_random(wd: str, size: int, depth: int, repeats: int, seed: int, secs: float, map_length: int
                 ) -> dict[str, Any]:
    vol64 = os.path.join(wd, f"vol{depth}")
    vol1 = os.path.join(wd, "vol1")
    raw = os.path.join(wd, "view.raw")
    chain = os.path.join(wd, "qcow2")
    t0 = time.perf_counter()
    owner = build_layered_volume(vol64, size, depth, seed)
    t1 = time.perf_counter()
    build_view_volume(vol1, owner, size)
    run([*OVERLAYBD, "export", vol64, raw])
    expected = os.path.join(wd, "expected.raw")
    write_view_raw(expected, owner)
    if digest(expected) != digest(raw):
        raise SystemExit(f"MISMATCH: overlaybd export of {vol64} is not the expected view")
    os.unlink(expected)
    t2 = time.perf_counter()
    parts, _ = shares(size // BLOCK, depth, seed)
    top = build_qcow2_chain(chain, parts, size)
    t3 = time.perf_counter()
    log(f"rand: {depth}-snapshot volume {t1 - t0:.1f} s, 1-snapshot volume + raw {t2 - t1:.1f} s, "
        f"{depth}-deep qcow2 chain {t3 - t2:.1f} s")
    names = [f"ours, {depth} snapshots", "ours, 1 snapshot", "qemu-nbd, raw", f"qemu-nbd, {depth}-deep qcow2"]
    res: dict[int, dict[str, list[float]]] = {d: {n: [] for n in names} for d in (1, 16)}
    cpu: dict[int, dict[str, list[float]]] = {d: {n: [] for n in names} for d in (1, 16)}  # server µs a request
    memory: dict[str, dict[str, int]] = {}
    with contextlib.ExitStack() as servers:
        uris = {
            names[0]: servers.enter_context(ours_server(vol64, os.path.join(wd, "r64.sock"), readonly=True)),
            names[1]: servers.enter_context(ours_server(vol1, os.path.join(wd, "r1.sock"), readonly=True)),
            names[2]: servers.enter_context(qemu_nbd(raw, "raw", os.path.join(wd, "rraw.sock"), readonly=True)),
            names[3]: servers.enter_context(qemu_nbd(top, "qcow2", os.path.join(wd, "rq.sock"), readonly=True,
                                                     name="chain")),
        }
        files = {names[0]: vol64, names[1]: vol1, names[2]: raw, names[3]: chain}
        if BASELINE_CMD:  # another build of ours on the deep volume (a change's before and after in one run)
            base = f"base, {depth} snapshots"
            uris[base] = servers.enter_context(overlaybd_server(vol64, os.path.join(wd, "rbase.sock"), readonly=True,
                                                                command=BASELINE_CMD))
            files[base] = vol64
            names = [*names, base]
            res = {d: {n: [] for n in names} for d in (1, 16)}
            cpu = {d: {n: [] for n in names} for d in (1, 16)}
        check_same([uris[n] for n in names], raw)
        log("rand: all four exports are identical to the raw view")
        counts: dict[tuple[str, int], int] = {}
        for rep in range(repeats):
            for d in (1, 16):
                order = names if rep % 2 == 0 else names[::-1]
                for n in order:
                    warm([files[n]])
                    if (n, d) not in counts:  # calibrate: about `secs` seconds per measurement
                        rate = qemu_img_bench(uris[n], 2000, d)
                        counts[(n, d)] = int(min(max(rate * secs, 2000), 500_000))
                    pid = SERVER_PIDS[uris[n]]
                    c0 = cpu_seconds(pid)
                    res[d][n].append(qemu_img_bench(uris[n], counts[(n, d)], d))
                    cpu[d][n].append((cpu_seconds(pid) - c0) / counts[(n, d)] * 1e6)
            log(f"rand: repeat {rep + 1}/{repeats} done")
        memory = {n: memory_kib(SERVER_PIDS[uris[n]]) for n in names}
        status = block_status(uris, files, names, map_length)
    rows = []
    out: dict[str, Any] = {"size": size, "depth": depth, "counts": {f"{n} QD{d}": c for (n, d), c in counts.items()}}
    crows = []
    for d in (1, 16):
        med = {n: median(res[d][n]) for n in names}
        ratios = [med[names[0]] / med[names[3]], med[names[0]] / med[names[2]], med[names[1]] / med[names[2]]]
        rows.append([f"QD{d}", *(med[n] for n in names[:4]), *ratios, "met" if min(ratios) >= 1.0 else "missed"])
        if len(names) > 4:
            rounds = [round(a / b, 2) for a, b in zip(res[d][names[0]], res[d][names[4]], strict=True)]
            log(f"rand QD{d}: ours / base {med[names[0]] / med[names[4]]:.2f} (IOPS {med[names[0]]:,.0f} vs "
                f"{med[names[4]]:,.0f}); server CPU µs/read {median(cpu[d][names[0]]):.1f} vs "
                f"{median(cpu[d][names[4]]):.1f}; per round {rounds}")
        out[f"qd{d}"] = {"median": med, "all": res[d], "server_cpu_us": cpu[d]}
        cmed = {n: median(cpu[d][n]) for n in names}
        crows.append([f"QD{d}", *(cmed[n] for n in names[:4]), cmed[names[0]] / cmed[names[3]],
                      cmed[names[1]] / cmed[names[2]]])
    print(table(["depth", *[f"{n} IOPS" for n in names[:4]], f"ours{depth}/qcow2-{depth}", f"ours{depth}/raw",
                 "ours1/raw", "target: each >= 1.0"], rows,
                title=f"Random 4 KiB reads, qemu-img bench -f raw -s 4096 -S $((4096*104729)), {size // MiB} MiB "
                      f"disk, median of {repeats}"))
    print()
    print(table(["depth", *[f"{n}, server CPU µs/read" for n in names[:4]], f"ours{depth}/qcow2-{depth}",
                 "ours1/raw"], crows, title="Server CPU time (user + system, all threads) per 4 KiB read, median"))
    print()
    out["memory_kib"] = memory
    mrows = [[n, memory[n]["VmRSS"] / 1024, memory[n]["VmHWM"] / 1024] for n in names]
    mrows.append([f"ours{depth} / qcow2-{depth}", memory[names[0]]["VmRSS"] / memory[names[3]]["VmRSS"],
                  memory[names[0]]["VmHWM"] / memory[names[3]]["VmHWM"]])
    print(table(["server", "VmRSS after the reads, MiB", "VmHWM (peak), MiB"], mrows,
                title="Server memory after the random reads (target ours / qemu-nbd <= 1.2)"))
    print()
    out["block_status"] = status
    srows = [[n, status[n]["qemu_img_map_s"] * 1000, status[n]["nbdinfo_map_s"] * 1000] for n in names]
    print(table(["export", f"qemu-img map --max-length={map_length // MiB}M, ms", "nbdinfo --map (whole disk), ms"],
                srows, title="Block status (base:allocation): time to map the disk"))
    print()
    return out


def block_status(uris: dict[str, str], files: dict[str, str], names: list[str], length: int) -> dict[str, Any]:
    """``qemu-img map -f raw --output=json --max-length=L URI`` (qemu's NBD client sets REQ_ONE and asks again
    after every extent it gets) and ``nbdinfo --map URI`` (asks for the whole disk at once)."""
    out: dict[str, Any] = {}
    for n in names:
        warm([files[n]])
        t0 = time.perf_counter()
        run(["qemu-img", "map", "-f", "raw", "--output=json", f"--max-length={length}", uris[n]])
        t1 = time.perf_counter()
        run(["nbdinfo", "--map", uris[n]])
        out[n] = {"qemu_img_map_s": t1 - t0, "nbdinfo_map_s": time.perf_counter() - t1}
    return out


# -- 3. random writes --------------------------------------------------------------------------------------


def write_script(size: int, count: int, seed: int, every: int = 64) -> str:
    rng = np.random.default_rng([seed, 3])
    offs = rng.integers(0, size // BLOCK, count) * BLOCK
    pats = rng.integers(1, 256, count)
    lines = []
    for i, (o, b) in enumerate(zip(offs.tolist(), pats.tolist(), strict=True)):
        lines.append(f"write -q -P {b} {o} 4k\n")
        if (i + 1) % every == 0:
            lines.append("flush\n")
    lines.append("flush\nquit\n")
    return "".join(lines)


def bench_writes(wd: str, size: int, repeats: int, seed: int, runtime: int, script_writes: int) -> dict[str, Any]:
    vol1 = os.path.join(wd, "vol1")
    wvol = os.path.join(wd, "wvol")
    wraw = os.path.join(wd, "w.raw")
    run([*OVERLAYBD, "clone", f"{vol1}@HEAD", wvol])
    shutil.copyfile(os.path.join(wd, "view.raw"), wraw)
    wqcow = os.path.join(wd, "w.qcow2")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", wraw, wqcow])
    names = ["ours", "qemu", "qcow2"]
    if BASELINE_CMD:  # another build of ours, measured beside it (a change's before and after in one run)
        run([*OVERLAYBD, "clone", f"{vol1}@HEAD", os.path.join(wd, "wvol-base")])
        names.insert(1, "base")
    res: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names}
                                              for k in ("qemu-io", "fio QD1", "fio QD16")}
    wcpu: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names} for k in ("fio QD1", "fio QD16")}
    flush_us: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names} for k in ("fio QD1", "fio QD16")}
    script = write_script(size, script_writes, seed)
    with contextlib.ExitStack() as servers:
        uris = {"ours": servers.enter_context(ours_server(wvol, os.path.join(wd, "w-ours.sock"),
                                                               readonly=False)),
                "qemu": servers.enter_context(qemu_nbd(wraw, "raw", os.path.join(wd, "w-qemu.sock"),
                                                       readonly=False)),
                "qcow2": servers.enter_context(qemu_nbd(wqcow, "qcow2", os.path.join(wd, "w-qcow2.sock"),
                                                        readonly=False))}
        files = {"ours": wvol, "qemu": wraw, "qcow2": wqcow}
        if BASELINE_CMD:
            files["base"] = os.path.join(wd, "wvol-base")
            uris["base"] = servers.enter_context(overlaybd_server(files["base"], os.path.join(wd, "w-base.sock"),
                                                                  readonly=False, command=BASELINE_CMD))
        for rep in range(repeats):
            order = names if rep % 2 == 0 else names[::-1]
            if rep == 0:  # the same script on both, then the two disks must hold the same bytes
                for n in order:
                    warm([files[n]])
                    t0 = time.perf_counter()
                    run(["qemu-io", "-t", "writeback", "-f", "raw", uris[n]], stdin=script)
                    res["qemu-io"][n].append(script_writes / (time.perf_counter() - t0))
                check_same([uris[n] for n in names if n != "qemu"], uris["qemu"])
                log("writes: after the same qemu-io script both disks are identical")
            for qd in (1, 16):
                for n in order:
                    warm([files[n]])
                    c0 = cpu_seconds(SERVER_PIDS[uris[n]])
                    r = fio([f"--name=w{qd}", "--ioengine=nbd", f"--uri={uris[n]}", "--rw=randwrite", "--bs=4k",
                             f"--iodepth={qd}", "--fsync=64", f"--size={size}", f"--runtime={runtime}",
                             "--time_based", f"--randseed={seed + rep}"])
                    if not r["syncs"]:
                        raise SystemExit(f"fio issued no flush against {n}: {r}")
                    res[f"fio QD{qd}"][n].append(r["write_iops"])
                    flush_us[f"fio QD{qd}"][n].append(r["sync_lat_us"])
                    wcpu[f"fio QD{qd}"][n].append((cpu_seconds(SERVER_PIDS[uris[n]]) - c0) / r["writes"] * 1e6)
            log(f"writes: repeat {rep + 1}/{repeats} done")
    out = _write_tables(res, wcpu, flush_us, size, repeats, script_writes)
    out.update({"size": size, "script_writes": script_writes, "runtime": runtime})
    return out


def _write_tables(res: dict[str, dict[str, list[float]]], wcpu: dict[str, dict[str, list[float]]],
                  flush_us: dict[str, dict[str, list[float]]], size: int, repeats: int, script_writes: int
                  ) -> dict[str, Any]:
    names = ["ours", "qemu", "qcow2"]
    rows = []
    out: dict[str, Any] = {}
    for k, v in res.items():
        o, q, c = median(v["ours"]), median(v["qemu"]), median(v["qcow2"])
        cpu_us = {n: median(wcpu[k][n]) for n in names} if k in wcpu else None
        fl = {n: median(flush_us[k][n]) for n in names} if k in flush_us else None
        # each round's ours against the peers measured right beside it in that round
        by_round = {peer: [a / b for a, b in zip(v["ours"], v[peer], strict=True)] for peer in ("qemu", "qcow2")}
        rows.append([k, o, q, c, o / q, o / c, _spread(by_round["qemu"]), _spread(by_round["qcow2"]),
                     "met" if o / c >= 1.0 else "missed",
                     *((cpu_us[n] for n in names) if cpu_us else ("", "", "")),
                     *((fl[n] for n in names) if fl else ("", "", ""))])
        out[k] = {"ours": o, "qemu": q, "qcow2": c, "ratio": o / q, "ratio_qcow2": o / c, "all": v,
                  "round_ratios": by_round, "server_cpu_us": wcpu.get(k), "flush_latency_us": flush_us.get(k)}
    print(table(["client (flush every 64 writes)", "ours writes/s", "qemu-nbd raw writes/s",
                 "qemu-nbd qcow2 writes/s", "ours/raw", "ours/qcow2", "ours/raw by round: median (range)",
                 "ours/qcow2 by round: median (range)", "target ours/qcow2 >= 1.0",
                 "ours CPU µs/write", "raw CPU µs/write", "qcow2 CPU µs/write", "ours flush µs", "raw flush µs",
                 "qcow2 flush µs"], rows,
                title=f"Random 4 KiB writes with a flush every 64 writes, {size // MiB} MiB disk, median of "
                      f"{repeats} (qemu-io: one run, {script_writes:,} writes)"))
    print()
    if "base" in res["qemu-io"]:
        brows = []
        for k, v in res.items():
            after = [a / b for a, b in zip(v["ours"], v["base"], strict=True)]
            before = [a / b for a, b in zip(v["base"], v["qcow2"], strict=True)]
            cpu = [median(wcpu[k][n]) for n in ("base", "ours")] if k in wcpu else ["", ""]
            brows.append([k, median(v["base"]), median(v["ours"]), _spread(before), _spread(after), *cpu])
            out[k]["base"] = median(v["base"])
            out[k]["round_ratios"]["ours/base"] = after
            out[k]["round_ratios"]["base/qcow2"] = before
        print(table(["client", "base writes/s", "ours writes/s", "base/qcow2 by round", "ours/base by round",
                     "base CPU µs/write", "ours CPU µs/write"], brows,
                    title=f"The baseline build (--baseline-cmd) beside ours, the same rounds: {BASELINE_CMD}"))
        print()
    return out


def _spread(ratios: list[float]) -> str:
    return f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


# -- 4. the cost of counting ------------------------------------------------------------------------------


def bench_metrics_cost(wd: str, size: int, depth: int, rounds: int, seed: int, secs: float) -> dict[str, Any]:
    vol = os.path.join(wd, f"mvol{depth}")
    build_layered_volume(vol, size, depth, seed)
    # the same server twice, the second as a check of the noise (A/A), and the server with --metrics
    names = ["without", "without, again", "with --metrics"]
    res: dict[int, dict[str, list[float]]] = {d: {n: [] for n in names} for d in (1, 16)}
    cpu: dict[int, dict[str, list[float]]] = {d: {n: [] for n in names} for d in (1, 16)}  # server CPU us a request
    with contextlib.ExitStack() as servers:
        socks = {n: os.path.join(wd, f"m{i}.sock") for i, n in enumerate(names)}
        uris = {n: servers.enter_context(overlaybd_server(vol, socks[n], readonly=True, command=SERVE_CMD,
                                                          extra=["--metrics", "127.0.0.1:0"] if "with " in n else []))
                for n in names}
        pids = {n: server_pid(socks[n]) for n in names}
        counts: dict[int, int] = {}
        for rnd in range(rounds):
            for d in (1, 16):
                if d not in counts:  # calibrate on the server without metrics: about `secs` seconds a measurement
                    warm([vol])
                    counts[d] = int(min(max(qemu_img_bench(uris[names[0]], 2000, d) * secs, 2000), 500_000))
                for n in names[rnd % 3:] + names[: rnd % 3]:  # each goes first in turn
                    warm([vol])
                    before = cpu_seconds(pids[n])
                    res[d][n].append(qemu_img_bench(uris[n], counts[d], d))
                    cpu[d][n].append((cpu_seconds(pids[n]) - before) / counts[d] * 1e6)
            log(f"metrics: round {rnd + 1}/{rounds} done")
    rows = []
    out: dict[str, Any] = {"size": size, "depth": depth, "rounds": rounds, "counts": counts}
    for d in (1, 16):
        out[f"qd{d}"] = {"iops": res[d], "cpu_us": cpu[d]}
        for other in names[1:]:
            ratios = [w / o for o, w in zip(res[d][names[0]], res[d][other], strict=True)]
            cpu_ratios = [w / o for o, w in zip(cpu[d][names[0]], cpu[d][other], strict=True) if o > 0]
            rows.append([f"QD{d}", other, median(res[d][other]), median(res[d][names[0]]),
                         f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                         median(cpu[d][other]), median(cpu[d][names[0]]),
                         f"{median(cpu_ratios):.2f} ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})"])
            out[f"qd{d}"][other] = {"iops_ratios": ratios, "iops_ratio_median": median(ratios),
                                    "cpu_ratios": cpu_ratios, "cpu_ratio_median": median(cpu_ratios)}
    print(table(["depth", "server", "IOPS", "IOPS without", "ratio (range)", "server CPU us/request",
                 "without", "ratio (range)"], rows,
                title=f"What --metrics costs: random 4 KiB reads, {depth} snapshots, {size // MiB} MiB disk, "
                      f"{rounds} interleaved rounds, medians; 'without, again' is the same server as 'without' "
                      "(the noise)"))
    runs = counting_cost()
    update = median(runs)
    request = median(cpu[1][names[0]])
    out["update_us"], out["update_us_all"] = update, runs
    print(f"\nwhat --metrics adds to a request, timed in process (9 x 200,000): median {update:.2f} us, range "
          f"{min(runs):.2f}-{max(runs):.2f}; the server's CPU for a QD1 request without it: {request:.1f} us "
          f"(median above): {update / request:.1%} of it")
    print()
    return out


def server_pid(sock: str) -> int:
    """The process serving on ``sock`` (its command line names ``unix:SOCK``)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"serve" in args and f"unix:{sock}".encode() in args:
                return int(entry)
    raise RuntimeError(f"no process serves on {sock}")


def counting_cost(n: int = 200_000, rounds: int = 9) -> list[float]:
    """Microseconds a request's counting takes, per round: two clock reads and ``PrometheusMetrics.request``, less
    the loop."""
    rec = PrometheusMetrics()
    clock = time.perf_counter
    runs = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(n):
            started = clock()
            rec.request("READ", 4096, clock() - started, 0)
        t1 = clock()
        for _ in range(n):
            pass
        runs.append((t1 - t0 - (clock() - t1)) / n * 1e6)
    return runs


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--seq-size-mib", type=int, help="sequential-read volume size (1024; quick 256)")
    ap.add_argument("--rand-size-mib", type=int, help="random-read volume size (256; quick 32)")
    ap.add_argument("--depth", type=int, default=64, help="snapshots / qcow2 layers of the deep volume (64)")
    ap.add_argument("--only", default="seq,rand,write",
                    help="comma-separated subset of seq,rand,write,metrics (metrics: what --metrics costs)")
    ap.add_argument("--write-runtime", type=int, help="seconds of each fio write measurement (10; quick 2)")
    ap.add_argument("--baseline-cmd", help="command that stands for 'overlaybd' in a second server of ours in the "
                                           "write cells (e.g. the code before a change), measured in the same rounds")
    ap.add_argument("--serve-cmd", help="command that stands for 'overlaybd' when serving (e.g. 'python patched.py' "
                                        "to measure a change to the server); default: the venv's overlaybd")
    args = ap.parse_args()
    global SERVE_CMD, BASELINE_CMD
    SERVE_CMD = shlex.split(args.serve_cmd) if args.serve_cmd else None
    BASELINE_CMD = shlex.split(args.baseline_cmd) if args.baseline_cmd else None
    need("qemu-nbd", "qemu-img", "qemu-io", "nbdcopy", "fio")
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    seq_size = (args.seq_size_mib or (256 if quick else 1024)) * MiB
    rand_size = (args.rand_size_mib or (32 if quick else 256)) * MiB
    only = set(args.only.split(","))
    result: dict[str, Any] = {"benchmark": "bench_nbd", "quick": quick, "repeats": repeats, "versions": versions(),
                              "serve_cmd": args.serve_cmd}
    log(f"bench_nbd: {result['versions']}")
    t0 = time.perf_counter()
    with workdir(args.workdir, args.keep, "bench-nbd-") as wd:
        if "seq" in only:
            result["sequential"] = bench_sequential(wd, seq_size, repeats, args.seed)
            shutil.rmtree(os.path.join(wd, "seqvol"), ignore_errors=True)
            os.unlink(os.path.join(wd, "seq.raw"))
        if "rand" in only or "write" in only:
            if "rand" in only:
                result["random_reads"] = bench_random(wd, rand_size, args.depth, repeats, args.seed,
                                                      secs=0.5 if quick else 2.0,
                                                      map_length=(4 if quick else 16) * MiB)
            else:
                owner = build_layered_volume(os.path.join(wd, "vol64"), rand_size, 1, args.seed)
                build_view_volume(os.path.join(wd, "vol1"), owner, rand_size)
                write_view_raw(os.path.join(wd, "view.raw"), owner)
        if "write" in only:
            result["random_writes"] = bench_writes(wd, rand_size, repeats, args.seed,
                                                   runtime=args.write_runtime or (2 if quick else 10),
                                                   script_writes=2000 if quick else 20000)
        if "metrics" in only:
            result["metrics_cost"] = bench_metrics_cost(wd, rand_size, args.depth, args.repeats or (3 if quick else 5),
                                                        args.seed, secs=0.5 if quick else 2.0)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
