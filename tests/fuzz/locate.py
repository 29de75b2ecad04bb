"""Finding the structures of a (possibly already damaged) file with the oracle's parsers, and building a file
around changed contents: a ZFile recompressed as the original was, a tar envelope as the reference writes it.

Nothing here uses the package: damage is made with an independent reading of the spec.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import zstandard

from ..oracle import (
    LSMT_HEADER,
    Z_DIGEST,
    ZFILE_MAGIC,
    ZREC,
    ZLayout,
    lsmt_rec,
    parse_zfile,
    pax_record_span,
    raw_crc32c,
    zfile_decompress,
    zfile_record_patch,
)

TAR_BLOCK = 512
BLOCK_SEED = 100007


@dataclass(frozen=True)
class Envelope:
    """The payload of a single-member tar: ``[base, base + length)``; ``pax`` when a PAX header precedes it."""

    base: int
    length: int
    pax: bool


def tar_checksum(header: bytearray) -> None:
    """Set a ustar header's checksum as the reference writes it (``"%6o \\0"``)."""
    header[148:156] = b" " * 8
    header[148:156] = b"%6o \x00" % sum(header[:TAR_BLOCK])


def tar_payload(buf: bytes) -> Envelope | None:
    if len(buf) < TAR_BLOCK or buf[257:262] != b"ustar":
        return None
    try:
        if buf[156:157] == b"x":
            start, end = pax_record_span(buf)
            size = int(bytes(buf[start:end]).split(b"size=")[1])
            env = Envelope(3 * TAR_BLOCK, size, True)
        else:
            env = Envelope(TAR_BLOCK, int(bytes(buf[124:136]).strip(b" \x00") or b"0", 8), False)
    except (ValueError, IndexError):
        return None
    return env if env.base + env.length <= len(buf) else None


def envelope(original: bytes, env: Envelope, payload: bytes) -> bytes:
    """``payload`` in the envelope ``original`` had: its headers kept, sizes and checksums made to match."""
    if env.pax:
        record = _pax_size_record(len(payload))
        pax = bytearray(original[:TAR_BLOCK])
        pax[124:136] = b"%11o " % len(record)
        tar_checksum(pax)
        head = bytes(pax) + record + bytes(TAR_BLOCK - len(record)) + original[2 * TAR_BLOCK : 3 * TAR_BLOCK]
    else:
        ustar = bytearray(original[:TAR_BLOCK])
        ustar[124:136] = b"%11o " % len(payload)
        tar_checksum(ustar)
        head = bytes(ustar)
    end = -(-(len(head) + len(payload)) // TAR_BLOCK) * TAR_BLOCK
    return head + payload + bytes(end - len(head) - len(payload) + 2 * TAR_BLOCK)


def _pax_size_record(size: int) -> bytes:
    tail = f" size={size}\n"
    n = len(tail) + 1
    while len(str(n)) + len(tail) != n:
        n = len(str(n)) + len(tail)
    return f"{n}{tail}".encode()


@dataclass(frozen=True)
class Wrapped:
    """Where the inner stream of a file lies: in a tar envelope and/or a ZFile, or the file itself."""

    env: Envelope | None
    zlay: ZLayout | None
    stream: bytes

    @property
    def is_lsmt(self) -> bool:
        return lsmt_rec(self.stream, 0) is not None and lsmt_rec(self.stream, len(self.stream) - LSMT_HEADER) \
            is not None


def unwrap(buf: bytes) -> Wrapped | None:
    """The file's layers peeled as the reference does (tar, then ZFile); None where the oracle cannot follow."""
    env = tar_payload(buf)
    base, length = (env.base, env.length) if env else (0, len(buf))
    if buf[base : base + 24] != ZFILE_MAGIC:
        return Wrapped(env, None, bytes(buf[base : base + length]))
    try:
        lay = parse_zfile(buf, base, length)
        return Wrapped(env, lay, zfile_decompress(buf, lay))
    except Exception:  # noqa: BLE001 - a file damaged beyond what the oracle parses: not a target for this step
        return None


def rewrap(original: bytes, w: Wrapped, stream: bytes) -> bytes:
    """``original`` with its inner stream replaced by ``stream``: recompressed in blocks as before (algorithm,
    block size, CRCs, header form, digests), in the envelope it had."""
    payload = zfile_around(original, w.zlay, stream) if w.zlay is not None else stream
    return envelope(original, w.env, payload) if w.env is not None else payload


def compressor(algo: int) -> Callable[[bytes], bytes]:
    if algo == 2:
        return zstandard.ZstdCompressor(level=3).compress

    def lz4_block(data: bytes) -> bytes:
        return lz4.block.compress(data, mode="default", store_size=False)  # type: ignore[no-any-return]

    return lz4_block


def with_block_crc(payload: bytes) -> bytes:
    return payload + struct.pack("<I", raw_crc32c(payload, BLOCK_SEED))


def zfile_around(original: bytes, lay: ZLayout, stream: bytes) -> bytes:
    z = original[lay.base : lay.base + lay.length]
    compress = compressor(lay.algo)
    stored = []
    for a in range(0, len(stream), lay.block_size):
        block = compress(stream[a : a + lay.block_size])
        stored.append(with_block_crc(block) if lay.verify else block)
    table = struct.pack(f"<{len(stored)}I", *map(len, stored))
    info = {"index_offset": ZREC + sum(map(len, stored)), "index_size": len(stored),
            "original_file_size": len(stream), "index_crc": raw_crc32c(table)}
    trailer_at = lay.length - ZREC
    if lay.overwritten:
        header = zfile_record_patch(z, 0, fix_digest=bool(lay.header_flags & Z_DIGEST), **info)
    else:
        header = z[:ZREC]
    trailer = zfile_record_patch(z, trailer_at, fix_digest=bool(_flags(z, trailer_at) & Z_DIGEST), **info)
    return header + b"".join(stored) + table + trailer


def _flags(z: bytes, at: int) -> int:
    return int(struct.unpack_from("<Q", z, at + 32)[0])
