"""Absurd counts and sizes: refused with a typed error before anything is allocated."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlaybd.errors import (
    BadMagicError,
    CorruptIndexError,
    LimitError,
    OverlaybdError,
    UnsupportedError,
)

from ...oracle import (
    LSMT_HEADER,
    ZREC,
    expect_writable,
    lsmt_record_patch,
    parse_zfile,
    raw_crc32c,
    zfile_record_patch,
)
from ..mutations import judge, observe_device
from .common import (
    rw_bench,
)

pytestmark = pytest.mark.fixtures


# -- 3. absurd counts -----------------------------------------------------------------------------------------------

_PROBE = r"""
import json, os, resource, sys
import overlaybd
from overlaybd.formats.detect import peel
from overlaybd.source.file import FileSource
vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))
out = []
for label, mode, path, index in json.loads(sys.argv[1]):
    try:
        if mode == 'stream':
            with FileSource(path) as f:
                z = peel(f).zfile
                z.pread(0, z.size)
        elif mode == 'stack':
            with overlaybd.open_stack([path] * 256) as s:
                pass
        else:
            with overlaybd.open_layer(path, index) as layer:
                layer.pread(0, min(layer.size, 1 << 20))
        out.append([label, None, ''])
    except BaseException as exc:
        out.append([label, type(exc).__name__, str(exc)])
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Absurd:
    label: str
    mode: str  # device | stream | stack
    path: Path
    expected: type[OverlaybdError]
    index: Path | None = None


