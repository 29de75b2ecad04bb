"""Server memory under clients that pipeline large reads and do not take the replies: ``overlaybd serve`` beside
``qemu-nbd`` on the same bytes, under the same load, in the same run.

Data: a volume (1 GiB; quick 256 MiB) of mixed data in one sealed snapshot (as ``bench_nbd.py``), and
``overlaybd export VOL disk.raw`` for the peer. Servers, each on a Unix socket: ours ``overlaybd serve VOL
--readonly`` with its default limits (or ``--serve-args``), the peer ``qemu-nbd -r -t -e N+2 -f raw disk.raw``.

Load, on one server at a time (ours and the peer alternate, ``--repeats`` times): N clients (4; quick 2) each send
64 READs of 32 MiB at once and take no reply for ``--hold`` seconds (10; quick 5), while a probe client reads
1 MiB at a time and checks the bytes against the raw file. Then the N clients leave (their sockets closed
unread), the probe too, and memory is followed for ``--after`` seconds (15; quick 10). Measured: the server's
RSS (VmRSS) before, its peak under the load, right after the clients left (1 s), at the end; the probe's read
latency.

Nothing here is a pass/fail threshold except the probe's bytes. A probe read still unanswered when the load ends
counts with the time it waited so far (shown ">="). A server whose RSS passes ``--rss-limit`` (4 GiB)
has its load stopped at once (the figure then reads ">= limit"): the code before the limits took 16 GiB in a
few seconds.

    .venv/bin/python benchmarks/bench_nbd_memory.py [--quick] [--clients N] [--serve-cmd CMD] [--json FILE]
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from common import emit_json, log, median, table, workdir
from nbd_common import OVERLAYBD, MiB, base_parser, build_mixed_volume, need, run, stop_process, versions, wait_socket

from overlaybd.export.nbd import protocol

BIG = 32 * MiB  # the largest READ both servers accept
PIPELINE = 64


# -- processes -----------------------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[Any]
    sock: str

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.name}: no VmRSS")


@contextlib.contextmanager
def started(name: str, cmd: Sequence[str], sock: str) -> Iterator[Process]:
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_socket(sock, proc, name)
        yield Process(name, proc, sock)
    finally:
        stop_process(proc)


# -- a raw NBD client ----------------------------------------------------------------------------------------


class Client:
    """Fixed newstyle, NBD_OPT_GO on the default export, simple replies."""

    def __init__(self, path: str, *, receive_buffer: int | None = None) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        if receive_buffer:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.s.settimeout(120)
        self.s.connect(path)
        self._recv(18)
        self.s.sendall(struct.pack(">I", protocol.FLAG_FIXED_NEWSTYLE | protocol.FLAG_NO_ZEROES))
        self.s.sendall(struct.pack(">QII", protocol.IHAVEOPT, protocol.OPT_GO, 6) + struct.pack(">IH", 0, 0))
        while True:
            _, _, kind, length = struct.unpack(">QIII", self._recv(20))
            data = self._recv(length)
            if kind == protocol.REP_INFO and data[:2] == b"\0\0":
                self.size = struct.unpack(">Q", data[2:10])[0]
            if kind == protocol.REP_ACK:
                return
            if kind & (1 << 31):
                raise RuntimeError(f"NBD_OPT_GO refused: {kind:#x}")

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def send_read(self, handle: int, offset: int, length: int) -> None:
        self.s.sendall(protocol.REQUEST.pack(protocol.REQUEST_MAGIC, 0, protocol.CMD_READ, handle, offset, length))

    def read(self, offset: int, length: int) -> bytes:
        self.send_read(1, offset, length)
        _, error, _ = struct.unpack(">IIQ", self._recv(16))
        if error:
            raise RuntimeError(f"read error {error}")
        return self._recv(length)

    def close(self) -> None:
        self.s.close()


# -- one measurement -----------------------------------------------------------------------------------------


@dataclass
class Probe:
    """A client reading 1 MiB at a time meanwhile; its latencies, and whether the bytes were right."""

    path: str
    raw: str
    latencies: list[float] = field(default_factory=list)
    wrong: list[int] = field(default_factory=list)
    error: str | None = None
    pending_since: float | None = None  # when the read in flight was sent
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            self.pending_since = time.perf_counter()  # the handshake counts with the first read
            c = Client(self.path)
            with open(self.raw, "rb") as f:
                k = 0
                while True:  # one read at least, however late the handshake ended
                    off = (k * 7919 * MiB) % (c.size - MiB)
                    t0 = self.pending_since or time.perf_counter()
                    self.pending_since = t0
                    got = c.read(off, MiB)
                    self.pending_since = None
                    self.latencies.append(time.perf_counter() - t0)
                    f.seek(off)
                    if got != f.read(MiB):
                        self.wrong.append(off)
                    k += 1
                    if self.stop.wait(0.2):
                        break
            c.close()
        except (OSError, RuntimeError) as exc:
            self.error = str(exc)


def measure(server: Process, raw: str, clients: int, hold: float, after: float, rss_limit: int) -> dict[str, Any]:
    warmup = Client(server.sock)
    warmup.read(0, MiB)
    warmup.close()
    time.sleep(0.5)
    baseline = server.rss()
    probe = Probe(server.sock, raw)
    thread = threading.Thread(target=probe.run, daemon=True)
    hostile: list[Client] = []
    peak = baseline
    limited = False
    try:
        for _ in range(clients):
            c = Client(server.sock, receive_buffer=4096)
            span = max(c.size - BIG, 1)
            for h in range(PIPELINE):
                c.send_read(h, (h * BIG) % span // 4096 * 4096, BIG)
            hostile.append(c)
        thread.start()
        end = time.monotonic() + hold
        while time.monotonic() < end:
            peak = max(peak, server.rss())
            if peak >= rss_limit:
                limited = True
                break
            time.sleep(0.05)
    finally:
        probe.stop.set()
        for c in hostile:
            c.close()
    thread.join(60)
    unanswered = None  # a probe read still without its reply: its wait so far is a lower bound
    if thread.is_alive() and probe.pending_since is not None:
        unanswered = time.perf_counter() - probe.pending_since
    left = time.monotonic()
    right_after = None
    samples = []
    while time.monotonic() - left < after:
        rss = server.rss()
        samples.append(rss)
        peak = max(peak, rss)
        if right_after is None and time.monotonic() - left >= 1.0:
            right_after = rss
        time.sleep(0.1)
    if (probe.error and unanswered is None) or probe.wrong:
        raise SystemExit(f"{server.name}: probe failed: {probe.error or f'wrong bytes at {probe.wrong[:5]}'}")
    lat = sorted(probe.latencies + ([unanswered] if unanswered is not None else []))
    if not lat:
        raise SystemExit(f"{server.name}: the probe made no read")
    return {"baseline": baseline, "peak": peak, "limited": limited or peak >= rss_limit,
            "after_1s": right_after or samples[-1], "after_end": samples[-1], "probe_reads": len(probe.latencies),
            "probe_unanswered": unanswered is not None, "probe_p50_ms": 1000 * lat[len(lat) // 2],
            "probe_max_ms": 1000 * lat[-1]}


# -- main ----------------------------------------------------------------------------------------------------


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--size-mib", type=int, help="volume size (1024; quick 256)")
    ap.add_argument("--clients", type=int, help="clients pipelining 64 x 32 MiB reads (4; quick 2)")
    ap.add_argument("--hold", type=float, help="seconds the clients hold their replies (10; quick 5)")
    ap.add_argument("--after", type=float, help="seconds memory is followed after they leave (15; quick 10)")
    ap.add_argument("--rss-limit", type=int, default=4096, help="MiB of server RSS at which the load stops (4096)")
    ap.add_argument("--serve-cmd", help="command that stands for 'overlaybd' (e.g. an older checkout)")
    ap.add_argument("--serve-args", default="", help="more arguments for 'overlaybd serve' (e.g. limits)")
    args = ap.parse_args()
    need("qemu-nbd", "qemu-img")
    quick = args.quick
    size = (args.size_mib or (256 if quick else 1024)) * MiB
    clients = args.clients or (2 if quick else 4)
    hold = args.hold or (5.0 if quick else 10.0)
    after = args.after or (10.0 if quick else 15.0)
    repeats = args.repeats or 1
    serve_cmd = shlex.split(args.serve_cmd) if args.serve_cmd else OVERLAYBD
    result: dict[str, Any] = {"benchmark": "bench_nbd_memory", "quick": quick, "clients": clients,
                              "pipeline": PIPELINE, "read_size": BIG, "hold_s": hold, "after_s": after,
                              "repeats": repeats, "serve_cmd": args.serve_cmd, "serve_args": args.serve_args,
                              "versions": versions()}
    log(f"bench_nbd_memory: {result['versions']}")
    t0 = time.perf_counter()
    names = ["ours", "qemu-nbd"]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with workdir(args.workdir, args.keep, "bench-nbd-mem-") as wd:
        vol, raw = os.path.join(wd, "vol"), os.path.join(wd, "disk.raw")
        kinds = build_mixed_volume(vol, size, args.seed)
        run([*OVERLAYBD, "export", vol, raw])
        log(f"built a {size // MiB} MiB volume {kinds} and its raw export")
        commands = {
            "ours": [*serve_cmd, "serve", vol, "--readonly", "--listen", f"unix:{wd}/ours.sock",
                     *shlex.split(args.serve_args)],
            "qemu-nbd": ["qemu-nbd", "-r", "-t", "-e", str(clients + 2), "-f", "raw", "-x", "", "-k",
                         f"{wd}/qemu.sock", raw],
        }
        for rep in range(repeats):
            for name in (names if rep % 2 == 0 else names[::-1]):
                with started(name, commands[name], f"{wd}/{name.split('-')[0]}.sock") as server:
                    m = measure(server, raw, clients, hold, after, args.rss_limit * MiB)
                runs[name].append(m)
                shown = {k: (v >> 20 if type(v) is int and k != "probe_reads" else v) for k, v in m.items()}
                log(f"{name} (MiB): {shown}")
    result["runs"] = runs
    rows = []
    summary: dict[str, Any] = {}
    for name in names:
        med = {k: median([r[k] for r in runs[name]]) for k in ("baseline", "peak", "after_1s", "after_end",
                                                               "probe_p50_ms", "probe_max_ms")}
        limited = any(r["limited"] for r in runs[name])
        unanswered = any(r["probe_unanswered"] for r in runs[name])
        summary[name] = {**med, "limited": limited, "probe_unanswered": unanswered}
        rows.append([name, med["baseline"] / MiB, (">= " if limited else "") + f"{med['peak'] / MiB:,.0f}",
                     (med["peak"] - med["baseline"]) / MiB, med["after_1s"] / MiB, med["after_end"] / MiB,
                     med["probe_p50_ms"], (">= " if unanswered else "") + f"{med['probe_max_ms']:,.0f}"])
    ours, peer = summary["ours"], summary["qemu-nbd"]
    grow = (ours["peak"] - ours["baseline"]) / max(peer["peak"] - peer["baseline"], 1)
    rows.append(["ours/qemu-nbd", ours["baseline"] / peer["baseline"], f"{ours['peak'] / peer['peak']:.2f}", grow,
                 ours["after_1s"] / peer["after_1s"], ours["after_end"] / peer["after_end"],
                 ours["probe_p50_ms"] / peer["probe_p50_ms"], ours["probe_max_ms"] / peer["probe_max_ms"]])
    print(table(["server", "RSS before, MiB", "peak, MiB", "peak - before, MiB", "1 s after they left, MiB",
                 f"{after:g} s after, MiB", "probe 1 MiB read p50, ms", "probe max, ms"], rows,
                title=f"{clients} clients x {PIPELINE} pipelined 32 MiB READs, replies not taken for {hold:g} s, "
                      f"then closed; {size // MiB} MiB volume; median of {repeats}"))
    print()
    result["summary"] = summary
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
