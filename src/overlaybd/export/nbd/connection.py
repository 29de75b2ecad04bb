"""One client's transmission phase: read requests, serve them concurrently, reply as each is done (out of order,
matched by handle).

Memory is bounded with back-pressure. A request is admitted only when its bytes (read buffer and reply, or write
payload) fit in this connection's budget and then in the server's; until then nothing more is read from this
client, so a client that does not take its replies stops itself. A connection whose replies make no progress for
``reply_timeout`` seconds is dropped, and so is one that does not send a large write payload it announced
within that time. A client that goes away has its requests cancelled: what has not started is
never run (a source call already running in a thread finishes first, because its buffer is in use).

On a local export, the requests that arrive together are served as they arrive, on the event loop: plain writes
to a log-structured upper in one call for all of them (:mod:`.writes`, in C without the GIL where built), other
small requests one by one; a FLUSH goes to the export's flusher from there too (it calls back once a flush of the
source covers it), so the writes behind it stay on that path. Their replies, the FLUSHes' and the small replies
of tasks done in the same turn of the loop go out together in one ``writev``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ...metrics import Recorder
from .buffers import Buffer, BufferPool
from .gate import RequestGate
from .handshake import MAX_DISCARD_PAYLOAD, META_CONTEXT_ID, discard
from .limits import ByteBudget, Limits, OncePerInterval
from .protocol import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_NAMES,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    MAX_PAYLOAD,
    REQUEST,
    REQUEST_MAGIC,
    Request,
    chunk_block_status,
    chunk_error,
    chunk_none,
    chunk_offset_data_header,
    parse_request,
    simple_reply,
)
from .requests import REQUEST_OVERHEAD, block_status, cost, modify, nbd_errno, validate
from .session import EndConnection, Session
from .writes import CATCH_UP_AT

log = logging.getLogger(__name__)
T = TypeVar("T")
INLINE_MAX = 1 << 20  # requests up to this size on a local export are served on the event loop
BATCH_BYTES = 1 << 20  # reply bytes gathered at most before they go out (a socket buffer takes that at once)
SMALL_REPLY = 4096  # replies (of requests served in tasks) up to this size wait for the batch of their loop turn
SMALL_PAYLOAD = 64 * 1024  # write payloads up to this are read without a deadline (they hold little budget)
# inline reads from this size on whose bytes sit in local read-only files go out with sendfile, without a copy
SENDFILE_MIN = 64 * 1024
Reply = list[bytes | memoryview]
# what requests count as (a command the protocol does not name counts as OTHER: a client cannot make new labels)
COMMANDS = {code: name for code, name in CMD_NAMES.items() if code != CMD_DISC}
Outcome = tuple[Reply, Buffer | None, int]  # a request's reply, the read buffer it holds, its errno (0: none)
_INLINE_COMMANDS = frozenset((CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES))


@dataclass
class Resources:
    """What every connection of one server shares."""

    limits: Limits
    pool: ThreadPoolExecutor
    gate: RequestGate
    budget: ByteBudget  # bytes in flight, all connections together
    buffers: BufferPool
    dropped: OncePerInterval  # warns about clients dropped for not taking their replies
    admitted: int = 0  # requests admitted so far, all connections together (the server watches it for idleness)
    metrics: Recorder | None = None  # counts requests (None: nothing is counted, not even the clock read)


class StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, also telling ``on_gone`` when the peer closes its side or the connection is
    lost: a client blocked by back-pressure is not being read, so its end would otherwise go unnoticed. Bytes
    that arrive go first to ``on_data`` (when set), which serves what it can at once and returns the rest for the
    stream reader."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.on_gone: Callable[[], None] | None = None
        self.on_data: Callable[[bytes], bytes] | None = None

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            data = self.on_data(data)
            if not data:
                return
        super().data_received(data)

    def eof_received(self) -> bool:
        keep_open = bool(super().eof_received())
        if self.on_gone is not None:
            self.on_gone()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_gone is not None:
            self.on_gone()


class Connection:
    def __init__(self, res: Resources, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: StreamProtocol, session: Session, peer: str) -> None:
        self.res = res
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self._high_water = self.transport.get_write_buffer_limits()[1]
        self.session = session
        self.peer = peer
        self.budget = ByteBudget(res.limits.max_inflight)
        self._slots = ByteBudget(res.limits.max_requests)  # requests in flight, one unit each
        self._requests: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[Any] | None = None
        self._disconnecting = False  # NBD_CMD_DISC came: finish what was asked, then close
        self._ending = False
        self._gone = False
        self.written = 0  # bytes handed to the transport
        raw = writer.get_extra_info("socket")
        self._fd = raw.fileno() if raw is not None else -1
        self._sendfile = self._fd >= 0  # reads of local read-only files go out with sendfile (see _send_spans)
        # replies of requests served on the spot, sent together once the requests that had arrived are served
        self._batch: Reply = []
        self._held: list[tuple[Buffer | None, int]] = []  # their buffers and budgets, given back once sent
        self._batch_bytes = 0
        self._flushing: asyncio.Handle | None = None
        self._idle = False  # the request reader waits for a request header, and has no byte of it yet
        self._answering = 0  # FLUSHes waiting for the flusher to call back (see _start_flush)
        self._answered = asyncio.Event()  # set while none waits
        self._answered.set()
        self._protocol = protocol
        protocol.on_gone = self._peer_gone
        protocol.on_data = self._arrived

    # -- the connection as a whole ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve requests until NBD_CMD_DISC, the client's end, a violation, or a client that takes no replies."""
        self._task = asyncio.current_task()
        raw = self.writer.get_extra_info("socket")
        if raw is not None:
            enlarge_send_buffer(raw)
        try:
            await self._read_requests()
        except asyncio.CancelledError:
            if not self._gone or self._task is None:
                raise
            self._task.uncancel()
            log.debug("connection %s: the client is gone", self.peer)
        finally:
            self._ending = True
            self._protocol.on_data = None
            if self._flushing is not None:
                self._flush()
            if not self._disconnecting:
                for task in self._requests:
                    task.cancel()
            if self._requests:
                await asyncio.gather(*self._requests, return_exceptions=True)
            if self._answering:
                # the FLUSHes waiting for a flush of the source: answered (after NBD_CMD_DISC) or not, the flush
                # finishes before the connection is done, as a request running in the pool does
                await self._answered.wait()

    def _peer_gone(self) -> None:
        """The client closed its side or the connection broke: nobody will take our replies, stop serving it."""
        if self._ending or self._disconnecting or self._gone:
            return
        self._gone = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def drop(self, reason: str) -> None:
        self.res.dropped.warn("dropped client %s: %s", self.peer, reason)
        self.transport.abort()

    # -- reading requests ------------------------------------------------------------------------------------
    async def _read_requests(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.transport.get_write_buffer_size() > self._high_water:
                await self._drain()  # replies served on the spot wait here for a client slow to take them
            self._idle = True
            try:
                head = await self.reader.readexactly(REQUEST.size)
            finally:
                self._idle = False
            req = parse_request(head)
            if req.command == CMD_WRITE and req.length > MAX_PAYLOAD:
                if req.length > MAX_DISCARD_PAYLOAD:
                    raise EndConnection(f"write payload of {req.length} bytes")
                await discard(self.reader, req.length)
                if self.res.metrics is not None:
                    self.res.metrics.request("WRITE", 0, 0.0, EINVAL)
                self._send([self._error(req, EINVAL, "request too large")])
                continue
            if req.command == CMD_DISC:
                self._disconnecting = True
                return
            if req.command == CMD_READ and self._plain_read(req.flags, req.length) and self._serve_reads(head, 0):
                self._reply_soon()
                continue
            n = cost(req)
            await self._admit(n)
            try:
                payload = await self._payload(req) if req.command == CMD_WRITE else b""
            except BaseException:
                self._release(n)
                raise
            if self._inline(req) and self._serve_now(req, payload, n):
                continue
            task = loop.create_task(self._serve(req, payload, n))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    async def _payload(self, req: Request) -> bytes:
        """A WRITE's data. A large one holds its budget while it arrives, so it must arrive within
        ``reply_timeout``; a client that announces one and does not send it is dropped."""
        if req.length <= SMALL_PAYLOAD:
            return await self.reader.readexactly(req.length)
        timeout = self.res.limits.reply_timeout
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.readexactly(req.length)
        except TimeoutError:
            self.drop(f"did not send a {req.length}-byte write payload within {timeout:g} s (--reply-timeout)")
            raise EndConnection("write payload not sent in time") from None

    async def _admit(self, n: int) -> None:
        """Wait for a request slot and ``n`` bytes of this connection's budget, then of the server's. Nothing
        more is read from this client meanwhile: that is the back-pressure."""
        await self._slots.acquire(1)
        try:
            await self.budget.acquire(n)
            try:
                await self.res.budget.acquire(n)
            except BaseException:
                self.budget.release(n)
                raise
        except BaseException:
            self._slots.release(1)
            raise
        self.res.admitted += 1

    def _try_admit(self, n: int) -> bool:
        """:meth:`_admit` if nothing has to wait for it; False, holding nothing, otherwise."""
        if not self._slots.try_acquire(1):
            return False
        if not self.budget.try_acquire(n):
            self._slots.release(1)
            return False
        if not self.res.budget.try_acquire(n):
            self.budget.release(n)
            self._slots.release(1)
            return False
        self.res.admitted += 1
        return True

    def _release(self, n: int) -> None:
        self.res.budget.release(n)
        self.budget.release(n)
        self._slots.release(1)

    # -- requests served as their bytes arrive -------------------------------------------------------------------
    def _arrived(self, data: bytes) -> bytes:
        """Bytes from the client, before the stream reader has them. While the request reader waits for a header
        with nothing buffered, the whole inline requests at the front of ``data`` that are admitted without
        waiting are served here, in this one turn of the event loop, their replies sent together; the rest (a
        partial request, one that must wait or go to the pool) is returned for the request reader, which takes it
        from there in order. It stops once the transport holds anything (the socket did not take a batch of
        replies, or a reply sent with ``sendfile``, whole), so what the transport holds stays within one batch or one
        reply, as on the request reader's path."""
        if not self._idle or len(getattr(self.reader, "_buffer", b"?")) or self._disconnecting or self._ending \
                or self._gone or self.transport.get_write_buffer_size() or self.transport.is_closing():
            return data
        pos = 0
        try:
            while True:
                served = self._arrived_one(data, pos)
                if served == pos:
                    break
                pos = served
                if self._batch_bytes >= BATCH_BYTES:
                    self._flush()
                if self.transport.get_write_buffer_size() or self.transport.is_closing():
                    break  # the client is slow to take replies (the request reader waits for the drain) or gone
        finally:
            if self._held:
                self._flush()
        return data[pos:] if pos else data

    def _arrived_one(self, data: bytes, pos: int) -> int:
        """Serve the inline request at ``data[pos:]``, if it is whole and admitted without waiting, or the plain
        writes from there on (:meth:`_serve_writes`): where the next request starts (``pos``: nothing served)."""
        size = REQUEST.size
        if len(data) - pos < size:
            return pos
        magic, flags, command, handle, offset, length = REQUEST.unpack_from(data, pos)
        if magic == REQUEST_MAGIC and command == CMD_FLUSH and not flags:
            return self._start_flush(Request(flags, command, handle, offset, length), pos)
        if magic != REQUEST_MAGIC or not self._inline_command(command, flags, length):
            return pos
        body = length if command == CMD_WRITE else 0
        if body > SMALL_PAYLOAD or len(data) - pos - size < body:
            return pos
        if command == CMD_WRITE and not flags:
            served = self._serve_writes(data, pos)
            if served != pos:
                return served
        elif command == CMD_READ and self._plain_read(flags, length):
            served = self._serve_reads(data, pos)
            if served != pos:
                return served
        req = Request(flags, command, handle, offset, length)
        n = cost(req)
        if not self._try_admit(n):
            return pos
        if not self.res.gate.try_enter():
            self._release(n)
            return pos
        self._serve_entered(req, data[pos + size : pos + size + body] if body else b"", n)
        return pos + size + body

    def _start_flush(self, req: Request, pos: int) -> int:
        """Have a FLUSH answered once a flush of the source covers the writes completed so far, if it is admitted
        without waiting: the export's flusher calls back (no task for each FLUSH: fio at QD16 with ``--fsync=64``
        sends one for every 4 writes), and the requests behind it go on being served here meanwhile. Where the next
        request starts (``pos``: not started)."""
        n = cost(req)
        if not self._try_admit(n):
            return pos
        started = time.perf_counter() if self.res.metrics is not None else 0.0
        self._answering += 1
        self._answered.clear()
        self.session.export.flusher.answer(lambda exc: self._flushed(req, n, exc, started), self._flush_source)
        return pos + REQUEST.size

    async def _flush_source(self) -> None:
        """Flush the export's source as it is now, in the pool, as a request in progress (between the request
        gate's enter and leave: maintenance does not change the source meanwhile)."""
        await self.res.gate.enter()
        try:
            await self._in_pool(self.session.export.source.flush)
        finally:
            self.res.gate.leave()

    def _flushed(self, req: Request, n: int, exc: BaseException | None, started: float) -> None:
        """The flusher's answer to a FLUSH of :meth:`_start_flush`: reply (an error if the flush failed; nothing if
        it was cancelled, the server closing) and give its budget back once the reply is sent."""
        self._answering -= 1
        if not self._answering:
            self._answered.set()
        if exc is not None and not isinstance(exc, Exception):
            self._release(n)
            return
        reply: Reply = [chunk_none(req.handle) if self.session.structured else simple_reply(req.handle)]
        error = 0
        if exc is not None:
            reply, _, error = self._failed(req, exc)
        if self.res.metrics is not None:  # before the reply goes: a client that has it finds it counted
            self.res.metrics.request("FLUSH", 0, time.perf_counter() - started, error)
        if self._ending:  # the batch went already: this reply goes on its own
            self._send(reply)
            self._release(n)
        else:
            self._queue_reply(reply, n)

    def _serve_writes(self, data: bytes, pos: int) -> int:
        """Serve the plain writes at ``data[pos:]`` in one call (see :mod:`.writes`), their replies joining the
        batch: where the first request not served starts (``pos`` if none was: the request goes the usual way).
        They are admitted as one request holding the bytes they came in."""
        n = REQUEST_OVERHEAD + len(data) - pos
        if not self._try_admit(n):
            return pos
        if not self.res.gate.try_enter():
            self._release(n)
            return pos
        try:
            export = self.session.export
            try:
                writes = export.writes()  # after try_enter(): the source does not change until leave()
            except Exception:  # not made (its reader's catch-up failed: memory): the usual way answers the error
                writes = None
            if writes is None:
                self._release(n)
                return pos
            writer, upper = writes
            started = time.perf_counter() if self.res.metrics is not None else 0.0
            try:
                end, replies, count, pending = writer.serve(data, pos, self.session.structured)
            except MemoryError:
                count = 0
            if not count:
                self._release(n)
                return pos
            if self.res.metrics is not None:  # before the replies go: a client that has one finds it counted
                self._count_served("WRITE", data, pos, count, True, started)
            export.flusher.wrote()  # before the replies go: a FLUSH that follows covers these writes
            self.res.admitted += count - 1
            self._batch.append(replies)
            self._held.append((None, n))
            self._batch_bytes += len(replies)
            if pending >= CATCH_UP_AT:
                upper.catch_up()
            return end
        finally:
            self.res.gate.leave()

    def _count_served(self, command: str, data: bytes, pos: int, count: int, payloads: bool, started: float) -> None:
        """Count the ``count`` requests at ``data[pos:]`` served in one call, each as taking the call's time (their
        replies go out together once the requests that arrived are served)."""
        metrics = self.res.metrics
        assert metrics is not None
        seconds = time.perf_counter() - started
        for _ in range(count):
            length = REQUEST.unpack_from(data, pos)[5]
            metrics.request(command, length, seconds)
            pos += REQUEST.size + (length if payloads else 0)

    def _plain_read(self, flags: int, length: int) -> bool:
        """A READ that :meth:`_serve_reads` may serve: inline, no flag but DF."""
        return not flags & ~CMD_FLAG_DF and self._inline_command(CMD_READ, flags, length)

    def _serve_reads(self, data: bytes, pos: int) -> int:
        """Serve the plain reads at ``data[pos:]`` in one call (see :mod:`.reads`), their replies joining the batch:
        where the first request not served starts (``pos`` if none was: the request goes the usual way). They are
        admitted as one request holding the bytes of their replies, which fit in what both budgets have left."""
        room = min(self.budget.room(), self.res.budget.room(), BATCH_BYTES) - REQUEST_OVERHEAD
        if room <= 0 or not self._slots.try_acquire(1):
            return pos
        if not self.res.gate.try_enter():
            self._slots.release(1)
            return pos
        try:
            try:
                reads = self.session.export.reads()  # after try_enter(): the source does not change until leave()
            except Exception:  # not made (the catch-up of the upper it marks failed: memory): the usual way reads
                reads = None
            if reads is None or not reads.current():
                self._slots.release(1)
                return pos
            # reads from SENDFILE_MIN on go out with sendfile where they can (_send_spans), without a copy
            max_read = SENDFILE_MIN - 1 if self._sendfile else INLINE_MAX
            started = time.perf_counter() if self.res.metrics is not None else 0.0
            end, replies, count = reads.serve(data, pos, self.session.structured, max_read, room)
            if not count:
                self._slots.release(1)
                return pos
            if self.res.metrics is not None:  # before the replies go: a client that has one finds it counted
                self._count_served("READ", data, pos, count, False, started)
            n = REQUEST_OVERHEAD + len(replies)
            self.budget.take(n)  # within the room of both
            self.res.budget.take(n)
            self.res.admitted += count
            self._batch.append(replies)
            self._held.append((None, n))
            self._batch_bytes += len(replies)
            return end
        finally:
            self.res.gate.leave()

    # -- one request -----------------------------------------------------------------------------------------
    async def _serve(self, req: Request, payload: bytes, n: int) -> None:
        metrics = self.res.metrics
        started = time.perf_counter() if metrics is not None else 0.0
        queued = False
        try:
            reply, buf, error = await self._execute(req, payload)
            if metrics is not None:  # before the reply goes: a client that has it finds it counted
                metrics.request(COMMANDS.get(req.command, "OTHER"), req.length, time.perf_counter() - started, error)
            if buf is None and not self._ending and sum(len(part) for part in reply) <= SMALL_REPLY:
                # with the replies of the other requests done in this turn of the event loop: the FLUSHes a flush
                # of the source answers (a client may have 16 waiting) go out in one send, not one each
                self._queue_reply(reply, n)
                queued = True
                return
            try:
                sent = self._send(reply)
            finally:
                if buf is not None:
                    # reusable only if the transport kept no reference to it (it copies, or sent it all)
                    self.res.buffers.give(buf, reusable=self.transport.get_write_buffer_size() == 0)
            if sent:
                await self._drain()
        except (EndConnection, ConnectionError):
            pass  # this connection is ending; its handler says why
        finally:
            if not queued:
                self._release(n)

    def _queue_reply(self, reply: Reply, n: int) -> None:
        """Add a reply to the batch sent at the end of this turn of the event loop; its budget ``n`` is given back
        once it is sent."""
        self._batch += reply
        self._held.append((None, n))
        self._batch_bytes += sum(len(part) for part in reply)
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_soon(self._flush)

    def _inline(self, req: Request) -> bool:
        """Served on the event loop: a small read, write, trim or write-zeroes (no FUA) on an export whose bytes
        are all local."""
        return self._inline_command(req.command, req.flags, req.length)

    def _inline_command(self, command: int, flags: int, length: int) -> bool:
        return (self.session.export.inline and length <= INLINE_MAX and not flags & CMD_FLAG_FUA
                and command in _INLINE_COMMANDS)

    def _serve_now(self, req: Request, payload: bytes, n: int) -> bool:
        """Serve an inline request at once, without a task, its reply joining the batch that goes out once the
        requests that have arrived are served (one ``writev`` for them all); False, doing nothing, while
        maintenance holds requests back."""
        if not self.res.gate.try_enter():
            return False
        self._serve_entered(req, payload, n)
        self._reply_soon()
        return True

    def _reply_soon(self) -> None:
        """After a request read by the request reader was served on the spot, its reply in the batch: the batch
        goes out now if it is full or nothing else has arrived whole, else at the end of this turn of the loop."""
        if self._batch_bytes >= BATCH_BYTES:
            # out before more is read: what the socket does not take would be copied into the transport, and the
            # reader waits for that to drain before serving more
            self._flush()
        elif len(self._held) == 1 and len(getattr(self.reader, "_buffer", b"\0" * REQUEST.size)) < REQUEST.size:
            # a lone request, and no other has arrived whole (asyncio's StreamReader keeps what it has read in
            # _buffer): its reply goes out now, not after another turn of the event loop
            self._flush()
        elif self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_soon(self._flush)

    def _serve_entered(self, req: Request, payload: bytes, n: int) -> None:
        """Serve an admitted inline request that has entered the gate (and leave it); its reply joins the
        batch."""
        metrics = self.res.metrics
        started = time.perf_counter() if metrics is not None else 0.0
        try:
            reply, buf, error = self._on_loop(req, payload)
        except Exception as exc:  # the request fails; the connection and the server go on
            reply, buf, error = self._failed(req, exc)
        finally:
            self.res.gate.leave()
        if metrics is not None:  # before the reply goes: a client that has it finds it counted
            metrics.request(COMMANDS.get(req.command, "OTHER"), req.length, time.perf_counter() - started, error)
        self._batch += reply
        self._held.append((buf, n))
        self._batch_bytes += sum(len(part) for part in reply)

    def _flush(self) -> None:
        """Send the batch of replies; give their buffers and budgets back."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        batch, held = self._batch, self._held
        self._batch, self._held, self._batch_bytes = [], [], 0
        self._send(batch)
        reusable = self.transport.get_write_buffer_size() == 0
        for buf, n in held:
            if buf is not None:
                self.res.buffers.give(buf, reusable=reusable)
            self._release(n)

    def _on_loop(self, req: Request, payload: bytes) -> Outcome:
        """A valid inline request, on the event loop (between the gate's enter and leave)."""
        error = validate(self.session, req)
        if error:
            return [self._error(req, error, f"invalid {CMD_NAMES.get(req.command, '?')}")], None, error
        src = self.session.export.source
        if req.command == CMD_READ:
            if req.length >= SENDFILE_MIN and self._sendfile and not self.transport.get_write_buffer_size():
                spans = src.file_spans(req.offset, req.length)
                if spans is not None:
                    return self._send_spans(req, spans)
            return self._read_reply(req)
        if not (req.command == CMD_WRITE and not req.flags and self._write(req, payload)):
            self.session.export.mark(req.offset, req.length)  # before the upper changes: reads there go this way
            modify(src, req, payload)
        self.session.export.flusher.wrote()
        return [chunk_none(req.handle) if self.session.structured else simple_reply(req.handle)], None, 0

    def _write(self, req: Request, payload: bytes) -> bool:
        """A plain write through the export's writer (see :mod:`.writes`); False if it did not serve it (the
        usual way serves it then, and raises the error if it fails)."""
        writes = self.session.export.writes()
        if writes is None:
            return False
        pending = writes[0].write(req.offset, payload)
        if pending >= CATCH_UP_AT:
            writes[1].catch_up()
        return pending >= 0

    def _read_reply(self, req: Request) -> Outcome:
        """A READ's reply: its header, and its bytes read into a pooled buffer."""
        buf = self.res.buffers.take(req.length)
        try:
            if req.length:
                self.session.export.source.readinto(req.offset, buf.view)
        except BaseException:
            self.res.buffers.give(buf, reusable=True)
            raise
        return [self._read_head(req), buf.view], buf, 0

    def _send_spans(self, req: Request, spans: list[tuple[int, int, int]]) -> Outcome:
        """A READ whose bytes are in local read-only files (or zero), sent while the transport holds nothing: its
        header, then each file span with ``sendfile`` (the socket takes the page cache's pages: no copy into a
        buffer, none into the socket) and each zero span from a zero mapping. What the socket does not take at once
        is read into a buffer and queued in the transport right behind, so the reply stays whole on the stream and
        the transport holds at most this one reply (as after a partial ``writev``). The reply is sent already:
        the outcome has no parts, and the buffer (if any) goes back once the transport has let it go."""
        head = self._read_head(req)
        done = 0
        try:
            done = _write_some(self._fd, head, -1, 0, len(head))
            if done == len(head):
                for fd, at, n in spans:
                    sent = _write_some(self._fd, None, fd, at, n)
                    done += sent
                    if sent < n:
                        break
        except OSError as exc:
            if not done:  # nothing sent: the usual path meets the same error (a broken socket) its own way
                return self._read_reply(req)
            if exc.errno in _NO_SENDFILE:
                self._sendfile = False  # the file system cannot: copy from now on
            # the bytes sent are known: the rest goes the usual way below (a broken socket fails there its own way)
        self.written += done
        if done == len(head) + req.length:
            return [], None, 0
        rest: Reply = [head[done:]] if done < len(head) else []
        skip = max(done - len(head), 0)
        buf = self.res.buffers.take(req.length - skip)
        try:
            self.session.export.source.readinto(req.offset + skip, buf.view)
        except BaseException:
            self.res.buffers.give(buf, reusable=True)
            if done:
                self.transport.abort()
            raise
        self._send([*rest, buf.view])
        return [], buf, 0

    def _read_head(self, req: Request) -> bytes:
        # header and payload go out together from our page-aligned buffer (see _send), never joined
        return chunk_offset_data_header(req.handle, req.offset, req.length, True) if self.session.structured \
            else simple_reply(req.handle)

    def _failed(self, req: Request, exc: Exception) -> Outcome:
        log.warning("%s %s [%d, +%d): %s", self.session.export.name or "(default)", CMD_NAMES.get(req.command, "?"),
                    req.offset, req.length, exc)
        error = nbd_errno(exc)
        return [self._error(req, error, str(exc)[:200])], None, error

    async def _execute(self, req: Request, payload: bytes) -> Outcome:
        session = self.session
        error = validate(session, req)
        if error:
            return [self._error(req, error, f"invalid {CMD_NAMES.get(req.command, '?')}")], None, error
        inline = self._inline(req)
        await self.res.gate.enter()
        buf: Buffer | None = None
        try:
            if inline:  # after enter(): a snapshot may have replaced the source while we waited
                return self._on_loop(req, payload)
            src = session.export.source
            if req.command == CMD_READ:
                buf = self.res.buffers.take(req.length)
                if req.length:
                    await self._in_pool(src.readinto, req.offset, buf.view)
                return [self._read_head(req), buf.view], buf, 0
            if req.command == CMD_BLOCK_STATUS:
                extents = await self._in_pool(block_status, src, req)
                return [chunk_block_status(req.handle, META_CONTEXT_ID, extents)], None, 0
            if req.command == CMD_FLUSH:
                await session.export.flusher.flush(lambda: self._in_pool(src.flush))
            else:
                session.export.mark(req.offset, req.length)  # before the upper changes: reads there go this way
                await self._in_pool(modify, src, req, payload)
                session.export.flusher.wrote()
            return [chunk_none(req.handle) if session.structured else simple_reply(req.handle)], None, 0
        except Exception as exc:  # the request fails; the connection and the server go on
            if buf is not None:
                self.res.buffers.give(buf, reusable=True)
            return self._failed(req, exc)
        except BaseException:  # cancelled: the source call has returned (see _in_pool), so the buffer is free
            if buf is not None:
                self.res.buffers.give(buf, reusable=True)
            raise
        finally:
            self.res.gate.leave()

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread pool. Cancelled before it starts, it never runs; cancelled while it runs,
        this waits for it to return (its buffer and its place among the requests in progress are held until
        then), then lets the cancellation through."""
        job = self.res.pool.submit(fn, *args)
        done = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not job.cancel():
                while not done.done():
                    try:
                        await asyncio.wait([done])
                    except asyncio.CancelledError:
                        continue
                if not done.cancelled():
                    done.exception()  # retrieved: a failure of a request nobody waits for is not worth a log line
            raise

    # -- replies ---------------------------------------------------------------------------------------------
    def _error(self, req: Request, error: int, message: str) -> bytes:
        return chunk_error(req.handle, error, message) if self.session.structured \
            else simple_reply(req.handle, error)

    def _send(self, reply: Reply) -> bool:
        """Hand a reply to the kernel, or to the transport for what the socket does not take at once; False if the
        connection is already closing. While the transport holds nothing, header and payload go out in one
        ``writev`` (one system call, no copy); the rest, if any, is queued behind by the transport."""
        transport = self.transport
        if transport.is_closing():
            return False
        self.written += sum(len(part) for part in reply)
        if self._fd >= 0 and not transport.get_write_buffer_size():
            try:
                sent = os.writev(self._fd, reply)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport meets the same error below and ends the connection its own way
            for part in reply:
                if sent >= len(part):
                    sent -= len(part)
                    continue
                transport.write(_owned(part, sent))
                sent = 0
            return True
        for part in reply:
            transport.write(_owned(part, 0))
        return True

    def _sent(self) -> int:
        return self.written - self.transport.get_write_buffer_size()

    async def _drain(self) -> None:
        """Wait until the transport's buffer is low again. If the client takes not one byte of our replies for
        ``reply_timeout`` seconds, drop it."""
        if self.transport.get_write_buffer_size() <= self._high_water:
            return  # not paused: the common case, without arming a timer
        timeout = self.res.limits.reply_timeout
        while True:
            before = self._sent()
            try:
                async with asyncio.timeout(timeout):
                    await self.writer.drain()
                return
            except TimeoutError:
                if self._sent() == before:
                    self.drop(f"took no reply byte for {timeout:g} s (--reply-timeout)")
                    raise EndConnection(f"took no reply byte for {timeout:g} s") from None


def _owned(part: bytes | memoryview, skip: int) -> bytes | memoryview:
    """What to queue in the transport for ``part[skip:]``: bytes as they are (immutable), a copy of anything else. The
    transport may keep what it is given until it is sent (uvloop's does; asyncio's copies it), and a view of a pooled
    buffer must not outlive the reply: the buffer goes back to the pool, or its mapping could not be closed."""
    if type(part) is bytes:
        return memoryview(part)[skip:] if skip else part
    return bytes(memoryview(part)[skip:])


_zeros: mmap.mmap | None = None
_NO_SENDFILE = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))  # sendfile refused for the file


def _write_some(sock: int, data: bytes | None, fd: int, at: int, n: int) -> int:
    """Write to the non-blocking socket ``sock`` what it takes now, up to ``n`` bytes: ``data``, or ``n`` bytes of
    file ``fd`` from ``at`` (``sendfile``), or zeros (``fd`` -1). The bytes written (fewer once the socket is full,
    or the file ends)."""
    global _zeros
    if data is None and fd < 0 and _zeros is None:
        _zeros = mmap.mmap(-1, INLINE_MAX, flags=mmap.MAP_PRIVATE)  # read only: the kernel's zero page, no memory
    done = 0
    while done < n:
        try:
            if data is not None:
                sent = os.write(sock, memoryview(data)[done:n])
            elif fd >= 0:
                sent = os.sendfile(sock, fd, at + done, n - done)
            else:
                assert _zeros is not None
                sent = os.write(sock, memoryview(_zeros)[: min(n - done, INLINE_MAX)])
        except InterruptedError:
            continue
        except BlockingIOError:
            break
        except OSError:
            if done:
                break  # what went is counted; the next call meets the error again
            raise
        if sent <= 0:
            break
        done += sent
    return done


def enlarge_send_buffer(sock: socket.socket, size: int = 8 << 20) -> None:
    """A large socket send buffer lets a 1 MiB reply go to the kernel in one send (no copy in asyncio)."""
    for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            return
        except OSError:
            continue
