"""ZFile compress and decompress as command-line tools, beside the reference C++ ``overlaybd-zfile`` and the ``lz4``
and ``zstd -T2`` tools, on the same file in the same run.

Data: a tar of /usr, cut (or repeated) to SIZE bytes (default 512 MiB), built once in the work folder (or given
with --data). Cases: LZ4 with 4 KiB blocks, zstd with 64 KiB blocks (CRC on, the default of both ZFile tools).

* ours: ``overlaybd zfile compress --algorithm A --bs B SRC DST`` / ``overlaybd zfile decompress SRC DST``, each a
  fresh process (Python start-up included); it writes into a temporary file, ``fsync``s it and renames it.
  "ours, in-process": the same ``operations.compress`` / ``decompress`` called in this process: no start-up.
  "ours, .pyc" (--pyc): the command run from a copy of the package with its bytecode compiled, as pip installs a
  wheel (the checkout's modules are compiled from source at each start where PYTHONDONTWRITEBYTECODE is set).
  "baseline" (--baseline-cmd CMD): another build of ours, CMD standing for ``overlaybd`` (e.g. main's venv), run in
  the same rounds on its own outputs: an A/B of a change.
* reference: ``overlaybd-zfile --algorithm A --bs B SRC DST`` / ``overlaybd-zfile -x SRC DST`` (built by
  ../shared/reference-tools/build.sh; OVERLAYBD_REFERENCE_TOOLS names its folder). It does not ``fsync``.
* lz4: ``lz4 -1 SRC DST`` / ``lz4 -d``; zstd: ``zstd -3 -T2 SRC -o DST`` / ``zstd -d -T2``. They do not ``fsync``.

Each peer runs as is; then its output is ``fsync``ed outside its time, and "+fsync" adds that time: the peer held
to the durability ours gives. Both ZFile tools decompress the same file (ours; for LZ4 4 KiB it is the reference's
bytes, checked). Rounds are interleaved (ours, reference, codec tool, in turn); median and range (min-max) are
printed; MB = 10^6 bytes of original data. The input sits in the page cache for every run; outputs are removed
before each run.

Bounds (--bounds): the codec alone on the same bytes, memory to memory, one call a block: python-lz4 /
zstandard (1 thread) and the C library through our extension (1 and 2 threads, CRC off).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import lz4.block
import numpy as np
import zstandard
from bench_startup import compiled_copy
from common import MiB, base_parser, emit_json, log, machine, table, versions, workdir

from overlaybd import operations
from overlaybd.formats.output import Compression
from overlaybd.formats.zfile import blocks
from overlaybd.formats.zfile.spec import ALGO_BY_NAME

CASES = (("lz4", 4), ("zstd", 64))
Cmd = list[str] | Callable[[], object]  # a command line, or a call made in this process


def make_data(path: Path, size: int) -> None:
    """A tar of /usr, cut to ``size`` bytes, repeated when it is shorter."""
    with open(path, "wb") as out:
        done = 0
        while done < size:
            tar = subprocess.Popen(["tar", "-C", "/", "-cf", "-", "usr"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
            assert tar.stdout is not None
            while done < size:
                chunk = tar.stdout.read(min(4 * MiB, size - done))
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
            tar.kill()
            tar.wait()


def reference_tool() -> str | None:
    folder = os.environ.get("OVERLAYBD_REFERENCE_TOOLS")
    for candidate in ([os.path.join(folder, "overlaybd-zfile")] if folder else []) + [shutil.which("overlaybd-zfile")]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def ours_tool() -> list[str]:
    exe = shutil.which("overlaybd", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "overlaybd"]


def load() -> float:
    return os.getloadavg()[0]


class Run(NamedTuple):
    wall: float  # seconds for the command
    fsync: float  # seconds for an fsync of its output afterwards
    cpu: float  # CPU seconds (user + system) of the command


def run_peer(cmd: Cmd, out: Path) -> Run:
    """``cmd`` run once (its output removed first), then its output fsynced."""
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    if callable(cmd):
        u0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        cmd()
        t1 = time.perf_counter()
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        return Run(t1 - t0, 0.0, u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    t1 = time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-500:]}")
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return Run(t1 - t0, time.perf_counter() - t1, usage.ru_utime + usage.ru_stime)


def commands(algo: str, kib: int, data: Path, work: Path, ref: str | None, *, pyc: str | None = None,
             baseline: list[str] | None = None) -> dict[str, dict[str, tuple[Cmd, Path]]]:
    """For each peer: its compress and decompress command and the file each writes."""
    ours = ours_tool()
    z_ours, z_ref = work / f"ours.{algo}.zfile", work / f"ref.{algo}.zfile"
    plain = work / f"plain.{algo}"

    def zfile_cmds(tool: list[str], z: Path, x: Path) -> dict[str, tuple[Cmd, Path]]:
        return {"c": ([*tool, "zfile", "compress", "--algorithm", algo, "--bs", str(kib), "-f", "--output", "json",
                       str(data), str(z)], z),
                "x": ([*tool, "zfile", "decompress", "-f", "--output", "json", str(z_ours), str(x)], x)}

    out: dict[str, dict[str, tuple[Cmd, Path]]] = {"ours": zfile_cmds(ours, z_ours, plain)}
    if pyc is not None:  # decompresses ours' file, as every peer does
        out["ours, .pyc"] = zfile_cmds(["env", f"PYTHONPATH={pyc}", *ours], work / f"pyc.{algo}.zfile", plain)
    if baseline is not None:
        out["baseline"] = zfile_cmds(baseline, work / f"baseline.{algo}.zfile", plain)
    comp = Compression(algo, kib * 1024, True, None)
    z_lib, plain_lib = work / f"lib.{algo}.zfile", work / f"plain-lib.{algo}"
    out["ours, in-process"] = {
        "c": (lambda: operations.compress(str(data), str(z_lib), comp, force=True), z_lib),
        "x": (lambda: operations.decompress(str(z_ours), str(plain_lib), force=True), plain_lib)}
    if ref is not None:
        out["reference"] = {
            "c": ([ref, "-f", "--algorithm", algo, "--bs", str(kib), str(data), str(z_ref)], z_ref),
            "x": ([ref, "-f", "-x", str(z_ours), str(plain)], plain)}
    if algo == "lz4" and shutil.which("lz4"):
        c = work / "tool.lz4"
        out["lz4"] = {"c": (["lz4", "-q", "-f", "-1", str(data), str(c)], c),
                      "x": (["lz4", "-q", "-f", "-d", str(c), str(plain)], plain)}
    if algo == "zstd" and shutil.which("zstd"):
        c = work / "tool.zst"
        out["zstd -T2"] = {"c": (["zstd", "-q", "-f", "-3", "-T2", str(data), "-o", str(c)], c),
                           "x": (["zstd", "-q", "-f", "-d", "-T2", str(c), "-o", str(plain)], plain)}
    return out


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_case(algo: str, kib: int, data: Path, work: Path, ref: str | None, rounds: int, *, pyc: str | None = None,
             baseline: list[str] | None = None) -> dict[str, Any]:
    size = data.stat().st_size
    cmds = commands(algo, kib, data, work, ref, pyc=pyc, baseline=baseline)
    times: dict[str, dict[str, list[Run]]] = {p: {"c": [], "x": []} for p in cmds}
    load_before = load()
    for r in range(rounds):
        for op in ("c", "x"):  # each peer compresses first: the decompress inputs are written by round 0
            for peer in peer_order(cmds, r):
                cmd, out = cmds[peer][op]
                times[peer][op].append(run_peer(cmd, out))
        log(f"{algo} {kib} KiB round {r + 1}/{rounds}: load {load():.2f}")
    result: dict[str, Any] = {"algo": algo, "block_kib": kib, "size": size, "load_before": load_before,
                              "load_after": load(), "peers": {}}
    for peer, ops in times.items():
        entry: dict[str, Any] = {}
        for op, runs in ops.items():
            entry[op] = {"mbps": summary([size / 1e6 / r.wall for r in runs]),
                         "mbps_fsync": summary([size / 1e6 / (r.wall + r.fsync) for r in runs]),
                         "fsync_s": summary([r.fsync for r in runs]), "cpu_s": summary([r.cpu for r in runs]),
                         # the same round's times set side by side: ours / this peer, throughput
                         "ours_by_round": summary([r.wall / o.wall for r, o in zip(runs, times["ours"][op],
                                                                                   strict=True)]),
                         "ours_by_round_fsync": summary([(r.wall + r.fsync) / o.wall
                                                         for r, o in zip(runs, times["ours"][op], strict=True)])}
        entry["compressed"] = cmds[peer]["c"][1].stat().st_size
        result["peers"][peer] = entry
    result["checks"] = checks(algo, data, work, cmds, ref)
    return result


def peer_order(cmds: dict[str, Any], r: int) -> list[str]:
    """The peers in turn, starting one further each round."""
    names = list(cmds)
    k = r % len(names)
    return names[k:] + names[:k]


def checks(algo: str, data: Path, work: Path, cmds: dict[str, dict[str, tuple[Cmd, Path]]],
           ref: str | None) -> dict[str, Any]:
    """The round trip is exact; ours against the reference's bytes; whether the reference reads its own file."""
    out: dict[str, Any] = {}
    plain = cmds["ours"]["x"][1]
    out["round_trip_exact"] = subprocess.run(["cmp", "-s", str(plain), str(data)]).returncode == 0
    z_ours = cmds["ours"]["c"][1]
    info = subprocess.run([*ours_tool(), "info", "--output", "json", str(z_ours)], capture_output=True, text=True)
    out["ours_info"] = info.stdout[-400:] if info.returncode == 0 else None
    for other in ("ours, .pyc", "baseline"):
        if other in cmds:
            out[f"same_bytes_as_{other}"] = subprocess.run(["cmp", "-s", str(z_ours), str(cmds[other]["c"][1])]
                                                           ).returncode == 0
    if ref is not None:
        z_ref = cmds["reference"]["c"][1]
        out["same_bytes_as_reference"] = subprocess.run(["cmp", "-s", str(z_ours), str(z_ref)]).returncode == 0
        reread = work / "reread"
        refx = subprocess.run([ref, "-f", "-x", str(z_ref), str(reread)], capture_output=True, text=True)
        out["reference_reads_its_own_file"] = refx.returncode == 0 and subprocess.run(
            ["cmp", "-s", str(reread), str(data)]).returncode == 0
        with contextlib.suppress(FileNotFoundError):
            reread.unlink()
    return out


