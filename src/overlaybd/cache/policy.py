"""How the cache behaves, in one object passed to it (tests and benchmarks set theirs the same way)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..sizes import parse_size

DEFAULT_MAX_BYTES = 4 << 30


def default_dir() -> str:
    """``$OVERLAYBD_CACHE_DIR``; else ``/var/cache/overlaybd`` as root, ``$XDG_CACHE_HOME/overlaybd`` otherwise."""
    env = os.environ.get("OVERLAYBD_CACHE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/overlaybd"
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "overlaybd")


def default_max_bytes() -> int:
    """``$OVERLAYBD_CACHE_SIZE`` (e.g. ``10G``), else 4 GiB."""
    env = os.environ.get("OVERLAYBD_CACHE_SIZE")
    return parse_size(env) if env else DEFAULT_MAX_BYTES


@dataclass(frozen=True, slots=True)
class CachePolicy:
    #: bytes a map byte stands for: small enough that a random read fetches little more than it needs
    chunk: int = 64 * 1024
    #: chunks fetched ahead, only for reads that continue where the last one ended (3 MiB)
    readahead_chunks: int = 48
    #: read ahead on every miss, not only a sequential one (how the cache worked before; for comparisons)
    readahead_always: bool = False
    #: one range request fetches at most this many chunks (4 MiB)
    max_run_chunks: int = 64
    #: range requests one read may have in flight at once
    concurrency: int = 4
    #: an entry's last use is noted at most this often (seconds); it orders eviction
    touch_every: float = 1.0
    #: the bound; reads prune least recently used entries down to 90 % of it when it is passed
    max_bytes: int = field(default_factory=default_max_bytes)
