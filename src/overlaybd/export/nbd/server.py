"""An NBD server for BlockSources: asyncio on the sockets, source calls in a bounded thread pool.

Protocol violations that leave the stream in sync get the error the spec names; ones that do not (a bad magic, a
write payload we will not read) end that connection only, never the server. What a client may hold is bounded
(:mod:`.limits`): connections, time to negotiate, bytes in flight, time without taking a reply.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ... import metrics
from ...errors import UsageError
from ...metrics import Recorder
from ..listening import UnixListener, accept_connections, tcp_listener
from .buffers import BufferPool, release_free_memory, tune_allocator
from .connection import Connection, Resources, StreamProtocol
from .gate import RequestGate
from .handshake import negotiate
from .limits import ByteBudget, Limits, OncePerInterval
from .protocol import ProtocolError
from .requests import nbd_errno
from .session import EndConnection, Export

__all__ = ["Export", "Limits", "NbdServer", "nbd_errno", "parse_listen", "serve"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class NbdServer:
    """Serves ``exports`` to any number of clients (up to ``limits.max_connections``) on any number of
    listeners, each connection in its own task: handshake within ``limits.handshake_limit``, then requests
    pipelined and answered out of order. ``quiesced(work)`` runs maintenance between requests (a snapshot).
    ``metrics`` counts requests, and is :func:`overlaybd.metrics.current` for what the connections and the worker
    threads run (the cache and registry counts of their reads); None counts nothing."""

    def __init__(self, exports: Iterable[Export], *, workers: int = 8, limits: Limits | None = None,
                 metrics: Recorder | None = None) -> None:
        self.exports = {e.name: e for e in exports}
        self.limits = limits or Limits()
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd", initializer=_bind,
                                       initargs=(metrics,))
        self.gate = RequestGate()
        self.budget = ByteBudget(self.limits.max_inflight_total)
        self.buffers = BufferPool()
        self.connections = 0  # open, in the handshake or after it
        self._resources = Resources(self.limits, self.pool, self.gate, self.budget, self.buffers,
                                    OncePerInterval(log), metrics=metrics)
        self._context = contextvars.copy_context()  # the connections' tasks run in it, with ``metrics`` bound
        self._context.run(_bind, metrics)
        if metrics is not None:
            metrics.watch(lambda: self.connections, lambda: self.budget.used, self.limits.max_inflight_total)
        self._refused = OncePerInterval(log)
        self._starved = OncePerInterval(log)
        self._silent = OncePerInterval(log)
        self._listeners: list[tuple[socket.socket, UnixListener | None]] = []
        self._acceptors: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._housekeeping: asyncio.TimerHandle | None = None
        self._admitted_seen = 0
        self._released = True

    async def quiesced(self, work: Callable[[], T]) -> T:
        """Run ``work`` in the pool while no request is in progress on a source; requests that arrive meanwhile
        wait. Gives up with :class:`~.gate.BusyError` if those in progress outlast ``limits.quiesce_timeout``."""
        loop = asyncio.get_running_loop()
        return await self.gate.quiesced(lambda: loop.run_in_executor(self.pool, work), self.limits.quiesce_timeout)

    # -- listening -----------------------------------------------------------------------------------------------
    async def listen_unix(self, path: str) -> UnixListener:
        listener = UnixListener(path)
        self._start(listener.sock, listener)
        return listener

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on the first address ``host`` resolves to; the port (useful with port 0)."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise UsageError(f"{host!r} resolves to no address")
        family, _, _, _, address = infos[0]
        sock = tcp_listener(address, family)
        self._start(sock, None)
        return int(sock.getsockname()[1])

    def _start(self, sock: socket.socket, owner: UnixListener | None) -> None:
        if self._housekeeping is None:
            self._check_idle()
        self._listeners.append((sock, owner))
        accepting = accept_connections(sock, self._accepted, self._starving)
        self._acceptors.append(asyncio.get_running_loop().create_task(accepting))

    async def close(self) -> None:
        """Stop listening, end every connection (requests already running on a source finish first), and stop
        the pool."""
        for task in self._acceptors:
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        for sock, owner in self._listeners:
            (owner.close if owner is not None else sock.close)()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        self.pool.shutdown(wait=True)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        self.buffers.clear()

    def _accepted(self, conn: socket.socket, address: object) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "unix"
        if self.connections >= self.limits.max_connections:
            conn.close()
            self._refused.warn("refused a connection from %s: %d connections open (--max-connections)", peer,
                               self.connections)
            return
        self.connections += 1
        task = asyncio.get_running_loop().create_task(self._handle(conn, peer), context=self._context.copy())
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _starving(self, exc: OSError) -> None:
        # the connection waits in the backlog until a descriptor is free
        self._starved.warn("cannot accept connections: %s (%d open); retrying", exc.strerror, self.connections)

    # -- one connection ------------------------------------------------------------------------------------------
    async def _handle(self, conn: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader()
            protocol = StreamProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        except BaseException:
            conn.close()
            self.connections -= 1
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            limit = self.limits.handshake_limit
            try:
                async with asyncio.timeout(limit):
                    session = await negotiate(reader, writer, self.exports)
            except TimeoutError:
                self._silent.warn("dropped client %s: no handshake within %g s (--handshake-limit)", peer, limit)
                return
            if session is not None:
                await Connection(self._resources, reader, writer, protocol, session, peer).run()
        except (EndConnection, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.debug("connection %s ended: %s", peer, exc or type(exc).__name__)
        except ProtocolError as exc:
            log.warning("connection %s: protocol error: %s", peer, exc)
        except asyncio.CancelledError:
            log.debug("connection %s closed: the server is stopping", peer)
        except Exception:  # never take the server down for one connection
            log.exception("connection %s failed", peer)
        finally:
            self.connections -= 1
            if transport.get_write_buffer_size():
                transport.abort()  # replies nobody takes: do not keep them
            else:
                transport.close()

    # -- giving memory back when idle ----------------------------------------------------------------------------
    def _check_idle(self) -> None:
        """Every ``idle_release / 2`` seconds: if no request came since the last check and none is in flight, give
        the pooled buffers and the heap's free pages back to the system (once per idle spell)."""
        admitted = self._resources.admitted
        if admitted != self._admitted_seen:
            self._admitted_seen = admitted
            self._released = False
        elif not self._released and not self.budget.used:
            released = self.buffers.clear()
            release_free_memory()
            self._released = True
            log.debug("idle: released %d bytes of pooled buffers and the heap's free pages", released)
        self._housekeeping = asyncio.get_running_loop().call_later(self.limits.idle_release / 2, self._check_idle)


