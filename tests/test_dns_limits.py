"""The per-source response rate limit, with a clock the test moves."""

from __future__ import annotations

import pytest

from logpose.nameserver.limits import ResponseRateLimiter
from logpose.nameserver.throttle import LogThrottle


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill():
    clock = FakeClock()
    limiter = ResponseRateLimiter(rate=3, clock=clock)

    assert [limiter.allow("192.0.2.1") for _ in range(4)] == [True, True, True, False]
    clock.now += 0.34  # one token back at 3 per second
    assert limiter.allow("192.0.2.1") is True
    assert limiter.allow("192.0.2.1") is False
    clock.now += 10.0  # refill stops at the burst size
    assert [limiter.allow("192.0.2.1") for _ in range(4)] == [True, True, True, False]


def test_sources_limited_apart():
    limiter = ResponseRateLimiter(rate=1, clock=FakeClock())

    assert limiter.allow("192.0.2.1") is True
    assert limiter.allow("192.0.2.1") is False
    assert limiter.allow("192.0.2.2") is True
    assert limiter.allow("2001:db8::1") is True


def test_table_bounded_least_recent_forgotten():
    limiter = ResponseRateLimiter(rate=1, max_sources=3, clock=FakeClock())
    for number in range(1, 4):
        limiter.allow(f"192.0.2.{number}")
    limiter.allow("192.0.2.1")  # seen again: now the most recent

    limiter.allow("192.0.2.4")  # the table is full, so 192.0.2.2 goes

    assert len(limiter) == 3
    assert limiter.allow("192.0.2.1") is False  # still remembered, its bucket empty
    assert limiter.allow("192.0.2.2") is True  # forgotten, so a full bucket again


def test_many_sources_stay_bounded():
    limiter = ResponseRateLimiter(rate=1, max_sources=100, clock=FakeClock())

    for number in range(5000):
        limiter.allow(f"2001:db8::{number:x}")

    assert len(limiter) == 100


@pytest.mark.parametrize(("rate", "max_sources"), [(0, 10), (1, 0)])
def test_limiter_arguments_checked(rate, max_sources):
    with pytest.raises(ValueError):
        ResponseRateLimiter(rate=rate, max_sources=max_sources)


def test_log_throttle_counts_held_back_lines():
    clock = FakeClock()
    throttle = LogThrottle(10.0, clock=clock)

    assert throttle.ready() == 0
    assert throttle.ready() is None
    assert throttle.ready() is None
    clock.now += 10.0
    assert throttle.ready() == 2
