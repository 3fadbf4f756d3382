"""The worker's backstop for deletion commands lost unseen.

The consumer says every gap it can see (service.kafka.Consumer: retention past its
position, a position beyond the log's end, an unreadable batch) and the worker writes
again what the gap may have held (service.deletion.giveup.resend_lost). One loss shows no
gap: a topic deleted and created again, since the broker drops the group's committed
offsets with it (the new log is read from its start, offset 0, as a new group's would
be). Whatever the cause, a lost command shows in the database: when the worker is idle
and caught up (each partition it owns read to its log's end, nothing in hand) and the
outbox holds nothing unpublished, every command written before that moment has been read
and handled, so a job created before it that still has an item pending (or is not fully
expanded) on one of those partitions waits for a command that will never come.

Off the hot path: it runs only when a fetch returned nothing with no batch in hand, at
most every ``WORKER_LOST_WORK_CHECK_S``; one check is an indexed read of the outbox's
unpublished rows, the end offsets (one broker request) and the unfinished jobs' pending
items (`resend_lost`); a job is written again at most once an hour, so an item that can
never leave ``pending`` (a ``job_item_left_pending``) costs one resend an hour.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa

from service.config import Settings
from service.db import Database, outbox, utcnow
from service.deletion.giveup import resend_lost
from service.kafka import Consumer
from service.logs import get_logger

log = get_logger(__name__)

RESEND_EVERY_S = 3600.0
"""A job is written again at most this often."""


class LostWork:
    """`check` when the worker is idle; see the module."""

    def __init__(
        self, db: Database, settings: Settings, wake: Callable[[], object] | None = None
    ) -> None:
        self.db = db
        self.settings = settings
        self.wake = wake
        self.clock: Callable[[], float] = time.monotonic
        self._next = 0.0
        self._resent: dict[uuid.UUID, float] = {}

    async def check(self, consumer: Consumer) -> int:
        """Write again the commands of work left undone while the consumer was caught up
        (see the module); returns the commands written. At most every
        ``worker_lost_work_check_s`` (0: never). Transient errors propagate."""
        every = self.settings.worker_lost_work_check_s
        now = self.clock()
        if not self._next:  # the first one an interval after the first idle moment
            self._next = now + every
        if every <= 0 or now < self._next:
            return 0
        self._next = now + every
        moment = utcnow()
        # The relay first: a row not yet published is a command on its way, not lost.
        async with self.db.read() as conn:
            waiting = (
                await conn.execute(
                    sa.select(outbox.c.id)
                    .where(outbox.c.published_at.is_(None), outbox.c.failed_at.is_(None))
                    .limit(1)
                )
            ).first()
        if waiting is not None:
            return 0
        partitions = await consumer.caught_up()
        if not partitions:
            return 0
        self._resent = {j: t for j, t in self._resent.items() if now - t < RESEND_EVERY_S}
        written = 0
        for lost in partitions:
            touched: set[uuid.UUID] = set()
            requests, expansions = await resend_lost(
                self.db,
                self.settings,
                lost,
                created_before=moment,
                skip=self._resent,
                touched=touched,
            )
            for job in touched:
                self._resent[job] = now
            if requests or expansions:
                log.warning(
                    "worker_lost_work_resent",
                    topic=lost.topic,
                    partition=lost.partition,
                    jobs=sorted(str(j) for j in touched),
                    requests=requests,
                    expansions=expansions,
                )
                written += requests + expansions
        if written and self.wake is not None:
            self.wake()
        return written
