"""Named crash points, used by the fault tests to kill a process at an exact moment, and
named pause points, where a test holds a component as if it stalled there."""

from __future__ import annotations

import asyncio
import os
import signal

from service.logs import get_logger

log = get_logger(__name__)


def crash_if(configured: str | None, name: str) -> None:
    """SIGKILL this process when `name` is the configured failpoint (nothing otherwise)."""
    if configured is not None and configured == name:
        log.warning("failpoint_crash", failpoint=name)
        os.kill(os.getpid(), signal.SIGKILL)


class Pauses:
    """Named points where a test holds a component, as a stalled process would stop there
    (e.g. the dispatcher between a send and its recording). Nothing is held unless a test
    called `hold`; a component given no `Pauses` never waits."""

    def __init__(self) -> None:
        self._gates: dict[str, asyncio.Event] = {}
        self._arrived: dict[str, int] = {}
        self._moved = asyncio.Event()  # someone arrived somewhere

    def hold(self, name: str) -> None:
        """From now on, whatever reaches `name` waits there until `release(name)`."""
        self._gates[name] = asyncio.Event()
        self._arrived[name] = 0

    def release(self, name: str) -> None:
        """Let everything held at `name` go on; `name` holds nothing any more."""
        gate = self._gates.pop(name, None)
        if gate is not None:
            gate.set()

    async def at(self, name: str) -> None:
        """Called by the component at point `name`: waits while a test holds it."""
        gate = self._gates.get(name)
        if gate is None:
            return
        self._arrived[name] += 1
        self._moved.set()
        await gate.wait()

    async def reached(self, name: str, count: int = 1, timeout_s: float = 15.0) -> None:
        """Wait until `count` callers are held at `name` (TimeoutError after `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            while self._arrived.get(name, 0) < count:
                self._moved.clear()
                await self._moved.wait()
