"""The webhook retry schedule, Retry-After and response classification."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import DEFAULT_RETRY_SCHEDULE
from service.webhooks.schedule import Outcome, RetryPolicy, classify, parse_retry_after

DEFAULT = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
NOW = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)

# database=None: property tests must not write a .hypothesis directory into the tree.
quick = settings(database=None, max_examples=300, deadline=None)


def test_the_configured_default_is_the_documented_schedule() -> None:
    """DESIGN: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h."""
    assert DEFAULT_RETRY_SCHEDULE == DEFAULT


def test_the_default_schedule_gives_eight_attempts_then_none() -> None:
    policy = RetryPolicy(DEFAULT, jitter=0.0)
    rng = random.Random(1)

    delays = [policy.next_delay(n, rng) for n in range(8)]

    assert delays == [float(d) for d in DEFAULT]
    assert policy.next_delay(8, rng) is None
    assert policy.next_delay(9, rng) is None
    assert policy.max_attempts == 8


def test_a_delivery_that_always_fails_is_attempted_len_delays_times() -> None:
    policy = RetryPolicy(DEFAULT)
    rng = random.Random(7)
    attempts = 0
    while policy.next_delay(attempts, rng) is not None:
        attempts += 1  # the attempt is made, and fails

    assert attempts == 8


@quick
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    attempts_made=st.integers(min_value=0, max_value=len(DEFAULT) - 1),
    jitter=st.floats(min_value=0.0, max_value=0.9),
)
def test_jitter_stays_within_its_bounds(seed: int, attempts_made: int, jitter: float) -> None:
    policy = RetryPolicy(DEFAULT, jitter=jitter)
    nominal = DEFAULT[attempts_made]

    delay = policy.next_delay(attempts_made, random.Random(seed))

    assert delay is not None
    assert nominal * (1 - jitter) <= delay <= nominal * (1 + jitter)


def test_jitter_spreads_the_delays() -> None:
    policy = RetryPolicy(DEFAULT)
    delays = {policy.next_delay(2, random.Random(seed)) for seed in range(50)}

    assert len(delays) > 40
    assert all(d is not None and 240 <= d <= 360 for d in delays)


def test_the_same_seed_gives_the_same_delay() -> None:
    policy = RetryPolicy(DEFAULT)

    assert policy.next_delay(3, random.Random(42)) == policy.next_delay(3, random.Random(42))


@quick
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    attempts_made=st.integers(min_value=0, max_value=len(DEFAULT) - 1),
    retry_after=st.floats(min_value=-100.0, max_value=10 * 24 * 3600.0),
)
def test_retry_after_is_never_earlier_than_the_schedule_and_is_capped(
    seed: int, attempts_made: int, retry_after: float
) -> None:
    policy = RetryPolicy(DEFAULT, jitter=0.2, retry_after_cap_s=24 * 3600)
    scheduled = policy.next_delay(attempts_made, random.Random(seed))
    assert scheduled is not None

    delay = policy.next_delay(attempts_made, random.Random(seed), retry_after_s=retry_after)

    assert delay is not None
    assert delay >= scheduled
    assert delay == max(scheduled, min(max(retry_after, 0.0), 24 * 3600))
    assert delay <= max(scheduled, 24 * 3600)


def test_retry_after_longer_than_the_schedule_is_honoured() -> None:
    policy = RetryPolicy(DEFAULT, jitter=0.0)

    assert policy.next_delay(1, random.Random(0), retry_after_s=120) == 120


def test_retry_after_shorter_than_the_schedule_is_ignored() -> None:
    policy = RetryPolicy(DEFAULT, jitter=0.0)

    assert policy.next_delay(2, random.Random(0), retry_after_s=10) == 300


def test_retry_after_is_capped() -> None:
    policy = RetryPolicy(DEFAULT, jitter=0.0, retry_after_cap_s=3600)

    assert policy.next_delay(1, random.Random(0), retry_after_s=10**9) == 3600


def test_retry_after_does_not_extend_an_exhausted_schedule() -> None:
    policy = RetryPolicy(DEFAULT)

    assert policy.next_delay(8, random.Random(0), retry_after_s=60) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delays_s": ()}, "at least one"),
        ({"delays_s": (0, -5)}, "negative"),
        ({"delays_s": (0,), "jitter": 1.0}, "jitter"),
        ({"delays_s": (0,), "jitter": -0.1}, "jitter"),
        ({"delays_s": (0,), "retry_after_cap_s": -1}, "cap"),
    ],
)
def test_a_nonsensical_policy_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_negative_attempts_made_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(DEFAULT).next_delay(-1, random.Random(0))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 60.0),  # obsolete RFC 850 form
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # in the past
        ("Tue, 20 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_parse_retry_after_of_a_formatted_http_date() -> None:
    later = NOW + timedelta(hours=2)

    assert parse_retry_after(format_datetime(later, usegmt=True), NOW) == 7200.0


def test_parse_retry_after_with_a_naive_now_takes_it_as_utc() -> None:
    naive_now = NOW.replace(tzinfo=None)

    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", naive_now) == 60.0


@pytest.mark.parametrize(
    "value", [None, "", "   ", "soon", "1e3", "0x10", "12 seconds", "Wed, 99 Foo 2015", "9" * 400]
)
def test_unreadable_retry_after_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (201, Outcome.SUCCESS),
        (204, Outcome.SUCCESS),
        (299, Outcome.SUCCESS),
        (301, Outcome.RETRY),  # redirects are not followed
        (302, Outcome.RETRY),
        (400, Outcome.RETRY),
        (404, Outcome.RETRY),
        (410, Outcome.GONE),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (199, Outcome.RETRY),
        (None, Outcome.RETRY),  # network error or timeout
    ],
)
def test_classify(status: int | None, outcome: Outcome) -> None:
    assert classify(status) is outcome
