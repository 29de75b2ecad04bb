"""Stopping the attach daemon with SIGINT or SIGTERM while writers are busy on its loop device: the FUSE connection
is aborted first (writes not answered yet fail), every serving thread (C and Python) is joined, and only then is
the volume flushed and closed; the daemon exits with status 0. Every write the device acknowledged is in the
volume, the volume checks ok, and no other file changed."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from overlaybd.export import fusedev as F
from overlaybd.export.fusedev import HOLD_WRITES
from overlaybd.export.loop import attachment
from overlaybd.source.file import MemorySource
from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD, run
from .test_attach import _kernel_ready

pytestmark = pytest.mark.slow
SIZE = 64 << 20
BLOCK = 64 << 10
PR_SET_CHILD_SUBREAPER = 36
ENGINES = {"native": {}, "python": {"OVERLAYBD_NATIVE": "0"}}


@contextmanager
def adopting() -> Iterator[None]:
    """The daemon ``overlaybd attach`` starts outlives it: as a subreaper, this process adopts it, and can wait for
    its exit status."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _attach(vol: Path, env: dict[str, str]) -> tuple[str, int, str]:
    """``overlaybd attach VOL`` with ``env`` added: the device, the daemon's pid, its log."""
    out = subprocess.run([*OVERLAYBD, "attach", str(vol)], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    device = out.stdout.strip()
    state = attachment(device)
    return device, state.pid, state.log


def _exit_status(pid: int) -> int:
    """The adopted daemon's exit status (a death by signal as its negative number)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _volume_with_a_snapshot(path: Path) -> bytearray:
    """A volume whose snapshot holds random data in its first half (its bytes are returned)."""
    vol = Volume.create(str(path), SIZE)
    model = bytearray(SIZE)
    data = random.Random(5).randbytes(SIZE // 2)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, data)
        model[:len(data)] = data
    vol.snapshot("base")
    return model


def _other_files(vol: Path) -> dict[str, str]:
    """sha256 of every file of the volume but its upper (the only files a write may change)."""
    upper = {os.path.realpath(p) for p in Volume(str(vol)).upper}
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(vol.rglob("*"))
            if p.is_file() and not p.is_socket() and os.path.realpath(p) not in upper and p.name != ".lock"}


def _check_ok(vol: Path) -> None:
    out = run(*OVERLAYBD, "check", str(vol))
    assert "ok" in out and "corrupt" not in out, out


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_daemon_with_every_acknowledged_write_kept(tmp_path: Path, sig: signal.Signals,
                                                                       engine: str) -> None:
    """Four writers through the loop device (direct I/O, 64 KiB each, every block written once, each writer its
    own blocks), the signal after 400 acknowledged writes: each writer goes on until its writes fail. The daemon
    exits with 0; every acknowledged write reads back; a write that failed reads as the new or the old bytes."""
    _kernel_ready()
    vol = tmp_path / "vol"
    model = _volume_with_a_snapshot(vol)
    others = _other_files(vol)
    acked: list[tuple[int, bytes]] = []
    failed: list[tuple[int, bytes]] = []
    enough = threading.Event()
    with adopting():
        device, pid, log_path = _attach(vol, ENGINES[engine])
        try:
            fd = os.open(device, os.O_RDWR | os.O_DIRECT)
            try:
                def writer(k: int) -> None:
                    buf = mmap.mmap(-1, BLOCK)
                    rng = random.Random(k)
                    for n in range(SIZE // BLOCK // 4):
                        off = (n * 4 + k) * BLOCK
                        data = rng.randbytes(BLOCK)
                        buf[:] = data
                        try:
                            assert os.pwrite(fd, buf, off) == BLOCK
                        except OSError:
                            failed.append((off, data))
                            return
                        acked.append((off, data))
                        if len(acked) >= 400:
                            enough.set()

                threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
                for t in threads:
                    t.start()
                assert enough.wait(120)
                os.kill(pid, sig)
                for t in threads:
                    t.join()
            finally:
                os.close(fd)
            assert _exit_status(pid) == 0
            log_text = Path(log_path).read_text()
            assert f"stopped by {sig.name}" in log_text and "Traceback" not in log_text, log_text
        finally:
            run(*OVERLAYBD, "detach", device)  # frees the loop device and the dead mount
    assert len(failed) == 4  # every writer saw its writes fail once the connection was aborted
    with Volume(str(vol)).open() as disk:
        for off, data in acked:
            assert disk.pread(off, BLOCK) == data, off
            model[off:off + BLOCK] = data
        for off, data in failed:
            got = disk.pread(off, BLOCK)
            assert got in (data, bytes(model[off:off + BLOCK])), off
            model[off:off + BLOCK] = got
        assert hashlib.sha256(disk.pread(0, SIZE)).digest() == hashlib.sha256(model).digest()
    _check_ok(vol)
    assert _other_files(vol) == others


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_stop_waits_for_the_write_under_way_before_the_volume_closes(tmp_path: Path, engine: str) -> None:
    """A write held under way (the test hook ``OVERLAYBD_TEST_HOLD_WRITES``: its space reserved, its data not yet
    written) when SIGINT comes: its client gets an error at once (the connection is aborted), but the daemon
    waits for it before it flushes and closes the volume, so its data and record land in the volume's files while
    they are open (without the join, the volume closed first, and the write went to whatever file held the
    descriptor number by then). Then the daemon exits with 0."""
    _kernel_ready()
    vol = tmp_path / "vol"
    model = _volume_with_a_snapshot(vol)
    others = _other_files(vol)
    hold = tmp_path / "hold"
    hold.mkdir()
    first, second = b"\x11" * BLOCK, b"\x22" * BLOCK
    with adopting():
        device, pid, _ = _attach(vol, {**ENGINES[engine], HOLD_WRITES: str(hold)})
        try:
            fd = os.open(device, os.O_RDWR | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, BLOCK)
                buf[:] = first
                assert os.pwrite(fd, buf, 0) == BLOCK  # acknowledged
                (hold / "hold").touch()
                errors: list[OSError] = []

                def held_writer() -> None:
                    out = mmap.mmap(-1, BLOCK)
                    out[:] = second
                    try:
                        os.pwrite(fd, out, 8 * BLOCK)
                    except OSError as exc:
                        errors.append(exc)

                t = threading.Thread(target=held_writer)
                t.start()
                deadline = time.monotonic() + 60
                while not any(p.name.startswith("held-") for p in hold.iterdir()):
                    assert time.monotonic() < deadline, "the write never reached the daemon"
                    time.sleep(0.01)
                os.kill(pid, signal.SIGINT)
                t.join()  # the abort fails it while the daemon still holds it
                assert len(errors) == 1
                (hold / "hold").unlink()
            finally:
                os.close(fd)
            assert _exit_status(pid) == 0
        finally:
            run(*OVERLAYBD, "detach", device)
    model[:BLOCK] = first
    model[8 * BLOCK:9 * BLOCK] = second  # written (not acknowledged) before the volume closed
    with Volume(str(vol)).open() as disk:
        assert disk.pread(0, SIZE) == bytes(model)
    _check_ok(vol)
    assert _other_files(vol) == others


@contextmanager
def _fusectl(wanted: bool) -> Iterator[None]:
    """The fusectl file system mounted (``wanted``) or not, as it was again afterwards."""
    mounted = os.path.ismount(F.CONNECTIONS)
    if wanted and not mounted:
        run("mount", "-t", "fusectl", "fusectl", F.CONNECTIONS)
    elif not wanted and mounted:
        run("umount", F.CONNECTIONS)
    try:
        yield
    finally:
        if wanted and not mounted:
            run("umount", F.CONNECTIONS)
        elif not wanted and mounted:
            run("mount", "-t", "fusectl", "fusectl", F.CONNECTIONS)


@pytest.mark.parametrize("fusectl", [True, False], ids=["fusectl abort", "forced unmount"])
def test_an_abort_ends_a_busy_connection_either_way(tmp_path: Path, fusectl: bool) -> None:
    """The connection held busy (a file open on it, as the loop device holds it): a stop aborts it through fusectl
    where that is mounted, else with a forced unmount; either way every serving thread returns, and the open
    file fails from then on."""
    _kernel_ready()
    mnt = tmp_path / "m"
    mnt.mkdir()
    with _fusectl(fusectl):
        fd = F.mount(str(mnt))
        connection = F.connection_of(str(mnt))
        assert connection is not None and os.path.exists(f"{F.CONNECTIONS}/{connection}") == fusectl
        stop = F.Stop()
        device = F.DiskDevice(fd, MemorySource(bytearray(1 << 20)), readonly=False, threads=2,
                              abort=lambda: F.abort_connection(str(mnt), connection))
        runner = threading.Thread(target=device.serve, args=(stop,))
        runner.start()
        held = os.open(mnt / "disk", os.O_RDWR)
        try:
            assert os.pwrite(held, b"\x01" * 512, 0) == 512
            stop.request("test")
            runner.join(60)
            assert not runner.is_alive()
            with pytest.raises(OSError):
                os.pread(held, 512, 0)
        finally:
            with contextlib.suppress(OSError):
                os.close(held)  # its FLUSH fails on an aborted connection (the descriptor is closed all the same)
            os.close(fd)
            stop.close()
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
