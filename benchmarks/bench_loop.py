"""The kernel block device (``overlaybd attach``: /dev/loopN over a single-file FUSE export) beside plain loop
devices on a raw file holding the same bytes, with the same clients, in the same run. Needs root.

Data: a volume (1 GiB; quick 256 MiB) of mixed data in one sealed snapshot (as ``bench_nbd.py``: by 1 MiB piece,
50 % random, 30 % text, 10 % written zeros, 10 % never written), and ``overlaybd export VOL disk.raw``.

Devices:

* ours: ``overlaybd attach VOL --readonly`` (reads), ``overlaybd attach WVOL`` on a clone (writes); both bind the
  loop device with ``--direct-io=on`` to ``MOUNT/disk``, which FUSE opens with ``direct_io``;
* loop DIO: ``losetup -f --show --direct-io=on [-r] disk.raw`` (the brief's peer: reads go to the virtio disk,
  bypassing the page cache);
* loop buffered: ``losetup -f --show -r disk.raw`` (page-cache reads of the same warm file; the fair peer for
  ours, whose layer files are read from a warm page cache too).

Clients: ``dd if=DEV of=/dev/null bs=1M iflag=direct``; ``fio --filename=DEV --direct=1 --ioengine=libaio
--rw=randread --bs=4k --iodepth=1|16 --runtime=R --time_based``; ``fio ... --rw=randwrite --fsync=64`` on the
writable devices (a flush every 64 writes reaches the volume as ``flush()``). Measurements are interleaved, the
page cache is re-warmed right before each, the median is printed. Every device is compared byte for byte with
the raw file first (a mismatch fails the run). Everything is detached at the end, also on failure.

    .venv/bin/python benchmarks/bench_loop.py [--quick] [--workdir DIR] [--repeats N] [--runtime S] [--json FILE]
        [--python-too]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from common import emit_json, log, median, table, warm, workdir
from nbd_common import (
    OVERLAYBD,
    MiB,
    base_parser,
    build_mixed_volume,
    fio,
    need,
    run,
    versions,
)

READERS = ["ours (attach, FUSE + loop DIO)", "loop DIO on raw", "loop buffered on raw"]
WRITERS = ["ours (attach, FUSE + loop DIO)", "loop DIO on raw"]
PYTHON = "ours, Python only (OVERLAYBD_NATIVE=0)"  # --python-too: the same attach without the C extensions


class Devices:
    """Loop devices and attachments made here; ``close()`` undoes every one of them, whatever failed."""

    def __init__(self) -> None:
        self.ours: list[str] = []
        self.loops: list[str] = []

    def attach(self, vol: str, readonly: bool, *, native: bool = True) -> str:
        saved = os.environ.get("OVERLAYBD_NATIVE")
        if not native:  # the daemon inherits the environment of the attach command
            os.environ["OVERLAYBD_NATIVE"] = "0"
        try:
            dev = run([*OVERLAYBD, "attach", vol, *(["--readonly"] if readonly else [])]).strip()
        finally:
            if saved is None:
                os.environ.pop("OVERLAYBD_NATIVE", None)
            else:
                os.environ["OVERLAYBD_NATIVE"] = saved
        self.ours.append(dev)
        return dev

    def loop(self, path: str, *, dio: bool, readonly: bool) -> str:
        dev = run(["losetup", "-f", "--show", *(["--direct-io=on"] if dio else []), *(["-r"] if readonly else []),
                   path]).strip()
        self.loops.append(dev)
        return dev

    def close(self) -> None:
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        for dev in self.ours:
            res = subprocess.run([*OVERLAYBD, "detach", dev], capture_output=True, text=True)
            if res.returncode:
                log(f"detach {dev} failed: {res.stderr.strip()}")
        self.ours.clear()
        self.loops.clear()


def same_bytes(dev: str, raw: str) -> None:
    res = subprocess.run(["cmp", dev, raw], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"MISMATCH: {dev} vs {raw}: {(res.stdout or res.stderr).strip()}")


def dd_mbps(dev: str) -> float:
    out = subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=1M", "iflag=direct"], capture_output=True,
                         text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([0-9.]+) s", out)
    if not m:
        raise RuntimeError(f"dd: {out!r}")
    return int(m.group(1)) / float(m.group(2)) / 1e6


def fio_dev(dev: str, rw: str, qd: int, runtime: int, seed: int) -> dict[str, Any]:
    extra = ["--fsync=64"] if rw == "randwrite" else ["--readonly"]
    return fio([f"--name={rw}{qd}", f"--filename={dev}", "--direct=1", "--ioengine=libaio", f"--rw={rw}",
                "--bs=4k", f"--iodepth={qd}", f"--runtime={runtime}", "--time_based", f"--randseed={seed}", *extra])


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--size-mib", type=int, help="volume size (1024; quick 256)")
    ap.add_argument("--runtime", type=int, help="seconds per fio run (10; quick 2)")
    ap.add_argument("--python-too", action="store_true",
                    help="also attach the volume (and another clone) with OVERLAYBD_NATIVE=0, measured in the same "
                         "rounds: the Python path, for a before/after in one run")
    args = ap.parse_args()
    readers = READERS + ([PYTHON] if args.python_too else [])
    writers = WRITERS + ([PYTHON] if args.python_too else [])
    if os.geteuid() != 0:
        sys.exit("bench_loop.py needs root (FUSE mount and loop devices)")
    need("losetup", "fio", "fusermount3", "dd", "cmp")
    quick = args.quick
    size = (args.size_mib or (256 if quick else 1024)) * MiB
    runtime = args.runtime or (2 if quick else 10)
    repeats = args.repeats or (1 if quick else 2)
    result: dict[str, Any] = {"benchmark": "bench_loop", "quick": quick, "repeats": repeats, "runtime": runtime,
                              "size": size, "versions": versions()}
    log(f"bench_loop: {result['versions']}")
    t_start = time.perf_counter()
    devs = Devices()
    with workdir(args.workdir, args.keep, "bench-loop-") as wd:
        try:
            vol, raw = os.path.join(wd, "vol"), os.path.join(wd, "disk.raw")
            wvol, wraw = os.path.join(wd, "wvol"), os.path.join(wd, "w.raw")
            t0 = time.perf_counter()
            result["kinds"] = build_mixed_volume(vol, size, args.seed)
            run([*OVERLAYBD, "export", vol, raw])
            run([*OVERLAYBD, "clone", f"{vol}@HEAD", wvol])
            wvol_py = os.path.join(wd, "wvol-python")
            if args.python_too:
                run([*OVERLAYBD, "clone", f"{vol}@HEAD", wvol_py])
            shutil.copyfile(raw, wraw)
            log(f"built the {size // MiB} MiB volume, its raw export and writable copies in "
                f"{time.perf_counter() - t0:.1f} s")

            t0 = time.perf_counter()
            rdev = {READERS[0]: devs.attach(vol, readonly=True),
                    READERS[1]: devs.loop(raw, dio=True, readonly=True),
                    READERS[2]: devs.loop(raw, dio=False, readonly=True)}
            wdev = {WRITERS[0]: devs.attach(wvol, readonly=False),
                    WRITERS[1]: devs.loop(wraw, dio=True, readonly=False)}
            if args.python_too:
                rdev[PYTHON] = devs.attach(vol, readonly=True, native=False)
                wdev[PYTHON] = devs.attach(wvol_py, readonly=False, native=False)
            result["attach_seconds"] = round(time.perf_counter() - t0, 2)
            result["devices"] = {**{f"read: {k}": v for k, v in rdev.items()},
                                 **{f"write: {k}": v for k, v in wdev.items()}}
            log(f"devices: {result['devices']}")
            files = {READERS[0]: vol, READERS[1]: raw, READERS[2]: raw, PYTHON: vol}
            wfiles = {WRITERS[0]: wvol, WRITERS[1]: wraw, PYTHON: wvol_py}
            for dev in rdev.values():
                same_bytes(dev, raw)
            for name in (WRITERS[0], PYTHON):
                if name in wdev:
                    same_bytes(wdev[name], raw)
            log("every device reads the same bytes as the raw file")
            seq, rand, lat, wr = measure(rdev, wdev, files, wfiles, repeats, runtime, args.seed)
        finally:
            devs.close()
    report(readers, writers, seq, rand, lat, wr, size, repeats, runtime)
    result["sequential_mbps"] = {n: {"median": median(seq[n]), "all": seq[n]} for n in readers}
    result["randread_iops"] = {k: {n: {"median": median(v[n]), "all": v[n]} for n in readers}
                               for k, v in rand.items()}
    result["randread_qd1_lat_us"] = {n: median(lat[n]) for n in readers}
    result["randwrite_iops"] = {k: {n: {"median": median(v[n]), "all": v[n]} for n in writers}
                                for k, v in wr.items()}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    emit_json(result, args.json)
    return 0


Series = dict[str, list[float]]


def measure(rdev: dict[str, str], wdev: dict[str, str], files: dict[str, str], wfiles: dict[str, str],
            repeats: int, runtime: int, seed: int) -> tuple[Series, dict[str, Series], Series, dict[str, Series]]:
    """Every client on every device, interleaved (the order reversed every other round), page cache re-warmed
    before each measurement: sequential MB/s, random-read IOPS by depth, QD1 latency, random-write IOPS by depth."""
    readers, writers = list(rdev), list(wdev)
    seq: Series = {n: [] for n in readers}
    rand: dict[str, Series] = {f"QD{qd}": {n: [] for n in readers} for qd in (1, 16)}
    lat: Series = {n: [] for n in readers}
    wr: dict[str, Series] = {f"QD{qd}": {n: [] for n in writers} for qd in (1, 16)}
    for rep in range(repeats):
        order = readers if rep % 2 == 0 else readers[::-1]
        for n in order:
            warm([files[n]])
            seq[n].append(dd_mbps(rdev[n]))
        for qd in (1, 16):
            for n in order:
                warm([files[n]])
                r = fio_dev(rdev[n], "randread", qd, runtime, seed + rep)
                rand[f"QD{qd}"][n].append(r["read_iops"])
                if qd == 1:
                    lat[n].append(r["read_lat_us"])
        worder = writers if rep % 2 == 0 else writers[::-1]
        for qd in (1, 16):
            for n in worder:
                warm([wfiles[n]])
                r = fio_dev(wdev[n], "randwrite", qd, runtime, seed + rep)
                wr[f"QD{qd}"][n].append(r["write_iops"])
        log(f"repeat {rep + 1}/{repeats} done")
    return seq, rand, lat, wr


def report(readers: list[str], writers: list[str], seq: Series, rand: dict[str, Series], lat: Series,
           wr: dict[str, Series], size: int, repeats: int, runtime: int) -> None:
    """The tables: medians, and ratios of ours (and of the Python path, when measured) to the plain loop devices."""
    ours = [n for n in (READERS[0], PYTHON) if n in readers]

    def ratios(v: Series, peers: list[str]) -> list[float]:
        return [median(v[o]) / median(v[p]) for o in ours for p in peers]

    rpeers = [READERS[1], READERS[2]]
    heads = [f"{'ours' if o == READERS[0] else 'python'}/{p.replace(' on raw', '')}" for o in ours for p in rpeers]
    rows = [["dd bs=1M iflag=direct, MB/s", *(median(seq[n]) for n in readers), *ratios(seq, rpeers)]]
    for k, v in rand.items():
        rows.append([f"fio randread 4k {k}, IOPS", *(median(v[n]) for n in readers), *ratios(v, rpeers)])
    rows.append(["fio randread 4k QD1, mean latency µs", *(median(lat[n]) for n in readers), *ratios(lat, rpeers)])
    print(table(["read (volume attached read-only)", *readers, *heads], rows,
                title=f"Reads of a {size // MiB} MiB device, median of {repeats} (fio runs {runtime} s)"))
    print()
    wheads = [f"{'ours' if o == READERS[0] else 'python'}/loop DIO" for o in ours]
    wrows = [[f"fio randwrite 4k {k} --fsync=64, writes/s", *(median(v[n]) for n in writers),
              *ratios(v, [WRITERS[1]])] for k, v in wr.items()]
    print(table(["write (writable clone attached)", *writers, *wheads], wrows,
                title=f"Random 4 KiB writes, a flush every 64, median of {repeats} (fio runs {runtime} s)"))
    print()


if __name__ == "__main__":
    sys.exit(main())
