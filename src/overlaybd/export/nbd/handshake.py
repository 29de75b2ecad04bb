"""The fixed newstyle handshake: one handler per option, looked up in a table.

A handler is pure: it gets the negotiation so far and the option's data, and returns the bytes to send and what
happens next (go on negotiating, start transmission, or end). :func:`negotiate` does the reading and writing; the
caller bounds it in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from . import protocol
from .protocol import (
    BASE_ALLOCATION,
    INFO_DESCRIPTION,
    INFO_NAME,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    ProtocolError,
    option_reply,
)
from .session import EndConnection, Export, Session

META_CONTEXT_ID = 1
MAX_DISCARD_PAYLOAD = 256 * 1024 * 1024  # option data (or a WRITE payload) up to this is read and dropped; beyond, end


@dataclass
class Negotiation:
    """The state of one client's handshake."""

    exports: Mapping[str, Export]
    no_zeroes: bool = False
    structured: bool = False
    meta: tuple[str, bool] | None = None  # (export name, base:allocation selected) after SET_META_CONTEXT


@dataclass
class Answer:
    """What one option gets: bytes to send, then either more options, transmission (``session``), or the end."""

    replies: list[bytes] = field(default_factory=list)
    session: Session | None = None
    end: bool = False

    def reply(self, option: int, kind: int, payload: bytes = b"") -> Answer:
        self.replies.append(option_reply(option, kind, payload))
        return self


Handler = Callable[[Negotiation, int, bytes], Answer]


def _export_name(neg: Negotiation, option: int, data: bytes) -> Answer:
    export = neg.exports.get(data.decode(errors="replace"))
    if export is None:  # this option has no error reply: the spec says to close
        raise EndConnection("NBD_OPT_EXPORT_NAME for an unknown export")
    head = protocol.export_name_reply(export.source.size, export.transmission_flags(neg.structured), neg.no_zeroes)
    return Answer([head], session=Session(export, neg.structured, False))


def _abort(neg: Negotiation, option: int, data: bytes) -> Answer:
    answer = Answer().reply(option, REP_ACK)
    answer.end = True
    return answer


def _list(neg: Negotiation, option: int, data: bytes) -> Answer:
    answer = Answer()
    if data:
        return answer.reply(option, REP_ERR_INVALID)
    for export in neg.exports.values():
        answer.reply(option, REP_SERVER, protocol.server_entry(export.name, export.description))
    return answer.reply(option, REP_ACK)


def _info_or_go(neg: Negotiation, option: int, data: bytes) -> Answer:
    answer = Answer()
    try:
        name, infos = protocol.parse_info_request(data)
    except ProtocolError:
        return answer.reply(option, REP_ERR_INVALID)
    export = neg.exports.get(name)
    if export is None:
        return answer.reply(option, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
    answer.reply(option, REP_INFO, protocol.info_export(export.source.size, export.transmission_flags(neg.structured)))
    answer.reply(option, REP_INFO, protocol.info_block_size(1, 4096, MAX_PAYLOAD))
    if INFO_NAME in infos:
        answer.reply(option, REP_INFO, protocol.info_name(export.name))
    if INFO_DESCRIPTION in infos and export.description:
        answer.reply(option, REP_INFO, protocol.info_description(export.description))
    answer.reply(option, REP_ACK)
    if option == OPT_GO:
        allocation = neg.meta is not None and neg.meta[0] == name and neg.meta[1]
        answer.session = Session(export, neg.structured, allocation)
    return answer


def _structured_reply(neg: Negotiation, option: int, data: bytes) -> Answer:
    if data:
        return Answer().reply(option, REP_ERR_INVALID)
    neg.structured = True
    return Answer().reply(option, REP_ACK)


def _meta_context(neg: Negotiation, option: int, data: bytes) -> Answer:
    answer = Answer()
    setting = option == OPT_SET_META_CONTEXT
    try:
        name, queries = protocol.parse_meta_context_request(data)
    except ProtocolError:
        return answer.reply(option, REP_ERR_INVALID)
    if setting and not neg.structured:
        return answer.reply(option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY must come first")
    if name not in neg.exports:
        return answer.reply(option, REP_ERR_UNKNOWN, f"no export named {name!r}".encode())
    wanted = (not queries and not setting) or any(q in (BASE_ALLOCATION, "base:") for q in queries)
    if wanted:
        answer.reply(option, REP_META_CONTEXT, protocol.meta_context(META_CONTEXT_ID, BASE_ALLOCATION))
    if setting:
        neg.meta = (name, wanted)
    return answer.reply(option, REP_ACK)


def _unsupported(neg: Negotiation, option: int, data: bytes) -> Answer:
    return Answer().reply(option, REP_ERR_UNSUP)  # STARTTLS, and every option we do not know


OPTION_HANDLERS: dict[int, Handler] = {
    OPT_EXPORT_NAME: _export_name,
    OPT_ABORT: _abort,
    OPT_LIST: _list,
    OPT_INFO: _info_or_go,
    OPT_GO: _info_or_go,
    OPT_STRUCTURED_REPLY: _structured_reply,
    OPT_LIST_META_CONTEXT: _meta_context,
    OPT_SET_META_CONTEXT: _meta_context,
}


def answer(neg: Negotiation, option: int, data: bytes) -> Answer:
    return OPTION_HANDLERS.get(option, _unsupported)(neg, option, data)


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    exports: Mapping[str, Export]) -> Session | None:
    """Run the handshake; the session agreed, or None if the client aborted."""
    writer.write(protocol.server_hello())
    await writer.drain()
    client_flags = int.from_bytes(await reader.readexactly(4), "big")
    if client_flags & ~protocol.CLIENT_FLAGS_KNOWN:
        raise EndConnection(f"unknown client flags 0x{client_flags:x}")
    neg = Negotiation(exports, no_zeroes=bool(client_flags & protocol.FLAG_NO_ZEROES))
    while True:
        option, length = protocol.parse_option_header(await reader.readexactly(protocol.OPTION_HEADER_SIZE))
        if length > MAX_OPTION_DATA:
            if length > MAX_DISCARD_PAYLOAD:
                raise EndConnection(f"option data of {length} bytes")
            await discard(reader, length)
            writer.write(option_reply(option, REP_ERR_TOO_BIG))
            await writer.drain()
            continue
        result = answer(neg, option, await reader.readexactly(length))
        for chunk in result.replies:
            writer.write(chunk)
        await writer.drain()
        if result.end:
            return None
        if result.session is not None:
            return result.session


async def discard(reader: asyncio.StreamReader, length: int) -> None:
    """Read and drop ``length`` bytes, 1 MiB at a time."""
    while length:
        chunk = await reader.readexactly(min(length, 1 << 20))
        length -= len(chunk)
