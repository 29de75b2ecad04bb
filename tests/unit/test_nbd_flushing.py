"""FLUSH requests of one export are joined (export/nbd/flushing.py): one flush of the source answers every FLUSH
whose writes completed before it started, a write completed after it started gets a flush of its own, and a
failed flush fails every FLUSH that waited for it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from overlaybd.errors import LayerIOError
from overlaybd.export.nbd.flushing import Flusher


class Source:
    """A flush that runs until the test lets it finish."""

    def __init__(self) -> None:
        self.started = 0
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None

    async def flush(self) -> None:
        self.started += 1
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None:
            raise self.fail

    def finish(self) -> None:
        self.gates[-1].set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_first_flush_runs_and_one_flush_answers_those_that_came_while_it_ran() -> None:
    async def main() -> None:
        f, src = Flusher(), Source()
        first = asyncio.create_task(f.flush(src.flush))
        await settle()
        assert src.started == 1  # nothing written through this server yet: it flushes all the same
        more = [asyncio.create_task(f.flush(src.flush)) for _ in range(15)]
        await settle()
        src.finish()
        await asyncio.gather(first, *more)
        assert src.started == 1 and f.flushes == 1
        await f.flush(src.flush)  # nothing written since: answered at once
        assert src.started == 1

    asyncio.run(main())


def test_a_write_completed_after_the_running_flush_started_gets_its_own() -> None:
    async def main() -> None:
        f, src = Flusher(), Source()
        first = asyncio.create_task(f.flush(src.flush))
        await settle()
        f.wrote()
        second = asyncio.create_task(f.flush(src.flush))
        third = asyncio.create_task(f.flush(src.flush))
        await settle()
        assert src.started == 1  # they wait for the running one before starting another
        src.finish()
        await first
        await settle()
        assert src.started == 2 and not second.done()
        src.finish()
        await asyncio.gather(second, third)
        assert src.started == 2  # the second flush covers both

    asyncio.run(main())


def test_a_failed_flush_fails_every_flush_that_waited_for_it() -> None:
    async def main() -> None:
        f, src = Flusher(), Source()
        src.fail = LayerIOError("fsync failed: Input/output error", path="upper")
        tasks = [asyncio.create_task(f.flush(src.flush)) for _ in range(4)]
        await settle()
        src.finish()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert src.started == 1
        assert all(isinstance(r, LayerIOError) for r in results)
        src.fail = None  # the next FLUSH tries again
        nxt = asyncio.create_task(f.flush(src.flush))
        await settle()
        src.finish()
        await nxt
        assert src.started == 2

    asyncio.run(main())


def test_a_cancelled_flush_leaves_the_waiters_to_flush_themselves() -> None:
    async def main() -> None:
        f, src = Flusher(), Source()
        first = asyncio.create_task(f.flush(src.flush))
        await settle()
        waiter = asyncio.create_task(f.flush(src.flush))
        await settle()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await settle()
        assert src.started == 2 and not waiter.done()
        src.finish()
        await waiter

    asyncio.run(main())


def test_callbacks_are_answered_by_the_flush_that_covers_them() -> None:
    async def main() -> None:
        f, src = Flusher(), Source()
        told: list[tuple[str, BaseException | None]] = []
        def teller(name: str) -> Callable[[BaseException | None], None]:
            return lambda exc: told.append((name, exc))

        for k in range(16):  # a burst of FLUSHes: one flush answers them all, no task each
            f.answer(teller(f"a{k}"), src.flush)
        await settle()
        assert src.started == 1 and not told
        f.wrote()  # a write completed while that flush ran: the next FLUSH needs a flush of its own
        f.answer(lambda exc: told.append(("b", exc)), src.flush)
        src.finish()
        await settle()
        assert [name for name, _ in told] == [f"a{k}" for k in range(16)] and src.started == 2
        src.finish()
        await settle()
        assert told[-1] == ("b", None) and all(exc is None for _, exc in told) and f.flushes == 2
        f.answer(lambda exc: told.append(("c", exc)), src.flush)  # nothing written since: answered at once
        assert told[-1] == ("c", None) and src.started == 2

    asyncio.run(main())


def test_a_failed_flush_fails_every_callback_that_waited_for_it() -> None:
    async def main() -> None:
        f, src = Flusher(), Source()
        src.fail = LayerIOError("fsync failed: Input/output error", path="upper")
        told: list[BaseException | None] = []
        for _ in range(4):
            f.answer(told.append, src.flush)
        await settle()
        src.finish()
        await settle()
        assert src.started == 1 and len(told) == 4 and all(isinstance(exc, LayerIOError) for exc in told)
        src.fail = None  # the next FLUSH tries again
        f.answer(told.append, src.flush)
        await settle()
        src.finish()
        await settle()
        assert src.started == 2 and told[-1] is None

    asyncio.run(main())
