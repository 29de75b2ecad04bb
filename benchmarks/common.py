"""Shared helpers for the benchmarks: work folders, page-cache warming, timing, tables, versions, layer files.

Every benchmark prints ratios against a peer measured in the same run (the machine is shared and noisy); no
absolute figure here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

MiB = 1 << 20
SECTOR = 512


# -- arguments and work folders ----------------------------------------------------------------------------


def base_parser(description: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test that ends in under a minute")
    ap.add_argument("--workdir", help="build the data here (default: a temporary folder); removed unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the files built (only with --workdir)")
    ap.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    ap.add_argument("--seed", type=int, default=20261128, help="random seed for data and read offsets")
    return ap


@contextlib.contextmanager
def workdir(path: str | None, keep: bool, prefix: str) -> Iterator[str]:
    """A fresh folder to build in, under ``path`` (or $BENCH_TMPDIR, or the system's temp folder); removed at the
    end unless ``keep`` was asked for with ``path``."""
    parent = path or os.environ.get("BENCH_TMPDIR")
    if parent:
        os.makedirs(parent, exist_ok=True)
    sub = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield sub
    finally:
        if not (keep and path):
            shutil.rmtree(sub, ignore_errors=True)


def fresh_dir(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


# -- page cache ------------------------------------------------------------------------------------------


def warm(paths: Sequence[str]) -> int:
    """Read files (or every file under a folder) once so they sit in the page cache (the kernel's DAMON
    reclaim evicts pages idle for about 60 s on the machines we measure on: call just before measuring). Sockets
    and other non-files are passed over. Returns the bytes read."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(d, f) for d, _, names in os.walk(p) for f in names]
        else:
            files.append(p)
    buf = aligned_buffer(4 * MiB)
    view = memoryview(buf)
    total = 0
    try:
        for f in files:
            if not stat.S_ISREG(os.stat(f).st_mode):  # a served volume holds a control socket
                continue
            fd = os.open(f, os.O_RDONLY)
            try:
                while (n := os.readv(fd, [view])) > 0:
                    total += n
            finally:
                os.close(fd)
    finally:
        view.release()
        buf.close()
    return total


def aligned_buffer(n: int) -> mmap.mmap:
    """A page-aligned buffer (copies into ``bytearray``s, whose data sits at 16 mod 4096, hit a slow path)."""
    return mmap.mmap(-1, n)


# -- timing ----------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(n: int, fn: Callable[[], Any]) -> float:
    return min(timed(fn)[0] for _ in range(n))


def shares(nblocks: int, depth: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A random permutation of the disk's 4 KiB blocks split into ``depth`` shares (each in permutation
    order), and owner[block] = the share (layer) holding it."""
    perm = np.random.default_rng([seed, depth]).permutation(nblocks)
    parts = np.array_split(perm, depth)
    owner = np.empty(nblocks, dtype=np.uint8)
    for i, part in enumerate(parts):
        owner[part] = i
    return parts, owner


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# -- output ----------------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (pastes into BENCHMARKS.md as is)."""
    cells = [[fmt(c) for c in r] for r in rows]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
        lines.append("")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.rjust(w) if num else c.ljust(w)
                                       for c, w, num in zip(r, widths, numeric, strict=True)) + " |")
    return "\n".join(lines)


def emit_json(result: dict[str, Any], path: str | None) -> None:
    line = json.dumps(result, sort_keys=False, default=_json_default)
    print(line, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(type(o).__name__)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- environment -----------------------------------------------------------------------------------------


def qemu_img_version() -> str | None:
    try:
        out = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.splitlines()[0].strip()


def versions() -> dict[str, Any]:
    import lz4
    import numpy
    import zstandard

    import overlaybd

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "lz4": f"{lz4.__version__} (liblz4 {lz4.library_version_string()})",
        "zstandard": f"{zstandard.__version__} (zstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}, "
                     f"{zstandard.backend})",
        "pyoverlaybd": overlaybd.__version__,
        "qemu-img": qemu_img_version(),
    }
    try:
        import crc32c

        out["crc32c"] = getattr(crc32c, "__version__", "?")
    except ImportError:
        pass
    return out


def machine() -> dict[str, Any]:
    model = "?"
    mem = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) // (1 << 20)} GiB"
                    break
    return {"cpus": os.cpu_count(), "cpu": model, "memory": mem, "kernel": platform.release(),
            "load1": os.getloadavg()[0]}


# -- LSMT layer files built directly (fast path for large benchmarks) ------------------------------------


def write_committed_layer(path: str, offsets_sectors: np.ndarray, lengths_sectors: np.ndarray,
                          zeroed: np.ndarray, fill: bytes | Callable[[int], bytes], virtual_size: int,
                          data_source: Any = None) -> int:
    """Write a committed LSMT file holding ``offsets/lengths`` (sorted, disjoint; sectors) with
    ``formats.lsmt.commit.write_compacted``. Data records read ``fill`` (one byte repeated) from an in-memory
    source laid out contiguously. Returns the file size."""
    from overlaybd.formats.lsmt.commit import write_compacted
    from overlaybd.formats.lsmt.index import Segments
    from overlaybd.source.file import MemorySource

    lengths = np.asarray(lengths_sectors, dtype=np.int64)
    zeroed = np.asarray(zeroed, dtype=bool)
    data_len = np.where(zeroed, 0, lengths)
    moff = np.cumsum(data_len) - data_len  # each data record's sectors, packed
    seg = Segments.build(offsets_sectors, lengths, moff, zeroed, 0)
    if data_source is None:
        total = int(data_len.sum()) * SECTOR
        blob = fill(total) if callable(fill) else fill * total
        data_source = MemorySource(blob)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _trailer, length = write_compacted(fd, 0, seg, [data_source], virtual_size=virtual_size,
                                           uuid=os.urandom(16), parent_uuid=b"\0" * 16)
        os.ftruncate(fd, length)
    finally:
        os.close(fd)
    return int(length)
