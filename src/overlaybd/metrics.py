"""What a running server counts, and where the counting goes.

The metric set (names, labels, units) is defined here, on the bottom floor, together with :class:`Recorder`, whose
methods do nothing: the default, so that the cache, the registry client and the servers count at no cost unless
someone listens. ``overlaybd.export.prometheus.PrometheusMetrics`` is the recorder that keeps the figures (a
Prometheus registry of its own per server).

Which recorder counts: the servers hold theirs and call it directly. The layers below them (the cache, the
registry client) do not know which server a read is for; they call :func:`current`: the recorder bound to the
running context (:func:`bind`: a server binds its recorder in its event loop's tasks and in its worker threads),
else the process's (:func:`set_default`: a command-line server, one per process, makes its recorder the process's,
so threads nobody bound, such as the trace prefetch or a background download, count there too), else the no-op.
"""

from __future__ import annotations

import contextvars
import errno
from collections.abc import Callable
from typing import Any

# -- the metric set: name, help, label names ------------------------------------------------------------------------
REQUESTS = ("overlaybd_requests_total", "Requests served, by command (NBD READ, WRITE, ...; FUSE read, write, ...)",
            ("command",))
REQUEST_BYTES = ("overlaybd_request_bytes_total", "Bytes of the ranges of successful requests, by command",
                 ("command",))
REQUEST_SECONDS = ("overlaybd_request_seconds", "Time from a request's start to its reply being sent, by command",
                   ("command",))
ERRORS = ("overlaybd_request_errors_total", "Requests that failed, by command and the errno the client got",
          ("command", "errno"))
CACHE_HITS = ("overlaybd_cache_hits_total", "Reads of remote blocks served from the local cache", ())
CACHE_MISSES = ("overlaybd_cache_misses_total", "Reads of remote blocks that had to fetch from the repository", ())
REGISTRY_BYTES = ("overlaybd_registry_bytes_total", "Body bytes received from a registry, by registry host",
                  ("host",))
REGISTRY_RETRIES = ("overlaybd_registry_retries_total", "Registry requests made again after a failed attempt "
                    "(connection error, 5xx, 429, body cut short), by registry host", ("host",))
INFLIGHT_BYTES = ("overlaybd_inflight_bytes", "Bytes held for requests in flight (read buffers, replies not yet "
                  "sent, write payloads), all connections together", ())
INFLIGHT_LIMIT = ("overlaybd_inflight_bytes_limit", "The most bytes requests may hold in flight "
                  "(--max-inflight-total)", ())
CONNECTIONS = ("overlaybd_connections", "Client connections open", ())
# latency buckets, seconds: a 4 KiB read from the page cache takes tens of microseconds, a lazy fetch seconds
BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
           2.5, 5.0, 10.0)


def errno_name(code: int) -> str:
    """``EIO`` for 5; the number as text for one without a name."""
    return errno.errorcode.get(code, str(code))


class Recorder:
    """Receives what happens; every method does nothing. Subclasses keep figures; they must be thread-safe (the
    cache and the registry client count from any thread)."""

    __slots__ = ()

    #: does this recorder keep anything? (callers may skip measuring, e.g. reading the clock, when not)
    active = False

    def request(self, command: str, nbytes: int, seconds: float, error: int = 0) -> None:
        """A request done: ``nbytes`` moved (counted only when it succeeded), ``error`` the errno it failed with
        (0: it succeeded)."""

    def cache_hit(self) -> None:
        """A read of a remote blob found its bytes in the cache."""

    def cache_miss(self) -> None:
        """A read of a remote blob had to fetch some of them from the repository."""

    def fetched(self, host: str, nbytes: int) -> None:
        """``nbytes`` of a body arrived from the registry at ``host``."""

    def retried(self, host: str) -> None:
        """An attempt at the registry at ``host`` failed, and another is about to be made."""

    def watch(self, connections: Callable[[], float], inflight: Callable[[], float], inflight_limit: float) -> None:
        """A server's gauges, to be read when the figures are: connections open, bytes in flight, their limit."""

    def figures(self) -> dict[str, Any]:
        """Every figure kept, as ``overlaybd stats --output json`` prints it (none here)."""
        return {}


NULL = Recorder()
_bound: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("overlaybd_metrics", default=None)
_process: list[Recorder] = [NULL]


def current() -> Recorder:
    """The recorder for what runs here: the context's, else the process's, else the no-op."""
    bound = _bound.get()
    return bound if bound is not None else _process[0]


def bind(recorder: Recorder | None) -> None:
    """Make ``recorder`` this context's (the current thread's, or the running task's and the tasks it starts);
    None unbinds. Usable as a thread pool's initializer."""
    _bound.set(recorder)


def set_default(recorder: Recorder | None) -> None:
    """Make ``recorder`` the process's (None: back to the no-op)."""
    _process[0] = recorder if recorder is not None else NULL
