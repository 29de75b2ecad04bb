"""The figures of :mod:`overlaybd.metrics`, kept in a Prometheus registry of their own (one per server, so that
servers in one process, and tests, do not mix), served over HTTP for Prometheus to scrape (``serve --metrics
HOST:PORT``), and summed up as JSON for ``overlaybd stats``.

``prometheus-client`` is an extra (``pyoverlaybd[metrics]``): only the command line's ``--metrics`` loads this
module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .. import metrics
from ..errors import UsageError
from ..metrics import Recorder, errno_name

Children = tuple[Any, Any, Any]  # one command's requests counter, bytes counter, latency histogram


class PrometheusMetrics(Recorder):
    """A recorder that keeps every figure, in ``self.registry``."""

    active = True

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._requests = Counter(*metrics.REQUESTS, registry=reg)
        self._bytes = Counter(*metrics.REQUEST_BYTES, registry=reg)
        self._seconds = Histogram(*metrics.REQUEST_SECONDS, registry=reg, buckets=metrics.BUCKETS)
        self._errors = Counter(*metrics.ERRORS, registry=reg)
        self._hits = Counter(*metrics.CACHE_HITS, registry=reg)
        self._misses = Counter(*metrics.CACHE_MISSES, registry=reg)
        self._fetched = Counter(*metrics.REGISTRY_BYTES, registry=reg)
        self._retries = Counter(*metrics.REGISTRY_RETRIES, registry=reg)
        self._by_command: dict[str, Children] = {}
        self._lock = threading.Lock()

    def watch(self, connections: Callable[[], float], inflight: Callable[[], float], inflight_limit: float) -> None:
        """Gauges read when scraped: a server's open connections and bytes in flight (nothing to update)."""
        reg = self.registry
        Gauge(*metrics.CONNECTIONS, registry=reg).set_function(connections)
        Gauge(*metrics.INFLIGHT_BYTES, registry=reg).set_function(inflight)
        Gauge(*metrics.INFLIGHT_LIMIT, registry=reg).set(inflight_limit)

    # -- counting (any thread) -------------------------------------------------------------------------------------
    def request(self, command: str, nbytes: int, seconds: float, error: int = 0) -> None:
        children = self._by_command.get(command)
        if children is None:
            children = self._bind(command)
        children[0].inc()
        children[2].observe(seconds)
        if error:
            self._errors.labels(command, errno_name(error)).inc()
        elif nbytes:
            children[1].inc(nbytes)

    def _bind(self, command: str) -> Children:
        with self._lock:
            children = self._by_command.get(command)
            if children is None:
                children = (self._requests.labels(command), self._bytes.labels(command),
                            self._seconds.labels(command))
                self._by_command[command] = children
            return children

    def cache_hit(self) -> None:
        self._hits.inc()

    def cache_miss(self) -> None:
        self._misses.inc()

    def fetched(self, host: str, nbytes: int) -> None:
        self._fetched.labels(host).inc(nbytes)

    def retried(self, host: str) -> None:
        self._retries.labels(host).inc()

    # -- reading ---------------------------------------------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        """Every figure, as ``overlaybd stats --output json`` prints it (the sums of what Prometheus scrapes)."""
        out: dict[str, Any] = {"requests": {}, "cache": {"hits": 0, "misses": 0}, "registries": {}}
        requests: dict[str, dict[str, Any]] = out["requests"]

        def command(name: str) -> dict[str, Any]:
            return requests.setdefault(name, {"count": 0, "bytes": 0, "errors": {}, "seconds": 0.0})

        for family in self.registry.collect():
            for s in family.samples:
                labels, value = s.labels, s.value
                if s.name == "overlaybd_requests_total":
                    command(labels["command"])["count"] = int(value)
                elif s.name == "overlaybd_request_bytes_total":
                    command(labels["command"])["bytes"] = int(value)
                elif s.name == "overlaybd_request_seconds_sum":
                    command(labels["command"])["seconds"] = value
                elif s.name == "overlaybd_request_errors_total":
                    command(labels["command"])["errors"][labels["errno"]] = int(value)
                elif s.name in ("overlaybd_cache_hits_total", "overlaybd_cache_misses_total"):
                    out["cache"][s.name.split("_")[2]] = int(value)
                elif s.name in ("overlaybd_registry_bytes_total", "overlaybd_registry_retries_total"):
                    host = out["registries"].setdefault(labels["host"], {"bytes": 0, "retries": 0})
                    host[s.name.split("_")[2]] = int(value)
                elif s.name in ("overlaybd_connections", "overlaybd_inflight_bytes", "overlaybd_inflight_bytes_limit"):
                    out[s.name[len("overlaybd_"):]] = int(value)
        return out


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
