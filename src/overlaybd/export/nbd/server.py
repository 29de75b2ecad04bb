"""An NBD server for BlockSources: asyncio on the socket, source calls in a bounded thread pool, replies as soon
as each request is done (out of order, matched by handle).

Protocol violations that leave the stream in sync get the error the spec names; ones that do not (a bad magic, a
write payload we will not read) end that connection only, never the server.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ...errors import (
    FormatError,
    LayerIOError,
    OutOfBoundsError,
    OverlaybdError,
    ReadOnlyError,
    SourceError,
)
from ...source.base import BlockSource, Capability, ExtentKind
from . import protocol as p

log = logging.getLogger(__name__)

MAX_INFLIGHT = 64  # requests in progress per connection before we stop reading more
MAX_DISCARD_PAYLOAD = 256 * 1024 * 1024  # a too-large WRITE payload up to this is read and dropped; beyond, disconnect
MAX_EXTENTS = 65536  # descriptors in one BLOCK_STATUS reply
INLINE_MAX = 128 * 1024  # requests up to this size on a local export are served on the event loop
META_CONTEXT_ID = 1


@dataclass
class Export:
    name: str
    source: BlockSource
    readonly: bool = False
    description: str = ""
    #: every byte is local (no remote layers): small requests are served on the event loop itself, saving two
    #: thread hops; a slow read there (a page-cache miss) costs the other requests of the moment a little latency
    inline: bool = False

    @property
    def writable(self) -> bool:
        return not self.readonly and Capability.WRITE in self.source.capabilities

    def transmission_flags(self, structured: bool) -> int:
        flags = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_SEND_FUA | p.TFLAG_CAN_MULTI_CONN
        if structured:
            flags |= p.TFLAG_SEND_DF
        if not self.writable:
            return flags | p.TFLAG_READ_ONLY
        caps = self.source.capabilities
        if Capability.TRIM in caps:
            flags |= p.TFLAG_SEND_TRIM
        if Capability.WRITE_ZEROES in caps:
            flags |= p.TFLAG_SEND_WRITE_ZEROES
        return flags


def errno_of(exc: BaseException) -> int:
    """Errors -> the NBD error the client sees (one of the three translation edges)."""
    if isinstance(exc, ReadOnlyError):
        return p.EPERM
    if isinstance(exc, OutOfBoundsError):
        return p.EINVAL
    if isinstance(exc, LayerIOError) and isinstance(exc.__cause__, OSError):
        code = exc.__cause__.errno
        return p.ENOSPC if code in (errno.ENOSPC, errno.EDQUOT) else p.EIO
    if isinstance(exc, (FormatError, SourceError, OverlaybdError, OSError)):
        return p.EIO
    return p.EIO


class _Abort(Exception):
    """End this connection (the client aborted, or the stream cannot be resynchronised)."""


class NbdServer:
    def __init__(self, exports: list[Export], *, workers: int = 8) -> None:
        self.exports = {e.name: e for e in exports}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd")
        self.connections = 0
        self._servers: list[asyncio.Server] = []
        self._running = asyncio.Event()  # cleared while requests are held back (between-requests maintenance)
        self._running.set()
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def quiesced(self, work: Callable[[], object]) -> object:
        """Run ``work`` in the pool while no request is in progress; requests that arrive meanwhile wait."""
        self._running.clear()
        try:
            await self._idle.wait()
            return await asyncio.get_running_loop().run_in_executor(self.pool, work)
        finally:
            self._running.set()

    # -- listening -----------------------------------------------------------------------------------------------
    async def listen_unix(self, path: str) -> asyncio.Server:
        if os.path.exists(path):
            os.unlink(path)
        server = await asyncio.start_unix_server(self.handle, path=path)
        self._servers.append(server)
        return server

    async def listen_tcp(self, host: str, port: int) -> asyncio.Server:
        server = await asyncio.start_server(self.handle, host=host, port=port, reuse_address=True)
        self._servers.append(server)
        return server

    def adopt_listener(self, server: asyncio.Server) -> None:
        """Close another listener (a control socket) together with ours."""
        self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self.pool.shutdown(wait=True)

    # -- one connection ------------------------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = writer.get_extra_info("peername") or "unix"
        try:
            session = await self._handshake(reader, writer)
            if session is not None:
                await self._transmission(reader, writer, *session)
        except (_Abort, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.debug("connection %s ended: %s", peer, exc or type(exc).__name__)
        except p.ProtocolError as exc:
            log.warning("connection %s: protocol error: %s", peer, exc)
        except Exception:  # never take the server down for one connection
            log.exception("connection %s failed", peer)
        finally:
            self.connections -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> tuple[Export, bool, bool] | None:
        writer.write(p.server_hello())
        await writer.drain()
        client_flags = int.from_bytes(await reader.readexactly(4), "big")
        if client_flags & ~p.CLIENT_FLAGS_KNOWN:
            raise _Abort(f"unknown client flags 0x{client_flags:x}")
        no_zeroes = bool(client_flags & p.FLAG_NO_ZEROES)
        structured = False
        meta: tuple[str, bool] | None = None  # (export name, base:allocation selected)
        while True:
            option, length = p.parse_option_header(await reader.readexactly(p.OPTION_HEADER_SIZE))
            if length > p.MAX_OPTION_DATA:
                if length > MAX_DISCARD_PAYLOAD:
                    raise _Abort(f"option data of {length} bytes")
                await _discard(reader, length)
                writer.write(p.option_reply(option, p.REP_ERR_TOO_BIG))
                await writer.drain()
                continue
            data = await reader.readexactly(length)

            def reply(kind: int, payload: bytes = b"", option: int = option) -> None:
                writer.write(p.option_reply(option, kind, payload))

            if option == p.OPT_EXPORT_NAME:
                export = self.exports.get(data.decode(errors="replace"))
                if export is None:
                    raise _Abort("NBD_OPT_EXPORT_NAME for an unknown export")
                writer.write(p.export_name_reply(export.source.size, export.transmission_flags(structured),
                                                 no_zeroes))
                await writer.drain()
                return export, structured, False
            if option == p.OPT_ABORT:
                reply(p.REP_ACK)
                await writer.drain()
                return None
            if option == p.OPT_LIST:
                if data:
                    reply(p.REP_ERR_INVALID)
                else:
                    for export in self.exports.values():
                        reply(p.REP_SERVER, p.server_entry(export.name, export.description))
                    reply(p.REP_ACK)
            elif option in (p.OPT_INFO, p.OPT_GO):
                try:
                    name, infos = p.parse_info_request(data)
                except p.ProtocolError:
                    reply(p.REP_ERR_INVALID)
                else:
                    export = self.exports.get(name)
                    if export is None:
                        reply(p.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
                    else:
                        reply(p.REP_INFO, p.info_export(export.source.size, export.transmission_flags(structured)))
                        reply(p.REP_INFO, p.info_block_size(1, 4096, p.MAX_PAYLOAD))
                        if p.INFO_NAME in infos:
                            reply(p.REP_INFO, p.info_name(export.name))
                        if p.INFO_DESCRIPTION in infos and export.description:
                            reply(p.REP_INFO, p.info_description(export.description))
                        reply(p.REP_ACK)
                        if option == p.OPT_GO:
                            await writer.drain()
                            allocation = meta is not None and meta[0] == name and meta[1]
                            return export, structured, allocation
            elif option == p.OPT_STRUCTURED_REPLY:
                if data:
                    reply(p.REP_ERR_INVALID)
                else:
                    structured = True
                    reply(p.REP_ACK)
            elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                setting = option == p.OPT_SET_META_CONTEXT
                try:
                    name, queries = p.parse_meta_context_request(data)
                except p.ProtocolError:
                    reply(p.REP_ERR_INVALID)
                else:
                    if setting and not structured:
                        reply(p.REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY must come first")
                    elif name not in self.exports:
                        reply(p.REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
                    else:
                        wanted = (not queries and not setting) or any(q in (p.BASE_ALLOCATION, "base:")
                                                                     for q in queries)
                        if wanted:
                            reply(p.REP_META_CONTEXT, p.meta_context(META_CONTEXT_ID, p.BASE_ALLOCATION))
                        if setting:
                            meta = (name, wanted)
                        reply(p.REP_ACK)
            else:  # STARTTLS and anything unknown
                reply(p.REP_ERR_UNSUP)
            await writer.drain()

    async def _transmission(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, export: Export,
                            structured: bool, allocation: bool) -> None:
        loop = asyncio.get_running_loop()
        raw = writer.get_extra_info("socket")
        if raw is not None:
            enlarge_send_buffer(raw)
        slots = asyncio.Semaphore(MAX_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                req = p.parse_request(await reader.readexactly(p.REQUEST.size))
                payload = b""
                if req.command == p.CMD_WRITE:
                    if req.length > p.MAX_PAYLOAD:
                        if req.length > MAX_DISCARD_PAYLOAD:
                            raise _Abort(f"write payload of {req.length} bytes")
                        await _discard(reader, req.length)
                        self._send_error(writer, req, structured, p.EINVAL, "request too large")
                        continue
                    payload = await reader.readexactly(req.length)
                if req.command == p.CMD_DISC:
                    break
                await slots.acquire()
                task = loop.create_task(self._serve(writer, export, req, payload, structured, allocation))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _t: slots.release())
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await writer.drain()
            except ConnectionError:
                pass

    def _send_error(self, writer: asyncio.StreamWriter, req: p.Request, structured: bool, error: int,
                    message: str) -> None:
        if structured:
            writer.write(p.chunk_error(req.handle, error, message))
        else:
            writer.write(p.simple_reply(req.handle, error))

    async def _serve(self, writer: asyncio.StreamWriter, export: Export, req: p.Request, payload: bytes,
                     structured: bool, allocation: bool) -> None:
        while not self._running.is_set():
            await self._running.wait()
        self._active += 1
        self._idle.clear()
        try:
            await self._serve_one(writer, export, req, payload, structured, allocation)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _serve_one(self, writer: asyncio.StreamWriter, export: Export, req: p.Request, payload: bytes,
                         structured: bool, allocation: bool) -> None:
        loop = asyncio.get_running_loop()
        src = export.source
        try:
            error = self._validate(export, req, structured, allocation)
            if error:
                self._send_error(writer, req, structured, error, f"invalid {p.CMD_NAMES.get(req.command, '?')}")
                return
            cmd = req.command
            inline = export.inline and req.length <= INLINE_MAX and not req.flags & p.CMD_FLAG_FUA
            if cmd == p.CMD_READ:
                buf = _BUFFERS.take(req.length)
                try:
                    if req.length and inline:
                        src.readinto(req.offset, buf.view)
                    elif req.length:
                        await loop.run_in_executor(self.pool, src.readinto, req.offset, buf.view)
                    head = p.chunk_offset_data_header(req.handle, req.offset, req.length, True) if structured \
                        else p.simple_reply(req.handle)
                    # two writes, not writelines: 3.11 joins those into a new copy; with a large socket buffer the
                    # payload goes to the kernel straight from our page-aligned buffer
                    writer.write(head)
                    writer.write(buf.view)
                finally:
                    # reusable only if the transport kept no reference to it (it copies, or sent it all)
                    _BUFFERS.give(buf, reusable=writer.transport.get_write_buffer_size() == 0)
            elif cmd == p.CMD_BLOCK_STATUS:
                extents = await loop.run_in_executor(self.pool, self._status, src, req)
                writer.write(p.chunk_block_status(req.handle, META_CONTEXT_ID, extents))
            elif inline and cmd != p.CMD_FLUSH:
                self._modify(src, req, payload)
                writer.write(p.simple_reply(req.handle) if not structured else p.chunk_none(req.handle))
            else:
                await loop.run_in_executor(self.pool, self._modify, src, req, payload)
                writer.write(p.simple_reply(req.handle) if not structured else p.chunk_none(req.handle))
        except Exception as exc:  # the request fails; the connection and the server go on
            code = errno_of(exc)
            log.warning("%s %s [%d, +%d): %s", export.name or "(default)", p.CMD_NAMES.get(req.command, "?"),
                        req.offset, req.length, exc)
            self._send_error(writer, req, structured, code, str(exc)[:200])
        try:
            await writer.drain()
        except ConnectionError:
            pass

    @staticmethod
    def _validate(export: Export, req: p.Request, structured: bool, allocation: bool) -> int:
        cmd = req.command
        known_flags = p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_DF | p.CMD_FLAG_REQ_ONE
        if req.flags & ~known_flags:
            return p.EINVAL
        if cmd not in (p.CMD_READ, p.CMD_WRITE, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS):
            return p.EINVAL
        if cmd == p.CMD_FLUSH:
            return 0
        if req.length > p.MAX_PAYLOAD and cmd in (p.CMD_READ, p.CMD_WRITE):
            return p.EINVAL
        if req.offset + req.length > export.source.size:
            return p.EINVAL
        if cmd == p.CMD_BLOCK_STATUS:
            return 0 if structured and allocation and req.length else p.EINVAL
        if cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES) and not export.writable:
            return p.EPERM
        caps = export.source.capabilities
        if cmd == p.CMD_TRIM and Capability.TRIM not in caps:
            return p.EINVAL
        if cmd == p.CMD_WRITE_ZEROES and Capability.WRITE_ZEROES not in caps:
            return p.EINVAL
        return 0

    @staticmethod
    def _modify(src: BlockSource, req: p.Request, payload: bytes) -> None:
        cmd = req.command
        if cmd == p.CMD_WRITE:
            src.pwrite(req.offset, payload)
        elif cmd == p.CMD_TRIM:
            src.trim(req.offset, req.length)
        elif cmd == p.CMD_WRITE_ZEROES:
            if req.flags & p.CMD_FLAG_NO_HOLE:
                _write_zero_data(src, req.offset, req.length)
            else:
                src.write_zeroes(req.offset, req.length)
        if cmd == p.CMD_FLUSH or req.flags & p.CMD_FLAG_FUA:
            src.flush()

    @staticmethod
    def _status(src: BlockSource, req: p.Request) -> list[tuple[int, int]]:
        """Extents as NBD states. Neighbours of the same state are one extent (layers do not matter to
        base:allocation); a request is answered for at most STATUS_SCAN bytes, which the spec allows."""
        out: list[tuple[int, int]] = []
        one = bool(req.flags & p.CMD_FLAG_REQ_ONE)
        for ext in src.extents(req.offset, min(req.length, STATUS_SCAN)):
            state = _STATE[ext.kind]
            if out and out[-1][1] == state:
                out[-1] = (out[-1][0] + ext.length, state)
                continue
            if one and out or len(out) >= MAX_EXTENTS:
                break
            out.append((ext.length, state))
        return out


_STATE = {ExtentKind.DATA: 0, ExtentKind.ZERO: p.STATE_ZERO, ExtentKind.HOLE: p.STATE_HOLE | p.STATE_ZERO}
STATUS_SCAN = 64 << 20  # bytes of the device one BLOCK_STATUS looks at, at most


class _Buffer:
    __slots__ = ("mem", "view")

    def __init__(self, mem: mmap.mmap, n: int) -> None:
        self.mem = mem
        self.view = memoryview(mem)[:n]


class _BufferPool:
    """Page-aligned (mmap) read buffers, reused: aligned copies are fast and fresh memory is slow on these VMs
    (PEERS §0). A buffer goes back only when nothing else can still be reading it."""

    def __init__(self, keep: int = 32) -> None:
        self._free: list[mmap.mmap] = []
        self._keep = keep

    def take(self, n: int) -> _Buffer:
        size = max(1 << 20, -(-n // mmap.PAGESIZE) * mmap.PAGESIZE)
        for i, mem in enumerate(self._free):
            if len(mem) >= n:
                return _Buffer(self._free.pop(i), n)
        return _Buffer(mmap.mmap(-1, size), n)

    def give(self, buf: _Buffer, *, reusable: bool) -> None:
        try:
            buf.view.release()
        except BufferError:  # someone (a transport that does not copy) still holds it: let it go
            return
        if reusable and len(self._free) < self._keep:
            self._free.append(buf.mem)


_BUFFERS = _BufferPool()  # used from the event loop thread only


def enlarge_send_buffer(sock: socket.socket, size: int = 8 << 20) -> None:
    """A large socket send buffer lets a 1 MiB reply go to the kernel in one send (no copy in asyncio)."""
    for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            return
        except OSError:
            continue


def _write_zero_data(src: BlockSource, offset: int, length: int) -> None:
    zeros = bytes(min(length, 4 << 20))
    pos = offset
    end = offset + length
    while pos < end:
        n = min(len(zeros), end - pos)
        src.pwrite(pos, memoryview(zeros)[:n])
        pos += n


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    while length:
        chunk = await reader.readexactly(min(length, 1 << 20))
        length -= len(chunk)


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
    from ...errors import UsageError

    raise UsageError(f"bad listen address {spec!r}: use unix:PATH or tcp:HOST:PORT")


def tune_allocator() -> None:
    """Keep freed request buffers in the heap instead of returning them to the kernel: fresh memory costs about
    5 µs a page on these VMs (PEERS §0), which halves large-read throughput."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum on 64-bit glibc)
    except (OSError, AttributeError):
        pass


async def serve(exports: list[Export], listen: str, *, ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None, workers: int = 8,
                started: Callable[[NbdServer], Awaitable[None]] | None = None) -> None:
    """Serve until ``stop`` is set; then close the listeners and finish requests in flight."""
    tune_allocator()
    server = NbdServer(exports, workers=workers)
    if started is not None:
        await started(server)
    kind, where, port = parse_listen(listen)
    if kind == "unix":
        await server.listen_unix(where)
        uri = f"nbd+unix:///?socket={where}"
    else:
        srv = await server.listen_tcp(where, port)
        port = srv.sockets[0].getsockname()[1]
        uri = f"nbd://{where}:{port}/"
    if ready is not None:
        ready(uri)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await server.close()
        if kind == "unix" and os.path.exists(where):
            os.unlink(where)
