"""The payloads of ``MANIFEST.json`` ``layer_ops``, exactly as its ``payload_kinds`` defines them.

* ``rand``:  ``hashlib.shake_256(seed.encode()).digest(n)``
* ``text``:  ``'%s line %08d: the quick brown fox jumps over the lazy dog\\n' % (seed, i)`` for i = 0, 1, ...,
  concatenated and truncated to n bytes
* ``mixed``: 4 KiB chunks i = 0, 1, ...: ``rand('%s/%d' % (seed, i), 4096)`` for even i,
  ``text('%s/%d' % (seed, i), 4096)`` for odd i, concatenated and truncated to n bytes
* ``zero``:  n zero bytes (written as DATA, not as a discard)

Also: applying a layer's operations to a writable layer and to a plain bytearray (the ground truth), and hashing
a whole device or file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

CHUNK = 4096
TEXT_LINE = "%s line %08d: the quick brown fox jumps over the lazy dog\n"


def rand(seed: str, n: int) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(n)


def text(seed: str, n: int) -> bytes:
    parts: list[bytes] = []
    have = 0
    i = 0
    while have < n:
        line = (TEXT_LINE % (seed, i)).encode()
        parts.append(line)
        have += len(line)
        i += 1
    return b"".join(parts)[:n]


def mixed(seed: str, n: int) -> bytes:
    parts: list[bytes] = []
    have = 0
    i = 0
    while have < n:
        sub = "%s/%d" % (seed, i)  # noqa: UP031 - the manifest defines the seed with %-formatting
        parts.append(rand(sub, CHUNK) if i % 2 == 0 else text(sub, CHUNK))
        have += CHUNK
        i += 1
    return b"".join(parts)[:n]


def zero(seed: str, n: int) -> bytes:
    del seed
    return bytes(n)


KINDS = {"rand": rand, "text": text, "mixed": mixed, "zero": zero}


def payload(kind: str, seed: str, n: int) -> bytes:
    try:
        make = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown payload kind {kind!r}") from None
    return make(seed, n)


def op_payload(op: Mapping[str, Any]) -> bytes:
    return payload(op["kind"], op["seed"], op["length"])


def apply_ops(target: Any, ops: Iterable[Mapping[str, Any]]) -> None:
    """Apply ``write`` (pwrite) and ``discard`` (trim) operations, in order, to a writable BlockSource."""
    for op in ops:
        if op["op"] == "write":
            target.pwrite(op["offset"], op_payload(op))
        elif op["op"] == "discard":
            target.trim(op["offset"], op["length"])
        else:
            raise ValueError(f"unknown operation {op['op']!r}")


def apply_ops_to_buffer(buf: bytearray, ops: Iterable[Mapping[str, Any]]) -> None:
    """The same operations on a plain buffer: discarded ranges read as zeros."""
    for op in ops:
        start, length = op["offset"], op["length"]
        if op["op"] == "write":
            buf[start : start + length] = op_payload(op)
        elif op["op"] == "discard":
            buf[start : start + length] = bytes(length)
        else:
            raise ValueError(f"unknown operation {op['op']!r}")


HASH_CHUNK = 4 << 20


def device_sha256(src: Any, chunk: int = HASH_CHUNK) -> tuple[int, str]:
    """(size, sha256 hex) of a whole BlockSource, read with ``pread`` in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    size = src.size
    pos = 0
    while pos < size:
        n = min(chunk, size - pos)
        data = src.pread(pos, n)
        assert len(data) == n, f"short read at {pos}: {len(data)} of {n} bytes"
        digest.update(data)
        pos += n
    return size, digest.hexdigest()


def file_sha256(path: Any) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
