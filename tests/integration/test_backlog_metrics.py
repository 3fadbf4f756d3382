"""`/metrics` says what is waiting (trial 7: only counters; the backlog of a slow or stuck
job had to be read from the database by hand). Both databases."""

from __future__ import annotations

import uuid
from datetime import timedelta

import aiohttp
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from service.app import Services
from service.backlog import refresh
from service.db import Database, deletion_jobs, utcnow
from service.metrics import Metrics
from service.procs import free_port
from tests.conftest import Tenant
from tests.integration.test_bulk_delete import seed_many


async def _scrape(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = s.labels.get("queue")
            samples[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return samples


async def test_metrics_show_the_backlog_of_a_job_nothing_works_on(
    tenant: Tenant, services: Services
) -> None:
    """No relay or worker runs: a deletion request's job waits, its outbox rows are not
    published; the gauges count them and age the job."""
    ids = await seed_many(services, tenant, 3)
    status, job, _ = await tenant.call("POST", "/v1/contacts/bulk-delete", {"contact_ids": ids})
    assert status == 202, job
    job_id = uuid.UUID(job["data"]["job_id"])
    async with services.db.begin() as conn:  # accepted a minute ago
        await conn.execute(
            deletion_jobs.update()
            .where(deletion_jobs.c.id == job_id)
            .values(created_at=utcnow() - timedelta(minutes=1))
        )

    got = await _scrape(tenant.http, tenant.base)
    assert got["backlog_read_ok"] == 1.0
    assert got["backlog_items{outbox_unpublished}"] >= 3  # the database is the session's
    assert got["backlog_items{deletion_jobs_unfinished}"] >= 1
    assert got["deletion_job_oldest_unfinished_age_seconds"] >= 60
    for queue in ("webhook_deliveries_pending", "webhook_deliveries_failing"):
        assert f"backlog_items{{{queue}}}" in got

    # Finished (by hand here): the job no longer counts.
    async with services.db.begin() as conn:
        unfinished = sa.select(sa.func.count()).where(deletion_jobs.c.completed_at.is_(None))
        before = (await conn.execute(unfinished)).scalar_one()
        await conn.execute(
            deletion_jobs.update().where(deletion_jobs.c.id == job_id).values(completed_at=utcnow())
        )
    got = await _scrape(tenant.http, tenant.base)
    assert got["backlog_items{deletion_jobs_unfinished}"] == before - 1


async def test_a_database_that_does_not_answer_marks_the_backlog_stale() -> None:
    """The scrape still answers (counters matter most during an outage); the gauges keep
    their values and say they could not be read."""
    metrics = Metrics()
    metrics.backlog.labels("outbox_unpublished").set(7)
    db = Database(f"postgresql+asyncpg://u:p@127.0.0.1:{free_port()}/nothing")
    try:
        await refresh(db, metrics)
    finally:
        await db.dispose()
    registry = metrics.registry
    assert registry.get_sample_value("backlog_read_ok") == 0
    assert registry.get_sample_value("backlog_items", {"queue": "outbox_unpublished"}) == 7
    assert metrics.render().status == 200
