"""The base layer of an image converted without mkfs: overlaybd's ``ext4_64`` (a 64 GiB ext4, a ZFile'd LSMT layer),
uploaded as the reference convertor uploads it: in a tar that Go's ``archive/tar`` writes for one file named
``overlaybd.commit`` (mode 0444, no owner, time 0, USTAR), payload at 512, two zero blocks at the end."""

from __future__ import annotations

import os

from ..formats.output import Written, write_atomically
from ..source.file import write_all

DEFAULT_PATH = "/opt/overlaybd/baselayers/ext4_64"
NAME = b"overlaybd.commit"
BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    """Go's ``formatOctal``: zero-padded octal digits and a NUL in ``width`` bytes."""
    digits = f"{value:o}".encode()
    if len(digits) > width - 1:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return digits.rjust(width - 1, b"0") + b"\0"


def go_ustar_header(size: int) -> bytes:
    """The 512-byte header Go writes for ``tar.Header{Name: "overlaybd.commit", Mode: 0444, Size: size,
    Typeflag: TypeReg}`` (pure)."""
    h = bytearray(BLOCK)
    h[0 : len(NAME)] = NAME
    h[100:108] = _octal(0o444, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[148:156] = b" " * 8
    checksum = sum(h)
    h[148:156] = _octal(checksum, 7) + b" "
    return bytes(h)


def wrap(src: str, dst: str) -> Written:
    """``dst``: the base layer file ``src`` in Go's tar envelope."""
    size = os.path.getsize(src)

    def produce(fd: int, base: int) -> int:
        write_all(fd, go_ustar_header(size), 0, dst)
        pos = BLOCK
        with open(src, "rb") as f:
            while chunk := f.read(4 << 20):
                write_all(fd, chunk, pos, dst)
                pos += len(chunk)
        end = BLOCK + -(-size // BLOCK) * BLOCK
        write_all(fd, bytes(end - pos + 2 * BLOCK), pos, dst)
        return end + 2 * BLOCK

    return write_atomically(dst, produce)