def _bind(recorder: Recorder | None) -> None:
    metrics.bind(recorder)


def parse_listen(spec: str) -> tuple[str, str, int]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:PORT`` binds 127.0.0.1) -> (kind, host-or-path, port)."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        try:
            return "tcp", (host or "127.0.0.1").strip("[]"), int(port)
        except ValueError:
            pass
    raise UsageError(f"bad listen address {spec!r}: use unix:PATH or tcp:HOST:PORT")


async def serve(exports: list[Export], listen: str, *, ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None, workers: int = 8, limits: Limits | None = None,
                started: Callable[[NbdServer], Awaitable[None]] | None = None,
                metrics: Recorder | None = None) -> None:
    """Serve until ``stop`` is set; then close the listeners and end the connections."""
    tune_allocator()
    release_free_memory()  # what opening the exports used and freed goes back before serving
    server = NbdServer(exports, workers=workers, limits=limits, metrics=metrics)
    try:
        if started is not None:
            await started(server)
        kind, where, port = parse_listen(listen)
        if kind == "unix":
            await server.listen_unix(where)
            uri = f"nbd+unix:///?socket={where}"
        else:
            port = await server.listen_tcp(where, port)
            uri = f"nbd://[{where}]:{port}/" if ":" in where else f"nbd://{where}:{port}/"
        if ready is not None:
            ready(uri)
        await (stop or asyncio.Event()).wait()
    finally:
        await server.close()
