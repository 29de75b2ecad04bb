"""What the bad-input tests share: the fixtures they mutate, their unmutated baselines, and helpers."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...oracle import (
    BytesImage,
    Expectation,
    LsmtImage,
    ZLayout,
)
from ..mutations import Failures, Workbench, judge, observe_device, observe_stream

RAW_LSMT = ("a/committed.lsmt", "a/sealed.lsmt", "b/layer2.lsmt")
LSMT_ZFILES = ("c/layer1.lz4.bs4k.zfile", "c/layer1.zstd.bs64k.zfile", "c/layer1.lz4.bs4k.nocrc.zfile",
               "d/merged.zfile")
RAW_ZFILE = "c/raw_odd.lz4.bs4k.zfile"
TAR = "c/layer1.lz4.bs4k.zfile.tar"
ZFILES = (*LSMT_ZFILES, RAW_ZFILE)
XORS = (0xFF, 0x01)


@dataclass
class Baseline:
    """What an unmutated fixture holds, from the independent parsers (checked against the manifest in conftest)."""

    rel: str
    path: Path
    data: bytes
    zlayout: ZLayout | None = None
    stream: BytesImage | None = None  # the decompressed ZFile
    device: LsmtImage | None = None  # the LSMT device (None for the raw ZFile)


def device_sha(manifest: dict[str, Any], rel: str) -> str:
    for case in manifest["cases"]:
        files = case["files"]
        if files.get("layers") == [rel] or files.get("zfile") == rel:
            return str(case["expected"]["sha256"])
    raise KeyError(rel)


def seeded_rng(label: str) -> random.Random:
    return random.Random(zlib.crc32(label.encode()))


def judge_stream_and_device(fails: Failures, what: str, path: Path, stream_exp: Expectation | None,
                             device_exp: Expectation | None) -> None:
    names = (str(path),)
    if stream_exp is not None:
        fails.add(what + " [stream]", judge(stream_exp, observe_stream(path), names))
    if device_exp is not None:
        fails.add(what + " [device]", judge(device_exp, observe_device(path), names))


def rw_bench(reference_dir: Path, tmp_path: Path) -> tuple[Workbench, Workbench]:
    return (Workbench(reference_dir / "a/rw.data", tmp_path / "rw.data"),
            Workbench(reference_dir / "a/rw.index", tmp_path / "rw.index"))


def zfile_flip_targets(lay: ZLayout, rng: random.Random) -> list[tuple[str, int]]:
    """(label, offset relative to the ZFile) of every byte of the meaningful record fields, sampled padding,
    sampled jump-table entries, and sampled bytes of sampled blocks (first, CRC, last)."""
    out: list[tuple[str, int]] = []
    rec_offs = list(range(0, 96)) + [96, 200, 511] + rng.sample(range(97, 511), 3)
    out += [(f"header+{o}", o) for o in rec_offs]
    if not lay.overwritten:
        out += [(f"trailer+{o}", lay.info_at + o) for o in rec_offs]
    n = lay.nblocks
    blocks = sorted({0, 1, n // 2, n - 1} | set(rng.sample(range(n), min(n, 4))))
    for k in blocks:
        a, z = lay.starts[k], lay.starts[k + 1]
        inside = {a, a + 1, (a + z) // 2, z - 5, z - 4, z - 1, rng.randrange(a, z)}
        out += [(f"block {k} +{o - a} of {z - a}", o) for o in sorted(x for x in inside if a <= x < z)]
    entries = sorted({0, 1, n // 2, n - 1} | set(rng.sample(range(n), min(n, 3))))
    for e in entries:
        out += [(f"jump entry {e} byte {j}", lay.index_offset + 4 * e + j) for j in range(4)]
    return out