def _absurd_cases(reference_dir: Path, tmp: Path) -> list[Absurd]:
    cases: list[Absurd] = []
    lsmt = (reference_dir / "a/committed.lsmt").read_bytes()
    t_at = len(lsmt) - LSMT_HEADER

    def lsmt_case(label: str, expected: type[OverlaybdError], **fields: int) -> None:
        p = tmp / f"{label}.lsmt"
        p.write_bytes(lsmt[:t_at] + lsmt_record_patch(lsmt, t_at, **fields))
        cases.append(Absurd(label, "device", p, expected))

    lsmt_case("lsmt-index-size-2^40", LimitError, index_size=1 << 40)
    lsmt_case("lsmt-index-size-2^64-1", LimitError, index_size=(1 << 64) - 1)
    lsmt_case("lsmt-index-size-at-limit", CorruptIndexError, index_size=1_000_000)
    lsmt_case("lsmt-index-offset-2^63", CorruptIndexError, index_offset=1 << 63)
    lsmt_case("lsmt-index-offset-0", CorruptIndexError, index_offset=0)
    # a device beyond the 2^50 sectors index records can address (and beyond what a file offset can hold)
    lsmt_case("lsmt-virtual-size-2^63", LimitError, virtual_size=1 << 63)
    lsmt_case("lsmt-virtual-size-2^64-1", LimitError, virtual_size=(1 << 64) - 1)
    lsmt_case("lsmt-virtual-size-2^59+512", LimitError, virtual_size=(1 << 59) + 512)
    p = tmp / "lsmt-header-virtual-size-2^63.lsmt"
    p.write_bytes(lsmt_record_patch(lsmt, 0, virtual_size=1 << 63) + lsmt[LSMT_HEADER:])
    cases.append(Absurd("lsmt-header-virtual-size-2^63", "device", p, LimitError))

    z = (reference_dir / "c/layer1.lz4.bs4k.zfile").read_bytes()
    lay = parse_zfile(z)

    def zfile_cases(label: str, expected: type[OverlaybdError], **fields: int) -> None:
        # in the trailer (no digest checked there) and in an overwritten header (digest recomputed)
        p = tmp / f"{label}.trailer.zfile"
        p.write_bytes(z[: lay.info_at] + zfile_record_patch(z, lay.info_at, fix_digest=True, **fields))
        cases.append(Absurd(label + " (trailer)", "stream", p, expected))
        hdr_fields = {"flags": 0x1B, "index_offset": lay.index_offset, "index_size": lay.nblocks,
                      "original_file_size": lay.original_size, "index_crc": struct.unpack_from("<I", z,
                                                                                              lay.info_at + 64)[0]}
        hdr_fields.update(fields)
        p = tmp / f"{label}.header.zfile"
        p.write_bytes(zfile_record_patch(z, 0, fix_digest=True, **hdr_fields) + z[ZREC:])
        cases.append(Absurd(label + " (overwritten header)", "stream", p, expected))

    zfile_cases("zfile-index-size-2^40", LimitError, index_size=1 << 40)
    zfile_cases("zfile-index-size-2^32", LimitError, index_size=1 << 32)
    zfile_cases("zfile-index-size-10^9", CorruptIndexError, index_size=10**9, original_file_size=10**9 * 4096)
    zfile_cases("zfile-index-offset-2^63", CorruptIndexError, index_offset=1 << 63)
    zfile_cases("zfile-original-size-2^63", CorruptIndexError, original_file_size=1 << 63)
    for bs in (0, 3, 256, 4095, 131072, 1 << 31, (1 << 32) - 1):
        zfile_cases(f"zfile-block-size-{bs}", UnsupportedError, block_size=bs)
    for algo in (0, 3, 7, 255):
        zfile_cases(f"zfile-algo-{algo}", UnsupportedError, algo=algo)
    zfile_cases("zfile-dict-size-1", UnsupportedError, dict_size=1)
    zfile_cases("zfile-dict-size-2^31", UnsupportedError, dict_size=1 << 31)
    zfile_cases("zfile-use-dict", UnsupportedError, use_dict=1)

    # a jump-table entry of 0xFFFFFFFF, and one of 0, with index_crc made to match
    for label, value in (("zfile-jump-entry-ffffffff", 0xFFFFFFFF), ("zfile-jump-entry-0", 0),
                         ("zfile-jump-entry-crc-only", 4)):
        table = bytearray(z[lay.index_offset : lay.info_at])
        struct.pack_into("<I", table, 4 * 3, value)
        p = tmp / f"{label}.zfile"
        p.write_bytes(z[: lay.index_offset] + bytes(table) +
                      zfile_record_patch(z, lay.info_at, fix_digest=True, index_crc=raw_crc32c(table)))
        cases.append(Absurd(label, "stream", p, CorruptIndexError))

    # three blocks' stored bytes given to one (the sum still right, index_crc matching): longer than any 4 KiB
    # block can compress to, so refused at open instead of handed to the codec
    table = bytearray(z[lay.index_offset : lay.info_at])
    entries = list(struct.unpack_from("<3I", table, 4 * 3))
    struct.pack_into("<3I", table, 4 * 3, sum(entries) - 10, 5, 5)
    p = tmp / "zfile-jump-entry-over-the-codec-bound.zfile"
    p.write_bytes(z[: lay.index_offset] + bytes(table) +
                  zfile_record_patch(z, lay.info_at, fix_digest=True, index_crc=raw_crc32c(table)))
    cases.append(Absurd("zfile-jump-entry-over-the-codec-bound", "stream", p, CorruptIndexError))

    # 10^9 blocks whose 4 GB jump table fits in a sparse file, but whose data area (8 bytes) cannot hold them:
    # refused before the table is read
    p = tmp / "zfile-10^9-blocks-in-8-bytes.zfile"
    with open(p, "wb") as f:
        f.write(zfile_record_patch(z, 0, fix_digest=True, flags=0x1B, index_offset=ZREC + 8, index_size=10**9,
                                   original_file_size=10**9 * 4096, index_crc=0))
        f.truncate(ZREC + 8 + 4 * 10**9)
    cases.append(Absurd("zfile-10^9-blocks-in-8-bytes", "stream", p, CorruptIndexError))

    # writable pair: an index file holding 128,000,001 records (a sparse 2 GB file): refused before reading it
    rw_data = tmp / "big.data"
    rw_index = tmp / "big.index"
    shutil.copyfile(reference_dir / "a/rw.data", rw_data)
    shutil.copyfile(reference_dir / "a/rw.index", rw_index)
    os.truncate(rw_index, LSMT_HEADER + 16 * (128_000_000 + 1))
    cases.append(Absurd("rw-index-128M+1-records", "device", rw_data, LimitError, rw_index))
    idx = (reference_dir / "a/rw.index").read_bytes()
    for label, fields in (("rw-index-header-index-offset-2^40", {"index_offset": 1 << 40}),
                          ("rw-index-header-flags-sealed", {"flags": 0x05})):
        p = tmp / f"{label}.index"
        p.write_bytes(lsmt_record_patch(idx, 0, **fields) + idx[LSMT_HEADER:])
        cases.append(Absurd(label, "device", rw_data, BadMagicError, p))

    data = (reference_dir / "a/rw.data").read_bytes()
    p = tmp / "rw-virtual-size-2^63.data"
    p.write_bytes(lsmt_record_patch(data, 0, virtual_size=1 << 63) + data[LSMT_HEADER:])
    cases.append(Absurd("rw-virtual-size-2^63", "device", p, LimitError, reference_dir / "a/rw.index"))

    # tar envelopes whose extended headers claim 1.5 GiB (sparse files): refused before they are read
    for kind in (b"x", b"g", b"L", b"K"):
        cases.append(Absurd(f"tar-{kind.decode()}-header-1.5GiB", "device", _huge_extended_header(tmp, kind),
                            LimitError))

    # a stack of 256 layers (the limit is 255)
    cases.append(Absurd("stack-256-layers", "stack", reference_dir / "b/layer2.lsmt", LimitError))
    return cases


