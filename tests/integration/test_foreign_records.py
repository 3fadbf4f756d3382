"""Another deployment's records on a shared broker are never acted on, and said loudly
(service.deployment). Real broker, both databases, two real deployments (two databases,
the same KAFKA_TOPIC_PREFIX and KAFKA_CONSUMER_GROUP_PREFIX).

Before, the worker skipped the other deployment's commands (their jobs are not in its
database) and the fan-out its events in silence; the other deployment's jobs waited with
nothing to say why.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer

from service.app import Services, create_app
from service.config import Settings
from service.db import admin_sql, outbox, server_secrets, webhook_deliveries
from service.db import webhook_endpoints as endpoints_table
from service.deployment import DEPLOYMENT_ID_NAME
from service.events import TOPIC_CONTACT_DELETED, TOPIC_DELETION_REQUESTED
from service.kafka import OutMessage, Producer
from service.migrate import upgrade
from service.topics import create_topics
from tests.conftest import Tenant, components_running, new_tenant, opened_services
from tests.integration.test_lost_records import BOUND_S, _done, _endpoint, own_db_url, settings
from tests.integration.test_unreadable_batches import _all_published, _bulk_delete, _completed
from tests.logcapture import json_logs

__all__ = ["own_db_url", "settings"]  # the fixtures, used by name


@pytest.fixture
async def other_db_url(db_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """The other deployment's database."""
    if db_url.startswith("sqlite"):
        url = f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
    else:
        name = f"other_{uuid.uuid4().hex[:10]}"
        await admin_sql(db_url, f'CREATE DATABASE "{name}"')
        url = f"{db_url.rpartition('/')[0]}/{name}"
    try:
        await upgrade(url)
        yield url
    finally:
        if not db_url.startswith("sqlite"):
            await admin_sql(db_url, f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
async def other(
    settings: Settings, other_db_url: str, http: aiohttp.ClientSession
) -> AsyncIterator[tuple[Services, Tenant]]:
    """Deployment B: its own database, this test's broker, topics and consumer groups."""
    async with opened_services(settings.model_copy(update={"database_url": other_db_url})) as b:
        server = TestServer(create_app(b), host="127.0.0.1")
        await server.start_server()
        try:
            yield b, await new_tenant(b, str(server.make_url("")).rstrip("/"), http)
        finally:
            await server.close()


async def _id(services: Services) -> str:
    async with services.db.read() as conn:
        return str(
            (
                await conn.execute(
                    sa.select(server_secrets.c.value).where(
                        server_secrets.c.name == DEPLOYMENT_ID_NAME
                    )
                )
            ).scalar_one()
        )


async def _skipped(
    lines: object, services: Services, count: int, **where: object
) -> list[dict[str, object]]:
    """The ``foreign_records_skipped`` lines for ``where``, once the counter shows ``count``
    (one line a minute at most: records fetched apart after the first line are counted
    now and said in the next line)."""
    async with asyncio.timeout(BOUND_S):
        while True:
            found = [
                line
                for line in lines.events("foreign_records_skipped")  # type: ignore[attr-defined]
                if all(line.get(k) == v for k, v in where.items())
            ]
            topic, case = str(where["topic"]), str(where["case"])
            if found and _counted(services, topic, case) >= count:
                return found
            await asyncio.sleep(0.1)


def _counted(services: Services, topic: str, case: str) -> float:
    value = services.metrics.registry.get_sample_value(
        "foreign_records_skipped_total", {"topic": topic, "case": case}
    )
    return value or 0.0


async def test_another_deployments_commands_are_skipped_loudly(
    tenant: Tenant,
    services: Services,
    settings: Settings,
    other: tuple[Services, Tenant],
) -> None:
    """B's relay publishes job B's two commands to the topic A's worker reads (same prefix,
    same group): A's worker does not act on them, and says so once (case
    another_deployment, B's id, the remedy) and counts them; a command without the header
    naming a job A does not have is said as unstamped. A's own job completes as ever."""
    b, b_tenant = other
    await create_topics(settings)
    topic = settings.topic(TOPIC_DELETION_REQUESTED)
    job_b = await _bulk_delete(b_tenant, 2)
    async with components_running(b, "relay"):
        await _all_published(b)
    b_id = await _id(b)
    async with b.db.read() as conn:
        row = (
            await conn.execute(
                sa.select(outbox.c.key, outbox.c.payload).where(outbox.c.topic == topic)
            )
        ).first()
    assert row is not None
    producer = Producer(settings.kafka_bootstrap_servers)
    await producer.start()
    try:  # one command of B's as an older version wrote it: no deployment header
        await producer.send_many([OutMessage(topic, row.key.encode(), bytes(row.payload))])
    finally:
        await producer.stop()

    with json_logs() as lines:
        async with components_running(services, "relay", "worker"):
            _done(await _bulk_delete(tenant, 1, wait=True), 1)
            [foreign] = await _skipped(lines, services, 2, case="another_deployment", topic=topic)
            [unstamped] = await _skipped(lines, services, 1, case="unstamped", topic=topic)
    a_id = await _id(services)
    assert a_id != b_id
    assert foreign["level"] == "error"
    assert (foreign["topic"], foreign["partition"]) == (topic, 0)
    assert foreign["count"] in (1, 2)  # 2 unless fetched apart (then the next line says 1)
    assert (foreign["deployment"], foreign["other_deployment"]) == (a_id, b_id)
    assert "KAFKA_TOPIC_PREFIX" in str(foreign["remedy"])
    assert (unstamped["topic"], unstamped["count"], unstamped["other_deployment"]) == (
        topic,
        1,
        None,
    )
    assert _counted(services, topic, "another_deployment") == 2
    assert _counted(services, topic, "unstamped") == 1
    # Never acted on: job B is still waiting in B, and nothing of it is in A.
    status, body, _ = await b_tenant.call("GET", f"/v1/bulk-jobs/{job_b['job_id']}")
    assert status == 200 and body["data"]["completed_at"] is None
    assert not any("payload" in line for line in lines.events("foreign_records_skipped"))


async def test_another_deployments_events_are_never_fanned_out(
    tenant: Tenant,
    services: Services,
    settings: Settings,
    other: tuple[Services, Tenant],
) -> None:
    """B deletes a contact; its contact.deleted event reaches the topic A's fan-out reads.
    A has an endpoint in a workspace with B's workspace id (as if A's data said it took
    that event): A's fan-out still does not act on B's event (stamped with B's id), and
    says so; A's own event is fanned out as ever."""
    b, b_tenant = other
    await create_topics(settings)
    topic = settings.topic(TOPIC_CONTACT_DELETED)
    mine = await _endpoint(tenant)
    async with services.db.begin() as conn:  # A's endpoint, again, in B's workspace
        row = dict(
            (await conn.execute(sa.select(endpoints_table).where(endpoints_table.c.id == mine)))
            .mappings()
            .one()
        )
        row.update(id=uuid.uuid4(), workspace_id=b_tenant.workspace_id)
        await conn.execute(endpoints_table.insert().values(row))
    async with components_running(b, "relay", "worker"):
        _done(await _completed(b_tenant, (await _bulk_delete(b_tenant, 1))["job_id"]), 1)
        await _all_published(b)

    with json_logs() as lines:
        async with components_running(services, "relay", "worker", "dispatcher"):
            _done(await _bulk_delete(tenant, 1, wait=True), 1)
            [foreign] = await _skipped(lines, services, 1, case="another_deployment", topic=topic)
            async with asyncio.timeout(BOUND_S):
                while not await _contact_deleted_deliveries(services):
                    await asyncio.sleep(0.1)
    assert (foreign["partition"], foreign["count"], foreign["component"]) == (0, 1, "dispatcher")
    assert foreign["other_deployment"] == await _id(b)
    [(workspace, endpoint)] = await _contact_deleted_deliveries(services)
    assert (workspace, endpoint) == (tenant.workspace_id, mine)  # nothing to B's workspace


async def _contact_deleted_deliveries(services: Services) -> list[tuple[uuid.UUID, uuid.UUID]]:
    d = webhook_deliveries.c
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(d.workspace_id, d.endpoint_id).where(d.event_type == "contact.deleted")
        )
        return [(r.workspace_id, r.endpoint_id) for r in rows]
