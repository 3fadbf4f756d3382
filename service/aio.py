"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib


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
