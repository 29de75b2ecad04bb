"""A few threads working through a queue of calls: what the ZFile writer and extractor took from
``concurrent.futures``, without it (its import loads ``logging`` and ``traceback``: about a tenth of what the
``zfile`` commands spent starting).

``Workers(n, name)`` starts ``n`` threads; ``submit(fn, *args)`` queues a call and returns its ``Task``, whose
``result()`` waits for it and returns its value or raises what it raised; ``cancel()`` drops a call that has not
started. Leaving the ``with`` (or ``close``) runs every call still queued and not cancelled, then joins the
threads.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any

_WAITING, _STARTED, _CANCELLED = 0, 1, 2
_state_lock = threading.Lock()


class CancelledError(Exception):
    """``result()`` of a task that was cancelled before it started."""


class Task:
    __slots__ = ("_fn", "_args", "_done", "_value", "_error", "_state")

    def __init__(self, fn: Callable[..., Any], args: tuple[object, ...]) -> None:
        self._fn = fn
        self._args = args
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._state = _WAITING

    def _run(self) -> None:
        with _state_lock:
            if self._state != _WAITING:
                return
            self._state = _STARTED
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # handed to whoever asks for the result, as a future does
            self._error = exc
        finally:
            self._done.set()

    def cancel(self) -> bool:
        """Drop the call if it has not started; whether it is (now) cancelled."""
        with _state_lock:
            if self._state == _WAITING:
                self._state = _CANCELLED
            elif self._state == _STARTED:
                return False
        self._done.set()
        return True

    def result(self) -> Any:
        self._done.wait()
        if self._state == _CANCELLED:
            raise CancelledError
        if self._error is not None:
            raise self._error
        return self._value


class Workers:
    def __init__(self, n: int, name: str) -> None:
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}_{k}", daemon=True) for k in range(n)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            task._run()

    def submit(self, fn: Callable[..., Any], *args: object) -> Task:
        task = Task(fn, args)
        self._queue.put(task)
        return task

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
