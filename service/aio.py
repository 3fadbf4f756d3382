"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

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


async def retry_transient(
    work: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    transient: Callable[[BaseException], bool],
    *,
    event: str,
    max_backoff_s: float = 10.0,
) -> T:
    """Run `work` until it succeeds, backing off after transient errors (never skipping).

    Other errors propagate; a stop requested during a back-off raises `Stopped`.
    """
    log = structlog.get_logger(__name__)
    backoff = 0.1
    while True:
        try:
            return await work()
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning(event, error=repr(exc), backoff_s=backoff)
        if stop.is_set():
            raise Stopped
        await wait_any(backoff, stop)
        backoff = min(backoff * 2, max_backoff_s)
