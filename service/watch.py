"""The broker watch: a line when the Kafka broker stops answering, and one when it is back.

A component that talks to Kafka waits out a broker outage inside aiokafka: the producer
retries a send until its request timeout (40 s), a consumer's fetch comes back empty while
it reconnects. So a 25-second outage left no line of ours in the relay's, the worker's or
the dispatcher's log, only the library's own ("Unable connect ...", a new user's trial,
trial 9), while README "Outages" says every wait for a dependency logs a line with its
``cause``. Each process that runs one of them also runs this watch: every
``KAFKA_WATCH_INTERVAL_S`` it asks the broker for metadata (``service.kafka.
kafka_reachable``, as ``/readyz`` does), and says

- ``dependency_unavailable`` (a warning: ``dependency="kafka"``, ``cause=
  "kafka_unavailable"``, the seconds since it stopped answering, and what waits) when it
  stops answering, and again every ``REPEAT_S`` while it stays down;
- ``dependency_recovered`` (``down_s``) when it answers again;

and sets ``dependency_up{dependency="kafka"}`` in ``/metrics`` (1 or 0). The database needs
no watch of its own: every wait on it is bounded and the retry loops say each one
(``service.faults.outage_cause``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

from service.aio import wait_any
from service.faults import KAFKA_UNAVAILABLE, describe
from service.kafka import kafka_reachable
from service.logs import get_logger

log = get_logger(__name__)

REPEAT_S = 60.0
"""While the broker stays down, the warning is said again this often (seconds)."""

KAFKA_COMPONENTS = frozenset({"relay", "worker", "dispatcher"})
"""The components that wait for the broker (the api does not talk to it)."""


class BrokerWatch:
    """The watch of one process (see the module). ``probe`` answers whether the broker
    answers (``kafka_reachable`` of the bootstrap servers); ``waiting`` names the
    components that wait for it, for the log line."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        interval_s: float,
        waiting: list[str],
        up: Gauge | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self.waiting = sorted(waiting)
        self.clock = clock
        self.down_since: float | None = None
        self._said = float("-inf")
        self.up = up

    async def check(self) -> bool:
        """Ask once; log and set the gauge on a change (and repeat while down)."""
        ok = await self.probe()
        now = self.clock()
        if ok:
            if self.down_since is not None:
                log.info(
                    "dependency_recovered",
                    dependency="kafka",
                    down_s=round(now - self.down_since, 1),
                )
                self.down_since = None
            self._gauge(1)
            return True
        if self.down_since is None:
            self.down_since = now
        if now - self._said >= REPEAT_S or self._said < self.down_since:
            self._said = now
            log.warning(
                "dependency_unavailable",
                dependency="kafka",
                cause=KAFKA_UNAVAILABLE,
                down_s=round(now - self.down_since, 1),
                waiting=self.waiting,
                effect="their work waits in the database and resumes when it answers",
            )
        self._gauge(0)
        return False

    def _gauge(self, value: int) -> None:
        if self.up is not None:
            self.up.labels("kafka").set(value)

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``interval_s`` until ``stop`` is set. Housekeeping: a check that
        fails in an unforeseen way is logged and tried again, never stops the process."""
        while not stop.is_set():
            try:
                await self.check()
            except Exception as exc:
                log.error("dependency_watch_failed", dependency="kafka", error=describe(exc))
            await wait_any(self.interval_s, stop)


def broker_watch(
    bootstrap: str, interval_s: float, waiting: list[str], up: Gauge | None
) -> BrokerWatch:
    """The watch of ``bootstrap`` for a process running the components ``waiting``."""
    timeout_s = 3.0  # as /readyz (service.ops): a loaded machine answers slowly
    return BrokerWatch(
        lambda: kafka_reachable(bootstrap, timeout_s=timeout_s), interval_s, waiting, up
    )
