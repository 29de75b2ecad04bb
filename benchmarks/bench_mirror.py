"""N nodes lazily reading the same part of one image, through a pull-through mirror or straight from the upstream.

The upstream is docker-registry on 127.0.0.1 behind a proxy of our own that adds ``--delay`` seconds to every
request (a distant registry) and counts the blob bytes it sends; the mirror is a second docker-registry configured
as a pull-through cache of the upstream (its requests to the upstream through another such proxy, counted apart),
near the nodes (no delay). A volume of SIZE (1 GiB; 10 LZ4 layers of half-random, half log-like 1 MiB extents) is
pushed to the upstream once. Each node is a process of its own with its own cache and layer store: it pulls the
image lazily and reads the same 5 % of the volume (1 MiB random reads, one list for every node), checking the
bytes against the volume's. N = 4 and 8 nodes start at once:

* direct: every node reads from the upstream (the peer);
* cold mirror: a fresh mirror (empty storage) named in hosts.toml for the upstream host (pull, resolve);
* warm mirror: N more nodes through the same mirror right after.

Figures: the blob bytes the upstream sent (the target: through the mirror, at most 1.1 x what one node alone gets
from it directly), each node's time to first byte (from the start of its pull to its first read returned) and to
its last read, medians over the nodes. ``--rounds`` rounds, interleaved; median and range across rounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import MiB, aligned_buffer, base_parser, emit_json, fmt, log, machine, median, table, versions, workdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.e2e.registry

from remote_common import DelayProxy, build_volume, random_reads  # noqa: E402

from overlaybd.remote.lazy import RemoteLayers  # noqa: E402
from overlaybd.remote.reference import parse_reference  # noqa: E402
from overlaybd.remote.transfer import pull, push  # noqa: E402
from overlaybd.volume import Volume  # noqa: E402
from tests.e2e.registry import registry  # noqa: E402

SHARE = 0.05
READ = MiB
REPO = "bench/vol:v1"


# -- one node (a process of its own) ---------------------------------------------------------------------------


def node(ref: str, target: str, size: int, seed: int) -> dict[str, Any]:
    offsets = random_reads(size, max(1, int(size * SHARE) // READ), seed, READ)
    buf = aligned_buffer(READ)
    view = memoryview(buf)
    digest = hashlib.blake2b()
    t0 = time.perf_counter()
    pull(parse_reference(ref), target, lazy=True)
    with Volume(target, opener=RemoteLayers()).open() as dev:
        first = None
        for off in offsets:
            dev.readinto(off, view)
            digest.update(view)
            if first is None:
                first = time.perf_counter() - t0
    return {"ttfb_s": first, "total_s": time.perf_counter() - t0, "hash": digest.hexdigest()}


def expected_hash(vol: Volume, size: int, seed: int) -> str:
    offsets = random_reads(size, max(1, int(size * SHARE) // READ), seed, READ)
    digest = hashlib.blake2b()
    with vol.open() as dev:
        for off in offsets:
            digest.update(dev.pread(off, READ))
    return digest.hexdigest()


def run_nodes(wd: Path, name: str, n: int, ref: str, size: int, seed: int, hosts_dir: Path | None
              ) -> list[dict[str, Any]]:
    """``n`` node processes at once; their results."""
    procs = []
    for k in range(n):
        root = wd / name / f"node{k}"
        env = {**os.environ, "OVERLAYBD_CACHE_DIR": str(root / "cache"), "OVERLAYBD_LAYER_STORE": str(root / "store"),
               "OVERLAYBD_HOSTS_DIR": str(hosts_dir or wd / "no-hosts")}
        procs.append(subprocess.Popen([sys.executable, __file__, "--node", ref, str(root / "vol"), str(size),
                                       str(seed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, stdin=subprocess.DEVNULL))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode:
            raise SystemExit(f"node failed: {stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def write_hosts(folder: Path, server: str, mirror: str) -> Path:
    host, _, port = server.rpartition(":")
    (folder / f"{host}_{port}_").mkdir(parents=True, exist_ok=True)
    (folder / f"{host}_{port}_" / "hosts.toml").write_text(
        f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n')
    return folder


# -- one round -------------------------------------------------------------------------------------------------


def summarize(nodes: list[dict[str, Any]], upstream_bytes: int, want: str) -> dict[str, Any]:
    return {"upstream_bytes": upstream_bytes, "ttfb_s": median([r["ttfb_s"] for r in nodes]),
            "ttfb_max_s": max(r["ttfb_s"] for r in nodes), "total_s": median([r["total_s"] for r in nodes]),
            "right": all(r["hash"] == want for r in nodes)}


def one_round(wd: Path, upstream: str, n: int, r: int, args: Any, size: int, want: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    direct = DelayProxy(upstream, args.delay)
    try:
        nodes = run_nodes(wd, f"r{r}-n{n}-direct", n, f"{direct.address}/{REPO}", size, args.seed, None)
        out["direct"] = summarize(nodes, direct.blob_bytes, want)
    finally:
        direct.close()
    to_mirror = DelayProxy(upstream, args.delay, accept_oci=True)
    server = DelayProxy(upstream, args.delay)  # the upstream as the nodes name it: counts what they fall back to
    try:
        with registry(wd / f"r{r}-n{n}-mirror", pull_through=f"http://{to_mirror.address}") as mirror:
            hosts_dir = write_hosts(wd / f"r{r}-n{n}-hosts", server.address, mirror)
            ref = f"{server.address}/{REPO}"
            nodes = run_nodes(wd, f"r{r}-n{n}-cold", n, ref, size, args.seed, hosts_dir)
            out["cold"] = summarize(nodes, to_mirror.blob_bytes + server.blob_bytes, want)
            out["cold"]["fallback_bytes"] = server.blob_bytes
            before = to_mirror.blob_bytes + server.blob_bytes
            nodes = run_nodes(wd, f"r{r}-n{n}-warm", n, ref, size, args.seed, hosts_dir)
            out["warm"] = summarize(nodes, to_mirror.blob_bytes + server.blob_bytes - before, want)
    finally:
        to_mirror.close()
        server.close()
    for v in ("direct", "cold", "warm"):
        log(f"  round {r + 1}, N={n}, {v}: upstream {out[v]['upstream_bytes'] / MiB:.1f} MiB, ttfb "
            f"{out[v]['ttfb_s']:.3f} s, reads done {out[v]['total_s']:.2f} s, right: {out[v]['right']}")
    return out


def report(results: dict[int, list[dict[str, Any]]], blob_total: int) -> str:
    rows = []
    for n, rounds in results.items():
        one_node = median([x["direct"]["upstream_bytes"] / n for x in rounds])
        for v, label in (("direct", "direct (peer)"), ("cold", "cold mirror"), ("warm", "warm mirror")):
            up = [x[v]["upstream_bytes"] for x in rounds]
            ttfb = [x[v]["ttfb_s"] for x in rounds]
            total = [x[v]["total_s"] for x in rounds]
            peer_ttfb = median([x["direct"]["ttfb_s"] for x in rounds])
            rows.append([n, label, f"{median(up) / MiB:.1f} ({min(up) / MiB:.1f}-{max(up) / MiB:.1f})",
                         round(median(up) / one_node, 2),
                         f"{median(ttfb):.3f} ({min(ttfb):.3f}-{max(ttfb):.3f})",
                         round(median(ttfb) / peer_ttfb, 2), f"{median(total):.2f}",
                         all(x[v]["right"] for x in rounds)])
    return table(["N", "nodes read from", "upstream sent, MiB (range)", "x one node direct",
                  "time to first byte, s (range)", "x direct", "all reads done, s", "bytes right"], rows,
                 title=f"Layer blobs together: {blob_total / MiB:.1f} MiB")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--node":
        _, _, ref, target, size, seed = sys.argv
        print(json.dumps(node(ref, target, int(size), int(seed))), flush=True)
        return
    ap = base_parser(__doc__)
    ap.add_argument("--size", type=int, default=1024, help="volume size, MiB (default 1024)")
    ap.add_argument("--nodes", default="4,8", help="node counts (default 4,8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.02, help="seconds added to each upstream request (0.02)")
    args = ap.parse_args()
    if args.quick:
        args.size, args.rounds, args.nodes = 64, 1, "2,4"
    size = args.size * MiB
    counts = [int(x) for x in args.nodes.split(",")]
    load0 = os.getloadavg()
    with workdir(args.workdir, args.keep, "bench-mirror-") as wd_name:
        wd = Path(wd_name)
        os.environ["OVERLAYBD_CACHE_DIR"] = str(wd / "builder-cache")
        with registry(wd / "upstream") as upstream:
            log(f"building a {args.size} MiB volume")
            vol = build_volume(str(wd / "vol"), size, args.seed)
            pushed = push(vol, parse_reference(f"{upstream}/{REPO}"))
            blob_total = sum(layer["size"] for layer in pushed.layers)
            want = expected_hash(vol, size, args.seed)
            results: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
            t0 = time.perf_counter()
            for r in range(args.rounds):
                for n in counts:
                    results[n].append(one_round(wd, upstream, n, r, args, size, want))
            elapsed = time.perf_counter() - t0
    print(report(results, blob_total))
    print(f"\n{args.rounds} rounds in {elapsed:.0f} s; load average {fmt(load0[0])} before, "
          f"{fmt(os.getloadavg()[0])} after")
    emit_json({"benchmark": "mirror", "size": size, "share": SHARE, "delay": args.delay, "blob_bytes": blob_total,
               "results": results, "load_before": load0, "load_after": os.getloadavg(), "machine": machine(),
               "versions": versions()}, args.json)
    if not all(x[v]["right"] for rounds in results.values() for x in rounds for v in ("direct", "cold", "warm")):
        raise SystemExit("a node read bytes that are not the volume's")


if __name__ == "__main__":
    main()
