"""Merged-index memory per record and the time to open a 255-layer stack holding 1,000,000 records.

Data: 255 committed LSMT files written with ``formats.lsmt.commit.write_compacted`` from numpy-built Segments,
~3,922 records each: small extents (1-8 sectors, one in eight a zeroed record) at random places over a 1 TiB
virtual disk, so records rarely coalesce and a few per cent of them overlap records of other layers.

Measured (page cache warm for the index areas; best of 3):

* ``overlaybd.open_stack(paths)`` end to end;
* its parts: opening the 255 layers alone (header, trailer, index read, decode, validate), and, on the loaded
  segments, ``formats.lsmt.index.merge_layers`` alone and ``MergedIndex(...)`` alone;
* memory: ``MergedIndex.nbytes / len`` (target <= 24 bytes a record) and, with tracemalloc, what an open stack
  keeps and the peak while opening, per merged record.

A sample of sectors is resolved through the stack and compared with a brute-force answer (the top-most layer
whose extent covers the sector).
"""

from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc
from contextlib import ExitStack
from functools import partial
from typing import Any

import numpy as np
from common import base_parser, emit_json, log, machine, table, versions, workdir, write_committed_layer

import overlaybd
from overlaybd.formats.detect import open_layer
from overlaybd.formats.lsmt.index import Segments, merge_layers
from overlaybd.formats.lsmt.layer import load_records, read_header, validate_index
from overlaybd.formats.lsmt.mapping import MergedIndex
from overlaybd.formats.lsmt.spec import HEADER_SIZE, SECTOR
from overlaybd.source.base import ExtentKind
from overlaybd.source.file import FileSource

VIRTUAL_SIZE = 1 << 40  # 1 TiB
SLOT = 64  # sectors: each extent lives inside its own 32 KiB slot of a layer (disjoint within the layer)


