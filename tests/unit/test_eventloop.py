"""serve's event loop: uvloop's where installed (a dependency on Linux), asyncio's with OVERLAYBD_UVLOOP=0; and
what the connection queues in a transport never holds a view of a pooled buffer (uvloop's transports keep what
they are given: views of our buffers kept the server's memory after its clients left)."""

from __future__ import annotations

import asyncio
import mmap

import pytest

from overlaybd.export import eventloop
from overlaybd.export.nbd.connection import _owned


def test_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is a dependency of pyoverlaybd on Linux")
    monkeypatch.delenv("OVERLAYBD_UVLOOP", raising=False)
    loop = eventloop.new_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert eventloop.describe() == "uvloop"
    assert eventloop.run(asyncio.sleep(0, "done")) == "done"


def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAYBD_UVLOOP", "0")
    loop = eventloop.new_loop()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
    finally:
        loop.close()
    assert eventloop.describe() == "asyncio (OVERLAYBD_UVLOOP=0)"


def test_what_a_transport_keeps_is_never_a_view_of_a_pooled_buffer() -> None:
    head = b"header"
    assert _owned(head, 0) is head  # immutable: queued as it is
    assert bytes(_owned(head, 2)) == b"ader"
    mem = mmap.mmap(-1, 4096)
    mem[:5] = b"hello"
    view = memoryview(mem)
    kept = _owned(view, 1)
    assert type(kept) is bytes and kept[:4] == b"ello" and len(kept) == 4095
    view.release()
    mem.close()  # no view of it is left: the pool could unmap it or hand it out again
    assert kept[:4] == b"ello"
