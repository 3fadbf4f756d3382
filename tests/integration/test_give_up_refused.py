"""A ``give_up`` the database refuses for good leaves no item pending forever without a
trace, and is not retried forever (GUIDE "Errors mean something";
service.deletion.giveup.give_up).

Both databases, real broker where a component runs. Two ways in:

- real data: a deletion request whose ref holds a NUL (PostgreSQL text cannot; SQLite
  stores it, so there the command names no item and changes nothing);
- fault injection where no real data reaches it on both databases: the job-progress step
  of the first record (``giveup.apply_progress``) raises SQLite's own "too many SQL
  variables" refusal (a real sqlite3 error, wrapped as SQLAlchemy raises it), and in the
  last test the bare record's too (a database that refuses the job's rows).

Before, the item stayed pending and its job never completed; the relay's and the worker's
lines said only that the job was not updated.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from service.app import Services
from service.config import Settings
from service.db import deletion_job_items, outbox
from service.deletion import giveup
from service.deletion.worker import BatchResult
from service.events import DeletionRequested
from service.topics import create_topics
from tests.conftest import Tenant, components_running, make_settings
from tests.logcapture import json_logs
from tests.real_errors import sqlite_too_many_variables, wrapped

BOUND_S = 30


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    return make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap, kafka_partitions=1)


async def _bulk_delete(tenant: Tenant, count: int) -> tuple[str, list[str]]:
    ids = []
    for n in range(count):
        email = f"g{n}-{uuid.uuid4().hex[:6]}@example.com"
        status, body, _ = await tenant.call("POST", "/v1/contacts", {"email": email})
        assert status == 201, body
        ids.append(body["data"]["id"])
    status, body, _ = await tenant.call("POST", "/v1/contacts/bulk-delete", {"contact_ids": ids})
    assert status == 202, body
    return str(body["data"]["job_id"]), ids


async def _job(tenant: Tenant, job_id: str) -> dict[str, Any]:
    status, body, _ = await tenant.call("GET", f"/v1/bulk-jobs/{job_id}")
    assert status == 200, body
    return dict(body["data"])


def _refuse(monkeypatch: pytest.MonkeyPatch, *, bare_too: bool) -> list[str]:
    """Make ``give_up``'s job-progress step refused for good (see the module): the first
    record's always, the bare record's when ``bare_too``. Returns the messages tried."""
    real = giveup.apply_progress  # type: ignore[attr-defined]
    tried: list[str] = []

    async def refusing(*args: Any, audit: Any = None, **kwargs: Any) -> Any:
        message = audit[0].data["message"] if audit else ""
        tried.append(message)
        if bare_too or giveup.BARE_REASON not in message:
            raise wrapped(sqlite_too_many_variables(), "UPDATE deletion_jobs ...")
        return await real(*args, audit=audit, **kwargs)

    monkeypatch.setattr(giveup, "apply_progress", refusing)
    return tried


async def _corrupt_request(services: Services, contact_id: str) -> None:
    """The deletion request of ``contact_id`` cannot be read: the relay sets it aside and
    gives its item up (found by the row's job-id header)."""
    async with services.db.begin() as conn:
        await conn.execute(
            outbox.update().where(outbox.c.key == contact_id).values(payload=b"\xff corrupted")
        )


async def test_a_refused_give_up_is_recorded_bare_and_the_job_completes(
    tenant: Tenant, services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_topics(settings)
    tried = _refuse(monkeypatch, bare_too=False)
    job_id, ids = await _bulk_delete(tenant, 2)
    await _corrupt_request(services, ids[1])
    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            async with asyncio.timeout(BOUND_S):
                while (job := await _job(tenant, job_id))["completed_at"] is None:
                    await asyncio.sleep(0.1)
    assert (job["status"], job["deleted_count"], job["failed_count"]) == (
        "completed_with_errors",
        1,
        1,
    )
    [error] = job["errors"]
    assert (error["contact_id"], error["code"]) == (ids[1], "FAILED_DELETE_CONTACT")
    assert giveup.BARE_REASON in error["message"]
    [line] = lines.events("give_up_recorded_bare")
    assert (line["job_id"], line["contact_id"], line["level"]) == (job_id, ids[1], "error")
    assert "SQLITE_ERROR" in line["error"]
    assert len(tried) == 2  # the record, then the bare record: nothing retried
    assert not lines.events("job_item_left_pending")


async def test_a_give_up_refused_bare_too_leaves_a_trace_and_is_not_retried(
    tenant: Tenant, services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing can be written for the item: it stays pending, an error line names its job
    and contact, and the relay goes on (a later job completes) without trying it again."""
    await create_topics(settings)
    tried = _refuse(monkeypatch, bare_too=True)
    job_id, ids = await _bulk_delete(tenant, 2)
    await _corrupt_request(services, ids[1])
    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            await lines.wait_for("job_item_left_pending", timeout_s=BOUND_S)
            # A later job's items go through the same relay and worker.
            later_id, _ = await _bulk_delete(tenant, 1)
            async with asyncio.timeout(BOUND_S):
                while (await _job(tenant, later_id))["completed_at"] is None:
                    await asyncio.sleep(0.1)
            async with asyncio.timeout(BOUND_S):
                while (job := await _job(tenant, job_id))["deleted_count"] < 1:
                    await asyncio.sleep(0.1)
    [line] = lines.events("job_item_left_pending")
    assert (line["job_id"], line["contact_id"], line["level"]) == (job_id, ids[1], "error")
    assert "SQLITE_ERROR" in line["error"] and "SQLITE_ERROR" in line["bare_error"]
    assert len(tried) == 2
    assert job["completed_at"] is None and job["failed_count"] == 0
    async with services.db.read() as conn:
        status = (
            await conn.execute(
                sa.select(deletion_job_items.c.status).where(
                    deletion_job_items.c.contact_id == uuid.UUID(ids[1])
                )
            )
        ).scalar_one()
    assert status == "pending"


async def test_a_ref_the_database_cannot_hold_fails_the_item_by_its_contact(
    tenant: Tenant, services: Services, settings: Settings
) -> None:
    """Real data: the command names a real pending item by its job and contact, with a NUL
    in its ref. PostgreSQL refuses the first record; the bare one fails the item by job and
    contact, and the command is marked for dead-lettering. SQLite holds the NUL: no item has
    that ref, nothing changes and nothing is refused."""
    job_id, ids = await _bulk_delete(tenant, 1)
    command = DeletionRequested(
        job_id=uuid.UUID(job_id),
        workspace_id=uuid.UUID(str(tenant.workspace_id)),
        ref="a\u0000b",
        contact_id=uuid.UUID(ids[0]),
    )
    result = BatchResult()
    with json_logs() as lines:
        await giveup.give_up(services.db, settings, command, "a reason", result)
    job = await _job(tenant, job_id)
    if services.db.is_sqlite:
        assert (job["completed_at"], result.unrecorded) == (None, [])
        assert not lines.events("give_up_recorded_bare")
        return
    assert (job["status"], job["failed_count"]) == ("completed_with_errors", 1)
    assert [c for c, _ in result.unrecorded] == [command]
    assert "SQLSTATE 22021" in result.unrecorded[0][1]
    [line] = lines.events("give_up_recorded_bare")
    assert line["contact_id"] == ids[0]
