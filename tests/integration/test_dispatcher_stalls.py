"""Exactly once under stalls: a dispatcher held at one point between claim, send, record
and renew while its leases lapse and another dispatcher runs.

A stall is made deterministic: the held dispatcher stops at a named pause point
(`service.failpoints.Pauses`), and the clock both dispatchers take their leases by is
moved on past a lease (as the stall would have taken that long), so the other one may
take the endpoint over at once. Real receiver, real databases (SQLite and PostgreSQL),
each dispatcher with its own Database, as separate processes would have.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from service.app import Services
from service.config import Settings
from service.db import Database, utcnow, webhook_deliveries
from service.failpoints import Pauses
from service.webhooks.dispatcher import LEASE_ROUNDS, LEASE_SLACK_S, Dispatcher
from tests.conftest import Tenant, make_settings
from tests.integration.test_webhooks import (
    Receiver,
    answer,
    create_endpoint,
    eventually,
    has_status,
    recorded_attempts,
    send_test,
    wait_delivery,
)


@pytest.fixture
def settings(db_url: str) -> Settings:
    """A 10 s request timeout, so that no request times out on a loaded machine (and is
    sent again, rightly): a stall is made by moving the clock, not by waiting out a lease.
    No broker: these tests run senders only."""
    return make_settings(db_url, webhook_retry_schedule="0,1,1,1", webhook_timeout_s=10)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.close()


@pytest.fixture(autouse=True)
async def _alone(services: Services) -> AsyncIterator[None]:
    """Only this test's deliveries are due: what earlier tests in the session's database
    left pending is failed first (these senders would claim it too, and the pause
    points count every delivery), and what this test leaves, afterwards."""

    async def cancel() -> None:
        async with services.db.begin() as conn:
            await conn.execute(
                webhook_deliveries.update()
                .where(webhook_deliveries.c.status.in_(("pending", "failing")))
                .values(status="failed", completed_at=utcnow())
            )

    await cancel()
    yield
    await cancel()


class Clock:
    """The clock the dispatchers of a test take and check their leases by."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def pass_a_lease(self, services: Services) -> None:
        """Move on past every lease taken so far (as a stall that long would)."""
        timeout_s = services.settings.webhook_timeout_s
        self.offset += timedelta(seconds=timeout_s * LEASE_ROUNDS + LEASE_SLACK_S + 1)


@dataclass
class Running:
    dispatcher: Dispatcher
    db: Database
    stop: asyncio.Event
    task: asyncio.Task[None]


@dataclass
class Senders:
    """Dispatcher senders on one clock, each with its own Database."""

    services: Services
    clock: Clock = field(default_factory=Clock)
    running: list[Running] = field(default_factory=list)

    def start(self, pauses: Pauses | None = None) -> Running:
        db = Database(self.services.settings.database_url)
        dispatcher = Dispatcher(
            self.services.settings,
            db,
            self.services.metrics,
            asyncio.Event(),
            clock=self.clock,
            pauses=pauses,
        )
        stop = asyncio.Event()
        run = Running(dispatcher, db, stop, asyncio.create_task(dispatcher.run_sender(stop)))
        self.running.append(run)
        return run

    async def stop(self, run: Running) -> None:
        """Stop it as a process would stop (it gives its endpoints back)."""
        run.stop.set()
        await asyncio.wait_for(run.task, timeout=30)
        await run.db.dispose()
        self.running.remove(run)

    async def close(self) -> None:
        for run in list(self.running):
            if run.dispatcher.pauses is not None:
                for point in ("claimed", "before_post", "sent", "pass"):
                    run.dispatcher.pauses.release(point)
            await self.stop(run)


async def settled(dispatcher: Dispatcher, endpoint: dict[str, Any]) -> None:
    """Wait until it holds nothing of this endpoint claimed, in flight or unrecorded."""
    eid = uuid.UUID(endpoint["id"])

    async def idle() -> bool | None:
        slots = dispatcher.slots.get(eid)
        busy = slots is not None and (slots.ready or slots.in_flight)
        busy = busy or any(d["endpoint_id"] == eid for d, _ in dispatcher.finished)
        return None if busy else True

    await eventually(idle, 10, "the resumed dispatcher settles")


def buffered(dispatcher: Dispatcher, endpoint: dict[str, Any]) -> int:
    slots = dispatcher.slots.get(uuid.UUID(endpoint["id"]))
    return 0 if slots is None else len(slots.ready)


async def succeeded(tenant: Tenant, endpoint_id: str, events: Sequence[str]) -> None:
    for event_id in events:
        await wait_delivery(tenant, endpoint_id, event_id, has_status("succeeded"), 15)


def sent(receiver: Receiver, path: str) -> list[str]:
    """The webhook ids the receiver got at `path`, sorted."""
    return sorted(h.webhook_id for h in receiver.at(path))


