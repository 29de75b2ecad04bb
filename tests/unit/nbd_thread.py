"""An NBD server on a Unix socket, its event loop in a thread of the test process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from overlaybd.export import eventloop
from overlaybd.export.nbd.server import NbdServer


@contextmanager
def listening(srv: NbdServer, path: str) -> Iterator[None]:
    """``srv`` listening on ``path`` until the block ends, on the kind of loop ``overlaybd serve`` runs on; then
    closed, its loop stopped and closed."""
    loop = eventloop.new_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.listen_unix(path))
        started.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        if not t.is_alive():
            loop.close()
