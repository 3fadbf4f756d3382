"""The bench's contract floor writes, per contact, the rows the service writes.

The contract floor (service.bench_contract) is the bench's measure of what DESIGN.md §1
costs any implementation: its rows must be the service's own, table by table, or its rate
means nothing. Counted by the same triggers (`RowCounter`) for a real deletion through the
running service (API, relay, worker, dispatcher in this process, real Kafka, a receiver
verifying the signatures with `standardwebhooks`) and for the floor over the same number
of contacts with the same timelines, on both databases.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from service.app import Services
from service.audit.store import verify_workspace
from service.bench import seed
from service.bench_contract import STAGES, RowCounter, add_endpoints, contract_floor
from service.db import Database, outbox, webhook_deliveries
from service.keys import ensure_workspace
from tests.conftest import (
    Tenant,
    components_running,
    make_settings,
    new_tenant,
    opened_services,
    own_database,
    subscribed_receiver,
)

N = 12
"""Contacts per side: one job each (under the floor's and the API's 500)."""
PER_TIME = {"server_secrets", "webhook_endpoints"}
"""Tables the service writes once per process start (its hash and signing keys) or per
unit of time (the dispatcher's endpoint ownership leases), not per contact: not the floor's."""


@pytest.fixture
async def services(db_url: str, kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Services]:
    """The service on a database of the test's own: the triggers count every writer's
    rows, and the shared database has other tests writing."""
    async with own_database(db_url, tmp_path, "contract") as url:
        settings = make_settings(url, kafka_bootstrap_servers=kafka_bootstrap)
        async with opened_services(settings) as svc:
            yield svc


async def _settled(db: Database, workspace_id: uuid.UUID, expected: int) -> bool:
    """Every delivery of the workspace recorded as succeeded, every outbox row published."""
    d = webhook_deliveries.c
    async with db.read() as conn:
        done = (
            await conn.execute(
                sa.select(sa.func.count()).where(
                    d.workspace_id == workspace_id, d.status == "succeeded"
                )
            )
        ).scalar_one()
        unpublished = (
            await conn.execute(sa.select(sa.func.count()).where(outbox.c.published_at.is_(None)))
        ).scalar_one()
    return bool(done == expected and unpublished == 0)


async def _service_rows(
    services: Services, tenant: Tenant, counter: RowCounter
) -> dict[str, dict[str, float]]:
    """Rows per contact per table of a real deletion of N contacts with one receiver."""
    verified: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        verified.append(Webhook(secret).verify(await request.read(), dict(request.headers))["type"])
        return web.Response(status=204)

    async with subscribed_receiver(tenant, hook) as secret:
        ids = await seed(services.db, tenant.workspace_id, N, tag="contract-service")
        await counter.install()
        async with components_running(services, "relay", "worker", "dispatcher"):
            status, job, _ = await tenant.call(
                "POST",
                "/v1/contacts/bulk-delete",
                {"contact_ids": [str(i) for i in ids]},
                {"Prefer": "wait=30"},
            )
            assert status == 200 and job["data"]["deleted_count"] == N, job
            for _ in range(300):
                if await _settled(services.db, tenant.workspace_id, N):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the deliveries were not all recorded in 30 s")
        assert verified == ["contact.deleted"] * N
        return await counter.counts(N)


async def test_contract_floor_writes_the_rows_the_service_writes(
    services: Services, api: str, http: object
) -> None:
    """Distinct rows inserted, updated and deleted per contact, table by table: the floor's
    equal the service's (row versions may differ: that is the service's overhead)."""
    import aiohttp

    db = services.db
    counter = RowCounter(db)
    try:
        async with aiohttp.ClientSession() as session:
            tenant = await new_tenant(services, api, session)
            service = await _service_rows(services, tenant, counter)
        workspace_id = await ensure_workspace(db, f"contract-{uuid.uuid4().hex[:8]}")
        ids = await seed(db, workspace_id, N, tag="contract-floor")
        endpoints = await add_endpoints(db, workspace_id, 1)
        await counter.counts(N)  # the seeding and the endpoint are not the floor's
        clock = await contract_floor(db, workspace_id, ids, endpoints, secrets.token_bytes(32))
        floor = await counter.counts(N)
    finally:
        await counter.remove()
    assert all(clock.seconds[stage] > 0 for stage in STAGES), clock

    def distinct(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {
            t: {k: v for k, v in ops.items() if k != "writes"}
            for t, ops in rows.items()
            if t not in PER_TIME
        }

    assert distinct(floor) == distinct(service), (floor, service)
    # The floor's audit events (its endpoint's, the job's two, one per contact) are a
    # chain the service's verify accepts: the floor hashes what the service hashes.
    result = await verify_workspace(db, workspace_id)
    assert result.ok and result.events_checked == 1 + N + 2, result
