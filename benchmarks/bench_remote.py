"""Push and lazy pull against a real registry (Debian docker-registry on 127.0.0.1), each figure beside a peer
measured in the same run.

Data: a volume of SIZE bytes (1 GiB; quick 128 MiB) built with ``Volume.create`` and 10 x (``Volume.open(
writable=True)`` + ``pwrite`` + ``Volume.snapshot(compression=Compression("lz4"))``). The disk is cut in 1 MiB
extents; a random permutation of them is split in 10 shares and layer i writes share i, so every byte of the disk
is data held by exactly one layer. Each extent is 1 KiB pieces, half random and half log-like text (the layers'
compressed size is ~0.6 of the original). The volume is pushed with ``overlaybd.remote.transfer.push``.

1. lazy start: ``pull(lazy=True)`` + ``Volume.open()`` + reading the first 4 KiB, cache empty; bytes and range
   requests fetched (counted in process by wrapping ``RegistryRepository.read_range``; cross-checked once by
   ``FaultProxy`` in pass mode). Peer: an eager pull (every blob downloaded and verified) + open + first read.
2. random 5 %: 64 KiB reads at random 4 KiB-aligned offsets (fixed seed) through the lazily pulled volume: cold
   (empty cache: bytes fetched / bytes read, target <= 2) and warm (same reads again). Peer: the same reads
   through the eagerly pulled volume, page cache warm (warm/local rate, target >= 0.8).
3. 50 ms per request (a delaying proxy of our own between client and registry): a sequential read of the whole
   volume in 1 MiB ``readinto`` calls, with read-ahead as shipped (``CachePolicy`` defaults: read-ahead, run
   length, concurrency) beside without read-ahead and with neither read-ahead nor run coalescing; and a "boot" workload
   (a fixed list of scattered 64 KiB reads) after ``pull(lazy=True, prefetch=TRACE)`` beside the same pull without
   a trace. The trace is recorded by running the workload on the source volume with ``Volume.open(record_trace=)``.

As shipped, the cache uses 64 KiB chunks and reads ahead (3 MiB) only for a read that continues the previous read
of the same blob. For comparison, "previous settings" emulates the cache before 972f4c1 in this process only
(256 KiB chunks, read-ahead of 4 chunks on every read, runs of at most 16 chunks), measured on parts 1, 2 and 3
beside the shipped settings: each variant is a ``CachePolicy`` given to the process's cache (``lazy.use_cache``).

OVERLAYBD_CACHE_DIR points into the work folder (the machine's cache is untouched) and is emptied before every
cold run. All traffic stays on 127.0.0.1. Correctness (exit 1 on failure): every lazy read equals the same read
of the eagerly pulled volume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (
    MiB,
    aligned_buffer,
    base_parser,
    emit_json,
    fmt,
    fresh_dir,
    log,
    machine,
    median,
    table,
    versions,
    warm,
    workdir,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.e2e.registry

from remote_common import (  # noqa: E402
    BARE,
    LAYERS,
    NO_READAHEAD,
    PREVIOUS,
    READ,
    SHIPPED,
    DelayProxy,
    Wire,
    build_volume,
    cache_allocated,
    cache_config,
    cache_dir,
    describe,
    hash_reads,
    random_reads,
    read_list,
    read_sequential,
    reset_cache,
    wait_thread,
)

from overlaybd.remote.reference import parse_reference  # noqa: E402
from overlaybd.remote.transfer import pull, push  # noqa: E402
from overlaybd.volume import Volume  # noqa: E402
from tests.e2e.registry import FaultProxy, registry  # noqa: E402

DELAY = 0.050


# -- the parts -----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, wd: str, host: str, size: int, args: Any, wire: Wire) -> None:
        self.wd = wd
        self.host = host
        self.size = size
        self.args = args
        self.wire = wire
        self.failures: list[str] = []
        self.pulls = 0

    def target(self, name: str) -> str:
        self.pulls += 1
        return os.path.join(self.wd, "pulls", f"{self.pulls:03d}-{name}")

    def check(self, what: str, ok: bool) -> None:
        if not ok:
            self.failures.append(what)
            log(f"CHECK FAILED: {what}")

    # 1 ------------------------------------------------------------------------------------------------------
    def lazy_start_once(self, ref: str, name: str, first_block: bytes) -> dict[str, Any]:
        reset_cache()
        m0 = self.wire.mark()
        t0 = time.perf_counter()
        vol = pull(parse_reference(ref), self.target(name), lazy=True).volume
        t1 = time.perf_counter()
        m1 = self.wire.mark()
        with vol.open() as dev:
            t2 = time.perf_counter()
            m2 = self.wire.mark()
            got = dev.pread(0, 4096)
            t3 = time.perf_counter()
        self.check(f"lazy first block ({name})", got == first_block)
        return {"pull_s": t1 - t0, "open_s": t2 - t1, "first_read_s": t3 - t2, "total_s": t3 - t0,
                "pull": (m1[0] - m0[0], m1[1] - m0[1]), "open": (m2[0] - m1[0], m2[1] - m1[1]),
                "all": self.wire.since(m0), "cache_allocated": cache_allocated()}

    def lazy_start(self, ref: str, eager_blob_bytes: int, first_block: bytes, repeats: int) -> dict[str, Any]:
        runs = []
        for r in range(repeats):
            runs.append(self.lazy_start_once(ref, "lazy-start", first_block))
            log(f"  lazy start {r + 1}/{repeats}: {runs[-1]['total_s']:.3f} s, {runs[-1]['all'][1]:,} bytes")
        eager = []
        for r in range(repeats):
            t0 = time.perf_counter()
            vol = pull(parse_reference(ref), self.target("eager-start")).volume
            t1 = time.perf_counter()
            with vol.open() as dev:
                got = dev.pread(0, 4096)
            t2 = time.perf_counter()
            self.check("eager first block", got == first_block)
            eager.append({"pull_s": t1 - t0, "open_read_s": t2 - t1, "total_s": t2 - t0})
            log(f"  eager start {r + 1}/{repeats}: {eager[-1]['total_s']:.3f} s")
            shutil.rmtree(vol.path)
        with cache_config(**PREVIOUS):
            whatif = self.lazy_start_once(ref, "lazy-start-whatif", first_block)
        # cross-check of the byte count by the tests' FaultProxy (pass mode), one run
        proxy = FaultProxy(self.host)
        try:
            reset_cache()
            m0 = self.wire.mark()
            vol = pull(parse_reference(ref.replace(self.host, proxy.address)), self.target("lazy-proxy"),
                       lazy=True).volume
            with vol.open() as dev:
                dev.pread(0, 4096)
            ours = self.wire.since(m0)
            faultproxy = {"blob_gets": proxy.blob_gets, "bytes": proxy.bytes_sent, "ours": ours}
        finally:
            proxy.close()
        med = {k: median([x[k] for x in runs]) for k in ("pull_s", "open_s", "first_read_s", "total_s")}
        eager_med = {k: median([x[k] for x in eager]) for k in ("pull_s", "open_read_s", "total_s")}
        return {"runs": runs, "median": med, "eager_runs": eager, "eager_median": eager_med,
                "eager_blob_bytes": eager_blob_bytes, "fetched_bytes": runs[0]["all"][1],
                "requests": runs[0]["all"][0], "whatif": whatif, "faultproxy": faultproxy}

    # 2 ------------------------------------------------------------------------------------------------------
    def random_5pct(self, ref: str, eager: Volume, repeats: int, profile: bool) -> dict[str, Any]:
        count = max(1, int(self.size * 0.05) // READ)
        offsets = random_reads(self.size, count, self.args.seed + 2)
        want = hash_reads(eager, offsets, READ)
        loops = max(1, -(-2000 // count))  # timed warm runs read the list this many times (>= 2,000 reads)
        out: dict[str, Any] = {"reads": count, "read_bytes": count * READ, "loops": loops, "cold": []}
        for name, cfg in [("as shipped", SHIPPED), ("no read-ahead", NO_READAHEAD),
                          ("previous settings (emulated)", PREVIOUS)]:
            with cache_config(**cfg):
                vol = pull(parse_reference(ref), self.target("random"), lazy=True).volume
                with vol.open() as dev:
                    m0 = self.wire.mark()
                    h = hashlib.blake2b()
                    t0 = time.perf_counter()
                    read_list(dev, offsets, READ, h)
                    cold_s = time.perf_counter() - t0
                    req, got = self.wire.since(m0)
                    self.check(f"lazy random reads, cold ({name}) equal the eager volume's", h.hexdigest() == want)
                    h = hashlib.blake2b()
                    read_list(dev, offsets, READ, h)
                    self.check(f"lazy random reads, warm ({name}) equal the eager volume's", h.hexdigest() == want)
                    self.check(f"warm reads fetched nothing ({name})", self.wire.since(m0)[0] == req)
                out["cold"].append({"variant": name, "config": describe(cfg), "seconds": cold_s, "requests": req,
                                    "fetched": got, "ratio": got / out["read_bytes"],
                                    "cache_allocated": cache_allocated()})
                log(f"  random 5%, {name}: fetched/read {got / out['read_bytes']:.2f}, {cold_s:.1f} s")
                if cfg is SHIPPED:
                    out.update(self.warm_vs_local(vol, eager, offsets, loops, repeats))
                    if profile:
                        out["profile"] = profile_reads(vol, eager, offsets)
        out["ratio_fetched"] = out["cold"][0]["ratio"]
        log(f"  random 5%: warm/local {out['warm_vs_local']:.2f}")
        return out

    def warm_vs_local(self, vol: Volume, eager: Volume, offsets: list[int], loops: int, repeats: int
                      ) -> dict[str, Any]:
        """Reads alternate one by one between the lazy volume (warm cache) and the eager one, so both meet the
        same load (the machine is shared); each side's files are read into the page cache before every repeat.
        The ratio reported is the median over repeats of (local time / lazy time)."""
        cache_files = [str(p) for p in Path(cache_dir()).rglob("*.data")]
        warm_s, local_s = [], []
        with vol.open() as lz, eager.open() as loc:
            timed_pairs(lz, loc, offsets, 1)
            for _ in range(repeats):
                warm(cache_files)
                warm(eager.lowers)
                a, b = timed_pairs(lz, loc, offsets, loops)
                warm_s.append(a)
                local_s.append(b)
        return {"warm_s": median(warm_s), "local_s": median(local_s), "warm_runs": warm_s, "local_runs": local_s,
                "warm_vs_local": median([b / a for a, b in zip(warm_s, local_s, strict=True)]),
                "warm_vs_local_best": min(local_s) / min(warm_s)}

    # 3 ------------------------------------------------------------------------------------------------------
    def sequential(self, proxy: DelayProxy, ref: str, variants: list[tuple[str, dict[str, Any]]],
                   want: str, limit: int) -> list[dict[str, Any]]:
        out = []
        for name, cfg in variants:
            with cache_config(**cfg):
                vol = pull(parse_reference(ref), self.target("seq"), lazy=True).volume
                with vol.open() as dev:
                    m0 = self.wire.mark()
                    p0 = proxy.requests
                    h = hashlib.blake2b()
                    t0 = time.perf_counter()
                    read_sequential(dev, limit, h)
                    dt = time.perf_counter() - t0
                    req, got = self.wire.since(m0)
                self.check(f"sequential read ({name}) equals the eager volume's", h.hexdigest() == want)
                out.append({"variant": name, "config": describe(cfg), **cfg, "seconds": dt, "mib": limit / MiB,
                            "mib_s": limit / MiB / dt, "requests": req, "proxy_requests": proxy.requests - p0,
                            "fetched": got})
                log(f"  sequential {name}: {limit / MiB / dt:.1f} MiB/s, {req} requests")
        return out

    def boot(self, proxy: DelayProxy, ref: str, source: Volume, offsets: list[int], want: str, repeats: int
             ) -> dict[str, Any]:
        trace_file = os.path.join(self.wd, "boot.trace")
        with source.open(record_trace=trace_file) as dev:
            read_list(dev, offsets, READ)
        from overlaybd.trace import decode

        with open(trace_file, "rb") as f:
            records = decode(f.read())
        variants = [("no prefetch", SHIPPED, None), ("trace prefetch", SHIPPED, trace_file),
                    ("trace prefetch, previous settings (emulated)", PREVIOUS, trace_file)]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in variants}
        for _ in range(repeats):
            for name, cfg, prefetch in variants:
                with cache_config(**cfg):
                    vol = pull(parse_reference(ref), self.target("boot"), lazy=True, prefetch=prefetch).volume
                    m0 = self.wire.mark()
                    h = hashlib.blake2b()
                    t0 = time.perf_counter()
                    with vol.open() as dev:
                        t1 = time.perf_counter()
                        read_list(dev, offsets, READ, h)
                        t2 = time.perf_counter()
                        req_w, got_w = self.wire.since(m0)
                        wait_thread("trace-prefetch")
                        req, got = self.wire.since(m0)
                self.check(f"boot reads ({name}) equal the eager volume's", h.hexdigest() == want)
                runs[name].append({"open_s": t1 - t0, "workload_s": t2 - t1, "total_s": t2 - t0,
                                   "requests_by_end": req_w, "requests": req, "fetched": got,
                                   "fetched_by_end": got_w})
                log(f"  boot {name}: {t2 - t0:.2f} s, {req} requests")
        summary = {name: {k: median([x[k] for x in rs]) for k in rs[0]} for name, rs in runs.items()}
        return {"reads": len(offsets), "trace_records": len(records),
                "trace_bytes": sum(r.count for r in records), "runs": runs, "median": summary}


def timed_pairs(first: Any, second: Any, offsets: Sequence[int], loops: int) -> tuple[float, float]:
    """The same reads through two devices, alternating read by read; seconds spent in each."""
    buf = aligned_buffer(READ)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    t_first = t_second = 0
    for _ in range(loops):
        for off in offsets:
            t0 = clock()
            first.readinto(off, view)
            t1 = clock()
            second.readinto(off, view)
            t2 = clock()
            t_first += t1 - t0
            t_second += t2 - t1
    return t_first / 1e9, t_second / 1e9


def profile_reads(lazy: Volume, local: Volume, offsets: list[int], limit: int = 22) -> dict[str, str]:
    """cProfile of the same reads, warm, through the lazily pulled volume and the eager one."""
    import cProfile
    import io
    import pstats

    out = {}
    for name, vol in (("warm_lazy", lazy), ("local", local)):
        with vol.open() as dev:
            read_list(dev, offsets, READ)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(3):
                read_list(dev, offsets, READ)
            prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(limit)
        out[name] = s.getvalue()
    return out


def blake(fn: Callable[[Any], None]) -> str:
    h = hashlib.blake2b()
    fn(h)
    return h.hexdigest()


# -- main --------------------------------------------------------------------------------------------------


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--size-mib", type=int, help="volume size (1024; quick 128)")
    ap.add_argument("--repeats", type=int, help="repeats of the short measurements (3; quick 1)")
    ap.add_argument("--boot-reads", type=int, help="reads in the boot workload (200; quick 50)")
    ap.add_argument("--delay-ms", type=float, default=DELAY * 1000, help="latency the proxy adds per request")
    ap.add_argument("--bare-mib", type=int,
                    help="how much of the volume the no-read-ahead, no-coalescing variant reads (128; quick 32): one "
                         "64 KiB request per chunk at +50 ms is ~1 MiB/s")
    ap.add_argument("--profile", action="store_true", help="also print cProfiles of warm lazy and local reads")
    args = ap.parse_args()
    size = (args.size_mib or (128 if args.quick else 1024)) * MiB
    repeats = args.repeats or (1 if args.quick else 3)
    boot_reads = args.boot_reads or (50 if args.quick else 200)
    bare = min(size, args.bare_mib * MiB if args.bare_mib else (32 * MiB if args.quick else 128 * MiB))
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "remote", "size": size, "layers": LAYERS, "versions": versions(),
                              "machine": machine(), "quick": args.quick, **source_state()}
    with workdir(args.workdir, args.keep, "bench-remote-") as wd:
        os.environ["OVERLAYBD_CACHE_DIR"] = os.path.join(wd, "cache")
        os.environ["DOCKER_CONFIG"] = os.path.join(wd, "docker")  # never the machine's own credentials
        wire = Wire()
        log(f"building a {size // MiB} MiB, {LAYERS}-layer volume in {wd}")
        t0 = time.perf_counter()
        src = build_volume(os.path.join(wd, "vol"), size, args.seed)
        result["build_s"] = time.perf_counter() - t0
        with src.open() as dev:
            first_block = dev.pread(0, 4096)
        with registry(Path(wd) / "registry") as host:
            ref = f"{host}/bench/vol:v1"
            t0 = time.perf_counter()
            report = push(src, parse_reference(ref))
            result["push_s"] = time.perf_counter() - t0
            blob_bytes = sum(x["size"] for x in report.layers)
            result["blob_bytes"] = blob_bytes
            log(f"pushed {blob_bytes:,} bytes in {result['push_s']:.1f} s")
            bench = Bench(wd, host, size, args, wire)
            os.makedirs(os.path.join(wd, "pulls"))

            log("1. lazy start")
            result["lazy_start"] = bench.lazy_start(ref, blob_bytes, first_block, repeats)

            log("2. random 5% reads")
            eager = pull(parse_reference(ref), fresh_dir(wd, "eager")).volume
            result["random"] = bench.random_5pct(ref, eager, 7 if args.quick else 11, args.profile)
            if args.profile:
                result["profile"] = result["random"].pop("profile")

            log(f"3. {args.delay_ms:.0f} ms per request")
            proxy = DelayProxy(host, args.delay_ms / 1000)
            try:
                slow_ref = ref.replace(host, proxy.address)
                with eager.open() as dev:
                    want_all = blake(lambda h: read_sequential(dev, size, h))
                    want_bare = blake(lambda h: read_sequential(dev, bare, h)) if bare < size else want_all
                seq = bench.sequential(proxy, slow_ref, [("as shipped", SHIPPED), ("no read-ahead", NO_READAHEAD),
                                                         ("previous settings (emulated)", PREVIOUS)],
                                       want_all, size)
                if bare < size:
                    seq += bench.sequential(proxy, slow_ref, [(f"as shipped, first {bare // MiB} MiB", SHIPPED)],
                                            want_bare, bare)
                seq += bench.sequential(proxy, slow_ref, [("no read-ahead, one chunk a request", BARE)], want_bare,
                                        bare)
                result["sequential"] = seq
                boot_offsets = random_reads(size, boot_reads, args.seed + 3)
                want_boot = hash_reads(eager, boot_offsets, READ)
                result["boot"] = bench.boot(proxy, slow_ref, src, boot_offsets, want_boot, repeats)
            finally:
                proxy.close()
        result["failures"] = bench.failures
        result["elapsed_s"] = time.perf_counter() - started
        result["load1_end"] = os.getloadavg()[0]
    print_report(result, args)
    emit_json({k: v for k, v in result.items() if k != "profile"}, args.json)
    return 1 if result["failures"] else 0


def source_state() -> dict[str, Any]:
    """The commit measured, and whether src/ differed from it (others edit the work tree at the same time)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "src_modified": None}
    return {"commit": head, "src_modified": bool(dirty)}


