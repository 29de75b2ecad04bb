"""Maintenance between requests (a snapshot of a served volume): hold new requests back, wait a bounded time for
those in progress on the sources, run the work, let requests go on.

"In progress" means a call into a source (a read into a buffer, a write, a flush). A reply waiting for its client
to take it is not in progress: it no longer touches the volume, and a client that stops reading must not be able
to hold a snapshot back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ...errors import OverlaybdError

T = TypeVar("T")


class BusyError(OverlaybdError):
    """Requests in progress did not finish in time for maintenance between requests."""


class RequestGate:
    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return self._active

    async def enter(self) -> None:
        """Wait while maintenance runs, then count this request as in progress until :meth:`leave`."""
        while not self._open.is_set():
            await self._open.wait()
        self._active += 1
        self._idle.clear()

    def try_enter(self) -> bool:
        """:meth:`enter` without waiting: False while maintenance runs."""
        if not self._open.is_set():
            return False
        self._active += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self._active -= 1
        if not self._active:
            self._idle.set()

    async def quiesced(self, work: Callable[[], Awaitable[T]], timeout: float) -> T:
        """Run ``work`` while no request is in progress; requests that arrive meanwhile wait. If those in progress
        do not finish within ``timeout`` seconds, give up (:class:`BusyError`) and let everything go on."""
        self._open.clear()
        try:
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                raise BusyError(f"{self._active} request(s) still in progress after {timeout:g} s; "
                                "nothing was changed") from None
            return await work()
        finally:
            self._open.set()
