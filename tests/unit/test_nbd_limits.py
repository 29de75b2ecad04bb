"""The NBD server's limits on their own: the byte budget (back-pressure), the rate-limited warning, the request gate
of snapshots, the buffer pool, the handshake's option table, and Unix sockets that belong to their process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from pathlib import Path

import pytest

from overlaybd.errors import LockedError, UsageError
from overlaybd.export.listening import UnixListener
from overlaybd.export.nbd import protocol
from overlaybd.export.nbd.buffers import BufferPool
from overlaybd.export.nbd.gate import BusyError, RequestGate
from overlaybd.export.nbd.handshake import OPTION_HANDLERS, Negotiation, answer
from overlaybd.export.nbd.limits import ByteBudget, Limits, OncePerInterval
from overlaybd.export.nbd.session import EndConnection, Export
from overlaybd.source.file import MemorySource


def test_budget_admits_in_order_and_lets_an_oversized_request_run_alone() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await budget.acquire(n)
            order.append(name)

        await budget.acquire(60)
        waiting = [asyncio.create_task(take("a", 50)), asyncio.create_task(take("b", 10)),
                   asyncio.create_task(take("huge", 500))]
        await asyncio.sleep(0)
        assert order == [] and budget.waiting == 3  # b would fit, but a came first
        budget.release(60)
        await asyncio.sleep(0)
        assert order == ["a", "b"] and budget.used == 60
        budget.release(60)
        await asyncio.sleep(0)
        assert order == ["a", "b", "huge"] and budget.used == 500  # alone in the budget
        budget.release(500)
        await asyncio.gather(*waiting)
        return order

    asyncio.run(scenario())


def test_budget_waiter_cancelled_gives_its_place_to_the_next() -> None:
    async def scenario() -> None:
        budget = ByteBudget(100)
        await budget.acquire(100)
        first = asyncio.create_task(budget.acquire(80))
        second = asyncio.create_task(budget.acquire(20))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        budget.release(100)
        await second
        assert budget.used == 20 and budget.waiting == 0
        # cancelled after being granted: the bytes come back
        blocked = asyncio.create_task(budget.acquire(90))
        await asyncio.sleep(0)
        budget.release(20)  # grants it...
        blocked.cancel()  # ...but its task is cancelled before it resumes
        await asyncio.gather(blocked, return_exceptions=True)
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_warning_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    warner = OncePerInterval(logging.getLogger("t"), interval=3600)
    with caplog.at_level(logging.WARNING):
        for i in range(1000):
            warner.warn("refused %d", i)
    assert [r.getMessage() for r in caplog.records] == ["refused 0"]
    warner._last -= 7200  # an interval later
    with caplog.at_level(logging.WARNING):
        warner.warn("refused %d", 1000)
    assert caplog.records[-1].getMessage() == "refused 1000 (999 more like it in the last 3600 s)"


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(UsageError, match="max-connections"):
        Limits(max_connections=0)
    with pytest.raises(UsageError, match="reply-timeout"):
        Limits(reply_timeout=0)


def test_gate_gives_up_on_requests_that_outlast_the_timeout() -> None:
    async def scenario() -> None:
        gate = RequestGate()
        await gate.enter()  # a request in progress that does not end
        ran = []

        async def work() -> str:
            ran.append(True)
            return "done"

        with pytest.raises(BusyError, match="1 request"):
            await gate.quiesced(work, timeout=0.05)
        assert not ran
        await gate.enter()  # requests go on after the failed attempt
        gate.leave()
        gate.leave()
        assert await gate.quiesced(work, timeout=1) == "done"

    asyncio.run(scenario())


def test_buffer_pool_keeps_a_bounded_number_of_bytes_and_clears() -> None:
    pool = BufferPool(keep_bytes=3 << 20, keep_count=8)
    bufs = [pool.take(1 << 20) for _ in range(5)]
    for b in bufs:
        pool.give(b, reusable=True)
    assert pool.kept_bytes == 3 << 20
    again = pool.take(4096)
    assert len(again.view) == 4096 and pool.kept_bytes == 2 << 20
    pool.give(again, reusable=False)
    assert pool.kept_bytes == 2 << 20
    assert pool.clear() == 2 << 20 and pool.kept_bytes == 0


def test_buffer_pool_clears_while_a_stale_view_of_a_buffer_lives() -> None:
    """A slice of a reply that went out already may outlive it until the collector frees it (a cancelled task's
    frame holds it): clearing the pool, as the server does when it stops, must not fail for that."""
    pool = BufferPool()
    buf = pool.take(4096)
    stale = buf.view[:100]
    pool.give(buf, reusable=True)
    assert pool.clear() > 0 and pool.kept_bytes == 0
    assert len(stale) == 100  # still readable: the mapping goes when the view does
    other = pool.take(4096)
    stale2 = other.view[10:]
    pool.give(other, reusable=False)  # not kept: unmapped once the view goes
    assert len(stale2) == 4086


def _negotiation() -> Negotiation:
    return Negotiation({"": Export("", MemorySource(bytes(4096))), "rw": Export("rw", MemorySource(bytearray(512)))})


def test_every_option_has_a_handler_and_unknown_ones_are_unsupported() -> None:
    assert set(OPTION_HANDLERS) == {protocol.OPT_EXPORT_NAME, protocol.OPT_ABORT, protocol.OPT_LIST,
                                    protocol.OPT_INFO, protocol.OPT_GO, protocol.OPT_STRUCTURED_REPLY,
                                    protocol.OPT_LIST_META_CONTEXT, protocol.OPT_SET_META_CONTEXT}
    neg = _negotiation()
    for option in (protocol.OPT_STARTTLS, 99):
        reply = answer(neg, option, b"")
        assert reply.session is None and not reply.end
        assert struct.unpack(">QIII", reply.replies[0])[2] == protocol.REP_ERR_UNSUP


def test_go_after_set_meta_context_selects_base_allocation() -> None:
    neg = _negotiation()
    assert answer(neg, protocol.OPT_STRUCTURED_REPLY, b"").session is None and neg.structured
    q = protocol.BASE_ALLOCATION.encode()
    answer(neg, protocol.OPT_SET_META_CONTEXT, struct.pack(">I", 2) + b"rw" + struct.pack(">II", 1, len(q)) + q)
    session = answer(neg, protocol.OPT_GO, struct.pack(">I", 2) + b"rw" + struct.pack(">H", 0)).session
    assert session is not None and session.export.name == "rw" and session.structured and session.allocation
    other = answer(neg, protocol.OPT_GO, struct.pack(">IH", 0, 0)).session
    assert other is not None and not other.allocation  # the context was set for another export
    assert answer(neg, protocol.OPT_ABORT, b"").end
    with pytest.raises(EndConnection):
        answer(neg, protocol.OPT_EXPORT_NAME, b"nope")


def test_unix_listener_takes_over_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    first = UnixListener(path)
    with pytest.raises(LockedError, match="another process is listening"):
        UnixListener(path)
    assert os.path.exists(path)
    first.close()
    assert not os.path.exists(path)
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(UsageError, match="not a socket"):
        UnixListener(str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "not a socket"


def test_unix_listener_removes_only_its_own_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    mine = UnixListener(path)
    os.unlink(path)  # someone removed it and put their own there
    theirs = UnixListener(path)
    mine.close()
    assert os.path.exists(path) and theirs.owns_path()
    theirs.close()
    assert not os.path.exists(path)
