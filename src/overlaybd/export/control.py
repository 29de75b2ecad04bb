"""A volume's control socket (``VOL/.control.sock``): lets ``overlaybd snapshot`` ask the process that serves the
volume to take the snapshot itself, between requests. One JSON line in, one JSON line out."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import OverlaybdError

log = logging.getLogger(__name__)
SOCKET = ".control.sock"
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(volume: str) -> str:
    return os.path.join(volume, SOCKET)


async def serve_control(path: str, handler: Handler) -> asyncio.Server:
    if os.path.exists(path):
        os.unlink(path)

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                reply = await handler(request)
            except (ValueError, KeyError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            except OverlaybdError as exc:
                reply = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()

    server = await asyncio.start_unix_server(one, path=path)
    os.chmod(path, 0o600)
    return server


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
