"""``serve --metrics`` and ``attach --metrics``: the figures Prometheus scrapes move by exactly what clients did, and
``overlaybd stats VOL`` says the same. Real servers, real clients (our raw NBD client, qemu-io), a real registry."""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from overlaybd.export.nbd import protocol
from overlaybd.remote.reference import parse_reference
from overlaybd.remote.transfer import pull, push
from overlaybd.volume import Volume

from ..nbd_client import Client, unix_path
from .nbd_helpers import OVERLAYBD, Server, require, run, serving, wait_for
from .registry import FaultProxy, registry

pytestmark = pytest.mark.slow
MiB = 1 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OVERLAYBD_LAYER_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


def metrics_url(log: str | Path) -> str:
    text = Path(log).read_text() if isinstance(log, Path) else log
    found = re.search(r"overlaybd: metrics at (http://\S+)", text)
    assert found, text
    return found.group(1)


def wait_url(server: Server) -> str:
    wait_for("the metrics URL in the server's log", lambda: "metrics at" in server.log(), deadline=30)
    return metrics_url(server.log())


def scrape(url: str) -> Samples:
    """Every sample of the endpoint, parsed by Prometheus's own parser: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def stats_json(vol: str | Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run(*OVERLAYBD, "stats", str(vol), "--output", "json"))
    return out


def read(client: Client, handle: int, offset: int, length: int) -> int:
    client.request(protocol.CMD_READ, handle, offset, length)
    got, error, data = client.simple(length)
    assert got == handle
    return error


def test_nbd_counters_move_by_exactly_what_the_client_did(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "64M")
    with serving([str(vol), "--metrics", "127.0.0.1:0"], tmp_path) as server:
        url = wait_url(server)
        before = scrape(url)
        c = Client(unix_path(server.uri))
        c.go()
        assert value(scrape(url), "overlaybd_connections") == 1
        for i in range(10):
            assert read(c, i, i * 8192, 4096) == 0
        for i in range(3):
            c.request(protocol.CMD_WRITE, 100 + i, i * 4096, 4096, payload=bytes([i + 1]) * 4096)
            assert c.simple()[1] == 0
        c.request(protocol.CMD_FLUSH, 200, 0, 0)
        assert c.simple()[1] == 0
        c.request(protocol.CMD_TRIM, 201, MiB, 65536)
        assert c.simple()[1] == 0
        c.request(protocol.CMD_WRITE_ZEROES, 202, 2 * MiB, 8192)
        assert c.simple()[1] == 0
        assert read(c, 300, 64 * MiB - 4096, 8192) == errno.EINVAL  # past the end: fails, counted as an error
        after = scrape(url)
        assert delta(after, before, "overlaybd_requests_total", command="READ") == 11
        assert delta(after, before, "overlaybd_request_bytes_total", command="READ") == 40960
        assert delta(after, before, "overlaybd_request_errors_total", command="READ", errno="EINVAL") == 1
        assert delta(after, before, "overlaybd_request_seconds_count", command="READ") == 11
        assert delta(after, before, "overlaybd_requests_total", command="WRITE") == 3
        assert delta(after, before, "overlaybd_request_bytes_total", command="WRITE") == 12288
        assert delta(after, before, "overlaybd_requests_total", command="FLUSH") == 1
        assert delta(after, before, "overlaybd_requests_total", command="TRIM") == 1
        assert delta(after, before, "overlaybd_request_bytes_total", command="TRIM") == 65536
        assert delta(after, before, "overlaybd_requests_total", command="WRITE_ZEROES") == 1
        assert delta(after, before, "overlaybd_request_bytes_total", command="WRITE_ZEROES") == 8192
        assert sum(v for (name, _), v in after.items() if name == "overlaybd_request_errors_total") == 1
        # a gauge of what is held now: the last request's bytes go back just after its reply is sent
        wait_for("no bytes in flight", lambda: value(scrape(url), "overlaybd_inflight_bytes") == 0)
        assert value(after, "overlaybd_inflight_bytes_limit") == 1 << 30

        # overlaybd stats says the same, as JSON and for people
        stats = stats_json(vol)
        assert stats["requests"] == {
            "READ": {"count": 11, "bytes": 40960, "errors": {"EINVAL": 1}, "seconds": pytest.approx(
                value(after, "overlaybd_request_seconds_sum", command="READ"))},
            "WRITE": {"count": 3, "bytes": 12288, "errors": {}, "seconds": pytest.approx(
                value(after, "overlaybd_request_seconds_sum", command="WRITE"))},
            "FLUSH": {"count": 1, "bytes": 0, "errors": {}, "seconds": pytest.approx(
                value(after, "overlaybd_request_seconds_sum", command="FLUSH"))},
            "TRIM": {"count": 1, "bytes": 65536, "errors": {}, "seconds": pytest.approx(
                value(after, "overlaybd_request_seconds_sum", command="TRIM"))},
            "WRITE_ZEROES": {"count": 1, "bytes": 8192, "errors": {}, "seconds": pytest.approx(
                value(after, "overlaybd_request_seconds_sum", command="WRITE_ZEROES"))},
        }
        assert stats["connections"] == 1 and stats["inflight_bytes_limit"] == 1 << 30
        human = run(*OVERLAYBD, "stats", str(vol))
        assert re.search(r"^READ\s+11\s+40\.0 KiB\s+1\s", human, re.M) and "EINVAL: 1" in human
        c.close()

        # a second client with structured replies asks for block status; qemu-io reads through its own connection
        s = Client(unix_path(server.uri))
        s.go(structured=True, meta=True)
        s.request(protocol.CMD_BLOCK_STATUS, 1, 0, MiB)
        while not s.chunk()[2] & protocol.REPLY_FLAG_DONE:
            pass
        s.close()
        run(require("qemu-io"), "-f", "raw", "-c", "read 0 64k", "-c", "read 1M 4k", server.uri)
        last = scrape(url)
        assert delta(last, after, "overlaybd_requests_total", command="BLOCK_STATUS") == 1
        assert delta(last, after, "overlaybd_request_bytes_total", command="BLOCK_STATUS") == MiB
        assert delta(last, after, "overlaybd_requests_total", command="READ") == 2
        assert delta(last, after, "overlaybd_request_bytes_total", command="READ") == 65536 + 4096


def test_a_failed_read_counts_with_the_errno_the_client_got(tmp_path: Path) -> None:
    """A write to a read-only export fails with EPERM: counted under WRITE and EPERM, no bytes."""
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "16M")
    with serving([str(vol), "--readonly", "--metrics", "127.0.0.1:0"], tmp_path) as server:
        url = wait_url(server)
        before = scrape(url)
        c = Client(unix_path(server.uri))
        c.go()
        c.request(protocol.CMD_WRITE, 7, 0, 4096, payload=b"x" * 4096)
        assert c.simple()[1] == errno.EPERM
        c.close()
        after = scrape(url)
        assert delta(after, before, "overlaybd_request_errors_total", command="WRITE", errno="EPERM") == 1
        assert delta(after, before, "overlaybd_requests_total", command="WRITE") == 1
        assert delta(after, before, "overlaybd_request_bytes_total", command="WRITE") == 0
        os.kill(server.pid, signal.SIGUSR1)  # prints the figures on stderr
        wait_for("the figures on stderr", lambda: re.search(r"^WRITE\s+1\s+0 B\s+1\s", server.log(), re.M) is not None)
        assert "EPERM: 1" in server.log()
        # a read-only server answers stats too (it holds the control socket while it counts)
        assert stats_json(vol)["requests"] == {"WRITE": {"count": 1, "bytes": 0, "errors": {"EPERM": 1},
                                                         "seconds": pytest.approx(value(
                                                             after, "overlaybd_request_seconds_sum",
                                                             command="WRITE"))}}


def test_lazy_volume_counts_cache_hits_misses_and_registry_bytes(tmp_path: Path) -> None:
    vol = Volume.create(str(tmp_path / "vol"), 32 * MiB)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, os.urandom(8 * MiB))
        dev.flush()
    vol.snapshot("data")
    with vol.open() as dev:
        content = dev.pread(0, 8 * MiB)
    with registry(tmp_path / "reg") as host:
        push(vol, parse_reference(f"{host}/m/vol:v1"))
        proxy = FaultProxy(host)
        try:
            lazy = pull(parse_reference(f"{proxy.address}/m/vol:v1"), str(tmp_path / "lazy"), lazy=True).volume
            with serving([lazy.path, "--readonly", "--metrics", "127.0.0.1:0"], tmp_path) as server:
                url = wait_url(server)
                c = Client(unix_path(server.uri))
                c.go()
                before = scrape(url)
                proxy.set("500", 2)  # the next two blob GETs fail: two retries
                c.request(protocol.CMD_READ, 1, 3 * MiB, 4096)
                assert c.simple(4096)[2] == content[3 * MiB : 3 * MiB + 4096]
                first = scrape(url)
                assert delta(first, before, "overlaybd_cache_misses_total") >= 1
                assert delta(first, before, "overlaybd_registry_bytes_total", host=proxy.address) > 0
                assert delta(first, before, "overlaybd_registry_retries_total", host=proxy.address) == 2
                # the same block again: all from the cache, nothing fetched
                c.request(protocol.CMD_READ, 2, 3 * MiB, 4096)
                assert c.simple(4096)[2] == content[3 * MiB : 3 * MiB + 4096]
                second = scrape(url)
                assert delta(second, first, "overlaybd_cache_hits_total") >= 1
                assert delta(second, first, "overlaybd_cache_misses_total") == 0
                assert delta(second, first, "overlaybd_registry_bytes_total", host=proxy.address) == 0
                c.close()
                stats = stats_json(lazy.path)
                assert stats["cache"] == {"hits": value(second, "overlaybd_cache_hits_total"),
                                          "misses": value(second, "overlaybd_cache_misses_total")}
                assert stats["registries"] == {proxy.address: {
                    "bytes": value(second, "overlaybd_registry_bytes_total", host=proxy.address),
                    "retries": 2}}
        finally:
            proxy.close()


def test_bad_metrics_addresses_are_one_line_errors(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "16M")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for address, message in [("nonsense", "bad metrics address 'nonsense'"),
                                  ("127.0.0.1:99999", "bad metrics address"),
                                  (":9100", "bad metrics address"),
                                  (f"127.0.0.1:{port}", f"cannot serve metrics on 127.0.0.1:{port}: "),
                                  ("no-such-host.invalid:9100", "cannot serve metrics on no-such-host.invalid")]:
            for command in ("serve", "attach"):
                res = subprocess.run([*OVERLAYBD, command, str(vol), "--metrics", address], capture_output=True,
                                     text=True, timeout=60, stdin=subprocess.DEVNULL)
                if command == "attach" and os.geteuid() != 0:
                    continue  # attach says it needs root first
                lines = res.stderr.strip().splitlines()
                assert res.returncode == 2 and len(lines) == 1, res.stderr
                assert lines[0].startswith("overlaybd: error: ") and message in lines[0], lines


def test_stats_without_a_counting_server_is_a_clear_error(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "16M")
    res = subprocess.run([*OVERLAYBD, "stats", str(vol)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("overlaybd: error: ") and "no server" in res.stderr
    with serving([str(vol)], tmp_path):  # writable, so it holds the control socket; but counts nothing
        res = subprocess.run([*OVERLAYBD, "stats", str(vol)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and "started without --metrics" in res.stderr, res.stderr


def test_a_writable_server_takes_the_control_socket_from_a_counting_read_only_one(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "16M")
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    with serving([str(vol), "--readonly", "--metrics", "127.0.0.1:0"], tmp_path / "ro") as reader:
        wait_url(reader)
        assert "requests" in stats_json(vol)  # the read-only server answers
        with serving([str(vol)], tmp_path / "rw"):  # starts, though the socket was taken
            res = subprocess.run([*OVERLAYBD, "stats", str(vol)], capture_output=True, text=True, timeout=60)
            assert res.returncode == 1 and "started without --metrics" in res.stderr, res.stderr
            run(*OVERLAYBD, "snapshot", str(vol), "-m", "through the writable server")
        assert "writable server took the control socket" in reader.log()
    assert len(Volume(str(vol)).snapshots()) == 1


def test_attach_counts_fuse_requests(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("attach needs root, /dev/fuse and loop devices")
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "64M")
    res = subprocess.run([*OVERLAYBD, "attach", str(vol), "--metrics", "127.0.0.1:0"], capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    device = res.stdout.strip()
    try:
        url = metrics_url(res.stderr)
        before = scrape(url)
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        try:
            page = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
            for i in range(10):
                assert os.preadv(fd, [page], 1 * MiB + i * 8192) == 4096
            page.write(b"\x5a" * 4096)
            assert os.pwritev(fd, [page], 0) == 4096
            os.fsync(fd)
        finally:
            os.close(fd)
        after = scrape(url)
        # the kernel may split or merge what reaches FUSE, but never changes the bytes: 10 x 4 KiB read, 4 KiB
        # written, and the fsync
        assert delta(after, before, "overlaybd_request_bytes_total", command="read") == 40960
        assert delta(after, before, "overlaybd_request_bytes_total", command="write") == 4096
        assert delta(after, before, "overlaybd_requests_total", command="fsync") >= 1
        stats = stats_json(vol)
        assert stats["requests"]["read"]["bytes"] == value(after, "overlaybd_request_bytes_total", command="read")
    finally:
        run(*OVERLAYBD, "detach", device)


def test_a_read_only_attach_that_counts_lets_a_writable_server_start(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("attach needs root, /dev/fuse and loop devices")
    vol = tmp_path / "vol"
    run(*OVERLAYBD, "create", str(vol), "--size", "16M")
    device = run(*OVERLAYBD, "attach", str(vol), "--readonly", "--metrics", "127.0.0.1:0").strip()
    try:
        assert "requests" in stats_json(vol)  # the FUSE daemon answers
        with serving([str(vol)], tmp_path):
            res = subprocess.run([*OVERLAYBD, "stats", str(vol)], capture_output=True, text=True, timeout=60)
            assert res.returncode == 1 and "started without --metrics" in res.stderr, res.stderr
    finally:
        run(*OVERLAYBD, "detach", device)
