"""Sizes as people write them (``10G``, ``512M``, ``4096``) and as they read them (``1.5 GiB``): binary units,
as qemu-img."""

from __future__ import annotations

import re

from .errors import UsageError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b?)?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``4096`` (bytes)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"not a size: {text!r} (try 10G, 512M or a number of bytes)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"
