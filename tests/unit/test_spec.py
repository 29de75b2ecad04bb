"""Binary layouts: sizes pinned, round trips, and the spec's worked values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from overlaybd.cli.common import parse_size
from overlaybd.errors import BadMagicError, ChecksumError, TruncatedError, UsageError
from overlaybd.formats import tarwrap
from overlaybd.formats.checksum import raw_crc32c
from overlaybd.formats.detect import replace_last, sibling_index
from overlaybd.formats.lsmt import spec as lsmt
from overlaybd.formats.zfile import spec as zf


def test_raw_crc32c_vectors() -> None:
    # the reference's raw variant, not the standard CRC-32C (0xE3069283)
    assert raw_crc32c(b"123456789") == 0x58E3FA20
    assert raw_crc32c(b"123456789", 100007) == 0x3C9BD4E0
    assert raw_crc32c(bytearray(b"123456789")) == raw_crc32c(memoryview(b"0123456789")[1:])


def test_lsmt_header_is_4096_bytes_and_round_trips() -> None:
    h = lsmt.LsmtHeader(flags=0x07, index_offset=4096 * 3, index_size=256, virtual_size=1 << 30,
                        uuid=lsmt.parse_uuid("a0000000-0000-4000-8000-00000000000a"), user_tag=b"msg")
    raw = h.pack()
    assert len(raw) == lsmt.HEADER_SIZE == 4096
    assert raw[:8] == b"LSMT\x00\x01\x02\x00"
    assert raw[56:93] == b"A0000000-0000-4000-8000-00000000000A\x00"  # uppercase text + NUL
    assert raw[93:130] == b"00000000-0000-0000-0000-000000000000\x00"  # null parent written as zeros text
    assert raw[lsmt.STRUCT_SIZE:] == bytes(4096 - 390)
    back = lsmt.LsmtHeader.unpack(raw, path="x", offset=0)
    assert back == h
    assert back.message == "msg"


def test_lsmt_header_rejects_bad_magic_and_short_input() -> None:
    raw = bytearray(lsmt.LsmtHeader(flags=1).pack())
    raw[3] ^= 1
    with pytest.raises(BadMagicError) as exc:
        lsmt.LsmtHeader.unpack(bytes(raw), path="f.lsmt", offset=4096)
    assert "f.lsmt" in str(exc.value) and "4096" in str(exc.value)
    with pytest.raises(TruncatedError):
        lsmt.LsmtHeader.unpack(b"LSMT", path="f", offset=0)


def test_legacy_uuid_fields_read_as_null() -> None:
    assert lsmt.uuid_from_text(b"\x00" * 37) == lsmt.NULL_UUID
    assert lsmt.uuid_from_text(b"not a uuid at all but 37 bytes long!!") == lsmt.NULL_UUID
    lower = b"b0000000-0000-4000-8000-0000000000b1\x00"
    assert lsmt.format_uuid(lsmt.uuid_from_text(lower)) == "b0000000-0000-4000-8000-0000000000b1"


def test_index_record_is_16_bytes_with_the_spec_bit_layout() -> None:
    # a record of the reference's own files: offset 0, length 8448, moffset 8, data
    raw = bytes.fromhex("0000000000000084" "0800000000000000")
    rec = lsmt.decode_records(raw)
    assert rec["offset"].tolist() == [0] and rec["length"].tolist() == [8448]
    assert rec["moffset"].tolist() == [8] and rec["zeroed"].tolist() == [False]
    again = lsmt.encode_records(rec["offset"], rec["length"], rec["moffset"], rec["zeroed"], rec["tag"])
    assert again == raw and len(again) == lsmt.RECORD_SIZE
    assert lsmt.INVALID_RECORD == bytes.fromhex("FFFFFFFFFFFF0300" "0000000000000000")
    full = lsmt.encode_records(np.array([(1 << 50) - 2]), np.array([16383]), np.array([(1 << 55) - 1]),
                               np.array([True]), np.array([255]))
    back = lsmt.decode_records(full)
    assert back["offset"][0] == (1 << 50) - 2 and back["length"][0] == 16383
    assert back["moffset"][0] == (1 << 55) - 1 and back["zeroed"][0] and back["tag"][0] == 255


def test_zfile_record_is_512_bytes_with_a_verified_digest() -> None:
    h = zf.ZFileHeader(flags=zf.FLAG_DATA | zf.FLAG_SEALED | zf.FLAG_DIGEST, index_offset=1000, index_size=3,
                       original_file_size=12000, index_crc=0x1234, block_size=4096, algo=zf.ALGO_ZSTD)
    raw = h.pack()
    assert len(raw) == zf.RECORD_SIZE == 512
    assert raw[24:28] == (96).to_bytes(4, "little")
    body = bytearray(raw)
    body[28:32] = bytes(4)
    assert int.from_bytes(raw[28:32], "little") == raw_crc32c(body)
    back = zf.ZFileHeader.unpack(raw, path="z", offset=0)
    assert back.with_(digest=0) == h
    bad = bytearray(raw)
    bad[60] ^= 1
    with pytest.raises(ChecksumError):
        zf.ZFileHeader.unpack(bytes(bad), path="z", offset=0)


def test_pax_size_record_counts_itself() -> None:
    assert tarwrap.pax_size_record(639491) == b"15 size=639491\n"  # the record's length counts its own digits
    for n in (0, 9, 99, 12345, 10**12):
        rec = tarwrap.pax_size_record(n)
        assert int(rec.split(b" ")[0]) == len(rec)


def test_envelope_is_a_tar_the_reader_accepts() -> None:
    head, end_at, total = tarwrap.envelope(639491, 0o100644)
    assert len(head) == 1536 and end_at == 1536 + 639491 + (-(1536 + 639491) % 512) and total == end_at + 1024
    assert tarwrap.is_tar(head[:512]) and tarwrap.is_tar(head[1024:1536])
    assert head[1024 + 100 : 1024 + 108] == b"100644 \x00"
    assert head[124:136] == b"         17 "  # the PAX size field of the hello-world sample


@pytest.mark.parametrize("text,value", [("10G", 10 << 30), ("512M", 512 << 20), ("4096", 4096), ("1k", 1024),
                                        ("2GiB", 2 << 30)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(UsageError):
        parse_size("ten gigs")


def test_sibling_index_replaces_the_last_data(tmp_path: Path) -> None:
    for data, index in (("x.data", "x.index"), ("writable_data", "writable_index"), ("data.data", "data.index"),
                        ("data_dir_data", "data_dir_index")):
        (tmp_path / index).write_bytes(b"")
        assert sibling_index(str(tmp_path / data)) == str(tmp_path / index)
    assert sibling_index(str(tmp_path / "missing.data")) is None
    assert sibling_index(str(tmp_path / "x.lsmt")) is None
    assert replace_last("a-data-data", "data", "index") == "a-data-index"
    assert replace_last("abc", "data", "index") == "abc"


def test_field_offsets_come_from_the_declarations_and_match_the_spec_tables() -> None:
    # the LSMT header and ZFile header offsets errors point at
    assert {k: lsmt.FIELD[k] for k in ("size", "flags", "index_offset", "index_size", "virtual_size", "uuid",
                                       "parent_uuid", "version", "user_tag")} == {
        "size": 24, "flags": 28, "index_offset": 32, "index_size": 40, "virtual_size": 48, "uuid": 56,
        "parent_uuid": 93, "version": 132, "user_tag": 134}
    assert lsmt.HEADER_RECORD.size == lsmt.STRUCT_SIZE == 390
    assert {k: zf.FIELD[k] for k in ("digest", "flags", "index_offset", "index_size", "original_file_size",
                                     "index_crc", "block_size", "algo", "use_dict", "dict_size", "verify")} == {
        "digest": 28, "flags": 32, "index_offset": 40, "index_size": 48, "original_file_size": 56, "index_crc": 64,
        "block_size": 72, "algo": 76, "use_dict": 78, "dict_size": 84, "verify": 88}
    assert zf.RECORD.size == zf.STRUCT_SIZE == 96 and zf.RECORD.span("digest") == (28, 32)
