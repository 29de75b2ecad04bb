"""NBD wire format, declared once: constants, message encoding and parsing. No I/O here.

Reference: NetworkBlockDevice/nbd ``doc/proto.md`` (fixed newstyle handshake, structured replies, block status).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from ...errors import OverlaybdError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_INFO_*
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH", CMD_TRIM: "TRIM",
             CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES", CMD_BLOCK_STATUS: "BLOCK_STATUS"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunk types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation status bits
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

# errors on the wire (Linux values, as the spec fixes them)
EPERM = errno.EPERM
EIO = errno.EIO
ENOMEM = errno.ENOMEM
EINVAL = errno.EINVAL
ENOSPC = errno.ENOSPC
EOVERFLOW = errno.EOVERFLOW
ENOTSUP = errno.ENOTSUP
ESHUTDOWN = errno.ESHUTDOWN
NBD_ERRNOS = frozenset((EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN))  # all the protocol names

MAX_STRING = 4096
MAX_OPTION_DATA = 64 * 1024
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE we accept (advertised as the maximum block size)

_HELLO = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_EXPORT_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")


class ProtocolError(OverlaybdError):
    """The peer broke the protocol in a way that ends the connection."""


def server_hello() -> bytes:
    return _HELLO.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def parse_option_header(buf: bytes) -> tuple[int, int]:
    """-> (option, data length); the magic must be IHAVEOPT."""
    magic, option, length = _OPTION.unpack(buf)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic 0x{magic:x}")
    return option, length


OPTION_HEADER_SIZE = _OPTION.size


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return _EXPORT_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(124))


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + name.encode()


def info_description(text: str) -> bytes:
    return struct.pack(">H", INFO_DESCRIPTION) + text.encode()


def server_entry(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + description.encode()


def meta_context(context_id: int, name: str) -> bytes:
    return struct.pack(">I", context_id) + name.encode()


class _Reader:
    """Bounds-checked reading of option data; any overrun is a ProtocolError (answered ERR_INVALID)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("option data is shorter than its fields say")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def string(self) -> str:
        n = self.u32()
        if n > MAX_STRING:
            raise ProtocolError(f"string of {n} bytes is longer than {MAX_STRING}")
        try:
            return self.take(n).decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not UTF-8") from exc

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("option data has trailing bytes")


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO data -> (export name, requested info types)."""
    r = _Reader(data)
    name = r.string()
    count = r.u16()
    infos = [r.u16() for _ in range(count)]
    r.done()
    return name, infos


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_LIST/SET_META_CONTEXT data -> (export name, queries)."""
    r = _Reader(data)
    name = r.string()
    count = r.u32()
    if count > 1024:
        raise ProtocolError(f"{count} meta context queries")
    queries = [r.string() for _ in range(count)]
    r.done()
    return name, queries


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    command: int
    handle: int
    offset: int
    length: int


def parse_request(buf: bytes) -> Request:
    magic, flags, command, handle, offset, length = REQUEST.unpack(buf)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:x}")
    return Request(flags, command, handle, offset, length)


def simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(handle: int, kind: int, length: int, done: bool) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, handle, length)


def chunk_offset_data_header(handle: int, offset: int, length: int, done: bool) -> bytes:
    return chunk_header(handle, REPLY_TYPE_OFFSET_DATA, 8 + length, done) + struct.pack(">Q", offset)


def chunk_none(handle: int) -> bytes:
    return chunk_header(handle, REPLY_TYPE_NONE, 0, True)


def chunk_error(handle: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return chunk_header(handle, REPLY_TYPE_ERROR, 6 + len(msg), True) + struct.pack(">IH", error, len(msg)) + msg


def chunk_block_status(handle: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """``extents`` are (length, status flags) pairs."""
    body = struct.pack(">I", context_id) + b"".join(struct.pack(">II", n, s) for n, s in extents)
    return chunk_header(handle, REPLY_TYPE_BLOCK_STATUS, len(body), True) + body
