"""When to try a webhook delivery again, and what a response means.

The retry schedule is a list of delays (DESIGN: immediately, 5 s, 5 min, 30 min, 2 h, 5 h,
10 h, 10 h), each spread by a random jitter so that a receiver that came back up is not hit
by every queued delivery in the same second. A receiver that answers 429 or 503 with
``Retry-After`` is given at least that long (capped), never less than the schedule.

Pure: the randomness and the current time are passed in.
"""

from __future__ import annotations

import enum
import math
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class Outcome(enum.StrEnum):
    """What one delivery attempt's response means for the delivery."""

    SUCCESS = "success"
    """A 2xx: delivered."""
    GONE = "gone"
    """410 Gone: stop, and disable the endpoint."""
    RETRY = "retry"
    """Anything else, including redirects (never followed) and network errors/timeouts."""


def classify(status: int | None) -> Outcome:
    """The outcome of an attempt from its HTTP status; None means no response at all."""
    if status is None:
        return Outcome.RETRY
    if 200 <= status <= 299:
        return Outcome.SUCCESS
    if status == 410:
        return Outcome.GONE
    return Outcome.RETRY


@dataclass(frozen=True)
class RetryPolicy:
    """A retry schedule.

    ``delays_s[0]`` is the delay before the first attempt (normally 0) and ``delays_s[i]``
    the delay before attempt ``i + 1``, so a delivery gets ``len(delays_s)`` attempts.
    Each delay is spread uniformly over ``[d * (1 - jitter), d * (1 + jitter)]``.
    """

    delays_s: tuple[int, ...]
    jitter: float = 0.2
    retry_after_cap_s: int = 24 * 3600

    def __post_init__(self) -> None:
        if not self.delays_s:
            raise ValueError("a retry schedule needs at least one delay")
        if any(d < 0 for d in self.delays_s):
            raise ValueError("retry delays cannot be negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.retry_after_cap_s < 0:
            raise ValueError("the Retry-After cap cannot be negative")

    @property
    def max_attempts(self) -> int:
        """How many attempts a delivery gets in all."""
        return len(self.delays_s)

    def next_delay(
        self,
        attempts_made: int,
        rng: random.Random,
        retry_after_s: float | None = None,
    ) -> float | None:
        """Seconds to wait before the next attempt, or None when the schedule is exhausted.

        ``attempts_made`` is how many attempts have already failed (0 asks for the delay
        before the first one). ``retry_after_s`` is the receiver's ``Retry-After``, if it
        sent one: the delay becomes ``max(scheduled, min(retry_after_s, cap))``, so the
        receiver can slow us down (up to the cap) but never speed us up.
        """
        if attempts_made < 0:
            raise ValueError("attempts_made cannot be negative")
        if attempts_made >= len(self.delays_s):
            return None
        nominal = self.delays_s[attempts_made]
        delay = rng.uniform(nominal * (1 - self.jitter), nominal * (1 + self.jitter))
        if retry_after_s is not None:
            asked = min(max(retry_after_s, 0.0), float(self.retry_after_cap_s))
            delay = max(delay, asked)
        return delay


_DELTA_SECONDS = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from ``now`` that a ``Retry-After`` header asks for (RFC 9110 §10.2.3).

    Accepts delay-seconds (``120``) or an HTTP-date (``Wed, 21 Oct 2015 07:28:00 GMT``).
    A negative delay or a date in the past gives 0; a missing or unreadable value gives
    None (the header is then ignored). A naive ``now`` or date is taken as UTC.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        # A thousand-digit "delay" overflows to inf: garbage, not a wish to wait forever.
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)
