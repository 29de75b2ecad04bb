"""A volume's control socket (``VOL/.control.sock``): lets ``overlaybd snapshot`` ask the process that serves the
volume to take the snapshot itself, between requests. One JSON line in, one JSON line out.

The socket belongs to the process that made it (:class:`~.listening.UnixListener`): another process cannot take
it over while it listens, and whoever ends removes the path only if it is still its own socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import OverlaybdError
from .listening import UnixListener, accept_connections

log = logging.getLogger(__name__)
SOCKET = ".control.sock"
MAX_REQUEST = 64 * 1024  # bytes of one request line
REQUEST_DEADLINE = 10.0  # seconds a client has to send its request line
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(volume: str) -> str:
    return os.path.join(volume, SOCKET)


class ControlSocket:
    """Listens on ``path`` and answers each request line with ``handler``'s reply (errors become ``ok: false``)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._listener: UnixListener | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener = UnixListener(self.path)
        os.chmod(self.path, 0o600)
        accepting = accept_connections(self._listener.sock, self._accepted, self._starving)
        self._accepting = asyncio.get_running_loop().create_task(accepting)

    async def stop_listening(self) -> None:
        """Take no more connections and remove the socket's path (answers under way go on)."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def close(self) -> None:
        await self.stop_listening()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    def _accepted(self, conn: socket.socket, address: object) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(conn))
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    @staticmethod
    def _starving(exc: OSError) -> None:
        log.debug("control socket: cannot accept: %s", exc.strerror)

    async def _answer(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_REQUEST)
        except BaseException:
            conn.close()
            raise
        try:
            try:
                async with asyncio.timeout(REQUEST_DEADLINE):
                    line = await reader.readline()
                if not line:
                    return
                reply = await self._reply_to(line)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
                return  # a client that says nothing, or too much: no answer
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _reply_to(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            return await self.handler(request)
        except (ValueError, KeyError) as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        except OverlaybdError as exc:
            return {"ok": False, "error": str(exc)}


def request(volume: str, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any] | None:
    """Send a request to the process serving ``volume``; None if nobody listens there."""
    path = socket_path(volume)
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        s.sendall(json.dumps(body).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    reply: dict[str, Any] = json.loads(data) if data else {"ok": False, "error": "no answer from the server"}
    return reply


class ControlThread:
    """A control socket answered from a thread of its own, for a process whose main thread is taken (the FUSE
    daemon). ``start()`` raises what stopped the socket from listening (another process answers there)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.socket: ControlSocket | None = None  # once started (the handler may stop it listening)
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        control = self.socket = ControlSocket(self.path, self.handler)
        try:
            await control.start()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await control.close()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
