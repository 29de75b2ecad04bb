"""Helpers shared by ``bench_nbd.py`` and ``bench_loop.py``: building volumes and peer images with the same bytes,
starting and stopping servers, running the external clients, and printing.

Every figure is printed beside a peer measured in the same run on the same machine (2 shared vCPUs, noisy);
no timing here is a pass/fail threshold. Only correctness checks fail a run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import common
import numpy as np
from common import shares

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4096
STRIDE_BLOCKS = 104729  # qemu-img bench -S $((4096*104729)): a prime stride spreads the reads over the disk
VENV_BIN = os.path.dirname(sys.executable)
SERVER_PIDS: dict[str, int] = {}  # URI -> the pid of the server behind it (for its CPU time and memory)
OVERLAYBD = [os.path.join(VENV_BIN, "overlaybd")] if os.path.exists(os.path.join(VENV_BIN, "overlaybd")) \
    else [sys.executable, "-m", "overlaybd.cli.main"]


# -- arguments, folders, output ------------------------------------------------------------------------------


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """common.base_parser, plus --repeats."""
    ap = common.base_parser(description)
    ap.add_argument("--repeats", type=int, help="measurements per setting, interleaved with the peer; median")
    return ap


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def versions() -> dict[str, Any]:
    import overlaybd

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _first_line(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", repo, "status", "--porcelain", "--", "src"])
    return {
        "pyoverlaybd": overlaybd.__version__,
        "commit": f"{commit}{' (src modified)' if dirty else ''}",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "qemu-nbd": _first_line(["qemu-nbd", "--version"]),
        "qemu-img": _first_line(["qemu-img", "--version"]),
        "nbdcopy": _first_line(["nbdcopy", "--version"]),
        "fio": _first_line(["fio", "--version"]),
        "cpus": os.cpu_count(),
        "load1": round(os.getloadavg()[0], 2),
    }


def run(cmd: Sequence[str], *, stdin: str | None = None, timeout: float = 1800) -> str:
    """Run a command; its stdout, or an error naming the command and its stderr."""
    res = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}: {(res.stderr or res.stdout).strip()[-2000:]}")
    return res.stdout


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (Debian: qemu-utils libnbd-bin fio)")


# -- data ----------------------------------------------------------------------------------------------------

_TEXT = b"".join(f"2026-11-28T12:{i % 60:02d}:{i * 7 % 60:02d} INFO worker-{i % 13} request {i * 7919} done "
                 f"in {i % 97} ms status=200 path=/v2/repo/blobs/sha256:{i * 104729:064x}\n".encode()
                 for i in range(12000))


def mixed_pieces(size: int, seed: int, piece: int = MiB) -> list[tuple[int, str]]:
    """Kinds of each 1 MiB piece: 'random' 50 %, 'text' 30 %, 'zero' (written zeros) 10 %, 'hole' 10 %."""
    rng = np.random.default_rng([seed, 1])
    kinds = rng.choice(["random", "text", "zero", "hole"], size=size // piece, p=[0.5, 0.3, 0.1, 0.1])
    return [(i * piece, str(k)) for i, k in enumerate(kinds)]


def build_mixed_volume(vol: str, size: int, seed: int) -> dict[str, int]:
    """A volume of ``size`` bytes filled with mixed data through ``Volume.open(writable=True)`` + ``pwrite`` of up
    to 4 MiB, then ``Volume.snapshot()`` so the data sits in one sealed layer. Returns counts of each kind."""
    from overlaybd.volume import Volume

    run([*OVERLAYBD, "create", vol, "--size", str(size)])
    pool = np.random.default_rng([seed, 2]).integers(0, 256, 72 * MiB, dtype=np.uint8).tobytes()
    text = (_TEXT * (MiB // len(_TEXT) + 2))
    counts: dict[str, int] = {}
    chunk = bytearray()
    chunk_at = 0

    v = Volume(vol)
    with v.open(writable=True) as dev:
        def put() -> None:
            nonlocal chunk
            if chunk:
                dev.pwrite(chunk_at, chunk)
                chunk = bytearray()

        for off, kind in mixed_pieces(size, seed):
            counts[kind] = counts.get(kind, 0) + 1
            if kind == "hole":
                put()
                continue
            if not chunk:
                chunk_at = off
            if kind == "random":
                start = (off * 7 // MiB % 64) * MiB + (off // MiB) % 4096
                chunk += pool[start : start + MiB]
            elif kind == "text":
                start = (off // MiB * 4099) % len(_TEXT)
                chunk += text[start : start + MiB]
            else:
                chunk += bytes(MiB)
            if len(chunk) >= 4 * MiB:
                put()
        put()
        dev.flush()
    v.snapshot("mixed data")
    return counts




def build_layered_volume(vol: str, size: int, depth: int, seed: int) -> np.ndarray:
    """``depth`` rounds of (write share i, every byte i+1, one 4 KiB pwrite per block; ``Volume.snapshot()``).
    Returns owner[block]; the top view of block b is bytes([owner[b] + 1]) * 4096."""
    from overlaybd.volume import Volume

    run([*OVERLAYBD, "create", vol, "--size", str(size)])
    parts, owner = shares(size // BLOCK, depth, seed)
    v = Volume(vol)
    for i, part in enumerate(parts):
        block = bytes([i + 1]) * BLOCK
        with v.open(writable=True) as dev:
            for b in np.sort(part).tolist():
                dev.pwrite(b * BLOCK, block)
            dev.flush()
        v.snapshot(f"share {i}")
    return owner


def build_view_volume(vol: str, owner: np.ndarray, size: int) -> None:
    """One snapshot holding the top view of a layered volume, written in 4 MiB pwrites."""
    from overlaybd.volume import Volume

    run([*OVERLAYBD, "create", vol, "--size", str(size)])
    v = Volume(vol)
    per = 4 * MiB // BLOCK
    with v.open(writable=True) as dev:
        for first in range(0, len(owner), per):
            fill = (owner[first : first + per] + 1).astype(np.uint8)
            dev.pwrite(first * BLOCK, np.repeat(fill, BLOCK).tobytes())
        dev.flush()
    v.snapshot("the top view in one layer")


def write_view_raw(path: str, owner: np.ndarray) -> None:
    with open(path, "wb") as f:
        per = 4 * MiB // BLOCK
        for first in range(0, len(owner), per):
            f.write(np.repeat((owner[first : first + per] + 1).astype(np.uint8), BLOCK).tobytes())


def build_qcow2_chain(folder: str, parts: list[np.ndarray], size: int) -> str:
    """One qcow2 (cluster_size=4096) per share, written alone with ``qemu-io -t unsafe`` (one
    ``write -q -P <byte> <off> 4k`` per block), then chained with ``qemu-img rebase -u -b prev -F qcow2``
    (the same images as creating each with ``-b``, without reopening the whole chain once per layer)."""
    os.makedirs(folder, exist_ok=True)
    prev = None
    for i, part in enumerate(parts):
        img = os.path.join(folder, f"L{i:03d}.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, str(size)])
        script = "".join(f"write -q -P {i + 1} {b * BLOCK} 4k\n" for b in np.sort(part).tolist()) + "quit\n"
        run(["qemu-io", "-t", "unsafe", "-f", "qcow2", img], stdin=script)
        if prev is not None:
            run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", os.path.basename(prev), "-F", "qcow2", img])
        prev = img
    assert prev is not None
    return prev


# -- servers -------------------------------------------------------------------------------------------------


def wait_socket(path: str, proc: subprocess.Popen[Any], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {path}")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def overlaybd_server(vol: str, sock: str, *, readonly: bool, extra: Sequence[str] = (),
                     command: Sequence[str] | None = None) -> Iterator[str]:
    """``overlaybd serve VOL --listen unix:SOCK``; yields the NBD URI it prints; SIGTERM at the end.
    ``command`` replaces ``overlaybd`` (e.g. a script that patches the server before calling the CLI)."""
    cmd = [*(command or OVERLAYBD), "serve", vol, "--listen", f"unix:{sock}", *(["--readonly"] if readonly else []),
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri.startswith("nbd"):
            stop_process(proc)
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"overlaybd serve did not start: {err.strip()[-2000:]}")
        SERVER_PIDS[uri] = proc.pid
        yield uri
    finally:
        stop_process(proc)


@contextlib.contextmanager
def qemu_nbd(image: str, fmt: str, sock: str, *, readonly: bool, name: str = "") -> Iterator[str]:
    """``qemu-nbd [-r] -t -e 8 -f FMT -x NAME -k SOCK IMAGE``; yields the URI; SIGTERM at the end."""
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = ["qemu-nbd", *(["-r"] if readonly else []), "-t", "-e", "8", "-f", fmt, "-x", name, "-k", sock, image]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc, "qemu-nbd")
        SERVER_PIDS[f"nbd+unix:///{name}?socket={sock}"] = proc.pid
        yield f"nbd+unix:///{name}?socket={sock}"
    finally:
        stop_process(proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


# -- clients -------------------------------------------------------------------------------------------------


def qemu_img_bench(uri: str, count: int, depth: int, *, size: int = BLOCK, write: bool = False) -> float:
    """``qemu-img bench -f raw -c COUNT -d DEPTH -s 4096 -S $((4096*104729)) URI``; operations per second."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", str(size),
           "-S", str(BLOCK * STRIDE_BLOCKS), *(["-w"] if write else []), uri]
    out = run(cmd)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(f"qemu-img bench: no timing in {out!r}")
    return count / float(m.group(1))


def fio(args: Sequence[str]) -> dict[str, Any]:
    """Run one fio job with ``--output-format=json``; the job's read/write/sync figures."""
    out = run(["fio", "--output-format=json", *args])
    start = out.find("{")
    job = json.loads(out[start:])["jobs"][0]
    return {
        "read_iops": job["read"]["iops"], "write_iops": job["write"]["iops"],
        "read_lat_us": job["read"]["clat_ns"]["mean"] / 1000, "write_lat_us": job["write"]["clat_ns"]["mean"] / 1000,
        "read_bw": job["read"]["bw_bytes"], "writes": job["write"]["total_ios"],
        "syncs": job.get("sync", {}).get("total_ios", 0),
        "sync_lat_us": job.get("sync", {}).get("lat_ns", {}).get("mean", 0) / 1000,
    }
