"""Flushes of one export, joined: a FLUSH needs a flush of the source that started after every write completed
before the FLUSH came, not one of its own.

Clients flush far more often than they write in between: fio at iodepth 16 with ``--fsync=64`` has up to 16 FLUSH
requests in flight at once after every 64 writes (7,528 FLUSHes for 33,536 writes in one run), and each was an
``fsync`` of its own. Here a FLUSH finds one of three things: no write completed since a finished flush started
(answered at once), a flush running that started after its writes completed (it waits for that one), or neither
(it starts one, after waiting for the one running, if any). A flush that fails fails every FLUSH that waited for
it: after an ``fsync`` error the next ``fsync`` may succeed with the data lost, so it is not tried again for them.

A FLUSH need not have a task of its own: :meth:`Flusher.answer` takes a callback, and one task per export (while
any wait) runs the flushes and calls back every FLUSH a flush covered; 16 FLUSHes at once then cost 16 callbacks,
not 16 tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Done = Callable[[BaseException | None], None]  # told None once its FLUSH is covered, or why it failed


class Flusher:
    """One per export, shared by its connections (writes on any connection are covered by a FLUSH on any)."""

    def __init__(self) -> None:
        self.written = 1  # writes completed (from 1: the first FLUSH flushes, whatever came before this server)
        self.flushed = 0  # ``written`` as it was when the last flush that succeeded started
        self.flushes = 0  # flushes of the source run
        self._running: asyncio.Future[None] | None = None
        self._waiting: list[tuple[int, Done]] = []  # FLUSHes answered by callback: (``written`` then, callback)
        self._runner: asyncio.Task[None] | None = None

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

    def answer(self, done: Done, run: Callable[[], Awaitable[object]]) -> None:
        """:meth:`flush` with a callback: ``done(None)`` once a flush that started after every write completed so
        far has succeeded (at once if one has), ``done(exc)`` if the flush it waited for failed. Called back on the
        event loop; ``run`` flushes the source (the first caller's, while flushes run for several)."""
        target = self.written
        if self.flushed >= target:
            done(None)
            return
        self._waiting.append((target, done))
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._answer_all(run))

    async def _answer_all(self, run: Callable[[], Awaitable[object]]) -> None:
        """Flush until no callback waits; call back those each flush covered, or all that waited if it failed."""
        try:
            while self._waiting:
                try:
                    await self.flush(run)  # covers every write completed so far: those of every callback waiting
                except BaseException as exc:
                    waiting, self._waiting = self._waiting, []
                    for _, done in waiting:
                        done(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                covered = [done for target, done in self._waiting if target <= self.flushed]
                self._waiting = [(target, done) for target, done in self._waiting if target > self.flushed]
                for done in covered:
                    done(None)
        finally:
            self._runner = None

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
