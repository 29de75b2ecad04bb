"""Trace prefetch: record which blocks of which layer a workload reads, and replay that list at the
next lazy start, fetching those blocks first and concurrently.

File: a 24-byte header (magic 0xC2EF1820, data size, raw CRC32C of the records chained from seed 0) and 24-byte
records (op 'R', layer index from the bottom, byte count, byte offset in the layer's unwrapped LSMT stream).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from .errors import FormatError, TruncatedError
from .formats.checksum import raw_crc32c
from .formats.lsmt.index import Segments
from .source.base import BlockSource
from .source.filter import Filter

log = logging.getLogger(__name__)

MAGIC = 0xC2EF1820
_HEADER = struct.Struct("<I4xQI4x")
_RECORD = struct.Struct("<B3xIQQ")
OP_READ = ord("R")
MAX_READ = 1 << 20  # replay issues reads of at most 1 MiB, as the reference
CONCURRENCY = 16  # the reference's prefetchConfig.concurrency


@dataclass(frozen=True, slots=True)
class TraceRecord:
    layer: int
    offset: int
    count: int


def encode(records: Sequence[TraceRecord]) -> bytes:
    body = b"".join(_RECORD.pack(OP_READ, r.layer, r.count, r.offset) for r in records)
    crc = 0
    for pos in range(0, len(body), _RECORD.size):
        crc = raw_crc32c(body[pos : pos + _RECORD.size], crc)
    return _HEADER.pack(MAGIC, len(body), crc) + body


def is_trace(head: bytes) -> bool:
    return len(head) >= 4 and struct.unpack_from("<I", head)[0] == MAGIC


def decode(raw: bytes, *, path: str = "<trace>") -> list[TraceRecord]:
    if len(raw) < _HEADER.size:
        raise TruncatedError("trace file is shorter than its header", path=path, offset=0)
    magic, size, crc = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError("not a trace file (bad magic)", path=path, offset=0)
    if size % _RECORD.size or len(raw) != _HEADER.size + size:
        raise FormatError(f"trace says {size} bytes of records, file holds {len(raw) - _HEADER.size}", path=path,
                          offset=8)
    body = raw[_HEADER.size :]
    got = 0
    for pos in range(0, len(body), _RECORD.size):
        got = raw_crc32c(body[pos : pos + _RECORD.size], got)
    if got != crc:
        raise FormatError(f"trace checksum mismatch (stored 0x{crc:08x}, computed 0x{got:08x})", path=path,
                          offset=16)
    out = []
    for pos in range(0, len(body), _RECORD.size):
        op, layer, count, offset = _RECORD.unpack_from(body, pos)
        if op == OP_READ:
            out.append(TraceRecord(layer, offset, count))
    return out


class TraceRecorder:
    """Collects reads (deduplicated, neighbours joined) and writes the trace file when closed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: set[tuple[int, int, int]] = set()
        self.records: list[TraceRecord] = []
        open(path + ".lock", "w").close()  # as the reference: delete it to stop recording

    def note(self, layer: int, offset: int, count: int) -> None:
        key = (layer, offset, count)
        with self._lock:
            if key in self._seen or not os.path.exists(self.path + ".lock"):
                return
            self._seen.add(key)
            last = self.records[-1] if self.records else None
            if last and last.layer == layer and last.offset + last.count == offset and last.count + count <= MAX_READ:
                self.records[-1] = TraceRecord(layer, last.offset, last.count + count)
            else:
                self.records.append(TraceRecord(layer, offset, count))

    def close(self) -> None:
        with self._lock:
            raw = encode(self.records)
        with open(self.path + ".tmp", "wb") as f:
            f.write(raw)
        os.replace(self.path + ".tmp", self.path)
        if os.path.exists(self.path + ".lock"):
            os.unlink(self.path + ".lock")
        open(self.path + ".ok", "w").close()
        log.info("%s: recorded %d reads", self.path, len(self.records))


class RecordingSource(Filter):
    """A filter noting every read of a layer's data stream."""

    def __init__(self, inner: BlockSource, layer: int, recorder: TraceRecorder) -> None:
        super().__init__(inner)
        self.layer = layer
        self.recorder = recorder

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self.recorder.note(self.layer, offset, len(buf))
        self.inner.readinto(offset, buf)


class Layer(Protocol):
    """What a stack needs of a lower layer (``formats.lsmt.stack.LowerLayer``)."""

    name: str

    @property
    def data(self) -> BlockSource: ...

    @property
    def virtual_size(self) -> int: ...

    @property
    def uuid(self) -> bytes: ...

    @property
    def parent_uuid(self) -> bytes: ...

    def segments(self) -> Segments: ...


class RecordedLayer:
    """A layer whose data reads are recorded as layer ``number`` of the trace; the rest is the layer's own."""

    def __init__(self, layer: Layer, number: int, recorder: TraceRecorder) -> None:
        self.layer = layer
        self.name = layer.name
        self.data = RecordingSource(layer.data, number, recorder)

    @property
    def virtual_size(self) -> int:
        return self.layer.virtual_size

    @property
    def uuid(self) -> bytes:
        return self.layer.uuid

    @property
    def parent_uuid(self) -> bytes:
        return self.layer.parent_uuid

    def segments(self) -> Segments:
        return self.layer.segments()


def replay(records: Sequence[TraceRecord], sources: Sequence[BlockSource], *, concurrency: int = CONCURRENCY
           ) -> threading.Thread:
    """Read the traced ranges in the background (which fills the cache below); returns the thread."""

    def read(rec: TraceRecord) -> int:
        src = sources[rec.layer]
        end = min(rec.offset + rec.count, src.size)
        pos = rec.offset
        while pos < end:
            n = min(MAX_READ, end - pos)
            src.pread(pos, n)
            pos += n
        return max(0, end - rec.offset)

    def run() -> None:
        usable = [r for r in records if 0 <= r.layer < len(sources)]
        try:
            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="prefetch") as pool:
                done = sum(pool.map(read, usable))
            log.info("prefetched %d bytes in %d reads", done, len(usable))
        except Exception as exc:  # prefetch is an optimisation: reads on demand still work
            log.warning("trace prefetch stopped: %s", exc)

    thread = threading.Thread(target=run, name="trace-prefetch", daemon=True)
    thread.start()
    return thread
