"""What the remote benchmarks share: the test volume (10 LZ4 layers of half-random, half log-like 1 MiB extents),
counting of what the registry client received, control of the process's cache (a ``CachePolicy`` per variant),
a proxy that adds latency and counts, and the read workloads."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from common import MiB, aligned_buffer, log

from overlaybd.cache.store import BlobCache, CachePolicy
from overlaybd.formats.output import Compression
from overlaybd.remote import lazy as lazy_mod
from overlaybd.remote.registry import Endpoint, RegistryRepository
from overlaybd.volume import Volume

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EXTENT = 1 * MiB
READ = 64 * 1024
SEQ_READ = 1 * MiB
LAYERS = 10


# -- data --------------------------------------------------------------------------------------------------


def text_pool(rng: np.random.Generator, n: int = 40000) -> np.ndarray:
    codes = rng.integers(0, 1000, size=(n, 3)).tolist()
    lines = [f"2026-11-28T12:{k % 60:02d}:{(k * 7) % 60:02d}Z node{a % 16} kubelet[{a}]: GET /v2/app/blobs/"
             f"sha256 status=200 bytes={b} took={c}ms\n" for k, (a, b, c) in enumerate(codes)]
    return np.frombuffer("".join(lines).encode(), np.uint8)


def extent_bytes(rng: np.random.Generator, text: np.ndarray, piece: int = 1024) -> bytes:
    out = rng.integers(0, 256, EXTENT, dtype=np.uint8)
    n = EXTENT // piece
    starts = rng.integers(0, text.size - piece, n)
    for k in np.flatnonzero(rng.random(n) < 0.5).tolist():
        s = int(starts[k])
        out[k * piece : (k + 1) * piece] = text[s : s + piece]
    return out.tobytes()


def build_volume(folder: str, size: int, seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    text = text_pool(rng)
    vol = Volume.create(folder, size)
    perm = rng.permutation(size // EXTENT)
    for i, share in enumerate(np.array_split(perm, LAYERS)):
        with vol.open(writable=True) as dev:
            for e in sorted(share.tolist()):
                dev.pwrite(e * EXTENT, extent_bytes(rng, text))
            dev.flush()
        vol.snapshot(f"layer {i}", compression=Compression("lz4"))
        log(f"  layer {i + 1}/{LAYERS} built")
    return vol


def random_reads(size: int, count: int, seed: int, length: int = READ) -> list[int]:
    rng = np.random.default_rng(seed)
    offsets: list[int] = (rng.integers(0, (size - length) // 4096 + 1, count) * 4096).tolist()
    return offsets


# -- counting and cache control ----------------------------------------------------------------------------


class Wire:
    """Range requests and bytes our registry client received (``RegistryRepository.read_range`` wrapped)."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self._lock = threading.Lock()
        orig = RegistryRepository.read_range
        wire = self

        def read_range(repo: RegistryRepository, digest: str, offset: int, buf: memoryview,
                       endpoint: Endpoint | None = None) -> None:
            orig(repo, digest, offset, buf, endpoint)
            with wire._lock:
                wire.requests += 1
                wire.bytes += len(buf)

        RegistryRepository.read_range = read_range  # type: ignore[method-assign,assignment]

    def mark(self) -> tuple[int, int]:
        with self._lock:
            return self.requests, self.bytes

    def since(self, mark: tuple[int, int]) -> tuple[int, int]:
        now = self.mark()
        return now[0] - mark[0], now[1] - mark[1]


def cache_dir() -> str:
    return os.environ["OVERLAYBD_CACHE_DIR"]


def reset_cache() -> None:
    """Empty the cache folder and forget the process's BlobCache objects (their fetch pools too)."""
    for c in lazy_mod._CACHES.values():
        c.close()
    lazy_mod._CACHES.clear()
    shutil.rmtree(cache_dir(), ignore_errors=True)


def cache_allocated() -> int:
    total = 0
    for p in Path(cache_dir()).rglob("*.data"):
        total += p.stat().st_blocks * 512
    return total


# As shipped: 64 KiB chunks, read-ahead only for a read that continues the previous one ("always": False).
_DEFAULT = CachePolicy()
SHIPPED: dict[str, Any] = {"chunk": _DEFAULT.chunk, "readahead": _DEFAULT.readahead_chunks,
                           "max_run": _DEFAULT.max_run_chunks, "concurrency": _DEFAULT.concurrency, "always": False}
NO_READAHEAD: dict[str, Any] = {**SHIPPED, "readahead": 0}
BARE: dict[str, Any] = {**SHIPPED, "readahead": 0, "max_run": 1, "concurrency": 1}
# The cache before 972f4c1 (emulated): 256 KiB chunks, 4 chunks of read-ahead on every read, runs of 16 chunks.
PREVIOUS: dict[str, Any] = {"chunk": 256 * 1024, "readahead": 4, "max_run": 16, "concurrency": _DEFAULT.concurrency,
                            "always": True}


