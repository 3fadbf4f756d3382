"""What is waiting, as gauges on ``/metrics``: how far behind each stage is.

An operator's trial (trial 7) could not tell a slow or stuck job from ``/metrics``: it had
only counters, and the backlog had to be read from the database by hand. On every scrape
(the api's ``/metrics`` and each process's ``OPS_PORT``), these are read from the database:

- ``backlog_items{queue}``: ``outbox_unpublished`` (rows the relay still owes Kafka),
  ``webhook_deliveries_pending`` and ``webhook_deliveries_failing`` (deliveries not done,
  the second after a failed attempt), ``deletion_jobs_unfinished``;
- ``deletion_job_oldest_unfinished_age_seconds``: how long the oldest unfinished job has
  waited (0 when none).

The outbox and delivery counts read their queue's rows through the index the relay and
the dispatcher use (`ix_outbox_unpublished`, `ix_webhook_deliveries_due`); the jobs'
through a scan of ``deletion_jobs`` (one row per request, not per contact). Each count
stops at `CAP` (a larger backlog reads as `CAP`), so a scrape costs what the backlog is, up
to a bound. The reads have `READ_TIMEOUT_S`; when the database does not
answer, the gauges keep their last values and ``backlog_read_ok`` is 0 (the scrape still
answers, with every counter).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from service.db import Database, deletion_jobs, outbox, utcnow, webhook_deliveries
from service.logs import get_logger
from service.metrics import Metrics

log = get_logger(__name__)

CAP = 1_000_000
READ_TIMEOUT_S = 2.0


def _capped(where: sa.Select[Any]) -> sa.Select[Any]:
    inner = where.limit(CAP).subquery()
    return sa.select(sa.func.count()).select_from(inner)


async def read_backlog(db: Database) -> tuple[dict[str, int], float]:
    """The queues' sizes (each at most `CAP`) and the oldest unfinished job's age (s)."""
    o, d, j = outbox.c, webhook_deliveries.c, deletion_jobs.c
    async with db.read() as conn:
        sizes = {
            "outbox_unpublished": _capped(
                sa.select(o.id).where(o.published_at.is_(None), o.failed_at.is_(None))
            ),
            "webhook_deliveries_pending": _capped(sa.select(d.id).where(d.status == "pending")),
            "webhook_deliveries_failing": _capped(sa.select(d.id).where(d.status == "failing")),
            "deletion_jobs_unfinished": _capped(sa.select(j.id).where(j.completed_at.is_(None))),
        }
        counts = {name: int((await conn.execute(q)).scalar_one()) for name, q in sizes.items()}
        oldest: datetime | None = (
            await conn.execute(sa.select(sa.func.min(j.created_at)).where(j.completed_at.is_(None)))
        ).scalar_one()
    age = max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
    return counts, age


async def refresh(db: Database, metrics: Metrics) -> None:
    """Set the backlog gauges from the database, or mark them stale (see the module)."""
    try:
        counts, age = await asyncio.wait_for(read_backlog(db), READ_TIMEOUT_S)
    except Exception as exc:  # a scrape never fails for this: the gauges say they are stale
        log.debug("backlog_read_failed", error=type(exc).__name__)
        metrics.backlog_read_ok.set(0)
        return
    for queue, n in counts.items():
        metrics.backlog.labels(queue).set(n)
    metrics.oldest_job_age.set(age)
    metrics.backlog_read_ok.set(1)
