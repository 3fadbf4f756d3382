"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from service.faults import is_transient, outage_cause

T = TypeVar("T")


async def first_of(*events: asyncio.Event) -> None:
    """Return as soon as any of the events is set."""
    tasks = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def wait_any(timeout_s: float, *events: asyncio.Event) -> None:
    """Wait until any event is set or the timeout passes, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(first_of(*events), timeout=timeout_s)


class Stopped(Exception):
    """Shutdown was requested while waiting out a transient error."""


Sleep = Callable[[float, asyncio.Event], Awaitable[None]]


async def sleep_unless_stopped(delay_s: float, stop: asyncio.Event) -> None:
    """Wait ``delay_s`` seconds, or less if ``stop`` is set meanwhile."""
    await wait_any(delay_s, stop)


@dataclass
class Backoff:
    """Capped exponential back-off with "equal jitter" (AWS Architecture Blog, "Exponential
    Backoff And Jitter", 2015): the n-th delay (n from 0) is uniform in [d/2, d] where
    d = min(cap_s, base_s * 2^n), in seconds. Half of it is random, so many processes that
    lost the same database do not come back in step; the other half keeps the wait growing.
    The randomness and the sleep are injected, so tests need not wait.
    """

    base_s: float = 0.1
    cap_s: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    sleep: Sleep = sleep_unless_stopped
    attempt: int = 0

    def next_delay(self) -> float:
        """The next delay in seconds (and count the attempt)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start again from the base delay (after a success)."""
        self.attempt = 0

    async def wait(self, stop: asyncio.Event) -> float:
        """Sleep the next delay (cut short by ``stop``); returns the delay chosen."""
        delay = self.next_delay()
        await self.sleep(delay, stop)
        return delay


async def retry_transient(
    work: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    transient: Callable[[BaseException], bool] = is_transient,
    *,
    event: str,
    max_backoff_s: float = 10.0,
    backoff: Backoff | None = None,
) -> T:
    """Run `work` until it succeeds, backing off after transient errors (never skipping).

    Which errors are transient is :func:`service.faults.is_transient` unless told
    otherwise. Other errors propagate; a stop requested during a back-off raises `Stopped`.
    """
    log = structlog.get_logger(__name__)
    policy = backoff or Backoff(cap_s=max_backoff_s)
    while True:
        try:
            return await work()
        except Exception as exc:
            if not transient(exc):
                raise
            delay = policy.next_delay()
            log.warning(
                event,
                cause=outage_cause(exc),
                error=repr(exc)[:500],
                attempt=policy.attempt,
                backoff_s=delay,
            )
        if stop.is_set():
            raise Stopped
        await policy.sleep(delay, stop)
        if stop.is_set():
            raise Stopped


async def wait_for_dependency(
    check: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    *,
    dependency: str,
    component: str,
    backoff: Backoff | None = None,
) -> T:
    """Run ``check`` until the dependency answers, logging what we wait for.

    For start-up: a component whose database or broker is down waits (with back-off, one
    ``waiting_for_dependency`` line per try) instead of exiting. Permanent errors
    propagate; a stop raises :class:`Stopped`.
    """
    log = structlog.get_logger(__name__)
    policy = backoff or Backoff(base_s=0.2, cap_s=5.0)
    while True:
        try:
            result = await check()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = policy.next_delay()
            log.warning(
                "waiting_for_dependency",
                component=component,
                dependency=dependency,
                cause=outage_cause(exc),
                error=repr(exc)[:300],
                retry_in_s=round(delay, 2),
            )
        else:
            if policy.attempt:
                log.info("dependency_available", component=component, dependency=dependency)
            return result
        if stop.is_set():
            raise Stopped
        await policy.sleep(delay, stop)
        if stop.is_set():
            raise Stopped
