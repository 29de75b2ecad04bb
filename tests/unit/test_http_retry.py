"""The one retry loop: bounded attempts, one deadline, back-off with jitter; URLs redacted in what is shown."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from overlaybd.remote.errors import AuthError, TransportError
from overlaybd.remote.http import Operation, Retryable, RetryPolicy, backoff, redact_url, retry_after, run


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(calls: list[Operation], reason: str = "HTTP 503", cost: float = 0.0, t: FakeTime | None = None
            ) -> Callable[[Operation], None]:
    def attempt(op: Operation) -> None:
        calls.append(op)
        if t is not None:
            t.now += cost
        raise Retryable(reason)

    return attempt


def test_a_dead_server_costs_exactly_the_attempts() -> None:
    t, calls = FakeTime(), list[Operation]()
    policy = RetryPolicy(attempts=5, deadline=60)
    with pytest.raises(TransportError, match="HTTP 503 \\(gave up after 5 attempts\\)") as exc:
        run(policy, "GET x", failing(calls), path="reg/repo", clock=t.clock, sleep=t.sleep, rng=lambda: 0.999)
    assert len(calls) == 5 and len(t.sleeps) == 4
    assert str(exc.value).startswith("reg/repo: GET x:")
    assert calls[-1].attempt == 5
    # exponential, capped, jittered within [base/2, base)
    for n, slept in enumerate(t.sleeps, start=1):
        base = min(policy.max_backoff, policy.first_backoff * 2 ** (n - 1))
        assert base / 2 <= slept < base


def test_the_deadline_stops_retrying_before_the_attempts_run_out() -> None:
    t, calls = FakeTime(), list[Operation]()
    policy = RetryPolicy(attempts=50, deadline=3.0, first_backoff=0.5, max_backoff=1.0)
    with pytest.raises(TransportError, match="deadline"):
        run(policy, "GET x", failing(calls, cost=0.4, t=t), clock=t.clock, sleep=t.sleep, rng=lambda: 0.5)
    assert 2 <= len(calls) < 10
    assert t.now - 100.0 <= policy.deadline  # no sleep went past it


def test_timeouts_shrink_to_what_is_left() -> None:
    t = FakeTime()
    op = Operation(RetryPolicy(deadline=12, connect_timeout=10, read_timeout=60), "x", clock=t.clock)
    assert op.timeouts() == (10, 12)
    t.now += 11.5
    assert op.timeouts() == (0.5, 0.5)
    op.check_deadline()
    t.now += 1
    with pytest.raises(TransportError, match="no answer within 12 s"):
        op.check_deadline()


def test_final_errors_are_not_retried_and_success_returns() -> None:
    t, calls = FakeTime(), list[Operation]()

    def refused(op: Operation) -> None:
        calls.append(op)
        raise AuthError("denied")

    with pytest.raises(AuthError):
        run(RetryPolicy(), "x", refused, clock=t.clock, sleep=t.sleep)
    assert len(calls) == 1 and not t.sleeps

    def flaky(op: Operation) -> int:
        if op.attempt < 3:
            raise Retryable("cut short")
        return op.attempt

    assert run(RetryPolicy(), "x", flaky, clock=t.clock, sleep=t.sleep) == 3


def test_retry_after_is_honoured_within_the_deadline() -> None:
    assert backoff(RetryPolicy(), 1, 0.0, retry_after=7.0) == 7.0
    assert retry_after("3") == 3.0 and retry_after(None) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    t, calls = FakeTime(), list[Operation]()

    def busy(op: Operation) -> None:
        calls.append(op)
        raise Retryable("HTTP 429", retry_after=120)

    with pytest.raises(TransportError, match="deadline"):
        run(RetryPolicy(deadline=60), "x", busy, clock=t.clock, sleep=t.sleep)
    assert len(calls) == 1 and not t.sleeps  # waiting 120 s would pass the deadline: give up now


@pytest.mark.parametrize("url,shown", [
    ("https://user:secret@auth.example.com/token?scope=x&sig=abc", "https://auth.example.com/token"),
    ("http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=SECRET#frag", "http://127.0.0.1:5000/v2/a/blobs/uploads/u"),
    ("https://[::1]:443/p?q", "https://[::1]:443/p"),
    ("https://s3.amazonaws.com/b/k?X-Amz-Signature=1", "https://s3.amazonaws.com/b/k"),
    ("/v2/x/blobs/uploads/?mount=1", "/v2/x/blobs/uploads/"),
    ("https://u:p@[::1/p", "<unparsable URL>"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_attempts_that_progress_start_the_count_and_the_clock_again() -> None:
    t = FakeTime()
    policy = RetryPolicy(attempts=3, deadline=60)

    def advancing(op: Operation) -> int:
        t.now += 50  # each attempt takes most of the deadline ...
        if op.attempt < 10:
            op.progressed()  # ... but gets a good part further before the link drops
            raise Retryable("cut")
        return op.attempt

    assert run(policy, "GET blob", advancing, clock=t.clock, sleep=t.sleep) == 10

    calls: list[Operation] = []
    with pytest.raises(TransportError, match="gave up after 2 attempts: the 60 s deadline"):
        run(policy, "GET blob", failing(calls, "cut", cost=50, t=t), clock=t.clock, sleep=t.sleep)
    assert len(calls) == 2