def layer_extents(rng: np.random.Generator, nrec: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nslots = VIRTUAL_SIZE // SECTOR // SLOT
    slots = np.sort(rng.choice(nslots, size=nrec, replace=False)).astype(np.int64)
    length = rng.integers(1, 9, nrec, dtype=np.int64)
    offset = slots * SLOT + rng.integers(0, SLOT - 8, nrec, dtype=np.int64)
    zeroed = rng.random(nrec) < 0.125
    return offset, length, zeroed


def build(folder: str, nlayers: int, total: int, seed: int) -> tuple[list[str], list[tuple[np.ndarray, ...]]]:
    per = [total // nlayers + (1 if k < total % nlayers else 0) for k in range(nlayers)]
    paths = []
    truth: list[tuple[np.ndarray, ...]] = []
    for k, nrec in enumerate(per):
        rng = np.random.default_rng([seed, k])
        off, ln, z = layer_extents(rng, nrec)
        path = os.path.join(folder, f"L{k:03d}.lsmt")
        write_committed_layer(path, off, ln, z, bytes([k + 1]), VIRTUAL_SIZE)
        paths.append(path)
        truth.append((off, ln, z))
    return paths, truth


def warm_indexes(paths: list[str]) -> None:
    """Read the header and everything from the index on (index + trailer) of each file."""
    for p in paths:
        with FileSource(p) as f:
            f.pread(0, HEADER_SIZE)
            trailer = read_header(f, f.size - HEADER_SIZE)
            f.pread(trailer.index_offset, f.size - trailer.index_offset)


def best(n: int, fn: Any, before: Any = None) -> tuple[float, Any]:
    times = []
    out = None
    for i in range(n):
        if before is not None:
            before()
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if hasattr(out, "close") and i < n - 1:
            out.close()
    return min(times), out


def open_layers(paths: list[str]) -> ExitStack:
    owned = ExitStack()
    for p in paths:
        open_layer(p, owned=owned)
    return owned


def load_parts(paths: list[str]) -> dict[str, float]:
    """Time the pieces of loading one layer's index, summed over all layers (mirrors LsmtLayer.__init__)."""
    t = {"read+decode": 0.0, "validate": 0.0, "per-layer MergedIndex": 0.0}
    for p in paths:
        with FileSource(p) as f:
            trailer = read_header(f, f.size - HEADER_SIZE)
            t0 = time.perf_counter()
            seg, pos = load_records(f, trailer.index_offset, trailer.index_size)
            t1 = time.perf_counter()
            validate_index(seg, pos, HEADER_SIZE // SECTOR, trailer.index_offset // SECTOR, path=p,
                           index_offset=trailer.index_offset)
            t2 = time.perf_counter()
            MergedIndex(seg)
            t3 = time.perf_counter()
        t["read+decode"] += t1 - t0
        t["validate"] += t2 - t1
        t["per-layer MergedIndex"] += t3 - t2
    return t


def seg_nbytes(seg: Segments) -> int:
    return int(sum(getattr(seg, f).nbytes for f in ("offset", "length", "moffset", "zeroed", "tag")))


def check(stack: Any, truth: list[tuple[np.ndarray, ...]], samples: int, seed: int) -> int:
    """Sample sectors inside random extents; the stack must name the top-most layer covering each."""
    rng = np.random.default_rng([seed, 99])
    bad = 0
    ks = rng.integers(0, len(truth), samples)
    for k in ks.tolist():
        off, ln, _z = truth[k]
        i = int(rng.integers(0, off.size))
        sector = int(off[i] + rng.integers(0, ln[i]))
        top: int | None = None
        kind = ExtentKind.HOLE
        for j in range(len(truth) - 1, -1, -1):
            o, n, z = truth[j]
            r = int(np.searchsorted(o, sector, side="right")) - 1
            if r >= 0 and o[r] + n[r] > sector:
                top, kind = j, (ExtentKind.ZERO if z[r] else ExtentKind.DATA)
                break
        ext = list(stack.extents(sector * SECTOR, SECTOR))
        if len(ext) != 1 or ext[0].layer != top or ext[0].kind is not kind:
            bad += 1
            continue
        expected = bytes([top + 1]) * SECTOR if top is not None else b""
        if kind is ExtentKind.DATA and stack.pread(sector * SECTOR, SECTOR) != expected:
            bad += 1
    return bad


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--layers", type=int, default=255)
    ap.add_argument("--records", type=int, help="records in all (default 1,000,000; --quick 100,000)")
    ap.add_argument("--repeats", type=int, help="best of (default 3; --quick 2)")
    ap.add_argument("--check", type=int, default=2000, help="sampled sectors checked against brute force")
    args = ap.parse_args()
    total = args.records or (100_000 if args.quick else 1_000_000)
    repeats = args.repeats or (2 if args.quick else 3)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"benchmark": "index", "quick": args.quick, "layers": args.layers, "records": total,
                           "repeats": repeats, "seed": args.seed}
    with workdir(args.workdir, args.keep, "bench-index-") as work:
        t0 = time.perf_counter()
        paths, truth = build(work, args.layers, total, args.seed)
        res["build_s"] = time.perf_counter() - t0
        res["files_bytes"] = sum(os.path.getsize(p) for p in paths)
        log(f"built {args.layers} layers, {total:,} records, {res['files_bytes'] / 1e9:.2f} GB in "
            f"{res['build_s']:.1f} s")

        def warmed() -> None:
            warm_indexes(paths)

        # end to end
        t_open, stack = best(repeats, lambda: overlaybd.open_stack(paths), warmed)
        res["open_stack_s"] = t_open
        merged = stack.lower_index
        res["merged_records"] = len(merged)
        res["merged_index_bytes"] = merged.nbytes
        res["bytes_per_record"] = merged.nbytes / len(merged)
        res["bad_checks"] = check(stack, truth, args.check, args.seed)
        res["checked"] = args.check
        # what the layers still hold once open (stacks release each layer's own index after merging; reading
        # ``segments()`` / ``levels`` here would load them again, so only what is held is counted)
        layer_segs = sum(seg_nbytes(s) for layer in stack.lowers
                         if (s := getattr(layer, "_segments", None)) is not None)
        layer_idx = sum(lv.nbytes for layer in stack.lowers for lv in (getattr(layer, "_levels", None) or []))
        res["per_layer_segments_bytes"] = layer_segs
        res["per_layer_merged_index_bytes"] = layer_idx
        stack.close()

        # parts
        t_layers, owned = best(repeats, lambda: open_layers(paths), warmed)
        res["open_layers_s"] = t_layers
        owned.close()
        parts_runs = []
        for _ in range(repeats):
            warmed()
            parts_runs.append(load_parts(paths))
        res["load_parts_s"] = {k: min(r[k] for r in parts_runs) for k in parts_runs[0]}
        with ExitStack() as owned:
            layers = [open_layer(p, owned=owned) for p in paths]
            top_first = [layers[k].segments().with_tag(k) for k in range(len(layers) - 1, -1, -1)]
            res["input_records"] = sum(len(s) for s in top_first)
            t_merge, seg = best(repeats, partial(merge_layers, top_first))
            t_mi, _mi = best(repeats, partial(MergedIndex, seg))
        res["merge_s"] = t_merge
        res["merged_index_build_s"] = t_mi
        layers = top_first = seg = _mi = None  # type: ignore[assignment]

        # memory: what an open stack keeps, and the peak while opening
        warmed()
        gc.collect()
        tracemalloc.start()
        base_cur, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        stack = overlaybd.open_stack(paths)
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        stack.close()
        n = res["merged_records"]
        res["tracemalloc_retained_bytes"] = cur - base_cur
        res["tracemalloc_peak_bytes"] = peak - base_cur
        res["retained_per_record"] = (cur - base_cur) / n
        res["peak_per_record"] = (peak - base_cur) / n

    n = res["merged_records"]
    parts = res["load_parts_s"]
    rows = [
        [f"open_stack, {args.layers} layers (end to end)", res["open_stack_s"] * 1e3],
        [f"open the {args.layers} layers alone", res["open_layers_s"] * 1e3],
        ["- of which: read + decode records (summed)", parts["read+decode"] * 1e3],
        ["- of which: validate order and bounds (summed)", parts["validate"] * 1e3],
        ["- of which: a MergedIndex per layer (LsmtLayer.levels; summed)", parts["per-layer MergedIndex"] * 1e3],
        ["merge_layers on the loaded segments", res["merge_s"] * 1e3],
        ["MergedIndex(merged)", res["merged_index_build_s"] * 1e3],
    ]
    print(table(["step", "ms"], rows, title=f"Opening {args.layers} layers, {res['input_records']:,} records "
                                                 f"in, {n:,} merged records out; best of {repeats}"))
    mem = [
        ["MergedIndex.nbytes / records (target <= 24)", res["bytes_per_record"]],
        ["tracemalloc: kept by the open stack / record", res["retained_per_record"]],
        ["- of which per-layer Segments still held / record", res["per_layer_segments_bytes"] / n],
        ["- of which per-layer MergedIndex still held / record", res["per_layer_merged_index_bytes"] / n],
        ["tracemalloc: peak while opening / record", res["peak_per_record"]],
    ]
    print()
    print(table(["memory", "bytes"], mem))
    met = res["bytes_per_record"] <= 24
    res["target_bytes_met"] = met
    print(f"\ntarget MergedIndex <= 24 bytes a record: {res['bytes_per_record']:.1f} {'met' if met else 'MISSED'}; "
          f"the whole open stack keeps {res['retained_per_record']:.1f} bytes a merged record")
    print(f"correctness: {res['bad_checks']} of {res['checked']} sampled sectors resolve wrongly")
    print(f"total {time.perf_counter() - t_start:.0f} s\n")
    res["versions"] = versions()
    res["machine"] = machine()
    emit_json(res, args.json)
    return 1 if res["bad_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
