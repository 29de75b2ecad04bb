"""The one retry loop for registry traffic: an operation's attempts, its back-off and its deadline.

An *operation* is one thing asked of a registry (a range read, a manifest, a whole blob, an upload step). It gets
at most ``RetryPolicy.attempts`` attempts and a total time budget, ``RetryPolicy.deadline`` seconds, measured from
its start: no attempt starts and no back-off sleeps past it, and each attempt's connect and read timeouts are cut
to what is left of it. An attempt signals a failure worth another try by raising :class:`Retryable` (a dropped
connection, a 5xx or 429, a body cut short, a garbled Content-Range: all counted here, in this one loop); any other
exception ends the operation at once. Between attempts it waits ``min(max_backoff, first_backoff * 2**(n-1))``
times a random factor in [0.5, 1) ("equal jitter", so concurrent readers of a dead registry do not retry in step),
or longer when the server's ``Retry-After`` asks for it.

Bulk bodies (a whole blob, which may take longer than any budget) are not cut by the deadline; a stalled socket
still times out after ``read_timeout``. Bodies of bounded size (range reads, manifests) check it as they read. An
attempt that made real progress before it failed (a resumable download that got a good part further) says so with
:meth:`Operation.progressed`: the failures and the clock then count again from there, so a long download over a
flaky link resumes as long as it advances, and a link that never advances still gives up as above.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from .. import metrics
from .errors import TransportError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5  # requests one operation may make, at most
    deadline: float = 60.0  # seconds one operation may take, waits included (bulk bodies excepted)
    first_backoff: float = 0.2
    max_backoff: float = 5.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # between two reads from the socket


DEFAULT_POLICY = RetryPolicy()


class Retryable(Exception):
    """Raised by an attempt that failed in a way another attempt may not (not an OverlaybdError: it never leaves
    :func:`run`, which turns the last one into a :class:`TransportError`)."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class Operation:
    """One operation's clock and what its attempts share (the auth challenge answered once per operation)."""

    policy: RetryPolicy
    what: str
    path: str | None = None
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    attempt: int = 0  # requests made so far, all told
    failures: int = 0  # failed attempts since the start, or since the last that progressed
    challenge_answered: bool = False
    host: str = ""  # the registry asked (what its figures are counted under)
    _progress: bool = False

    def __post_init__(self) -> None:
        self.started = self.clock()

    def remaining(self) -> float:
        return self.policy.deadline - (self.clock() - self.started)

    def timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts for the next request: the policy's, cut to what is left of the deadline."""
        left = max(0.001, self.remaining())
        return min(self.policy.connect_timeout, left), min(self.policy.read_timeout, left)

    def progressed(self) -> None:
        """This attempt got a good part further: if it fails, failures and time count again from its end."""
        self._progress = True

    def check_deadline(self) -> None:
        """For bodies of bounded size: a server that trickles them out does not hold the operation forever."""
        if self.remaining() <= 0:
            raise TransportError(f"{self.what}: no answer within {self.policy.deadline:g} s (attempt "
                                 f"{self.attempt})", path=self.path)


def backoff(policy: RetryPolicy, failures: int, unit: float, retry_after: float | None = None) -> float:
    """Seconds to wait after the ``failures``-th failure; ``unit`` is a random number in [0, 1) (pure)."""
    base = min(policy.max_backoff, policy.first_backoff * float(2 ** (failures - 1)))
    wait = base / 2 + unit * base / 2
    if retry_after is not None:
        wait = max(wait, retry_after)
    return wait


def run(policy: RetryPolicy, what: str, attempt: Callable[[Operation], T], *, path: str | None = None,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random, host: str = "") -> T:
    """Call ``attempt`` until it returns, at most ``policy.attempts`` times and within ``policy.deadline``."""
    op = Operation(policy, what, path, clock, host=host)
    while True:
        op.attempt += 1
        try:
            return attempt(op)
        except Retryable as exc:
            if op._progress:
                op._progress, op.failures, op.started = False, 0, clock()
            op.failures += 1
            if op.failures >= policy.attempts:
                raise TransportError(f"{what}: {exc.reason} (gave up after {op.failures} attempts)",
                                     path=path) from None
            wait = backoff(policy, op.failures, rng(), exc.retry_after)
            if wait >= op.remaining():
                raise TransportError(f"{what}: {exc.reason} (gave up after {op.failures} attempts: the "
                                     f"{policy.deadline:g} s deadline)", path=path) from None
            metrics.current().retried(host)
            sleep(wait)


def retry_after(header: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (the HTTP-date form is ignored: back-off applies)."""
    if header and header.strip().isdigit():
        return float(header.strip())
    return None


def redact_url(url: str) -> str:
    """What errors and logs may show of a URL: scheme://host[:port]/path, never userinfo nor query (a token realm,
    a signed redirect or an upload location can carry credentials in either)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    host = parts.netloc.rpartition("@")[2]
    if not parts.scheme:
        return parts.path
    return f"{parts.scheme}://{host}{parts.path}"
