"""What qemu-img tells about and does with disk images (qcow2 and backing chains), through its JSON output."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from .errors import LayerIOError, UsageError

QCOW2_MAGIC = b"QFI\xfb"


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise UsageError("qcow2 needs qemu-img (Debian package qemu-utils)")
    return path


def run(args: list[str]) -> str:
    cmd = [qemu_img(), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode:
        raise LayerIOError(f"qemu-img {args[0]} failed: {res.stderr.strip() or res.returncode}", path=cmd[-1])
    return res.stdout


def is_qcow2(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == QCOW2_MAGIC


def backing_chain(path: str) -> list[dict[str, Any]]:
    """The images of ``path``'s backing chain, bottom (the base) to top (``path``), as ``qemu-img info`` gives
    them (``filename``, ``format``, ``virtual-size``, ...)."""
    chain: list[dict[str, Any]] = json.loads(run(["info", "--backing-chain", "--output=json", path]))
    return chain[::-1]


def own_ranges(path: str, fmt: str) -> list[tuple[int, int, bool]]:
    """``(offset, length, zero)`` of what image ``path`` itself holds, not its backing files: its data clusters,
    and the clusters it marks as zero (which hide what is below)."""
    out = []
    for e in json.loads(run(["map", "--output=json", "-f", fmt, path])):
        if int(e.get("depth", 0)) != 0 or not e.get("present", e.get("data", False) or e.get("zero", False)):
            continue
        if e.get("data"):
            out.append((int(e["start"]), int(e["length"]), False))
        elif e.get("zero"):
            out.append((int(e["start"]), int(e["length"]), True))
    return out


def to_raw(path: str, fmt: str, dest: str) -> None:
    """The image as its guest sees it (backing files included), into a sparse raw file."""
    run(["convert", "-f", fmt, "-O", "raw", "-S", "4k", path, dest])


def from_raw(src: str, dest: str) -> None:
    run(["convert", "-f", "raw", "-O", "qcow2", src, dest])


def is_chained(path: str) -> bool:
    return is_qcow2(path) and len(backing_chain(path)) > 1


def image_format(path: str) -> str:
    return "qcow2" if is_qcow2(path) else "raw"


__all__ = ["backing_chain", "from_raw", "image_format", "is_chained", "is_qcow2", "own_ranges", "to_raw"]