def print_report(r: dict[str, Any], args: Any) -> None:
    size = r["size"]
    ls = r["lazy_start"]
    print(f"\nCommit {r['commit']}{' (src/ modified in the work tree)' if r['src_modified'] else ''}; "
          f"{json.dumps(r['versions'])}")
    print(f"\nVolume: {size // MiB} MiB, {r['layers']} layers; blobs {r['blob_bytes']:,} bytes "
          f"({r['blob_bytes'] / size:.2f} of the disk); built in {r['build_s']:.1f} s, pushed in {r['push_s']:.1f} s "
          f"({r['blob_bytes'] / MiB / r['push_s']:.0f} MiB/s)\n")
    m, e, w = ls["median"], ls["eager_median"], ls["whatif"]
    fp = ls["faultproxy"]
    print(table(["start (cache empty)", "seconds", "of which pull", "open", "first 4 KiB read", "bytes fetched",
                 "range requests"], [
        ["lazy: pull --lazy + open + read (median)", m["total_s"], m["pull_s"], m["open_s"], m["first_read_s"],
         ls["fetched_bytes"], ls["requests"]],
        ["eager: pull + open + read (peer, median)", e["total_s"], e["pull_s"], e["open_read_s"], None,
         ls["eager_blob_bytes"], None],
        ["lazy / eager", m["total_s"] / e["total_s"], None, None, None, ls["fetched_bytes"] / ls["eager_blob_bytes"],
         None],
        ["lazy, previous settings (emulated)", w["total_s"], w["pull_s"], w["open_s"],
         w["first_read_s"], w["all"][1], w["all"][0]]], "1. Lazy start"))
    print(f"\nFaultProxy (pass mode) cross-check of one lazy start: {fp['blob_gets']} blob GETs, {fp['bytes']:,} "
          f"bytes; counted in process: {fp['ours'][0]} requests, {fp['ours'][1]:,} bytes\n")
    rd = r["random"]
    rows: list[list[Any]] = []
    for c in rd["cold"]:
        rows.append([f"cold: {c['variant']}", c["seconds"], rd["reads"] / c["seconds"], c["requests"], c["fetched"],
                     c["ratio"]])
    n = rd["reads"] * rd["loops"]
    rows.append(["warm: as shipped (median)", rd["warm_s"] / rd["loops"], n / rd["warm_s"], 0, 0, None])
    rows.append(["local: eager pull, page cache warm (peer, median)", rd["local_s"] / rd["loops"], n / rd["local_s"],
                 None, None, None])
    print(table(["random 64 KiB reads", "seconds", "reads/s", "range requests", "bytes fetched", "fetched / read"],
                rows, f"2. Random 5 % ({rd['reads']} reads, {rd['read_bytes'] // MiB} MiB; warm and local timed "
                f"over {rd['loops']} passes)"))
    met_ratio = "met" if rd["ratio_fetched"] <= 2 else "MISSED"
    met_warm = "met" if rd["warm_vs_local"] >= 0.8 else "MISSED"
    print(f"\nfetched / read, cold, as shipped: {rd['ratio_fetched']:.2f} (target <= 2: {met_ratio}); "
          f"warm / local read rate: {rd['warm_vs_local']:.2f}, median of {len(rd['warm_runs'])} runs alternating "
          f"read by read "
          f"(best / best {rd['warm_vs_local_best']:.2f}; target >= 0.8: {met_warm})\n")
    seq = r["sequential"]
    ref_rate = seq[0]["mib_s"]
    print(table([f"sequential 1 MiB reads, +{args.delay_ms:g} ms a request", "cache settings", "MiB read", "seconds",
                 "MiB/s", "range requests", "bytes fetched", "vs as shipped"],
                [[s["variant"], s["config"], int(s["mib"]), s["seconds"], s["mib_s"], s["requests"], s["fetched"],
                  s["mib_s"] / ref_rate] for s in seq],
                "3a. Sequential read through the delaying proxy (cache empty at start)"))
    b = r["boot"]
    bm = b["median"]
    print()
    print(table([f"boot workload, +{args.delay_ms:g} ms a request", "open s", "workload s", "open + workload s",
                 "requests by the end", "requests (prefetch done)", "bytes fetched (prefetch done)"],
                [[name, x["open_s"], x["workload_s"], x["total_s"], int(x["requests_by_end"]), int(x["requests"]),
                  int(x["fetched"])] for name, x in bm.items()],
                f"3b. Boot: {b['reads']} scattered 64 KiB reads (trace: {b['trace_records']} records, "
                f"{b['trace_bytes']:,} bytes; median of {len(b['runs']['no prefetch'])})"))
    speed = bm["no prefetch"]["total_s"] / bm["trace prefetch"]["total_s"]
    print(f"\nno prefetch / trace prefetch (open + workload): {speed:.2f}x\n")
    if "profile" in r:
        print("Warm lazy reads, cProfile:\n" + r["profile"]["warm_lazy"])
        print("Local reads, cProfile:\n" + r["profile"]["local"])
    if r["failures"]:
        print("FAILED: " + "; ".join(r["failures"]))
    print(f"elapsed {fmt(r['elapsed_s'])} s; load average {r['machine']['load1']:.1f} at the start, "
          f"{r['load1_end']:.1f} at the end")


if __name__ == "__main__":
    sys.exit(main())
