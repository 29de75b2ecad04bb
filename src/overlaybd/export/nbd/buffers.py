"""Read buffers for the NBD server, and what the server asks of the C allocator.

Reads go out from page-aligned (mmap) buffers: on AMD CPUs with ``rep movsb`` a copy whose destination and source
differ by 16 modulo 4096 (where glibc places large ``bytearray`` buffers) runs about 10x slower, and the first
touch of fresh anonymous memory costs about 5 µs a page, so buffers are reused. Reuse is bounded in bytes, and the
server empties the pool once no request has come for a while: memory a burst of large reads needed goes back to
the system once the burst is over.
"""

from __future__ import annotations

import ctypes
import mmap

MiB = 1 << 20


class Buffer:
    __slots__ = ("mem", "view")

    def __init__(self, mem: mmap.mmap, n: int) -> None:
        self.mem = mem
        self.view = memoryview(mem)[:n]


class BufferPool:
    """Page-aligned buffers, reused while requests come, at most ``keep_bytes`` of them kept; ``clear()`` (the
    server calls it once it has been idle a while) unmaps them all. Used from the event loop thread only.

    A buffer comes back only when nothing else can still be reading it (``give(..., reusable=False)`` drops it).
    Buffers are at least 256 KiB (nbdcopy's default request) and up to 256 of them are kept: four nbdcopy
    connections keep 256 such reads in flight, and a buffer unmapped and mapped again faults its pages in anew
    (in one run, 41-99 page faults a MiB read with at most 64 buffers of 1 MiB kept, 0.1 with these)."""

    def __init__(self, *, keep_bytes: int = 64 * MiB, keep_count: int = 256, minimum: int = 256 * 1024) -> None:
        self.keep_bytes = keep_bytes
        self.keep_count = keep_count
        self.minimum = minimum
        self._free: list[mmap.mmap] = []
        self._kept = 0

    @property
    def kept_bytes(self) -> int:
        return self._kept

    def take(self, n: int) -> Buffer:
        for i, mem in enumerate(self._free):
            if len(mem) >= n:
                del self._free[i]
                self._kept -= len(mem)
                return Buffer(mem, n)
        size = max(self.minimum, -(-n // mmap.PAGESIZE) * mmap.PAGESIZE)
        return Buffer(mmap.mmap(-1, size), n)

    def give(self, buf: Buffer, *, reusable: bool) -> None:
        try:
            buf.view.release()
        except BufferError:  # someone (a transport that does not copy) still holds it: let it go
            return
        size = len(buf.mem)
        if reusable and len(self._free) < self.keep_count and self._kept + size <= self.keep_bytes:
            self._free.append(buf.mem)
            self._kept += size
        else:
            _unmap(buf.mem)

    def clear(self) -> int:
        """Unmap every buffer kept; the bytes released."""
        released = self._kept
        for mem in self._free:
            _unmap(mem)
        self._free = []
        self._kept = 0
        return released


def _unmap(mem: mmap.mmap) -> None:
    """Unmap now; or, while a view of it that the server no longer uses still exists (a slice of a reply, copied
    out already, that the collector has not freed yet), once that view goes."""
    try:
        mem.close()
    except BufferError:
        pass


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018  (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Serve allocations below 32 MiB (write payloads, the transport's copies of replies a client is slow to
    take) from the heap and keep freed heap memory while requests come, rather than have glibc hand it back and
    fault it in again (about 5 µs a fresh page): nbdcopy writing 1 MiB requests into a served volume ran
    1.1-1.2x faster with it than with glibc's defaults, in two interleaved runs. What is kept is given back once
    the server goes idle (:func:`release_free_memory`), so a burst does not leave its memory behind."""
    if _LIBC is not None:
        _LIBC.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        _LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # its maximum on 64-bit glibc


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
