"""What the NBD server grants its clients, and the two mechanisms that enforce it: a byte budget that requests
wait for (back-pressure), and a warning that is logged at most once per interval however often its cause recurs.

The defaults, and why:

* ``max_connections`` 100: QEMU's NBD server caps its own default there (CVE-2024-7409); multi-connection clients
  open 4 (nbdcopy) to 16 sockets, and each connection costs the server one descriptor.
* ``max_inflight`` 64 MiB a connection: two requests of the largest size we accept (32 MiB), or 64 pipelined
  1 MiB reads, which is more than nbdcopy (16 x 256 KiB by default) or qemu-img keep in flight.
* ``max_inflight_total`` 1 GiB: sixteen connections at their full allowance before any waits for another; the
  most memory a crowd of clients can make the server hold for requests, whatever they do.
* ``handshake_limit`` 10 s: QEMU's default for a client to finish negotiating.
* ``reply_timeout`` 60 s: a connection whose replies make no progress at all for that long (the client takes
  no byte) is dropped; a slow client that takes bytes, however few, is not. A write payload over 64 KiB must
  arrive within that time too (it holds its budget meanwhile).
* ``quiesce_timeout`` 30 s: the longest a snapshot waits for requests in progress on the volume (source calls;
  not replies waiting for their client).
* ``idle_release`` 5 s: within that long without a new request (at least half of it), pooled read buffers and
  the heap's free pages go back to the system; a client that comes back sooner finds them still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from ...errors import UsageError

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one server grants its clients. Byte figures count read buffers, reply bytes not yet handed to the
    kernel, and write payloads; a single request larger than a budget is let through when it is alone in it."""

    max_connections: int = 100
    max_inflight: int = 64 * MiB  # per connection
    max_inflight_total: int = 1024 * MiB
    max_requests: int = 64  # per connection, whatever their size
    handshake_limit: float = 10.0  # seconds
    reply_timeout: float = 60.0  # seconds without any reply byte taken by the client
    quiesce_timeout: float = 30.0  # seconds a snapshot waits for requests in progress
    idle_release: float = 5.0  # seconds without a new request, then pooled buffers and free heap go back

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_inflight", "max_inflight_total", "max_requests"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("handshake_limit", "reply_timeout", "quiesce_timeout", "idle_release"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name.replace('_', '-')} must be a positive number of seconds")


class ByteBudget:
    """Bytes that may be in flight at once. ``acquire(n)`` waits, first come first served, until ``n`` more fit;
    a request larger than the whole budget is admitted when nothing else holds any of it, so it cannot wait
    forever."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, n: int) -> bool:
        return self.used + n <= self.capacity or self.used == 0

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self.used += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled: give it back
                self.release(n)
            else:
                with contextlib.suppress(ValueError):  # _wake may have passed over it already
                    self._waiters.remove(entry)
                self._wake()
            raise

    def try_acquire(self, n: int) -> bool:
        """:meth:`acquire` without waiting: False if anyone waits or ``n`` does not fit now."""
        if self._waiters or not self._fits(n):
            return False
        self.used += n
        return True

    def room(self) -> int:
        """Bytes :meth:`try_acquire` grants now: 0 while anyone waits."""
        return 0 if self._waiters else max(self.capacity - self.used, 0)

    def take(self, n: int) -> None:
        """Hold ``n`` bytes that :meth:`room` granted in this same turn of the event loop."""
        if n > self.room():
            raise RuntimeError(f"{n} bytes taken, {self.room()} granted")
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():  # its waiter was cancelled; it takes itself out
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self.used += n
            fut.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class OncePerInterval:
    """A warning logged at most once per ``interval`` seconds; the occurrences it stood for are counted in it."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.log = logger
        self.interval = interval
        self._last = -float("inf")
        self._quiet = 0

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._quiet += 1
            return
        extra = f" ({self._quiet} more like it in the last {self.interval:.0f} s)" if self._quiet else ""
        self.log.warning(message + extra, *args)
        self._last = now
        self._quiet = 0
