"""Redistribution: what a machine that holds v1 fetches to get v2, and what a changed disk costs as a snapshot.

1. pull v2 after v1 (docker-registry on 127.0.0.1, bytes counted at a proxy of our own in front of it): a volume with
   a BASE MiB base snapshot and a DELTA MiB second one is pushed as v1 and v2. A node pulls v1 into a volume, then
   ``overlaybd pull v2`` into the same volume (fast-forward). Peer: the same node pulling v2 into a new volume with
   ``--no-store`` (every layer again, as before the layer store). Target: the update fetches only the new layer,
   <= 1.05 x its size.
2. delta import: a SIZE MiB raw disk (random data in half its blocks, the rest zero) is imported into a volume, then
   1 % of its 4 KiB blocks change (new data or zeros) and ``overlaybd import`` brings the changed disk in as one
   snapshot. Peer: ``qemu-img convert -O qcow2 -B base.qcow2`` of the same change into a qcow2 overlay over the
   first disk as qcow2. Target: no slower, no larger.

Every figure beside its peer, measured in the same run, ``--repeats`` times interleaved (median and range).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import MiB, base_parser, emit_json, fmt, log, machine, median, table, versions, workdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.e2e.registry
from tests.e2e.registry import FaultProxy, registry  # noqa: E402

OVERLAYBD = [os.path.join(os.path.dirname(sys.executable), "overlaybd")]
BLOCK = 4096


def cli(*args: object, env: dict[str, str] | None = None) -> str:
    res = subprocess.run([*OVERLAYBD, *map(str, args)], capture_output=True, text=True, env=env,
                         stdin=subprocess.DEVNULL)
    if res.returncode:
        raise SystemExit(f"overlaybd {' '.join(map(str, args))}: {res.stderr}")
    return res.stdout


def run(*args: object) -> str:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode:
        raise SystemExit(f"{args}: {res.stderr}")
    return res.stdout


def timed_cli(*args: object, env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = cli(*args, env=env)
    return time.perf_counter() - t0, out


def node_env(root: Path, name: str) -> dict[str, str]:
    """A machine of its own: its cache and layer store."""
    return {**os.environ, "OVERLAYBD_CACHE_DIR": str(root / name / "cache"),
            "OVERLAYBD_LAYER_STORE": str(root / name / "store")}


def pull_after(wd: Path, host: str, base_mib: int, delta_mib: int, repeats: int) -> dict[str, Any]:
    proxy = FaultProxy(host)
    try:
        origin = wd / "origin"
        env = node_env(wd, "origin-machine")
        cli("create", origin, "--size", f"{base_mib + 2 * delta_mib + 16}M", env=env)
        rng = random.Random(1)
        for n, mib in enumerate((base_mib, delta_mib)):
            path = wd / f"part{n}.raw"
            size = (base_mib + 2 * delta_mib + 16) * MiB
            with open(path, "wb") as f:
                f.truncate(size)
                f.seek(0 if n == 0 else base_mib * MiB)
                f.write(rng.randbytes(mib * MiB))
            cli("import", path, origin, "-m", f"v{n + 1}", env=env)
            pushed = json.loads(cli("push", origin, f"{host}/bench/vol:v{n + 1}", "--output", "json", env=env))
        sizes = [layer["size"] for layer in pushed["layers"]]
        rows = []
        for r in range(repeats):
            env = node_env(wd, f"node{r}")
            vol = wd / f"node{r}-vol"
            mark = proxy.bytes_sent
            t_v1, _ = timed_cli("pull", f"{proxy.address}/bench/vol:v1", vol, env=env)
            b_v1 = proxy.bytes_sent - mark
            mark = proxy.bytes_sent
            t_v2, _ = timed_cli("pull", f"{proxy.address}/bench/vol:v2", vol, env=env)
            b_v2 = proxy.bytes_sent - mark
            mark = proxy.bytes_sent
            t_full, _ = timed_cli("pull", f"{proxy.address}/bench/vol:v2", wd / f"node{r}-full", "--no-store",
                                  env=env)
            b_full = proxy.bytes_sent - mark
            rows.append({"v1_s": t_v1, "v1_bytes": b_v1, "update_s": t_v2, "update_bytes": b_v2, "full_s": t_full,
                         "full_bytes": b_full})
            log(f"pull after: round {r + 1}: update {b_v2:,} bytes in {t_v2:.2f} s; full {b_full:,} in {t_full:.2f} s")
        return {"layer_sizes": sizes, "rounds": rows}
    finally:
        proxy.close()


def delta_import(wd: Path, size_mib: int, repeats: int) -> dict[str, Any]:
    rng = random.Random(2)
    nblocks = size_mib * MiB // BLOCK
    first = wd / "disk1.raw"
    with open(first, "wb") as f:
        f.truncate(size_mib * MiB)
        for b in range(0, nblocks, 2):  # data in half the blocks
            f.seek(b * BLOCK)
            f.write(rng.randbytes(BLOCK))
    changed = rng.sample(range(nblocks), nblocks // 100)
    second = wd / "disk2.raw"
    run("cp", "--sparse=always", first, second)
    with open(second, "r+b") as f:
        for b in changed:
            f.seek(b * BLOCK)
            f.write(rng.randbytes(BLOCK) if b % 3 else bytes(BLOCK))
    base_qcow2 = wd / "base.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", first, base_qcow2)
    rows = []
    for r in range(repeats):
        vol = wd / f"import{r}"
        env = node_env(wd, f"import-node{r}")
        cli("import", first, vol, env=env)
        run("sync")
        t_ours, out = timed_cli("import", second, vol, "--output", "json", env=env)
        snap = json.loads(out)["snapshots"][0]
        overlay = wd / f"overlay{r}.qcow2"
        run("sync")
        t0 = time.perf_counter()
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", base_qcow2.name, "-F", "qcow2", second,
            overlay)
        t_qemu = time.perf_counter() - t0
        ours_size = snap["file_size"]
        qemu_size = os.stat(overlay).st_blocks * 512
        rows.append({"ours_s": t_ours, "qemu_s": t_qemu, "ours_bytes": ours_size, "qemu_bytes": qemu_size,
                     "written": snap["written"], "zeroed": snap["zeroed"]})
        log(f"delta import: round {r + 1}: ours {t_ours:.2f} s {ours_size:,} B; qemu-img {t_qemu:.2f} s "
            f"{qemu_size:,} B")
        overlay.unlink()
    return {"changed_blocks": len(changed), "rounds": rows}


def spread(xs: list[float]) -> str:
    return f"{fmt(median(xs))} ({fmt(min(xs))}-{fmt(max(xs))})"


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base-mib", type=int, default=64)
    ap.add_argument("--delta-mib", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=1024, help="the disk of the delta import")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.base_mib, args.delta_mib, args.size_mib = 1, 16, 2, 128
    result: dict[str, Any] = {"benchmark": "redistribution", "machine": machine(), "versions": versions(),
                              "args": vars(args)}
    with workdir(args.workdir, args.keep, "bench-redist-") as wd_s:
        wd = Path(wd_s)
        with registry(wd / "registry") as host:
            pa = pull_after(wd, host, args.base_mib, args.delta_mib, args.repeats)
        di = delta_import(wd, args.size_mib, args.repeats)
    result["pull_after"], result["delta_import"] = pa, di
    new_layer = pa["layer_sizes"][1]
    rows = pa["rounds"]
    print(table(["measure", "update (fast-forward)", "full pull (peer)", "ratio"], [
        ["bytes fetched", spread([r["update_bytes"] for r in rows]), spread([r["full_bytes"] for r in rows]),
         fmt(median([r["update_bytes"] / r["full_bytes"] for r in rows]))],
        ["fetched / new layer size (target <= 1.05)", fmt(median([r["update_bytes"] / new_layer for r in rows])),
         "", ""],
        ["seconds", spread([r["update_s"] for r in rows]), spread([r["full_s"] for r in rows]),
         fmt(median([r["update_s"] / r["full_s"] for r in rows]))],
    ], title=f"pull v2 after v1: base {args.base_mib} MiB, new layer {new_layer:,} bytes"))
    print()
    rows = di["rounds"]
    print(table(["measure", "overlaybd import", "qemu-img convert -B", "ours/peer"], [
        ["seconds", spread([r["ours_s"] for r in rows]), spread([r["qemu_s"] for r in rows]),
         fmt(median([r["ours_s"] / r["qemu_s"] for r in rows]))],
        ["bytes on disk", spread([r["ours_bytes"] for r in rows]), spread([r["qemu_bytes"] for r in rows]),
         fmt(median([r["ours_bytes"] / r["qemu_bytes"] for r in rows]))],
    ], title=f"delta import of a {args.size_mib} MiB disk, {di['changed_blocks']:,} blocks changed (1 %)"))
    print()
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
