"""A small NBD client speaking raw bytes, for tests that need to see (or break) the protocol."""

from __future__ import annotations

import socket
import struct

from overlaybd.export.nbd import protocol


def connect(path: str | tuple[str, int], timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_UNIX if not isinstance(path, tuple) else socket.AF_INET)
    s.settimeout(timeout)
    s.connect(path)
    return s


def unix_path(uri: str) -> str:
    """The socket path of an ``nbd+unix:///NAME?socket=PATH`` URI."""
    return uri.split("socket=", 1)[1]


class Client:
    def __init__(self, path: str | tuple[str, int], flags: int = protocol.FLAG_FIXED_NEWSTYLE | protocol.FLAG_NO_ZEROES,
                 *, receive_buffer: int | None = None) -> None:
        self.s = socket.socket(socket.AF_UNIX if not isinstance(path, tuple) else socket.AF_INET)
        if receive_buffer is not None:  # before connecting: a small one makes the server's replies back up at once
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.s.settimeout(10)
        self.s.connect(path)
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (protocol.NBDMAGIC, protocol.IHAVEOPT)
        assert hflags & protocol.FLAG_FIXED_NEWSTYLE
        self.s.sendall(struct.pack(">I", flags))

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", protocol.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
            assert magic == protocol.OPT_REPLY_MAGIC and opt == option
            replies.append((kind, self.recv(length)))
            if kind == protocol.REP_ACK or kind & (1 << 31):
                return replies

    def go(self, name: str = "", structured: bool = False, meta: bool = False, size: int | None = None) -> int:
        if structured:
            assert self.option(protocol.OPT_STRUCTURED_REPLY)[-1][0] == protocol.REP_ACK
        if meta:
            q = protocol.BASE_ALLOCATION.encode()
            body = struct.pack(">I", len(name)) + name.encode() + struct.pack(">II", 1, len(q)) + q
            replies = self.option(protocol.OPT_SET_META_CONTEXT, body)
            assert replies[0][0] == protocol.REP_META_CONTEXT
        replies = self.option(protocol.OPT_GO, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))
        assert replies[-1][0] == protocol.REP_ACK, replies
        export = [d for k, d in replies if k == protocol.REP_INFO and d[:2] == b"\x00\x00"][0]
        got, flags = struct.unpack(">QH", export[2:])
        assert size is None or got == size
        self.size = got
        return int(flags)

    def request(self, cmd: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> None:
        self.s.sendall(protocol.REQUEST.pack(protocol.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload)

    def simple(self, length: int = 0) -> tuple[int, int, bytes]:
        magic, error, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == protocol.SIMPLE_REPLY_MAGIC
        return handle, error, self.recv(length) if not error else b""

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, kind, handle, length = struct.unpack(">IHHQI", self.recv(20))
        assert magic == protocol.STRUCTURED_REPLY_MAGIC
        return handle, kind, flags, self.recv(length)

    def read_until_closed(self, timeout: float = 60) -> int:
        """Take whatever the server still sends until it closes the connection; the bytes taken."""
        self.s.settimeout(timeout)
        total = 0
        buf = bytearray(1 << 20)
        while True:
            try:
                n = self.s.recv_into(buf)
            except ConnectionResetError:
                return total
            if not n:
                return total
            total += n

    def close(self) -> None:
        self.s.close()
