"""The per-key token bucket, with a fake clock: burst, refusal, refill and headers."""

from __future__ import annotations

import uuid

from service.http import RateLimiter


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_burst_up_to_capacity_is_allowed_then_refused_with_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, capacity=3, clock=clock)
    key = uuid.uuid4()

    results = [limiter.check(key) for _ in range(3)]
    allowed, headers = limiter.check(key)

    assert all(ok for ok, _ in results)
    assert all("Retry-After" not in h for _, h in results)
    assert not allowed
    assert headers["Retry-After"] == "1"
    assert headers["X-RateLimit-Remaining"] == "0"


def test_retry_after_is_the_time_until_the_next_token() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.25, capacity=1, clock=clock)
    key = uuid.uuid4()
    limiter.check(key)
    clock.advance(1.0)

    allowed, headers = limiter.check(key)

    assert not allowed
    # 0.25 token accrued; 0.75 more at 0.25/s is 3 s.
    assert headers["Retry-After"] == "3"


def test_tokens_refill_over_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, capacity=2, clock=clock)
    key = uuid.uuid4()
    limiter.check(key)
    limiter.check(key)
    assert not limiter.check(key)[0]

    clock.advance(0.5)  # one token at 2/s
    assert limiter.check(key)[0]
    assert not limiter.check(key)[0]

    clock.advance(60)  # refills, but never beyond capacity
    assert [limiter.check(key)[0] for _ in range(3)] == [True, True, False]


def test_headers_report_limit_remaining_and_seconds_until_full() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.5, capacity=2, clock=clock)
    key = uuid.uuid4()

    _, first = limiter.check(key)
    _, second = limiter.check(key)

    assert first == {
        "X-RateLimit-Limit": "2",
        "X-RateLimit-Remaining": "1",
        "X-RateLimit-Reset": "2",  # one token short, at 0.5/s
    }
    assert second == {
        "X-RateLimit-Limit": "2",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "4",
    }


def test_each_key_has_its_own_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=0.001, capacity=1, clock=clock)
    noisy, quiet = uuid.uuid4(), uuid.uuid4()

    assert limiter.check(noisy)[0]
    assert not limiter.check(noisy)[0]

    allowed, headers = limiter.check(quiet)
    assert allowed
    assert headers["X-RateLimit-Remaining"] == "0"
    assert not limiter.check(noisy)[0]
