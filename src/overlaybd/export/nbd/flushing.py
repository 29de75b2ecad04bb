"""Flushes of one export, joined: a FLUSH needs a flush of the source that started after every write completed
before the FLUSH came, not one of its own.

Clients flush far more often than they write in between: fio at iodepth 16 with ``--fsync=64`` has up to 16 FLUSH
requests in flight at once after every 64 writes (7,528 FLUSHes for 33,536 writes in one run), and each was an
``fsync`` of its own. Here a FLUSH finds one of three things: no write completed since a finished flush started
(answered at once), a flush running that started after its writes completed (it waits for that one), or neither
(it starts one, after waiting for the one running, if any). A flush that fails fails every FLUSH that waited for
it: after an ``fsync`` error the next ``fsync`` may succeed with the data lost, so it is not tried again for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Flusher:
    """One per export, shared by its connections (writes on any connection are covered by a FLUSH on any)."""

    def __init__(self) -> None:
        self.written = 1  # writes completed (from 1: the first FLUSH flushes, whatever came before this server)
        self.flushed = 0  # ``written`` as it was when the last flush that succeeded started
        self.flushes = 0  # flushes of the source run
        self._running: asyncio.Future[None] | None = None

    def wrote(self) -> None:
        """A write, trim or write-zeroes has completed (before its reply goes)."""
        self.written += 1

    async def flush(self, run: Callable[[], Awaitable[object]]) -> None:
        """Return once a flush that started after every write completed so far has succeeded; ``run`` flushes the
        source."""
        target = self.written
        while self.flushed < target:
            running = self._running
            if running is not None:
                await asyncio.wait([running])  # its failure is raised below, our own cancellation here
                if running.cancelled():
                    continue  # its starter was cancelled: the next flush decides
                exc = running.exception()
                if exc is not None:
                    # whether or not it started after our writes: those it did not cover came before it, and what
                    # became of them is as uncertain
                    raise exc
                continue
            await self._run(run)

    async def _run(self, run: Callable[[], Awaitable[object]]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        covers = self.written
        self._running = done
        try:
            self.flushes += 1
            await run()
        except asyncio.CancelledError:
            done.cancel()
            raise
        except BaseException as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: the waiters raise it themselves
            raise
        else:
            self.flushed = max(self.flushed, covers)
            done.set_result(None)
        finally:
            self._running = None
