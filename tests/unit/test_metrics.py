"""Whose figures a count goes to: each server keeps its own (two servers in one process do not mix), the layers
below count to the recorder bound where they run, and nothing counts by default."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

from overlaybd import metrics
from overlaybd.export.nbd import protocol
from overlaybd.export.prometheus import PrometheusMetrics
from overlaybd.export.served import ServedVolume
from overlaybd.volume import Volume

from ..nbd_client import Client

MiB = 1 << 20


def test_nothing_counts_by_default_and_binding_is_per_context() -> None:
    assert metrics.current() is metrics.NULL and not metrics.current().active
    mine, process = PrometheusMetrics(), PrometheusMetrics()
    seen: list[metrics.Recorder] = []

    def other_thread() -> None:
        seen.append(metrics.current())

    metrics.bind(mine)
    try:
        assert metrics.current() is mine
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert seen == [metrics.NULL]  # a thread nobody bound counts nowhere...
        metrics.set_default(process)
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert seen[-1] is process  # ...or to the process's recorder, when there is one
        assert metrics.current() is mine  # the bound one comes first
    finally:
        metrics.bind(None)
        metrics.set_default(None)
    assert metrics.current() is metrics.NULL


def test_figures_sum_up_what_was_counted() -> None:
    rec = PrometheusMetrics()
    for _ in range(3):
        rec.request("READ", 4096, 0.001)
    rec.request("READ", 4096, 0.002, 5)
    rec.cache_hit()
    rec.cache_miss()
    rec.cache_miss()
    rec.fetched("reg.example:5000", 1000)
    rec.fetched("reg.example:5000", 24)
    rec.retried("reg.example:5000")
    assert rec.figures() == {
        "requests": {"READ": {"count": 4, "bytes": 12288, "errors": {"EIO": 1}, "seconds": 0.005}},
        "cache": {"hits": 1, "misses": 2},
        "registries": {"reg.example:5000": {"bytes": 1024, "retries": 1}},
    }
    assert metrics.NULL.figures() == {}


def test_two_servers_in_one_process_keep_their_own_figures(tmp_path: Path) -> None:
    vols = [Volume.create(str(tmp_path / f"v{i}"), 16 * MiB) for i in range(2)]
    recorders = [PrometheusMetrics(), PrometheusMetrics()]
    socks = [str(tmp_path / f"s{i}.sock") for i in range(2)]
    started: list[str] = []
    ready = threading.Event()
    control: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def up(uri: str) -> None:  # on the event loop: must not block
        started.append(uri)
        if len(started) == 2:
            ready.set()

    async def main() -> None:
        stop = asyncio.Event()
        control.append((asyncio.get_running_loop(), stop))
        with ServedVolume(vols[0]) as a, ServedVolume(vols[1]) as b:
            await asyncio.gather(*(served.serve(f"unix:{sock}", stop=stop, metrics=rec,
                                                ready=up)
                                   for served, sock, rec in zip((a, b), socks, recorders, strict=True)))

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    try:
        assert ready.wait(timeout=30)
        for sock, reads in zip(socks, (5, 2), strict=True):
            c = Client(sock)
            c.go()
            for i in range(reads):
                c.request(protocol.CMD_READ, i, i * 4096, 4096)
                assert c.simple(4096)[1] == 0
            c.close()
    finally:
        loop, stop = control[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
    counts = [rec.figures()["requests"]["READ"] for rec in recorders]
    assert [(c["count"], c["bytes"]) for c in counts] == [(5, 5 * 4096), (2, 2 * 4096)]
    assert metrics.current() is metrics.NULL  # the servers bound theirs in their own contexts only


def test_without_prometheus_client_metrics_is_a_one_line_error(tmp_path: Path) -> None:
    """In a process where prometheus-client cannot be imported (as when the extra is not installed)."""
    vol = Volume.create(str(tmp_path / "vol"), MiB)
    program = ("import sys; sys.modules['prometheus_client'] = None; from overlaybd.cli.main import main; "
               f"sys.exit(main(['serve', {vol.path!r}, '--metrics', '127.0.0.1:0']))")
    res = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("overlaybd: error: --metrics needs prometheus-client (pip install "
                               "'pyoverlaybd[metrics]')")
