"""Every problem the fuzzer found, as ``(seed, steps)``: replayed on every run (``test_fuzz.py``).

The comment above each says what went wrong before the fix.
"""

from __future__ import annotations

from typing import Any

REGRESSIONS: list[tuple[str, list[tuple[str, str, dict[str, Any]]]]] = [
    # cat ended in an OverflowError traceback and check said ok: virtual size 2^63 in header and trailer
    ("b/layer2.lsmt", [
        ("lsmt_field", "layer2.lsmt", {"record": "header", "field": "virtual_size", "value": 1 << 63}),
        ("lsmt_field", "layer2.lsmt", {"record": "trailer", "field": "virtual_size", "value": 1 << 63})]),
    # the Python block path took a zstd block with a byte of the next one after its frame (no CRC to tell); the C
    # path refused it: the two paths disagreed on check and cat
    ("c/layer1.zstd.bs64k.nocrc.zfile", [("jump_shift", "layer1.zstd.bs64k.nocrc.zfile", {"k": 7, "delta": 1})]),
    ("c/layer1.zstd.bs64k.nocrc.zfile", [("jump_shift", "layer1.zstd.bs64k.nocrc.zfile", {"k": 8, "delta": 100})]),
    # a flipped magic byte made the file 'raw': check said ok, cat and map refused it
    ("c/layer1.zstd.bs4k.zfile", [("flip", "layer1.zstd.bs4k.zfile", {"at": 11, "xor": 255})]),
    ("c/layer1.lz4.bs4k.zfile.tar", [("flip", "layer1.lz4.bs4k.zfile.tar", {"at": 1541, "xor": 255})]),
    ("c/raw_odd.lz4.bs4k.zfile", [("flip", "raw_odd.lz4.bs4k.zfile", {"at": 9, "xor": 27})]),
]
