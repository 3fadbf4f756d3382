"""The API during an outage, and idempotency keys that outlive their request.

A transient error (service.faults) is 503 `service_unavailable` with `Retry-After`, never
500, and gives its Idempotency-Key back so the client's retry runs. A key whose handler
died is free again once its lease lapses (seconds), and the fencing token makes sure a
stalled first request can never create a second job after it was taken over.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer
from asyncpg.exceptions import CannotConnectNowError

from service import idempotency
from service.app import Services, create_app
from service.db import Database, deletion_jobs, idempotency_keys, utcnow
from service.deletion import routes as deletion_routes
from service.errors import IdempotencyConflict
from service.procs import free_port
from tests.conftest import Tenant, make_settings
from tests.logcapture import json_logs
from tests.real_errors import wrapped

BULK = "/v1/contacts/bulk-delete"


async def job_ids(services: Services, tenant: Tenant) -> list[str]:
    async with services.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(deletion_jobs.c.id).where(
                    deletion_jobs.c.workspace_id == tenant.workspace_id
                )
            )
        ).all()
    return [str(r.id) for r in rows]


async def test_a_transient_failure_is_503_with_retry_after_and_frees_the_key(
    services: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database going away mid-request: 503, and the same key retried runs at once."""
    real_create = deletion_routes.create_job  # type: ignore[attr-defined]
    failures = 1

    async def create_during_shutdown(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise wrapped(CannotConnectNowError("the database system is shutting down"))
        return await real_create(*args, **kwargs)

    monkeypatch.setattr(deletion_routes, "create_job", create_during_shutdown)
    body = {"contact_ids": [str(uuid.uuid4())]}
    headers = {"Idempotency-Key": f"k-{uuid.uuid4()}"}

    status, answer, response_headers = await tenant.call("POST", BULK, body, headers)
    assert status == 503, answer
    assert answer["error"]["code"] == "service_unavailable"
    assert int(response_headers["Retry-After"]) >= 1
    assert await job_ids(services, tenant) == []

    status, answer, response_headers = await tenant.call("POST", BULK, body, headers)
    assert status == 202, answer  # not 409 "still being handled"
    assert "Idempotent-Replayed" not in response_headers
    assert await job_ids(services, tenant) == [answer["data"]["job_id"]]


@pytest.fixture
def short_lease(monkeypatch: pytest.MonkeyPatch) -> timedelta:
    lease = timedelta(seconds=1)
    monkeypatch.setattr(idempotency, "LEASE", lease)
    return lease


async def test_a_key_whose_handler_died_is_free_once_its_lease_lapses(
    services: Services, tenant: Tenant, short_lease: timedelta
) -> None:
    """409 while the lease runs (the handler may be alive), then the retry runs, once."""
    body = {"contact_ids": [str(uuid.uuid4())]}
    key = f"k-{uuid.uuid4()}"
    print_ = idempotency.fingerprint("POST", BULK, body)
    # A request claims the key, and its process dies before it writes anything.
    await idempotency.claim(services.db, tenant.workspace_id, key, print_, 3600)

    status, answer, headers = await tenant.call("POST", BULK, body, {"Idempotency-Key": key})
    assert status == 409, answer
    assert headers["Retry-After"] == "1"

    await asyncio.sleep(short_lease.total_seconds() + 0.2)
    status, answer, _ = await tenant.call("POST", BULK, body, {"Idempotency-Key": key})
    assert status == 202, answer
    status, again, headers = await tenant.call("POST", BULK, body, {"Idempotency-Key": key})
    assert status == 202 and again == answer
    assert headers["Idempotent-Replayed"] == "true"
    assert await job_ids(services, tenant) == [answer["data"]["job_id"]]


async def test_a_running_request_keeps_its_key_by_renewing_the_lease(
    services: Services, tenant: Tenant, short_lease: timedelta
) -> None:
    key = f"k-{uuid.uuid4()}"
    claim = await idempotency.claim(services.db, tenant.workspace_id, key, "fp", 3600)
    assert claim.token is not None
    async with idempotency.hold(services.db, tenant.workspace_id, key, claim.token):
        for _ in range(4):  # well past the lease
            await asyncio.sleep(short_lease.total_seconds() / 2)
            with pytest.raises(IdempotencyConflict):
                await idempotency.claim(services.db, tenant.workspace_id, key, "fp", 3600)


async def test_a_renewal_the_database_refuses_for_good_is_not_taken_for_an_outage(
    services: Services, tenant: Tenant, short_lease: timedelta
) -> None:
    """A renewal refused for good (a key with a NUL, which PostgreSQL text cannot hold) was
    logged as an outage and tried again every LEASE / 3 for as long as the request ran: now
    one error line, and no more tries. (SQLite stores the NUL: no claim has that key, so
    the renewal finds none and stops, quietly.)"""
    key = f"k-{uuid.uuid4()}-\x00"
    with json_logs() as lines:
        async with idempotency.hold(services.db, tenant.workspace_id, key, utcnow()):
            await asyncio.sleep(short_lease.total_seconds() * 2)
    assert lines.events("idempotency_renew_failed") == []
    refused = lines.events("idempotency_renew_refused")
    if services.db.is_sqlite:
        assert refused == []
    else:
        [line] = refused
        assert line["level"] == "error" and "SQLSTATE 22021" in line["error"]


async def test_a_stalled_request_that_was_taken_over_cannot_create_a_second_job(
    services: Services, tenant: Tenant, short_lease: timedelta
) -> None:
    """The fencing token: after a takeover, the first request's job transaction refuses."""
    key = f"k-{uuid.uuid4()}"
    first = await idempotency.claim(services.db, tenant.workspace_id, key, "fp", 3600)
    await asyncio.sleep(short_lease.total_seconds() + 0.2)  # its lease lapses (stalled)
    second = await idempotency.claim(services.db, tenant.workspace_id, key, "fp", 3600)
    assert first.token is not None and second.token is not None
    assert second.token != first.token

    with pytest.raises(idempotency.LostClaim):
        async with services.db.begin() as conn:
            await idempotency.record_job(conn, tenant.workspace_id, key, uuid.uuid4(), first.token)
    async with services.db.begin() as conn:
        await idempotency.record_job(conn, tenant.workspace_id, key, uuid.uuid4(), second.token)


async def test_a_taken_over_key_whose_job_exists_answers_that_job(
    services: Services, tenant: Tenant, short_lease: timedelta
) -> None:
    body = {"contact_ids": [str(uuid.uuid4())]}
    key = f"k-{uuid.uuid4()}"
    status, answer, _ = await tenant.call("POST", BULK, body, {"Idempotency-Key": key})
    assert status == 202
    job_id = answer["data"]["job_id"]
    # As if the first request had died after creating its job, before storing its answer.
    async with services.db.begin() as conn:
        await conn.execute(
            idempotency_keys.update()
            .where(idempotency_keys.c.key == key)
            .values(
                state="in_progress",
                response_status=None,
                response_body=None,
                expires_at=utcnow() + short_lease,  # its last renewal
            )
        )
    await asyncio.sleep(short_lease.total_seconds() + 0.2)
    status, answer, _ = await tenant.call("POST", BULK, body, {"Idempotency-Key": key})
    assert status == 202, answer
    assert answer["data"]["job_id"] == job_id
    assert await job_ids(services, tenant) == [job_id]


# -- a database that does not answer at all -------------------------------------------


@pytest.fixture
async def api_without_database() -> AsyncIterator[str]:
    """The API of a service whose PostgreSQL is not listening (a port nobody holds)."""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"
    services = Services(settings=make_settings(url), db=Database(url))
    server = TestServer(create_app(services), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
        await services.close()


async def test_the_api_answers_503_not_500_while_the_database_is_unreachable(
    api_without_database: str,
) -> None:
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer cd_live_whatever", "Idempotency-Key": "k1"}
        for method, path in (("GET", "/v1/bulk-jobs"), ("POST", BULK)):
            async with http.request(
                method, api_without_database + path, headers=headers, json={"search": "x"}
            ) as response:
                body = await response.json()
                assert response.status == 503, body
                assert body["error"]["code"] == "service_unavailable"
                assert int(response.headers["Retry-After"]) >= 1
        async with http.get(api_without_database + "/readyz") as response:
            body = await response.json()
            assert response.status == 503
            assert body["error"]["details"]["database"] == "unreachable"
