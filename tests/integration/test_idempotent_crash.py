"""An idempotent POST's change and its stored answer are one transaction, on SQLite and
PostgreSQL: a process killed between the two (failpoint ``idempotent_work_before_key``)
leaves neither, so the client's retry with the same key runs the change once. Before,
the change committed first and a retry made it a second time (README admitted it)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from service import idempotency
from service.app import Services
from service.config import Settings
from service.db import Database, contacts, idempotency_keys, utcnow, webhook_endpoints
from service.keys import create_key
from tests.components import Components, components, listening_port
from tests.conftest import contact_row

pytestmark = pytest.mark.slow

# Long enough for the lease the dead request left (idempotency.LEASE) to lapse.
RETRY_FOR_S = idempotency.LEASE.total_seconds() + 20


@pytest.fixture
def processes(settings: Settings, tmp_path: Path) -> Iterator[Components]:
    with components(settings, tmp_path, {"HTTP_PORT": "0"}) as group:
        yield group


async def _count_contacts(db: Database, tag: str) -> int:
    async with db.read() as conn:
        stmt = sa.select(sa.func.count()).where(contacts.c.email == f"{tag}@example.com")
        return int((await conn.execute(stmt)).scalar_one())


async def _count_endpoints(db: Database, tag: str) -> int:
    async with db.read() as conn:
        stmt = sa.select(sa.func.count()).where(webhook_endpoints.c.description == tag)
        return int((await conn.execute(stmt)).scalar_one())


Case = tuple[str, Callable[[str], dict[str, Any]], Callable[[Database, str], Awaitable[int]]]
# Each replayable POST kind the crash is tried on: path, body from a unique tag, count.
CASES: dict[str, Case] = {
    "contact": ("/v1/contacts", lambda tag: {"email": f"{tag}@example.com"}, _count_contacts),
    "webhook endpoint": (
        "/v1/webhooks/endpoints",
        lambda tag: {"url": "http://127.0.0.1:9/hook", "description": tag},
        _count_endpoints,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_crash_between_the_change_and_its_key_leaves_one_change_after_the_retry(
    services: Services, processes: Components, case: str
) -> None:
    path, make_body, count = CASES[case]
    created = await create_key(
        services.db, f"ws-{uuid.uuid4().hex[:8]}", ["contacts:write", "webhooks:manage"]
    )
    tag = f"crash-{uuid.uuid4().hex[:10]}"
    headers = {"Authorization": f"Bearer {created.key}", "Idempotency-Key": f"k-{tag}"}
    body = make_body(tag)
    doomed = processes.start("api", failpoint="idempotent_work_before_key")
    port = await listening_port(doomed)

    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await http.post(f"http://127.0.0.1:{port}{path}", json=body, headers=headers)
        assert await doomed.wait_exit(timeout_s=15) == -9
        survivor = processes.start("api")
        port = await listening_port(survivor)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_FOR_S
        while True:
            async with http.post(
                f"http://127.0.0.1:{port}{path}", json=body, headers=headers
            ) as response:
                status = response.status
            if status != 409 or loop.time() > deadline:
                break
            await asyncio.sleep(0.5)  # the dead request's lease has not lapsed yet

    assert status == 201
    assert await count(services.db, tag) == 1


async def test_a_claim_taken_over_during_the_work_rolls_the_work_back(db: Database) -> None:
    """The stored answer is the work's fence: if the key was taken over meanwhile (the
    lease lapsed), the work's own writes go too and the request is a 409."""
    workspace = uuid.uuid4()
    contact_id = uuid.uuid4()
    key = f"k-{uuid.uuid4()}"

    async def work(claim: idempotency.Claim) -> idempotency.StoredResponse:
        # Another request takes the key over (what a lapsed lease lets happen while this
        # one stalls, e.g. resolving a webhook URL), before this one writes anything.
        async with db.engine.begin() as other:
            await other.execute(
                idempotency_keys.update()
                .where(idempotency_keys.c.key == key)
                .values(created_at=utcnow() + timedelta(seconds=1))
            )
        async with db.begin() as conn:
            row = contact_row(workspace, contact_id, utcnow())
            await conn.execute(contacts.insert().values(**row))
        return idempotency.StoredResponse(201, {}, b"{}")

    with pytest.raises(idempotency.LostClaim):
        await idempotency.once(db, workspace, key, "print", 60, work, one_transaction=True)

    async with db.read() as conn:
        found = (
            await conn.execute(sa.select(contacts.c.id).where(contacts.c.id == contact_id))
        ).first()
    assert found is None
