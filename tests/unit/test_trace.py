"""Trace files: layout, checksum, and rejection of damaged files."""

from __future__ import annotations

import struct

import pytest

from overlaybd.errors import FormatError, TruncatedError
from overlaybd.formats.checksum import raw_crc32c
from overlaybd.trace import MAGIC, TraceRecord, decode, encode


def test_layout_and_round_trip() -> None:
    recs = [TraceRecord(0, 4096, 65536), TraceRecord(3, 1 << 40, 512)]
    raw = encode(recs)
    assert len(raw) == 24 + 24 * 2
    assert raw[:4] == bytes.fromhex("2018EFC2")  # spec: bytes 20 18 EF C2
    magic, size, crc = struct.unpack_from("<I4xQI", raw)
    assert (magic, size) == (MAGIC, 48)
    assert crc == raw_crc32c(raw[48:72], raw_crc32c(raw[24:48], 0))  # chained over the records
    assert raw[24] == ord("R") and struct.unpack_from("<IQQ", raw, 28) == (0, 65536, 4096)
    assert decode(raw) == recs


@pytest.mark.parametrize("damage", ["short", "magic", "size", "crc", "body"])
def test_damaged_traces_are_refused(damage: str) -> None:
    raw = bytearray(encode([TraceRecord(1, 0, 4096)]))
    if damage == "short":
        raw = raw[:10]
    elif damage == "magic":
        raw[0] ^= 1
    elif damage == "size":
        raw[8] ^= 8
    elif damage == "crc":
        raw[16] ^= 1
    else:
        raw[40] ^= 1
    with pytest.raises((FormatError, TruncatedError)):
        decode(bytes(raw), path="t.trace")