def _huge_extended_header(tmp: Path, kind: bytes) -> Path:
    """A sparse 1.5 GiB tar whose first header is an extended header (PAX or GNU) of 1.5 GiB."""
    size = 3 << 29
    hdr = bytearray(512)
    hdr[0:13] = b"././@LongLink"
    hdr[124:136] = b"%11o " % size
    hdr[156:157] = kind
    hdr[257:265] = b"ustar\x0000"
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%6o \x00" % sum(hdr)
    path = tmp / f"huge-{kind.decode()}.tar"
    with open(path, "wb") as f:
        f.write(hdr)
        f.truncate(512 + size + 1024)
    return path


def test_absurd_counts_refused_before_allocating(reference_dir: Path, tmp_path: Path) -> None:
    """Run in a child whose address space is capped at its start-up size + 512 MiB: honouring any of these
    counts would need gigabytes (or exabytes), so the right typed error must come back first."""
    cases = _absurd_cases(reference_dir, tmp_path)
    arg = json.dumps([[c.label, c.mode, str(c.path), None if c.index is None else str(c.index)] for c in cases])
    proc = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = {label: (exc, msg) for label, exc, msg in json.loads(proc.stdout)}
    problems = []
    for c in cases:
        exc, msg = results[c.label]
        if exc != c.expected.__name__:
            problems.append(f"{c.label}: expected {c.expected.__name__}, got {exc}: {msg}")
        elif c.mode != "stack" and str(c.path) not in msg and (c.index is None or str(c.index) not in msg):
            problems.append(f"{c.label}: message does not name the file: {msg}")
    assert not problems, "\n".join(problems)


def test_absurd_writable_index_header_fields_are_ignored(reference_dir: Path, rw_pair: tuple[bytes, bytes],
                                                         tmp_path: Path) -> None:
    """The record count of a writable index comes from the file's size, not from its header."""
    data, index = rw_pair
    dbench, ibench = rw_bench(reference_dir, tmp_path)
    for fields in ({"index_size": 1 << 62}, {"virtual_size": (1 << 64) - 1}):
        patch = lsmt_record_patch(index, 0, **fields)
        with ibench.patched(0, patch) as ibuf:
            exp = expect_writable(data, ibuf)
            problem = judge(exp, observe_device(dbench.path, ibench.path), (str(ibench.path),))
            assert problem is None, (fields, problem)
