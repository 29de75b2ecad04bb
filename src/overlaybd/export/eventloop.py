"""The event loop the NBD server runs on: uvloop's (libuv, in C) where it is installed, asyncio's own otherwise or
with ``OVERLAYBD_UVLOOP=0``.

Every turn of the loop costs the server something on each request it serves at queue depth 1 (waiting, reading the
socket, calling the protocol): uvloop does that in C. Measured beside asyncio's loop on the same server, random 4 KiB
reads at QD1: 10-15 % more a second, 10-20 % less CPU per read (BENCHMARKS.md). The server uses only the loop's
public interface and its transports' (``get_extra_info("socket")``, write buffer sizes), which both loops have.
"""

from __future__ import annotations

import importlib.util
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:  # asyncio is imported when a loop is made: --version names the loop without loading it
    import asyncio
    from collections.abc import Coroutine
    from typing import Any, TypeVar

    T = TypeVar("T")


def _uvloop() -> Any:
    if os.environ.get("OVERLAYBD_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the kind the server runs on."""
    import asyncio

    uvloop = _uvloop()
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop of the kind the server runs on."""
    import asyncio

    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)


def describe() -> str:
    """Which loop ``serve`` runs on (``overlaybd --version``), without importing it (start-up stays short)."""
    if os.environ.get("OVERLAYBD_UVLOOP", "1") == "0":
        return "asyncio (OVERLAYBD_UVLOOP=0)"
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio (uvloop is not installed)"
