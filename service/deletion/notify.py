"""In-process notice that a job finished, so `Prefer: wait` sleeps instead of polling.

A worker in another process cannot reach this, so waiters also re-read the job on a
slow backoff (at most once a second); in one process (`run`, `dev`) the notice is instant.
"""

from __future__ import annotations

import asyncio
import uuid


class JobNotifier:
    def __init__(self) -> None:
        self._waiters: dict[uuid.UUID, list[asyncio.Event]] = {}

    def notify(self, job_id: uuid.UUID) -> None:
        for event in self._waiters.pop(job_id, []):
            event.set()

    async def wait(self, job_id: uuid.UUID, timeout_s: float) -> bool:
        """Wait for a notice about this job; False on timeout."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, []).append(event)
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None and event in waiters:
                waiters.remove(event)
                if not waiters:
                    del self._waiters[job_id]
