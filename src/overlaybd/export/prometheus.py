"""The figures of :mod:`overlaybd.metrics`, kept in a Prometheus registry of their own (one per server, so that
servers in one process, and tests, do not mix), served over HTTP for Prometheus to scrape (``serve --metrics
HOST:PORT``), and summed up as JSON for ``overlaybd stats``.

``prometheus-client`` is an extra (``pyoverlaybd[metrics]``): only the command line's ``--metrics`` loads this
module.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .. import metrics
from ..errors import UsageError
from ..metrics import BUCKETS, Recorder, errno_name

_LE = (*(repr(float(b)) for b in BUCKETS), "+Inf")  # the buckets' upper bounds, as Prometheus writes them


class _Command:
    """One command's figures."""

    __slots__ = ("buckets", "bytes", "count", "errors", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)  # not cumulative; the last is past the largest bound
        self.errors: dict[int, int] = {}


class PrometheusMetrics(Recorder):
    """A recorder that keeps every figure, served by ``self.registry``. Counting is a few additions under a lock
    (a request costs well under a microsecond); the Prometheus families are made when scraped."""

    active = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: dict[str, _Command] = {}
        self._hits = 0
        self._misses = 0
        self._fetched: dict[str, int] = {}
        self._retries: dict[str, int] = {}
        self._gauges: tuple[Callable[[], float], Callable[[], float], float] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def watch(self, connections: Callable[[], float], inflight: Callable[[], float], inflight_limit: float) -> None:
        self._gauges = (connections, inflight, inflight_limit)

    # -- counting (any thread) -------------------------------------------------------------------------------------
    def request(self, command: str, nbytes: int, seconds: float, error: int = 0) -> None:
        with self._lock:
            c = self._commands.get(command)
            if c is None:
                c = self._commands[command] = _Command()
            c.count += 1
            c.seconds += seconds
            c.buckets[bisect_left(BUCKETS, seconds)] += 1
            if error:
                c.errors[error] = c.errors.get(error, 0) + 1
            else:
                c.bytes += nbytes

    def cache_hit(self) -> None:
        with self._lock:
            self._hits += 1

    def cache_miss(self) -> None:
        with self._lock:
            self._misses += 1

    def fetched(self, host: str, nbytes: int) -> None:
        with self._lock:
            self._fetched[host] = self._fetched.get(host, 0) + nbytes

    def retried(self, host: str) -> None:
        with self._lock:
            self._retries[host] = self._retries.get(host, 0) + 1

    # -- reading ---------------------------------------------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        """Every figure, as ``overlaybd stats --output json`` prints it: what Prometheus scrapes, summed up."""
        with self._lock:
            out: dict[str, Any] = {
                "requests": {name: {"count": c.count, "bytes": c.bytes,
                                    "errors": {errno_name(e): n for e, n in sorted(c.errors.items())},
                                    "seconds": c.seconds} for name, c in self._commands.items()},
                "cache": {"hits": self._hits, "misses": self._misses},
                "registries": {host: {"bytes": self._fetched.get(host, 0), "retries": self._retries.get(host, 0)}
                               for host in sorted({*self._fetched, *self._retries})},
            }
        if self._gauges is not None:
            connections, inflight, limit = self._gauges
            out.update(connections=int(connections()), inflight_bytes=int(inflight()),
                       inflight_bytes_limit=int(limit))
        return out

    def collect(self) -> Iterator[Metric]:
        """The Prometheus families (the registry calls this when scraped)."""
        with self._lock:
            commands = {name: (c.count, c.bytes, c.seconds, list(c.buckets), dict(c.errors))
                        for name, c in self._commands.items()}
            hits, misses = self._hits, self._misses
            fetched, retries = dict(self._fetched), dict(self._retries)
        requests = CounterMetricFamily(*metrics.REQUESTS[:2], labels=metrics.REQUESTS[2])
        moved = CounterMetricFamily(*metrics.REQUEST_BYTES[:2], labels=metrics.REQUEST_BYTES[2])
        latency = HistogramMetricFamily(*metrics.REQUEST_SECONDS[:2], labels=metrics.REQUEST_SECONDS[2])
        errors = CounterMetricFamily(*metrics.ERRORS[:2], labels=metrics.ERRORS[2])
        for name, (count, nbytes, seconds, buckets, failed) in sorted(commands.items()):
            requests.add_metric([name], count)
            moved.add_metric([name], nbytes)
            cumulative, total = [], 0
            for bound, n in zip(_LE, buckets, strict=True):
                total += n
                cumulative.append((bound, float(total)))
            latency.add_metric([name], cumulative, seconds)
            for code, n in sorted(failed.items()):
                errors.add_metric([name, errno_name(code)], n)
        yield from (requests, moved, latency, errors)
        yield CounterMetricFamily(*metrics.CACHE_HITS[:2], value=hits)
        yield CounterMetricFamily(*metrics.CACHE_MISSES[:2], value=misses)
        for spec, table in ((metrics.REGISTRY_BYTES, fetched), (metrics.REGISTRY_RETRIES, retries)):
            family = CounterMetricFamily(*spec[:2], labels=spec[2])
            for host, n in sorted(table.items()):
                family.add_metric([host], n)
            yield family
        if self._gauges is not None:
            connections, inflight, limit = self._gauges
            yield GaugeMetricFamily(*metrics.CONNECTIONS[:2], value=connections())
            yield GaugeMetricFamily(*metrics.INFLIGHT_BYTES[:2], value=inflight())
            yield GaugeMetricFamily(*metrics.INFLIGHT_LIMIT[:2], value=limit)


# -- the HTTP endpoint ---------------------------------------------------------------------------------------------
def parse_address(spec: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (127.0.0.1); port 0 takes a free one."""
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not (port.isascii() and port.isdigit() and int(port) < 65536) or (sep and not host):
        raise UsageError(f"bad metrics address {spec!r}: use HOST:PORT (e.g. 127.0.0.1:9100)")
    return host, int(port)


class Endpoint:
    """``/metrics`` of ``recorder`` over HTTP, in a thread, until closed."""

    def __init__(self, recorder: PrometheusMetrics, spec: str) -> None:
        host, port = parse_address(spec)
        try:
            self.httpd: WSGIServer = start_http_server(port, host, registry=recorder.registry)[0]
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(f"cannot serve metrics on {spec}: {reason}") from None
        bound = self.httpd.socket.getsockname()
        self.port = int(bound[1])
        self.url = f"http://[{host}]:{self.port}/metrics" if ":" in host else f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
