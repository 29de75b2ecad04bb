"""What a Python NBD server costs at the least, measured beside ``qemu-nbd`` and ``overlaybd serve``: the bounds that
the NBD cells of BENCHMARKS.md are read against.

1. Per request: a minimal asyncio NBD server (this file, ``--floor-server``) that does nothing for a READ but
   answer with 4 KiB of zeros from one buffer: fixed-newstyle handshake, simple replies, one
   ``asyncio.Protocol``; ``--batch`` sends the replies to the requests of one ``data_received`` in one ``writev``
   (what ``overlaybd serve`` does for small local requests), without it each reply is one ``transport.write``.
   Clients: ``qemu-img bench -f raw -c N -d 1|16 -s 4096 -S $((4096*104729)) URI`` against the floor (both
   variants), ``overlaybd serve`` on a 1-snapshot volume and ``qemu-nbd -r -t -e 8 -f raw`` on its raw export, 256
   MiB, interleaved; measured: requests a second and the server's CPU time (user + system, all threads) per
   request.
2. Memory: VmRSS of a Python interpreter that has imported nothing, then asyncio, then numpy, then what
   ``overlaybd serve`` imports; beside the RSS of ``qemu-nbd`` serving a 64-deep qcow2 chain, from
   ``bench_nbd.py``.

    .venv/bin/python benchmarks/bench_nbd_floor.py [--quick] [--repeats N] [--json FILE]
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import subprocess
import sys
import time
from typing import Any

from common import emit_json, log, median, table, warm, workdir
from nbd_common import (
    OVERLAYBD,
    SERVER_PIDS,
    MiB,
    base_parser,
    build_mixed_volume,
    cpu_seconds,
    need,
    overlaybd_server,
    qemu_img_bench,
    qemu_nbd,
    run,
    stop_process,
    versions,
    wait_socket,
)

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
OPT_EXPORT_NAME, OPT_GO = 1, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
CMD_READ, CMD_DISC = 0, 2
FLAG_HAS_FLAGS, FLAG_READ_ONLY = 1, 2


class FloorProtocol(asyncio.Protocol):
    """The handshake, then every READ answered with zeros; nothing else is served."""

    def __init__(self, size: int, batch: bool) -> None:
        self.size = size
        self.batch = batch
        self.buf = b""
        self.negotiating = True
        self.zeros = memoryview(bytes(1 << 20))
        self.transport: asyncio.Transport | None = None
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()
        transport.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))  # fixed newstyle, no zeroes

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.negotiating:
            self._options()
        if not self.negotiating:
            self._requests()

    def _options(self) -> None:
        assert self.transport is not None
        if len(self.buf) >= 4 and not hasattr(self, "client_flags"):
            self.client_flags = self.buf[:4]
            self.buf = self.buf[4:]
        while len(self.buf) >= 16:
            _, opt, length = struct.unpack(">QII", self.buf[:16])
            if len(self.buf) < 16 + length:
                return
            self.buf = self.buf[16 + length:]
            flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY
            if opt == OPT_EXPORT_NAME:
                self.transport.write(struct.pack(">QH", self.size, flags))
                self.negotiating = False
                return
            if opt == OPT_GO:
                info = struct.pack(">HQH", 0, self.size, flags)
                self.transport.write(struct.pack(">QIII", REPLY_MAGIC, opt, REP_INFO, len(info)) + info)
                self.transport.write(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ACK, 0))
                self.negotiating = False
                return
            self.transport.write(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))

    def _requests(self) -> None:
        assert self.transport is not None
        parts: list[bytes | memoryview] = []
        while len(self.buf) >= REQUEST.size:
            _, _, cmd, handle, _, length = REQUEST.unpack_from(self.buf)
            self.buf = self.buf[REQUEST.size:]
            if cmd == CMD_DISC:
                self.transport.close()
                return
            reply: list[bytes | memoryview] = [SIMPLE.pack(0x67446698, 0, handle), self.zeros[:length]] \
                if cmd == CMD_READ else [SIMPLE.pack(0x67446698, 22, handle)]
            if self.batch:
                parts += reply
            else:
                self.transport.write(b"".join(reply))
        if parts:
            self._writev(parts)

    def _writev(self, parts: list[bytes | memoryview]) -> None:
        assert self.transport is not None
        try:
            sent = os.writev(self.fd, parts) if not self.transport.get_write_buffer_size() else 0
        except BlockingIOError:
            sent = 0
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            self.transport.write(bytes(part[sent:]))
            sent = 0


async def floor_server(sock: str, size: int, batch: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: FloorProtocol(size, batch), sock)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def rss_kib(code: str) -> int:
    out = subprocess.run([sys.executable, "-c", f"{code}\nprint(open('/proc/self/status').read())"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"VmRSS:\s+(\d+)", out)
    assert m is not None
    return int(m.group(1))


def measure_requests(wd: str, size: int, repeats: int, secs: float, seed: int) -> dict[str, Any]:
    vol, raw = os.path.join(wd, "vol"), os.path.join(wd, "disk.raw")
    build_mixed_volume(vol, size, seed)
    run([*OVERLAYBD, "export", vol, raw])
    names = ["floor, one write a reply", "floor, batched writev", "overlaybd serve", "qemu-nbd raw"]
    procs = []
    uris: dict[str, str] = {}
    try:
        for name, batch in ((names[0], False), (names[1], True)):
            sock = os.path.join(wd, f"floor{int(batch)}.sock")
            proc = subprocess.Popen([sys.executable, __file__, "--floor-server", sock, str(size),
                                     *(["--batch"] if batch else [])], stdout=subprocess.DEVNULL)
            procs.append(proc)
            wait_socket(sock, proc, "floor server")
            uris[name] = f"nbd+unix:///?socket={sock}"
            SERVER_PIDS[uris[name]] = proc.pid
        with overlaybd_server(vol, os.path.join(wd, "ours.sock"), readonly=True) as ours, \
                qemu_nbd(raw, "raw", os.path.join(wd, "qemu.sock"), readonly=True) as peer:
            uris[names[2]], uris[names[3]] = ours, peer
            return _interleave(uris, names, repeats, secs, [vol, raw])
    finally:
        for proc in procs:
            stop_process(proc)


def _interleave(uris: dict[str, str], names: list[str], repeats: int, secs: float, files: list[str]
                ) -> dict[str, Any]:
    iops: dict[int, dict[str, list[float]]] = {d: {n: [] for n in names} for d in (1, 16)}
    cpu: dict[int, dict[str, list[float]]] = {d: {n: [] for n in names} for d in (1, 16)}
    counts: dict[tuple[str, int], int] = {}
    for rep in range(repeats):
        for d in (1, 16):
            for n in (names if rep % 2 == 0 else names[::-1]):
                warm(files)
                if (n, d) not in counts:
                    counts[(n, d)] = int(min(max(qemu_img_bench(uris[n], 2000, d) * secs, 2000), 500_000))
                pid = SERVER_PIDS[uris[n]]
                c0 = cpu_seconds(pid)
                iops[d][n].append(qemu_img_bench(uris[n], counts[(n, d)], d))
                cpu[d][n].append((cpu_seconds(pid) - c0) / counts[(n, d)] * 1e6)
        log(f"floor: repeat {rep + 1}/{repeats} done, load {os.getloadavg()[0]:.1f}")
    rows = []
    for d in (1, 16):
        q = median(iops[d][names[3]])
        rows.append([f"QD{d} IOPS", *(median(iops[d][n]) for n in names),
                     *(median(iops[d][n]) / q for n in names[:3])])
        rows.append([f"QD{d} server CPU µs/request", *(median(cpu[d][n]) for n in names), "", "", ""])
    print(table(["qemu-img bench 4 KiB reads", *names, *[f"{n} / qemu-nbd" for n in names[:3]]], rows,
                title=f"Per-request floor, median of {repeats}"))
    print()
    return {"iops": iops, "server_cpu_us": cpu, "counts": {f"{n} QD{d}": c for (n, d), c in counts.items()}}


def measure_memory() -> dict[str, int]:
    steps = {"python, nothing imported": "", "+ asyncio": "import asyncio",
             "+ asyncio, numpy": "import asyncio, numpy",
             "+ what overlaybd serve imports": "import asyncio, numpy, overlaybd.cli.main"}
    out = {k: rss_kib(code) for k, code in steps.items()}
    print(table(["interpreter", "VmRSS, MiB"], [[k, v / 1024] for k, v in out.items()],
                title="Memory floor of a Python server (VmRSS right after the imports)"))
    print()
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--floor-server":
        asyncio.run(floor_server(sys.argv[2], int(sys.argv[3]), "--batch" in sys.argv))
        return 0
    ap = base_parser(__doc__)
    args = ap.parse_args()
    need("qemu-nbd", "qemu-img")
    repeats = args.repeats or (1 if args.quick else 3)
    size = (32 if args.quick else 256) * MiB
    result: dict[str, Any] = {"benchmark": "bench_nbd_floor", "versions": versions(), "repeats": repeats}
    t0 = time.perf_counter()
    with workdir(args.workdir, args.keep, "bench-floor-") as wd:
        result["requests"] = measure_requests(wd, size, repeats, 0.5 if args.quick else 2.0, args.seed)
    result["memory_kib"] = measure_memory()
    result["load_end"] = round(os.getloadavg()[0], 2)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
