"""A small NBD client speaking raw bytes, for tests that need to see (or break) the protocol."""

from __future__ import annotations

import socket
import struct

from overlaybd.export.nbd import protocol as p


class Client:
    def __init__(self, path: str | tuple[str, int], flags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES) -> None:
        self.s = socket.socket(socket.AF_UNIX if not isinstance(path, tuple) else socket.AF_INET)
        self.s.settimeout(10)
        self.s.connect(path)
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        assert hflags & p.FLAG_FIXED_NEWSTYLE
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
        self.s.sendall(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
            assert magic == p.OPT_REPLY_MAGIC and opt == option
            replies.append((kind, self.recv(length)))
            if kind == p.REP_ACK or kind & (1 << 31):
                return replies

    def go(self, name: str = "", structured: bool = False, meta: bool = False, size: int | None = None) -> int:
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        if meta:
            q = p.BASE_ALLOCATION.encode()
            body = struct.pack(">I", len(name)) + name.encode() + struct.pack(">II", 1, len(q)) + q
            replies = self.option(p.OPT_SET_META_CONTEXT, body)
            assert replies[0][0] == p.REP_META_CONTEXT
        replies = self.option(p.OPT_GO, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))
        assert replies[-1][0] == p.REP_ACK, replies
        export = [d for k, d in replies if k == p.REP_INFO and d[:2] == b"\x00\x00"][0]
        got, flags = struct.unpack(">QH", export[2:])
        assert size is None or got == size
        self.size = got
        return flags

    def request(self, cmd: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> None:
        self.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload)

    def simple(self, length: int = 0) -> tuple[int, int, bytes]:
        magic, error, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return handle, error, self.recv(length) if not error else b""

    def chunk(self) -> tuple[int, int, int, bytes]:
        magic, flags, kind, handle, length = struct.unpack(">IHHQI", self.recv(20))
        assert magic == p.STRUCTURED_REPLY_MAGIC
        return handle, kind, flags, self.recv(length)