@contextmanager
def cache_config(chunk: int, readahead: int, max_run: int, concurrency: int, always: bool) -> Iterator[None]:
    """Chunk size, read-ahead, run length and fetch pool as given, on an empty cache, for every layer the process
    opens. ``always``: read ahead on every read, not only sequential ones."""
    reset_cache()
    lazy_mod.use_cache(BlobCache(cache_dir(), policy=CachePolicy(
        chunk=chunk, readahead_chunks=readahead, max_run_chunks=max_run, concurrency=concurrency,
        readahead_always=always)))
    try:
        yield
    finally:
        reset_cache()


def describe(cfg: dict[str, Any]) -> str:
    ra = (f"read-ahead {cfg['readahead']}" + (" on every read" if cfg["always"] else " if sequential")
          if cfg["readahead"] else "no read-ahead")
    return f"{cfg['chunk'] // 1024} KiB chunks, {ra}, max run {cfg['max_run']}, pool {cfg['concurrency']}"


# -- a proxy adding latency --------------------------------------------------------------------------------


class _DelayHandler(http.server.BaseHTTPRequestHandler):
    """One client connection of a :class:`DelayProxy`, kept alive, with its own upstream connection."""

    protocol_version = "HTTP/1.1"
    conn: http.client.HTTPConnection | None = None
    server: _DelayServer

    def log_message(self, *args: object) -> None:
        pass

    def _upstream(self, method: str, body: bytes | None, headers: dict[str, str]) -> http.client.HTTPResponse:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.server.proxy.upstream, timeout=60)
            try:
                self.conn.request(method, self.path, body=body, headers=headers)
                return self.conn.getresponse()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _forward(self, method: str) -> None:
        proxy = self.server.proxy
        time.sleep(proxy.delay)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        if proxy.accept_oci and "/manifests/" in self.path:
            accept = [v for k, v in headers.items() if k.lower() == "accept"]
            headers = {k: v for k, v in headers.items() if k.lower() != "accept"}
            headers["Accept"] = ", ".join([*accept, OCI_MANIFEST, OCI_INDEX])
        resp = self._upstream(method, body, headers)
        proxy.count(requests=1)
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(k, v)
        declared = resp.getheader("Content-Length")
        if method == "HEAD" or declared is None:
            data = resp.read()
            self.send_header("Content-Length", declared if method == "HEAD" and declared else str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)
            return
        self.send_header("Content-Length", declared)
        self.end_headers()
        blob = method == "GET" and "/blobs/sha256:" in self.path
        while piece := resp.read(1 << 20):
            if blob:  # counted as it goes: a client that hangs up mid-body has still been sent what it was sent
                proxy.count(blob_bytes=len(piece))
            self.wfile.write(piece)

    def do_GET(self) -> None:  # noqa: N802
        self._forward("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward("HEAD")


class _DelayServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 16 prefetch threads connect at once

    def __init__(self, proxy: DelayProxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _DelayHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-answer (a mirror giving up a stream) is not worth a traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class DelayProxy:
    """HTTP/1.1 keep-alive proxy that waits ``delay`` seconds before forwarding each request (one round trip of
    a distant registry) and streams the answer back; counts requests and blob GET bytes. With ``accept_oci``,
    manifest requests also accept the OCI media types (docker-registry 2.8 as a pull-through cache leaves them out
    of its requests to its upstream, and then refuses OCI manifests)."""

    def __init__(self, upstream: str, delay: float, *, accept_oci: bool = False) -> None:
        self.upstream = upstream
        self.delay = delay
        self.accept_oci = accept_oci
        self.requests = 0
        self.blob_bytes = 0
        self._lock = threading.Lock()
        self.httpd = _DelayServer(self)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, *, requests: int = 0, blob_bytes: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.blob_bytes += blob_bytes

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- workloads ---------------------------------------------------------------------------------------------


def read_list(dev: Any, offsets: Sequence[int], length: int, digest: Any = None) -> None:
    buf = aligned_buffer(length)
    view = memoryview(buf)
    for off in offsets:
        dev.readinto(off, view)
        if digest is not None:
            digest.update(view)


def read_sequential(dev: Any, size: int, digest: Any = None) -> None:
    buf = aligned_buffer(SEQ_READ)
    view = memoryview(buf)
    for off in range(0, size, SEQ_READ):
        n = min(SEQ_READ, size - off)
        dev.readinto(off, view[:n])
        if digest is not None:
            digest.update(view[:n])


def hash_reads(vol: Volume, offsets: Sequence[int], length: int) -> str:
    h = hashlib.blake2b()
    with vol.open() as dev:
        read_list(dev, offsets, length, h)
    return h.hexdigest()


def wait_thread(name: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(t.name == name and t.is_alive() for t in threading.enumerate()):
        time.sleep(0.01)