# -- bounds: the codec alone --------------------------------------------------------------------------------


def bounds(algo: str, kib: int, data: Path, rounds: int) -> dict[str, Any]:
    bs = kib * 1024
    raw = data.read_bytes()
    res: dict[str, Any] = {"python codec, 1 thread": python_codec(algo, bs, memoryview(raw), rounds)}
    for threads in (1, 2):
        if blocks.NATIVE is not None:
            res[f"C library, {threads} thread{'s' if threads > 1 else ''}"] = c_codec(algo, bs, memoryview(raw),
                                                                                     threads, rounds)
    return res


def write_floor(data: Path, work: Path, rounds: int) -> dict[str, Any]:
    """Writing the original bytes alone into a new file (``pwrite`` calls from memory into the page cache) in
    256 KiB and in 4 MiB pieces, from 1 and 2 threads, without and with an ``fsync``: what any decompressor
    writing one file pays."""
    raw = memoryview(data.read_bytes())
    out = work / "floor"
    res: dict[str, Any] = {}
    for piece in (256 << 10, 4 * MiB):
        for threads in (1, 2):
            for sync in (False, True):
                def once(piece: int = piece, threads: int = threads, sync: bool = sync) -> None:
                    with contextlib.suppress(FileNotFoundError):
                        out.unlink()
                    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    try:
                        on_threads(threads, lambda k: os.pwrite(fd, raw[k * piece : (k + 1) * piece], k * piece),
                                   -(-len(raw) // piece))
                        if sync:
                            os.fsync(fd)
                    finally:
                        os.close(fd)
                name = f"{piece >> 10} KiB writes, {threads} thread{'s' if threads > 1 else ''}"
                res[name + (", fsync" if sync else "")] = best(rounds, once, len(raw))
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    return res


def python_codec(algo: str, bs: int, view: memoryview, rounds: int) -> dict[str, Any]:
    """One python-lz4 / zstandard call a block, one thread."""
    pieces = [view[i : i + bs] for i in range(0, len(view), bs)]
    comp: Callable[[memoryview], bytes]
    if algo == "lz4":
        def comp(p: memoryview) -> bytes:
            return lz4.block.compress(p, store_size=False)  # type: ignore[no-any-return]

        def dec(c: bytes) -> bytes:
            return lz4.block.decompress(c, uncompressed_size=bs)  # type: ignore[no-any-return]
    else:
        zc, zd = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
        comp = zc.compress

        def dec(c: bytes) -> bytes:
            return zd.decompress(c, max_output_size=bs)
    stored = [comp(p) for p in pieces]
    return {"c": best(rounds, lambda: [comp(p) for p in pieces], len(view)),
            "x": best(rounds, lambda: [dec(c) for c in stored], len(view))}


def c_codec(algo: str, bs: int, view: memoryview, threads: int, rounds: int) -> dict[str, Any]:
    """The C library through the extension: one call a thread over its share of the blocks, CRC off."""
    native = blocks.NATIVE
    assert native is not None
    code = ALGO_BY_NAME[algo]
    per = -(-len(view) // bs // threads) * bs
    parts = [view[i : i + per] for i in range(0, len(view), per)]
    counts = [-(-len(p) // bs) for p in parts]
    outs = [bytearray(n * native.compress_bound(code, bs)) for n in counts]
    lens = [np.empty(n, dtype="<u4") for n in counts]
    plains = [bytearray(n * bs) for n in counts]

    def compress(k: int) -> None:
        native.compress(code, parts[k], bs, False, outs[k], lens[k], 1 << 30)

    on_threads(threads, compress, len(parts))
    starts = [np.concatenate([[0], np.cumsum(ln, dtype=np.int64)]) for ln in lens]

    def decompress(k: int) -> None:
        last = len(parts[k]) - (counts[k] - 1) * bs
        done = native.decompress(code, outs[k], starts[k], 0, counts[k], 0, plains[k], bs, last, False)
        assert done[1] == blocks.OK, done

    return {"c": best(rounds, lambda: on_threads(threads, compress, len(parts)), len(view)),
            "x": best(rounds, lambda: on_threads(threads, decompress, len(parts)), len(view))}


def on_threads(threads: int, fn: Callable[[int], Any], n: int) -> None:
    if threads == 1:
        for k in range(n):
            fn(k)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(fn, k) for k in range(n)]:
            f.result()


def best(rounds: int, fn: Callable[[], Any], size: int) -> dict[str, float]:
    xs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        xs.append(size / 1e6 / (time.perf_counter() - t0))
    return summary(xs)


# -- output ------------------------------------------------------------------------------------------------


def rng(s: dict[str, float]) -> str:
    return f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"


def rng2(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def print_case(res: dict[str, Any]) -> None:
    peers = res["peers"]
    ours = peers["ours"]
    rows = []
    for peer, e in peers.items():
        row: list[Any] = [peer]
        for op in ("c", "x"):
            row += [rng(e[op]["mbps"]), rng(e[op]["mbps_fsync"]),
                    None if peer == "ours" else ours[op]["mbps"]["median"] / e[op]["mbps"]["median"],
                    None if peer == "ours" else ours[op]["mbps"]["median"] / e[op]["mbps_fsync"]["median"],
                    e[op]["cpu_s"]["median"]]
        row.append(e["compressed"] / res["size"])
        rows.append(row)
    print(table(["peer", "compress MB/s", "+fsync", "ours/peer", "ours/(peer+fsync)", "CPU s", "decompress MB/s",
                 "+fsync", "ours/peer", "ours/(peer+fsync)", "CPU s", "size ratio"], rows,
                title=f"{res['algo']} {res['block_kib']} KiB blocks, {res['size'] / MiB:.0f} MiB; load "
                      f"{res['load_before']:.2f} -> {res['load_after']:.2f}"))
    print()
    rows = [[peer] + [rng2(e[op][key]) for op in ("c", "x") for key in ("ours_by_round", "ours_by_round_fsync")]
            for peer, e in peers.items() if peer != "ours"]
    print(table(["peer", "compress: ours/peer", "ours/(peer+fsync)", "decompress: ours/peer", "ours/(peer+fsync)"],
                rows, title="ours / peer within each round (median, range)"))
    print()
    print("checks:", res["checks"])
    print()


def print_bounds(algo: str, kib: int, b: dict[str, Any]) -> None:
    rows = [[name, rng(v["c"]), rng(v["x"])] for name, v in b.items()]
    print(table(["codec alone", "compress MB/s", "decompress MB/s"], rows, title=f"{algo} {kib} KiB: the codec alone"))
    print()


def main() -> int:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", help="use this file as the data (default: a tar of /usr built in the work folder)")
    ap.add_argument("--only", choices=[a for a, _ in CASES])
    ap.add_argument("--bounds", action="store_true", help="also measure the codec alone on the same bytes")
    ap.add_argument("--pyc", action="store_true", help="also run ours from a copy with compiled bytecode")
    ap.add_argument("--baseline-cmd", help="command standing for 'overlaybd' in a second build of ours, run in the "
                    "same rounds (e.g. /work/main/.venv/bin/overlaybd)")
    args = ap.parse_args()
    size = (64 if args.quick else args.size_mib) * MiB
    rounds = 2 if args.quick else args.rounds
    ref = reference_tool()
    if ref is None:
        log("the reference overlaybd-zfile is not built: set OVERLAYBD_REFERENCE_TOOLS (../shared/reference-tools)")
    with workdir(args.workdir, args.keep, "zfile-peers-") as wd:
        work = Path(wd)
        data = Path(args.data) if args.data else work / "usr.tar"
        if not args.data:
            make_data(data, size)
        data.read_bytes()  # into the page cache
        result: dict[str, Any] = {"machine": machine(), "versions": versions(), "block_path": blocks.describe(),
                                  "reference": ref, "cases": [], "bounds": {}}
        for algo, kib in CASES:
            if args.only and algo != args.only:
                continue
            res = run_case(algo, kib, data, work, ref, rounds, pyc=compiled_copy(wd) if args.pyc else None,
                           baseline=shlex.split(args.baseline_cmd) if args.baseline_cmd else None)
            print_case(res)
            result["cases"].append(res)
            if args.bounds:
                b = bounds(algo, kib, data, 3)
                print_bounds(algo, kib, b)
                result["bounds"][f"{algo}-{kib}"] = b
        if args.bounds:
            floor = write_floor(data, work, 3)
            print(table(["writing the original into a new file", "MB/s"], [[k, rng(v)] for k, v in floor.items()]))
            result["bounds"]["write"] = floor
        emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