async def test_stalled_after_its_claim_a_dispatcher_never_sends_what_its_successor_sent(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """Held between its claim and the sends until the claim lapsed: another dispatcher
    takes the endpoint, sends and records every delivery and gives the endpoint up (it
    stops). The first one, resuming, owns the endpoint again, but none of its buffered
    leases is its own any more: it sends nothing (it sent all three again before)."""
    path = "/stall-claimed"
    endpoint = await create_endpoint(tenant, receiver.script(path, answer(200)))
    events = [await send_test(tenant, endpoint["id"]) for _ in range(3)]
    group = Senders(services)
    try:
        pauses = Pauses()
        pauses.hold("claimed")
        first = group.start(pauses)
        await pauses.reached("claimed")
        assert buffered(first.dispatcher, endpoint) == 3 and not receiver.at(path)
        group.clock.pass_a_lease(services)
        second = group.start()
        await succeeded(tenant, endpoint["id"], events)
        await group.stop(second)
        pauses.release("claimed")
        await settled(first.dispatcher, endpoint)
    finally:
        await group.close()
    assert sent(receiver, path) == sorted(events)
    assert await recorded_attempts(services, events) == dict.fromkeys(events, 1)


async def test_stalled_before_its_request_a_dispatcher_does_not_send_once_the_lease_ran_out(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """Held with two requests about to start (the sends taken from the buffer, nothing
    written to the receiver) until the lease lapsed, while another dispatcher takes the
    endpoint over and sends all four: resuming, the first starts neither request (it
    sent both again before), and the receiver never sees more than the limit at once."""
    path = "/stall-before-post"
    endpoint = await create_endpoint(tenant, receiver.script(path, answer(200)), max_in_flight=2)
    events = [await send_test(tenant, endpoint["id"]) for _ in range(4)]
    group = Senders(services)
    try:
        pauses = Pauses()
        pauses.hold("before_post")
        first = group.start(pauses)
        await pauses.reached("before_post", 2)
        pauses.hold("pass")  # the whole process stalls, not only its two requests
        await pauses.reached("pass")
        group.clock.pass_a_lease(services)
        group.start()
        await succeeded(tenant, endpoint["id"], events)
        pauses.release("before_post")
        pauses.release("pass")
        await settled(first.dispatcher, endpoint)
    finally:
        await group.close()
    assert sent(receiver, path) == sorted(events)
    assert receiver.max_in_flight[path] <= 2
    assert await recorded_attempts(services, events) == dict.fromkeys(events, 1)


async def test_stalled_between_its_requests_and_their_recording_a_lone_dispatcher_records_them(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """Held after its three requests were answered, before recording them, until their
    leases lapsed, with no other dispatcher about: nobody claimed them meanwhile, so it
    records them when it resumes, and none goes out again (it dropped the three and
    sent them again before)."""
    path = "/stall-sent"
    endpoint = await create_endpoint(tenant, receiver.script(path, answer(200)))
    events = [await send_test(tenant, endpoint["id"]) for _ in range(3)]
    group = Senders(services)
    try:
        pauses = Pauses()
        pauses.hold("sent")
        first = group.start(pauses)
        await pauses.reached("sent", 3)
        pauses.hold("pass")
        await pauses.reached("pass")
        group.clock.pass_a_lease(services)
        pauses.release("sent")
        pauses.release("pass")
        await succeeded(tenant, endpoint["id"], events)
        await settled(first.dispatcher, endpoint)
    finally:
        await group.close()
    assert sent(receiver, path) == sorted(events)
    assert await recorded_attempts(services, events) == dict.fromkeys(events, 1)


async def test_a_late_recording_never_overwrites_a_successors_claim(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """Held between its requests and their recording until the leases lapsed, while
    another dispatcher claimed the three deliveries (and is about to send them): the
    first one's late attempts are not recorded over that claim (the webhooks do go out
    twice: nothing told the successor they had been sent); the successor's are, once
    each, so every delivery ends with one attempt row per recorded request."""
    path = "/stall-late-record"
    endpoint = await create_endpoint(tenant, receiver.script(path, answer(200)))
    events = [await send_test(tenant, endpoint["id"]) for _ in range(3)]
    group = Senders(services)
    try:
        held = Pauses()
        held.hold("sent")
        first = group.start(held)
        await held.reached("sent", 3)
        held.hold("pass")
        await held.reached("pass")
        group.clock.pass_a_lease(services)
        about_to_send = Pauses()
        about_to_send.hold("before_post")
        group.start(about_to_send)
        await about_to_send.reached("before_post", 3)
        held.release("sent")
        held.release("pass")
        await settled(first.dispatcher, endpoint)
        assert await recorded_attempts(services, events) == {}
        about_to_send.release("before_post")
        await succeeded(tenant, endpoint["id"], events)
    finally:
        await group.close()
    assert sent(receiver, path) == sorted(events * 2)
    assert await recorded_attempts(services, events) == dict.fromkeys(events, 1)


async def test_a_buffer_held_past_half_its_lease_is_renewed_and_sent_once(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """Held after its claim for most of the lease (too little left to start a request,
    nobody else about): the next pass renews the buffered leases (they are still the
    ones it took), and the deliveries go out from the buffer, once each, under the
    renewed leases."""
    path = "/stall-renewed"
    endpoint = await create_endpoint(tenant, receiver.script(path, answer(200)))
    events = [await send_test(tenant, endpoint["id"]) for _ in range(3)]
    group = Senders(services)
    try:
        pauses = Pauses()
        pauses.hold("claimed")
        first = group.start(pauses)
        await pauses.reached("claimed")
        mine = first.dispatcher.slots[uuid.UUID(endpoint["id"])]
        taken = {d["claimed_until"] for d in mine.ready}
        lease = timedelta(seconds=services.settings.webhook_timeout_s * LEASE_ROUNDS)
        group.clock.offset += lease * 0.8 + timedelta(seconds=LEASE_SLACK_S)
        pauses.hold("before_post")
        pauses.release("claimed")
        await pauses.reached("before_post", 3)
        leases = await claimed_until(services, events)
        assert len(leases) == 1 and leases[0] > max(taken), (leases, taken)
        pauses.release("before_post")
        await succeeded(tenant, endpoint["id"], events)
    finally:
        await group.close()
    assert sent(receiver, path) == sorted(events)
    assert await recorded_attempts(services, events) == dict.fromkeys(events, 1)


async def claimed_until(services: Services, event_ids: Sequence[str]) -> list[datetime]:
    """The distinct leases of the deliveries of these events."""
    d = webhook_deliveries.c
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(d.claimed_until).where(d.event_id.in_(list(event_ids))).distinct()
        )
        return [r for (r,) in rows.all()]
