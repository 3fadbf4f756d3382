"""Webhooks against a real receiver: endpoint API, signatures, retries, isolation, recovery.

Each test runs on SQLite and PostgreSQL. The receiver is a real aiohttp server on
127.0.0.1 that records every request and answers from a script; signatures are checked
with the PyPI ``standardwebhooks`` library, never with our own signing code. Deliveries
are made through the API (``POST .../test``) or by calling ``Dispatcher.fan_out`` with a
CloudEvent, and sent by a ``Dispatcher`` sender running in this process with a short
retry schedule (0, 1, 1, 1 s) so that a whole schedule runs out in a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.app import Services, create_app
from service.config import Settings
from service.db import (
    Database,
    admin_sql,
    audit_events,
    utcnow,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from service.events import (
    TYPE_CONTACT_DELETED,
    TYPE_JOB_COMPLETED,
    CloudEvent,
    ContactDeleted,
    DeletionJobCompleted,
    OrphanedTimeline,
    envelope,
)
from service.kafka import InMessage, Producer
from service.keys import SCOPES, create_key
from service.migrate import upgrade
from service.procs import free_port
from service.webhooks import dispatcher as dispatcher_module
from service.webhooks import store
from service.webhooks.dispatcher import AttemptResult, Dispatcher
from service.webhooks.models import DisabledReason
from service.webhooks.payloads import TYPE_WEBHOOK_TEST, webhook_body
from tests.conftest import (
    Tenant,
    components_running,
    make_settings,
    new_tenant,
    opened_services,
)
from tests.logcapture import json_logs

T = TypeVar("T")
ENDPOINTS = "/v1/webhooks/endpoints"
DELIVERIES = "/v1/webhooks/deliveries"
MAX_IN_FLIGHT = 4


@pytest.fixture
def settings(db_url: str, kafka_bootstrap: str) -> Settings:
    """The real broker, a retry schedule of 0, 1, 1, 1 s and a 2 s timeout."""
    return make_settings(
        db_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        webhook_retry_schedule="0,1,1,1",
        webhook_timeout_s=2,
        webhook_connect_timeout_s=1,
        webhook_max_in_flight_per_endpoint=MAX_IN_FLIGHT,
    )


# -- the receiver ----------------------------------------------------------------------

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Hit:
    """One request the receiver got."""

    path: str
    body: bytes
    headers: dict[str, str]
    at: float  # time.time() when it arrived

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


def answer(status: int, body: str = "", headers: dict[str, str] | None = None) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, headers=headers)

    return reply


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every request and answers by script.

    ``script(path, r1, r2, ...)`` answers the first request to ``path`` with r1, the
    second with r2, and every later one with the last. Unscripted paths answer 204.
    """

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.scripts: dict[str, list[Reply]] = {}
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.released = asyncio.Event()  # ends every `sleep` early, at teardown
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    async def start(self) -> None:
        await self.server.start_server()

    async def close(self) -> None:
        self.released.set()
        await self.server.close()

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def script(self, path: str, *replies: Reply) -> str:
        """Answer requests to `path` with `replies` in turn; returns the path's URL."""
        self.scripts[path] = list(replies)
        return self.url(path)

    def sleep(self, seconds: float, then: Reply) -> Reply:
        """A reply that takes `seconds` (or until the receiver is released)."""

        async def reply(request: web.Request) -> web.StreamResponse:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), timeout=seconds)
            return await then(request)

        return reply

    def at(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        earlier = len(self.at(request.path))
        self.hits.append(Hit(request.path, body, dict(request.headers), time.time()))
        replies = self.scripts.get(request.path) or [answer(204)]
        reply = replies[min(earlier, len(replies) - 1)]
        self.in_flight[request.path] += 1
        self.max_in_flight[request.path] = max(
            self.max_in_flight[request.path], self.in_flight[request.path]
        )
        try:
            return await reply(request)
        finally:
            self.in_flight[request.path] -= 1


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.close()


# -- the dispatcher --------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def _forget_pending(services: Services) -> AsyncIterator[None]:
    """Cancel what a test leaves pending, so no later test's receiver gets it."""
    started = utcnow() - timedelta(seconds=1)
    yield
    async with services.db.begin() as conn:
        await conn.execute(
            webhook_deliveries.update()
            .where(
                webhook_deliveries.c.status.in_(("pending", "failing")),
                webhook_deliveries.c.created_at >= started,
            )
            .values(status="failed", completed_at=utcnow())
        )


StartSender = Callable[..., Dispatcher]


@pytest.fixture
async def sender(services: Services, receiver: Receiver) -> AsyncIterator[StartSender]:
    """Starts a dispatcher's sender in this process (settings overridable); stops it after."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start(**overrides: Any) -> Dispatcher:
        settings = Settings(**(services.settings.model_dump() | overrides))
        dispatcher = Dispatcher(
            settings,
            services.db,
            services.metrics,
            services.webhook_signal,
            changes=services.webhook_changes,  # the API's news, as in one process
        )
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(dispatcher.run_sender(stop))))
        return dispatcher

    yield start
    receiver.released.set()  # in-flight requests answer now
    for stop, _ in running:
        stop.set()
    for _, task in running:
        await asyncio.wait_for(task, timeout=30)


@pytest.fixture
async def everything(services: Services) -> AsyncIterator[Services]:
    """Relay, worker and dispatcher running in this process against the real broker."""
    async with components_running(services, "relay", "worker", "dispatcher"):
        yield services


# -- helpers ---------------------------------------------------------------------------


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    """The first non-None value of `probe`; fails the test after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await probe()
        if value is not None:
            return value
        assert loop.time() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.05)


async def _some(value: T) -> T | None:
    """`value` if it is truthy, else None: a probe for `eventually`."""
    return value or None


async def create_endpoint(tenant: Tenant, url: str, **fields: Any) -> dict[str, Any]:
    status, body, _ = await tenant.call("POST", ENDPOINTS, {"url": url, **fields})
    assert status == 201, body
    endpoint: dict[str, Any] = body["data"]
    return endpoint


async def send_test(tenant: Tenant, endpoint_id: str) -> str:
    """Queue a webhook.test delivery; returns its event id."""
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{endpoint_id}/test")
    assert status == 202, body
    event_id: str = body["data"]["event_id"]
    return event_id


async def list_deliveries(tenant: Tenant, endpoint_id: str, query: str = "") -> list[Any]:
    status, body, _ = await tenant.call(
        "GET", f"{ENDPOINTS}/{endpoint_id}/deliveries?limit=500{query}"
    )
    assert status == 200, body
    items: list[Any] = body["data"]
    return items


async def delivery_of(tenant: Tenant, endpoint_id: str, event_id: str) -> dict[str, Any]:
    """The delivery of an event to an endpoint, with its attempts."""
    found = [d for d in await list_deliveries(tenant, endpoint_id) if d["event_id"] == event_id]
    assert len(found) == 1, found
    status, body, _ = await tenant.call("GET", f"{DELIVERIES}/{found[0]['id']}")
    assert status == 200, body
    delivery: dict[str, Any] = body["data"]
    return delivery


async def wait_delivery(
    tenant: Tenant,
    endpoint_id: str,
    event_id: str,
    until: Callable[[dict[str, Any]], bool],
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        delivery = await delivery_of(tenant, endpoint_id, event_id)
        return delivery if until(delivery) else None

    return await eventually(probe, timeout_s, f"delivery of {event_id}")


def has_status(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda d: bool(d["status"] == status)


async def get_endpoint(tenant: Tenant, endpoint_id: str) -> dict[str, Any]:
    status, body, _ = await tenant.call("GET", f"{ENDPOINTS}/{endpoint_id}")
    assert status == 200, body
    endpoint: dict[str, Any] = body["data"]
    return endpoint


@dataclass(frozen=True)
class Audited:
    action: str
    actor_type: str
    target_id: str | None
    data: dict[str, Any]


async def audit_trail(services: Services, workspace_id: uuid.UUID) -> list[Audited]:
    """The workspace's webhook audit events, in order."""
    async with services.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(audit_events)
                .where(
                    audit_events.c.workspace_id == workspace_id,
                    audit_events.c.action.startswith("webhook."),
                )
                .order_by(audit_events.c.seq)
            )
        ).all()
    return [Audited(r.action, r.actor_type, r.target_id, json.loads(r.data)) for r in rows]


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def random_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def message(event: CloudEvent, offset: int = 0) -> InMessage:
    return InMessage(
        topic=event.type,
        partition=0,
        offset=offset,
        key=(event.subject or "").encode(),
        value=event.model_dump_json().encode(),
        headers=(),
    )


def contact_deleted(workspace_id: uuid.UUID) -> CloudEvent:
    contact_id = uuid.uuid4()
    data = ContactDeleted(
        contact_id=contact_id,
        workspace_id=workspace_id,
        job_id=uuid.uuid4(),
        deleted_at=datetime.now(UTC),
        email_sha256=hashlib.sha256(b"gone@example.com").hexdigest(),
        orphaned_timeline=OrphanedTimeline(activities=1, notes=2, tasks=0),
    )
    return envelope(TYPE_CONTACT_DELETED, str(contact_id), data, datetime.now(UTC))


def job_completed(workspace_id: uuid.UUID) -> CloudEvent:
    job_id = uuid.uuid4()
    data = DeletionJobCompleted(
        job_id=job_id,
        workspace_id=workspace_id,
        status="completed",
        total_requested=1,
        processed_count=1,
        deleted_count=1,
        not_found_count=0,
        failed_count=0,
        completed_at=datetime.now(UTC),
    )
    return envelope(TYPE_JOB_COMPLETED, str(job_id), data, datetime.now(UTC))


@pytest.fixture
async def dlq(settings: Settings) -> AsyncIterator[Producer]:
    producer = Producer(settings.kafka_bootstrap_servers)
    await producer.start()
    yield producer
    await producer.stop()


# -- endpoint management ---------------------------------------------------------------


async def test_endpoint_crud_shows_the_secret_only_on_create_and_rotate(
    tenant: Tenant, services: Services
) -> None:
    """Create 201 with a whsec_ secret; list/get/patch hide it; rotate shows a new one;
    delete 204 then 404; each change leaves its audit event."""
    status, body, _ = await tenant.call(
        "POST",
        ENDPOINTS,
        {"url": "https://hooks.example.com/a", "description": "first"},
    )
    assert status == 201, body
    created = body["data"]
    endpoint_id = created["id"]
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert created["status"] == "enabled"
    assert created["disabled_reason"] is None
    assert created["event_types"] == []

    got = await get_endpoint(tenant, endpoint_id)
    assert "secret" not in got
    assert got["url"] == "https://hooks.example.com/a"
    assert got["description"] == "first"

    status, body, _ = await tenant.call("GET", ENDPOINTS)
    assert status == 200, body
    assert [e["id"] for e in body["data"]] == [endpoint_id]
    assert all("secret" not in e for e in body["data"])

    status, body, _ = await tenant.call(
        "PATCH",
        f"{ENDPOINTS}/{endpoint_id}",
        {
            "url": "https://hooks.example.com/b",
            "event_types": ["contact.deleted"],
            "description": "second",
        },
    )
    assert status == 200, body
    assert "secret" not in body["data"]
    got = await get_endpoint(tenant, endpoint_id)
    assert got["url"] == "https://hooks.example.com/b"
    assert got["event_types"] == ["contact.deleted"]
    assert got["description"] == "second"

    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{endpoint_id}/rotate-secret")
    assert status == 200, body
    rotated = body["data"]["secret"]
    assert rotated.startswith("whsec_")
    assert rotated != secret
    assert len(base64.b64decode(rotated.removeprefix("whsec_"), validate=True)) == 32
    assert "secret" not in await get_endpoint(tenant, endpoint_id)

    status, body, _ = await tenant.call("DELETE", f"{ENDPOINTS}/{endpoint_id}")
    assert status == 204, body
    status, body, _ = await tenant.call("GET", f"{ENDPOINTS}/{endpoint_id}")
    assert status == 404, body
    status, body, _ = await tenant.call("DELETE", f"{ENDPOINTS}/{endpoint_id}")
    assert status == 404, body
    status, body, _ = await tenant.call("GET", ENDPOINTS)
    assert body["data"] == []

    trail = await audit_trail(services, tenant.workspace_id)
    assert [(e.action, e.target_id) for e in trail] == [
        ("webhook.endpoint.created", endpoint_id),
        ("webhook.endpoint.updated", endpoint_id),
        ("webhook.endpoint.secret_rotated", endpoint_id),
        ("webhook.endpoint.deleted", endpoint_id),
    ]
    assert all(e.actor_type == "api_key" for e in trail)
    assert sorted(trail[1].data["changed"]) == ["description", "event_types", "url"]
    # Neither secret is ever written to the audit trail.
    for event in trail:
        assert secret not in json.dumps(event.data)
        assert rotated not in json.dumps(event.data)


async def test_the_audit_trail_keeps_an_endpoint_url_s_origin_and_hash_never_its_token(
    services: Services, tenant: Tenant
) -> None:
    """A URL's path and query often carry the receiver's token; the append-only trail kept
    the whole URL for good (trial 6). It keeps the origin and the URL's SHA-256."""
    url = "http://127.0.0.1:9/hooks/T0SECRETPATH?token=s3cr3t-query"
    status, body, _ = await tenant.call("POST", ENDPOINTS, {"url": url})
    assert status == 201, body
    trail = await audit_trail(services, tenant.workspace_id)
    [created] = [e for e in trail if e.action == "webhook.endpoint.created"]
    assert created.data["url_origin"] == "http://127.0.0.1:9"
    assert created.data["url_sha256"] == hashlib.sha256(url.encode()).hexdigest()
    for event in trail:
        text = json.dumps(event.data)
        assert "T0SECRETPATH" not in text and "s3cr3t-query" not in text, text


BAD_URLS = (
    "/relative/hook",
    "hooks.example.com/hook",
    "ftp://hooks.example.com/hook",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "http://",
    "http:///hook",
    "https://user:password@hooks.example.com/hook",
    "https://user@hooks.example.com/hook",
    "https://hooks.example.com/with space",
    "",
)


async def test_invalid_endpoint_requests_are_400(tenant: Tenant) -> None:
    """Non-absolute-http(s) URLs, URLs with credentials, unknown event types and unknown
    fields are refused with 400, on create and on PATCH."""
    for url in BAD_URLS:
        status, body, _ = await tenant.call("POST", ENDPOINTS, {"url": url})
        assert status == 400, (url, body)
        assert body["error"]["code"] == "validation_error", body
    good = await create_endpoint(tenant, "https://hooks.example.com/ok")
    for url in BAD_URLS:
        status, body, _ = await tenant.call("PATCH", f"{ENDPOINTS}/{good['id']}", {"url": url})
        assert status == 400, (url, body)

    cases: list[dict[str, Any]] = [
        {"url": "https://hooks.example.com/x", "event_types": ["contact.created"]},
        {"url": "https://hooks.example.com/x", "event_types": "contact.deleted"},
        {"url": "https://hooks.example.com/x", "secret": random_secret()},
        {"url": "https://hooks.example.com/x", "status": "disabled"},
        {"description": "no url"},
    ]
    for case in cases:
        status, body, _ = await tenant.call("POST", ENDPOINTS, case)
        assert status == 400, (case, body)
    for patch in ({"event_types": ["nope"]}, {"secret": random_secret()}, {"status": "x"}):
        status, body, _ = await tenant.call("PATCH", f"{ENDPOINTS}/{good['id']}", patch)
        assert status == 400, (patch, body)

    # Nothing was created by the refused requests, and the good one is unchanged.
    status, body, _ = await tenant.call("GET", ENDPOINTS)
    assert [e["id"] for e in body["data"]] == [good["id"]]
    assert (await get_endpoint(tenant, good["id"]))["url"] == "https://hooks.example.com/ok"


# Each member of "event_types that an endpoint cannot subscribe to", with what the 400
# names (Svix's filterTypes: known types, each once).
NOT_SUBSCRIBABLE: dict[str, tuple[list[Any], str]] = {
    "unknown type": (["contact.created"], "'contact.created' is not an event type"),
    "unknown beside a known one": (["contact.deleted", "contact.Deleted"], "'contact.Deleted'"),
    "test-only type": (["webhook.test"], "'webhook.test' is not an event type to subscribe to"),
    "test-only beside a known one": (["contact.deleted", "webhook.test"], "'webhook.test'"),
    "duplicate": (["contact.deleted", "contact.deleted"], "'contact.deleted' given more than once"),
}


@pytest.mark.parametrize("case", sorted(NOT_SUBSCRIBABLE))
async def test_event_types_an_endpoint_cannot_subscribe_to_are_a_400_naming_them(
    tenant: Tenant, case: str
) -> None:
    types, named = NOT_SUBSCRIBABLE[case]
    good = await create_endpoint(tenant, "https://hooks.example.com/ok", event_types=[])

    created = await tenant.call(
        "POST", ENDPOINTS, {"url": "https://hooks.example.com/x", "event_types": types}
    )
    patched = await tenant.call("PATCH", f"{ENDPOINTS}/{good['id']}", {"event_types": types})

    for status, body, _ in (created, patched):
        assert status == 400, (case, body)
        detail = body["error"]["details"][0]
        assert detail["field"] == "event_types" and named in detail["message"], detail
    status, body, _ = await tenant.call("GET", ENDPOINTS)
    assert [e["id"] for e in body["data"]] == [good["id"]]
    assert (await get_endpoint(tenant, good["id"]))["event_types"] == []


async def test_no_event_types_means_every_type_on_create_and_on_patch(tenant: Tenant) -> None:
    """``[]`` (or none) subscribes to every type; a PATCH with ``[]`` goes back to every type."""
    created = await create_endpoint(tenant, "https://hooks.example.com/all")
    narrowed = await create_endpoint(
        tenant, "https://hooks.example.com/some", event_types=["deletion_job.completed"]
    )

    status, body, _ = await tenant.call(
        "PATCH", f"{ENDPOINTS}/{narrowed['id']}", {"event_types": []}
    )

    assert created["event_types"] == []
    assert status == 200 and body["data"]["event_types"] == []


async def test_another_workspaces_endpoints_and_deliveries_are_404(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    """Every endpoint and delivery route answers 404 for another workspace's ids."""
    endpoint = await create_endpoint(tenant, "https://hooks.example.com/mine")
    eid = endpoint["id"]
    event_id = await send_test(tenant, eid)
    delivery = await delivery_of(tenant, eid, event_id)
    did = delivery["id"]
    since = {"since": "2000-01-01T00:00:00Z"}

    requests: list[tuple[str, str, Any]] = [
        ("GET", f"{ENDPOINTS}/{eid}", None),
        ("PATCH", f"{ENDPOINTS}/{eid}", {"description": "taken over"}),
        ("DELETE", f"{ENDPOINTS}/{eid}", None),
        ("POST", f"{ENDPOINTS}/{eid}/rotate-secret", None),
        ("POST", f"{ENDPOINTS}/{eid}/enable", None),
        ("POST", f"{ENDPOINTS}/{eid}/test", None),
        ("GET", f"{ENDPOINTS}/{eid}/deliveries", None),
        ("GET", f"{ENDPOINTS}/{eid}/deliveries?status=pending", None),
        ("POST", f"{ENDPOINTS}/{eid}/recover", since),
        ("GET", f"{DELIVERIES}/{did}", None),
        ("POST", f"{DELIVERIES}/{did}/retry", None),
    ]
    for method, path, payload in requests:
        status, body, _ = await other_tenant.call(method, path, payload)
        assert status == 404, (method, path, body)
        assert body["error"]["code"] == "not_found", body

    status, body, _ = await other_tenant.call("GET", ENDPOINTS)
    assert status == 200, body
    assert body["data"] == []
    # The owner's endpoint and delivery are untouched.
    mine = await get_endpoint(tenant, eid)
    assert mine["description"] is None
    assert mine["status"] == "enabled"
    again = await delivery_of(tenant, eid, event_id)
    assert again["status"] == "pending"
    assert [d["event_id"] for d in await list_deliveries(tenant, eid)] == [event_id]


async def test_a_key_without_webhooks_manage_is_403(
    services: Services, api: str, http: aiohttp.ClientSession
) -> None:
    """A key of the same workspace without the webhooks:manage scope can do nothing here."""
    workspace = f"ws-{uuid.uuid4().hex[:12]}"
    full = await create_key(services.db, workspace, list(SCOPES))
    limited = await create_key(
        services.db, workspace, [s for s in SCOPES if s != "webhooks:manage"]
    )
    assert full.workspace_id == limited.workspace_id
    owner = Tenant(api, full.key, full.key_id, full.workspace_id, http)
    reader = Tenant(api, limited.key, limited.key_id, limited.workspace_id, http)
    eid = (await create_endpoint(owner, "https://hooks.example.com/x"))["id"]
    did = (await delivery_of(owner, eid, await send_test(owner, eid)))["id"]

    requests: list[tuple[str, str, Any]] = [
        ("POST", ENDPOINTS, {"url": "https://hooks.example.com/y"}),
        ("GET", ENDPOINTS, None),
        ("GET", f"{ENDPOINTS}/{eid}", None),
        ("PATCH", f"{ENDPOINTS}/{eid}", {"description": "x"}),
        ("DELETE", f"{ENDPOINTS}/{eid}", None),
        ("POST", f"{ENDPOINTS}/{eid}/rotate-secret", None),
        ("POST", f"{ENDPOINTS}/{eid}/enable", None),
        ("POST", f"{ENDPOINTS}/{eid}/test", None),
        ("GET", f"{ENDPOINTS}/{eid}/deliveries", None),
        ("POST", f"{ENDPOINTS}/{eid}/recover", {"since": "2000-01-01T00:00:00Z"}),
        ("GET", f"{DELIVERIES}/{did}", None),
        ("POST", f"{DELIVERIES}/{did}/retry", None),
    ]
    for method, path, payload in requests:
        status, body, _ = await reader.call(method, path, payload)
        assert status == 403, (method, path, body)
        assert body["error"]["code"] == "insufficient_permissions", body
    assert (await get_endpoint(owner, eid))["description"] is None


# -- what a receiver gets --------------------------------------------------------------


async def test_delivery_is_signed_per_standard_webhooks(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """A delivery verifies with standardwebhooks and the endpoint secret, not with another
    secret nor with a changed body; webhook-id is the event id; JSON, our User-Agent."""
    sender()
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(204)))
    event_id = await send_test(tenant, endpoint["id"])
    hits = await eventually(
        lambda: _some(receiver.at("/hook")), 10, "the test event at the receiver"
    )
    assert len(hits) == 1
    hit = hits[0]

    payload: Any = Webhook(endpoint["secret"]).verify(hit.body, hit.headers)
    assert set(payload) == {"type", "timestamp", "data"}
    assert payload["type"] == "webhook.test"
    assert payload["data"]["endpoint_id"] == endpoint["id"]
    assert abs(at(payload["timestamp"]) - datetime.now(UTC)) < timedelta(minutes=1)
    with pytest.raises(WebhookVerificationError):
        Webhook(random_secret()).verify(hit.body, hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint["secret"]).verify(hit.body.replace(b"test", b"tost"), hit.headers)

    assert hit.webhook_id == event_id
    assert abs(int(hit.headers["webhook-timestamp"]) - time.time()) < 60
    assert hit.headers["webhook-signature"].startswith("v1,")
    assert " " not in hit.headers["webhook-signature"]  # one live secret, one signature
    assert hit.headers["Content-Type"] == "application/json"
    assert "contact-deletion" in hit.headers["User-Agent"]

    delivery = await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"))
    assert delivery["attempt_count"] == 1
    assert [a["status_code"] for a in delivery["attempts"]] == [204]


async def test_after_rotation_both_the_old_and_new_secret_verify(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """During the overlap the header carries two signatures; either secret verifies."""
    sender()
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(200)))
    old = endpoint["secret"]
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{endpoint['id']}/rotate-secret")
    assert status == 200, body
    new = body["data"]["secret"]
    event_id = await send_test(tenant, endpoint["id"])
    hits = await eventually(lambda: _some(receiver.at("/hook")), 10, "a delivery")
    hit = hits[0]
    assert hit.webhook_id == event_id
    assert len(hit.headers["webhook-signature"].split(" ")) == 2
    assert Webhook(new).verify(hit.body, hit.headers)["type"] == "webhook.test"
    assert Webhook(old).verify(hit.body, hit.headers)["type"] == "webhook.test"
    with pytest.raises(WebhookVerificationError):
        Webhook(random_secret()).verify(hit.body, hit.headers)


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "idempotency-key"])
async def test_every_send_after_a_rotation_answered_carries_the_new_secret(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services, keyed: bool
) -> None:
    """rotate-secret while a backlog is sent (trial 9: for ~1 s after the answer, 43
    deliveries came signed with the old secret only, from the buffer claimed ahead):
    once it answered, every request but those already in flight verifies, with
    `standardwebhooks`, with the new secret alone; also with an Idempotency-Key, whose
    transaction the rotation commits in (the dispatcher is told once it committed:
    `Database.after_commit`, tested in test_db_unit)."""
    sender()
    key = {"Idempotency-Key": uuid.uuid4().hex} if keyed else None
    changed = await change_during_a_backlog(
        services, tenant, receiver, "/rotating", "POST", "/rotate-secret", headers=key
    )
    assert changed.status == 200, changed.body
    new = Webhook(changed.body["data"]["secret"])
    await backlog_over(tenant, changed.endpoint["id"])
    assert sorted(h.webhook_id for h in receiver.at("/rotating")) == sorted(changed.events)
    late = [h for h in receiver.at("/rotating") if h.at > changed.answered]
    assert len(late) > 100  # the backlog was still being sent
    unverified = 0
    for hit in late:
        try:
            new.verify(hit.body, hit.headers)
        except WebhookVerificationError:
            unverified += 1
    assert unverified <= MAX_IN_FLIGHT, unverified


async def test_another_process_s_dispatcher_sees_a_rotation_or_a_delete_within_a_pass(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """A dispatcher in another process (its own Database, not told by this API) holding a
    rate-limited endpoint's buffer (2 s of sends at 50/s): it reads the endpoint's row
    again at a pass at most every WEBHOOK_GROUP_COMMIT_S, so 1 s after rotate-secret
    answered every request verifies with the new secret alone (README: within 0.5 s plus
    the pass), and 1 s after DELETE answered nothing more arrives. (Before, the buffer
    went out as it was read: 2 s more of the old secret, of the deleted endpoint.)"""
    settle_s = 1.0
    rotating = await create_endpoint(
        tenant, receiver.script("/rotating", answer(200)), rate_limit_per_s=50
    )
    deleted = await create_endpoint(
        tenant, receiver.script("/deleted", answer(200)), rate_limit_per_s=50
    )
    await backlog(services, tenant, rotating["id"], 300)
    await backlog(services, tenant, deleted["id"], 300)
    async with dispatchers(services, 1):
        await eventually(lambda: _some(len(receiver.at("/rotating")) >= 30), 30, "30 sent")
        await eventually(lambda: _some(len(receiver.at("/deleted")) >= 30), 30, "30 sent")
        status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{rotating['id']}/rotate-secret")
        rotated = time.time()
        assert status == 200, body
        new = Webhook(body["data"]["secret"])
        status, body, _ = await tenant.call("DELETE", f"{ENDPOINTS}/{deleted['id']}")
        removed = time.time()
        assert status == 204, body
        await asyncio.sleep(settle_s + 1.0)
    later = [h for h in receiver.at("/rotating") if h.at > rotated + settle_s]
    assert later  # the backlog was still being sent
    for hit in later:
        new.verify(hit.body, hit.headers)
    assert not [h for h in receiver.at("/deleted") if h.at > removed + settle_s]


async def test_contact_deleted_reaches_subscribers_without_the_clear_email(
    tenant: Tenant, receiver: Receiver, everything: Services
) -> None:
    """Through the whole pipeline: an unfiltered endpoint gets contact.deleted (body
    {type, timestamp, data}, email only as SHA-256, webhook-id = the event id) and
    deletion_job.completed; an endpoint subscribed only to deletion_job.completed gets
    no contact.deleted."""
    email = "Someone.Private@Example.com"
    every = await create_endpoint(tenant, receiver.script("/every", answer(204)))
    jobs_only = await create_endpoint(
        tenant, receiver.script("/jobs", answer(204)), event_types=["deletion_job.completed"]
    )
    status, body, _ = await tenant.call("POST", "/v1/contacts", {"email": email})
    assert status == 201, body
    contact_id = body["data"]["id"]
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts/bulk-delete", {"contact_ids": [contact_id]}, {"Prefer": "wait=20"}
    )
    assert status == 200, body
    job_id = body["data"]["job_id"]

    await eventually(
        lambda: _some(receiver.at("/every")[1:] and receiver.at("/jobs")),
        20,
        "both events at /every and the job event at /jobs",
    )
    await asyncio.sleep(0.5)  # a contact.deleted to /jobs would have arrived by now

    by_type: dict[str, Hit] = {}
    for hit in receiver.at("/every"):
        payload: Any = Webhook(every["secret"]).verify(hit.body, hit.headers)
        by_type[payload["type"]] = hit
    assert set(by_type) == {"contact.deleted", "deletion_job.completed"}

    hit = by_type["contact.deleted"]
    raw = hit.body.decode()
    assert email.lower() not in raw.lower()
    assert "someone.private" not in raw.lower()
    payload = json.loads(raw)
    assert set(payload) == {"type", "timestamp", "data"}
    data = payload["data"]
    assert data["contact_id"] == contact_id
    assert data["workspace_id"] == str(tenant.workspace_id)
    assert data["job_id"] == job_id
    assert data["email_sha256"] == hashlib.sha256(email.strip().lower().encode()).hexdigest()
    assert set(data["orphaned_timeline"]) == {"activities", "notes", "tasks"}

    async def recorded() -> dict[str, str] | None:
        # An attempt is recorded up to WEBHOOK_GROUP_COMMIT_S after it ended: the receiver
        # can have both while the database has one succeeded so far.
        deliveries = await list_deliveries(tenant, every["id"], "&status=succeeded")
        ids = {d["event_type"]: d["event_id"] for d in deliveries}
        return ids if len(ids) == 2 else None

    event_ids = await eventually(recorded, 10, "both deliveries recorded as succeeded")
    assert hit.webhook_id == event_ids["contact.deleted"]
    assert by_type["deletion_job.completed"].webhook_id == event_ids["deletion_job.completed"]

    jobs_hits = receiver.at("/jobs")
    assert len(jobs_hits) == 1
    only: Any = Webhook(jobs_only["secret"]).verify(jobs_hits[0].body, jobs_hits[0].headers)
    assert only["type"] == "deletion_job.completed"
    assert only["data"]["job_id"] == job_id
    assert [d["event_type"] for d in await list_deliveries(tenant, jobs_only["id"])] == [
        "deletion_job.completed"
    ]


# -- retries ---------------------------------------------------------------------------


async def test_500_then_200_is_delivered_on_the_second_attempt_with_the_same_webhook_id(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    sender()
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500), answer(200)))
    event_id = await send_test(tenant, endpoint["id"])
    delivery = await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"))
    assert delivery["attempt_count"] == 2
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]
    hits = receiver.at("/hook")
    assert [h.webhook_id for h in hits] == [event_id, event_id]
    for hit in hits:
        Webhook(endpoint["secret"]).verify(hit.body, hit.headers)
    # The schedule's second delay is 1 s with +-20 % jitter.
    assert 0.7 <= hits[1].at - hits[0].at <= 2.5


def raw_answer(status: int, body: bytes, reason: str | None = None) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, reason=reason)

    return reply


@pytest.mark.parametrize(
    ("status", "body", "final"),
    [
        (200, b"ok\x00\x00nul", "succeeded"),
        (200, b"\xff\xfe\xfa not utf-8 \xc3\x28", "succeeded"),
        (410, b"gone\x00", "failed"),
    ],
    ids=["nul-bytes", "invalid-utf8", "gone-with-nul"],
)
async def test_whatever_a_receiver_answers_is_recorded_once_and_never_resent(
    tenant: Tenant, receiver: Receiver, sender: StartSender, status: int, body: bytes, final: str
) -> None:
    """NUL bytes or invalid UTF-8 in the answer: one attempt row, final state, no resend."""
    sender()
    url = receiver.script("/odd", raw_answer(status, body, reason="Odd\u00e9 Reason"))
    endpoint = await create_endpoint(tenant, url)
    event_id = await send_test(tenant, endpoint["id"])

    delivery = await wait_delivery(tenant, endpoint["id"], event_id, has_status(final))

    assert [a["status_code"] for a in delivery["attempts"]] == [status]
    stored = delivery["attempts"][0]["response_body"]
    assert "\x00" not in stored and stored.startswith(("ok", "gone", "\ufffd"))
    await asyncio.sleep(1.5)  # longer than the next retry delay: nothing is sent again
    assert len(receiver.at("/odd")) == 1


async def test_an_attempt_whose_details_are_refused_is_still_counted(
    services: Services, tenant: Tenant, receiver: Receiver
) -> None:
    """If the database refuses what the receiver said, the bare outcome is recorded, so the
    claim does not lapse into resending the same webhook forever."""
    endpoint = await create_endpoint(tenant, receiver.script("/x", answer(500)))
    event_id = await send_test(tenant, endpoint["id"])
    dispatcher = Dispatcher(services.settings, services.db, services.metrics)
    claimed = [d for d in await dispatcher.claim() if d["event_id"] == event_id]
    assert len(claimed) == 1
    result = AttemptResult(500, 12.5, None, "body", None)
    object.__setattr__(result, "body", "raw\x00text")  # as if it had slipped past cleaning

    await dispatcher.record_safely(claimed[0], result)

    delivery = await delivery_of(tenant, endpoint["id"], event_id)
    assert delivery["attempt_count"] == 1
    assert [a["status_code"] for a in delivery["attempts"]] == [500]
    if services.db.is_sqlite:  # SQLite stores NUL; PostgreSQL refuses it
        assert delivery["attempts"][0]["response_body"] == "raw\x00text"
    else:
        assert delivery["attempts"][0]["response_body"] is None
        assert "could not be stored" in delivery["attempts"][0]["error"]
    assert delivery["status"] in ("pending", "failing")  # "failing" once retried
    assert delivery["next_attempt_at"] is not None


async def test_503_with_retry_after_waits_at_least_that_long(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """Retry-After: 2 on a 503 pushes the next attempt 2 s out (the schedule says 1 s)."""
    sender()
    url = receiver.script("/hook", answer(503, headers={"Retry-After": "2"}), answer(200))
    endpoint = await create_endpoint(tenant, url)
    event_id = await send_test(tenant, endpoint["id"])
    delivery = await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"))
    first, second = delivery["attempts"]
    assert (first["status_code"], second["status_code"]) == (503, 200)
    waited = at(second["attempted_at"]) - at(first["attempted_at"])
    assert waited >= timedelta(seconds=2)
    assert delivery["next_attempt_at"] is None  # it is over: nothing is planned
    hits = receiver.at("/hook")
    assert [h.webhook_id for h in hits] == [event_id, event_id]
    assert hits[1].at - hits[0].at >= 1.9


async def test_a_timeout_is_recorded_as_an_error_and_retried(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """A receiver slower than webhook_timeout_s (2 s) fails the attempt; the retry succeeds."""
    sender()
    url = receiver.script("/hook", receiver.sleep(4, answer(200)), answer(200))
    endpoint = await create_endpoint(tenant, url)
    event_id = await send_test(tenant, endpoint["id"])
    delivery = await wait_delivery(
        tenant, endpoint["id"], event_id, has_status("succeeded"), timeout_s=15
    )
    first, second = delivery["attempts"]
    assert first["status_code"] is None
    assert "timed out" in first["error"]
    assert 1900 <= first["latency_ms"] < 3500
    assert second["status_code"] == 200
    assert second["error"] is None
    assert [h.webhook_id for h in receiver.at("/hook")] == [event_id, event_id]


async def test_a_refused_connection_is_retried(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """Connections refused (a closed port) are failed attempts that are retried; once the
    endpoint points at a live receiver the same event arrives there."""
    sender()
    closed = f"http://127.0.0.1:{free_port()}/hook"
    endpoint = await create_endpoint(tenant, closed)
    event_id = await send_test(tenant, endpoint["id"])
    delivery = await wait_delivery(
        tenant, endpoint["id"], event_id, lambda d: d["attempt_count"] >= 2
    )
    assert delivery["status"] == "failing"
    for attempt in delivery["attempts"]:
        assert attempt["status_code"] is None
        assert attempt["error"], attempt
        assert attempt["response_body"] is None

    status, body, _ = await tenant.call(
        "PATCH", f"{ENDPOINTS}/{endpoint['id']}", {"url": receiver.script("/hook", answer(200))}
    )
    assert status == 200, body
    delivery = await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"))
    assert delivery["attempts"][-1]["status_code"] == 200
    assert [h.webhook_id for h in receiver.at("/hook")] == [event_id]


async def test_an_exhausted_delivery_is_failed_with_an_audit_event(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services
) -> None:
    """After the whole schedule (4 attempts) fails, the delivery is `failed` and audited."""
    sender()
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500, "down")))
    event_id = await send_test(tenant, endpoint["id"])
    delivery = await wait_delivery(tenant, endpoint["id"], event_id, has_status("failed"), 15)
    assert delivery["attempt_count"] == 4
    assert delivery["completed_at"] is not None
    assert [a["status_code"] for a in delivery["attempts"]] == [500] * 4
    assert [h.webhook_id for h in receiver.at("/hook")] == [event_id] * 4

    exhausted = [
        e
        for e in await audit_trail(services, tenant.workspace_id)
        if e.action == "webhook.delivery.exhausted"
    ]
    assert len(exhausted) == 1
    assert exhausted[0].target_id == delivery["id"]
    assert exhausted[0].actor_type == "system"
    assert exhausted[0].data["event_id"] == event_id
    assert exhausted[0].data["attempts"] == 4
    assert exhausted[0].data["last_status_code"] == 500
    # One delivery running out does not disable the endpoint (that takes days).
    assert (await get_endpoint(tenant, endpoint["id"]))["status"] == "enabled"


async def test_every_attempt_stores_status_latency_error_and_the_first_4_kib(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """A 10 KiB response body is stored cut to its first 4096 characters."""
    sender()
    url = receiver.script("/hook", answer(500, "x" * 10240), answer(200, "y" * 10240))
    endpoint = await create_endpoint(tenant, url)
    event_id = await send_test(tenant, endpoint["id"])
    delivery = await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"))
    first, second = delivery["attempts"]
    assert first["status_code"] == 500
    assert first["response_body"] == "x" * 4096
    assert second["status_code"] == 200
    assert second["response_body"] == "y" * 4096
    for attempt in (first, second):
        assert attempt["error"] is None
        assert 0 < attempt["latency_ms"] < 2000
        assert at(attempt["attempted_at"]) <= datetime.now(UTC)
    assert at(first["attempted_at"]) < at(second["attempted_at"])
    assert delivery["last_attempt_at"] == second["attempted_at"]


async def test_410_gone_fails_the_delivery_and_disables_until_enabled(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services
) -> None:
    """410 stops retrying and disables the endpoint (audited); enable re-enables it."""
    sender()
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(410)))
    eid = endpoint["id"]
    event_id = await send_test(tenant, eid)
    delivery = await wait_delivery(tenant, eid, event_id, has_status("failed"))
    assert delivery["attempt_count"] == 1
    disabled = await get_endpoint(tenant, eid)
    assert disabled["status"] == "disabled"
    assert disabled["disabled_reason"] == "gone"
    assert disabled["disabled_at"] is not None
    await asyncio.sleep(1.5)  # no retry follows a 410
    assert len(receiver.at("/hook")) == 1

    receiver.script("/hook", answer(200))
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/enable")
    assert status == 200, body
    assert body["data"]["status"] == "enabled"
    assert body["data"]["disabled_reason"] is None
    assert body["data"]["disabled_at"] is None
    assert "secret" not in body["data"]
    again = await send_test(tenant, eid)
    await wait_delivery(tenant, eid, again, has_status("succeeded"))

    trail = [
        e
        for e in await audit_trail(services, tenant.workspace_id)
        if e.action in ("webhook.endpoint.disabled", "webhook.endpoint.enabled")
    ]
    assert [(e.action, e.actor_type, e.target_id) for e in trail] == [
        ("webhook.endpoint.disabled", "system", eid),
        ("webhook.endpoint.enabled", "api_key", eid),
    ]
    assert trail[0].data["reason"] == "gone" and "410" in trail[0].data["detail"]


async def backlog(services: Services, tenant: Tenant, endpoint_id: str, count: int) -> list[str]:
    """`count` webhook.test deliveries to the endpoint, written in one transaction (as a
    filter job's fan-out writes them) and signalled; returns their event ids."""
    events = [f"evt_backlog_{uuid.uuid4().hex}" for _ in range(count)]
    data = {"endpoint_id": endpoint_id, "message": "a backlog"}
    body = webhook_body(TYPE_WEBHOOK_TEST, utcnow(), data)
    eid = uuid.UUID(endpoint_id)
    async with services.db.begin() as conn:
        await store.enqueue_many(
            conn,
            services.db,
            [
                store.NewDeliveries(tenant.workspace_id, [eid], e, TYPE_WEBHOOK_TEST, body)
                for e in events
            ],
        )
    services.webhook_signal.set()
    return events


async def backlog_over(tenant: Tenant, endpoint_id: str) -> None:
    """Wait until none of the endpoint's deliveries is pending."""

    async def over() -> bool | None:
        pending = await list_deliveries(tenant, endpoint_id, "&status=pending")
        return True if not pending else None

    await eventually(over, 30, "the backlog over")


async def unsent_are_failed_uncounted(
    services: Services, receiver: Receiver, path: str, events: Sequence[str]
) -> None:
    """Every delivery of `events` is over: those that reached `path` (once each) have one
    attempt, the others failed with none (given up unsent, not counted as tried)."""
    sent = Counter(h.webhook_id for h in receiver.at(path))
    assert max(sent.values(), default=1) == 1, sent
    d = webhook_deliveries.c
    async with services.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(d.event_id, d.status, d.attempt_count).where(d.event_id.in_(list(events)))
            )
        ).all()
    assert len(rows) == len(events)
    for event_id, status, attempts in rows:
        if event_id in sent:
            assert attempts == 1, (event_id, status, attempts)
        else:
            assert (status, attempts) == ("failed", 0), (event_id, status, attempts)


@dataclass(frozen=True)
class Changed:
    """An endpoint changed through the API while its backlog was being sent."""

    endpoint: dict[str, Any]
    events: list[str]  # the backlog's event ids
    answered: float  # time.time() once the API answered
    status: int
    body: Any


async def change_during_a_backlog(
    services: Services,
    tenant: Tenant,
    receiver: Receiver,
    path: str,
    method: str,
    suffix: str = "",
    change: Any = None,
    headers: dict[str, str] | None = None,
) -> Changed:
    """An endpoint at `path` with a backlog of 1,000 deliveries; once 150 of them arrived,
    the API call `method` on the endpoint (+ `suffix`) with the body `change`."""
    endpoint = await create_endpoint(tenant, receiver.script(path, answer(200)))
    events = await backlog(services, tenant, endpoint["id"], 1000)
    await eventually(lambda: _some(len(receiver.at(path)) >= 150), 30, "150 sent")
    where = f"{ENDPOINTS}/{endpoint['id']}{suffix}"
    status, body, _ = await tenant.call(method, where, change, headers)
    return Changed(endpoint, events, time.time(), status, body)


async def test_a_410_during_a_backlog_stops_the_sends_at_once(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services
) -> None:
    """A receiver that answers 410 in the middle of a 1,000-delivery backlog (trial 9: 759
    more POSTs followed the first 410 within 1.2 s, from the buffer claimed ahead): after
    the first 410 only the requests already in flight arrive; the rest of the backlog is
    failed unsent (no attempt counted) with the endpoint disabled."""
    sender()
    ok = 150  # answered 200 first: the sender learns the pace and claims far ahead
    url = receiver.script("/gone", *[answer(200)] * ok, answer(410))
    endpoint = await create_endpoint(tenant, url)
    events = await backlog(services, tenant, endpoint["id"], 1000)

    await backlog_over(tenant, endpoint["id"])
    await asyncio.sleep(0.5)  # anything still to come arrives
    disabled = await get_endpoint(tenant, endpoint["id"])
    assert (disabled["status"], disabled["disabled_reason"]) == ("disabled", "gone")
    after = len(receiver.at("/gone")) - (ok + 1)
    assert 0 <= after <= MAX_IN_FLIGHT, after
    await unsent_are_failed_uncounted(services, receiver, "/gone", events)


async def test_a_delete_during_a_backlog_stops_the_sends_before_it_answers(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services
) -> None:
    """DELETE of an endpoint with a backlog being sent: once it answered 204, only the
    requests already in flight arrive (the dispatcher of this process is told before the
    answer), and no delivery is left to send."""
    sender()
    changed = await change_during_a_backlog(services, tenant, receiver, "/deleted", "DELETE")
    assert changed.status == 204, changed.body
    await asyncio.sleep(1.0)
    late = [h for h in receiver.at("/deleted") if h.at > changed.answered]
    assert len(late) <= MAX_IN_FLIGHT, len(late)
    assert len(receiver.at("/deleted")) < len(changed.events)
    await unsent_are_failed_uncounted(services, receiver, "/deleted", changed.events)


async def test_an_attempt_in_flight_when_its_endpoint_is_deleted_does_not_bring_it_back(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services
) -> None:
    """DELETE fails the endpoint's unsent deliveries, in-flight ones too; an attempt in
    flight then answered 500 used to schedule its retry over that `failed` (a delivery
    `failing` for an endpoint that no longer exists, never sent, counted in the backlog
    for good). Its outcome is recorded (the attempt happened), its delivery stays failed."""
    sender()
    url = receiver.script("/slow-500", receiver.sleep(1.0, answer(500)))
    endpoint = await create_endpoint(tenant, url)
    events = await backlog(services, tenant, endpoint["id"], 40)
    await eventually(lambda: _some(len(receiver.at("/slow-500")) >= MAX_IN_FLIGHT), 30, "sent")
    status, body, _ = await tenant.call("DELETE", f"{ENDPOINTS}/{endpoint['id']}")
    assert status == 204, body
    d = webhook_deliveries.c

    async def answered() -> bool | None:
        return True if receiver.in_flight["/slow-500"] == 0 else None

    await eventually(answered, 30, "the requests in flight answered")
    await asyncio.sleep(1.0)  # their outcomes recorded (a group commit)
    async with services.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(d.event_id, d.status, d.attempt_count).where(d.event_id.in_(events))
            )
        ).all()
    attempted = [r for r in rows if r.attempt_count > 0]
    assert attempted, rows  # the in-flight attempts were recorded
    assert {r.status for r in rows} == {"failed"}, Counter(r.status for r in rows)


async def test_a_url_changed_during_a_backlog_is_where_every_later_send_goes(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services
) -> None:
    """PATCH of an endpoint's URL while its backlog is sent: once it answered, only the
    requests already in flight reach the old URL; the rest go to the new one, each
    delivery once."""
    sender()
    new_url = receiver.script("/after", answer(200))
    changed = await change_during_a_backlog(
        services, tenant, receiver, "/before", "PATCH", change={"url": new_url}
    )
    assert changed.status == 200, changed.body
    await backlog_over(tenant, changed.endpoint["id"])
    late = [h for h in receiver.at("/before") if h.at > changed.answered]
    assert len(late) <= MAX_IN_FLIGHT, len(late)
    assert receiver.at("/after")
    hits = Counter(h.webhook_id for h in receiver.at("/before") + receiver.at("/after"))
    assert sorted(hits) == sorted(changed.events)
    assert set(hits.values()) == {1}


async def test_a_redirect_is_a_failure_and_is_not_followed(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """A 302 to a path that would answer 200 fails the attempt; the target is never asked."""
    sender()
    target = receiver.script("/target", answer(200))
    url = receiver.script("/hook", answer(302, headers={"Location": target}))
    endpoint = await create_endpoint(tenant, url)
    event_id = await send_test(tenant, endpoint["id"])
    delivery = await wait_delivery(
        tenant, endpoint["id"], event_id, lambda d: d["attempt_count"] >= 2
    )
    assert delivery["status"] in ("failing", "failed")
    for attempt in delivery["attempts"]:
        assert attempt["status_code"] == 302
        assert "redirect" in attempt["error"]
    assert receiver.at("/target") == []
    assert len(receiver.at("/hook")) >= 2


async def test_a_receiver_s_cookie_is_never_sent_to_it_or_another_endpoint(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """A receiver answering with Set-Cookie gets no Cookie back on its next delivery, nor
    does another endpoint on the same host (by name: an HTTP client keeps no cookie for
    an IP address, so the URLs say localhost)."""
    sender()
    setting = receiver.script("/setting", answer(204, headers={"Set-Cookie": "sid=abc; Path=/"}))
    other = receiver.script("/other", answer(204))
    first = await create_endpoint(tenant, setting.replace("127.0.0.1", "localhost"))
    second = await create_endpoint(tenant, other.replace("127.0.0.1", "localhost"))
    first_event = await send_test(tenant, first["id"])
    await wait_delivery(tenant, first["id"], first_event, has_status("succeeded"))
    again = await send_test(tenant, first["id"])
    elsewhere = await send_test(tenant, second["id"])
    await wait_delivery(tenant, first["id"], again, has_status("succeeded"))
    await wait_delivery(tenant, second["id"], elsewhere, has_status("succeeded"))

    hits = receiver.at("/setting") + receiver.at("/other")
    assert sorted(h.webhook_id for h in hits) == sorted([first_event, again, elsewhere])
    assert [h.headers.get("Cookie") for h in hits] == [None, None, None]


async def test_a_slow_receiver_does_not_delay_another_endpoint(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """A receiver taking 10 s a request holds only its own 4 slots: with 6 deliveries of
    it in flight or queued, another endpoint's delivery arrives within 2 s."""
    sender(webhook_timeout_s=15)
    slow = await create_endpoint(tenant, receiver.script("/slow", receiver.sleep(10, answer(200))))
    fast = await create_endpoint(tenant, receiver.script("/fast", answer(200)))
    slow_events = [await send_test(tenant, slow["id"]) for _ in range(6)]
    await eventually(
        lambda: _some(receiver.in_flight["/slow"] == MAX_IN_FLIGHT),
        5,
        "4 requests in flight at the slow receiver",
    )

    sent = time.time()
    fast_event = await send_test(tenant, fast["id"])
    hits = await eventually(lambda: _some(receiver.at("/fast")), 5, "the fast delivery")
    assert hits[0].webhook_id == fast_event
    assert hits[0].at - sent < 2.0
    assert receiver.in_flight["/slow"] == MAX_IN_FLIGHT  # still stuck at the slow one
    await asyncio.sleep(0.5)
    assert receiver.max_in_flight["/slow"] == MAX_IN_FLIGHT
    assert len(receiver.at("/slow")) == MAX_IN_FLIGHT  # the other 2 wait for a free slot
    pending = [d for d in await list_deliveries(tenant, slow["id"]) if d["status"] == "pending"]
    assert len(pending) == 6

    receiver.released.set()  # the slow receiver answers now
    for event_id in slow_events:
        await wait_delivery(tenant, slow["id"], event_id, has_status("succeeded"))
    assert receiver.max_in_flight["/slow"] == MAX_IN_FLIGHT
    assert sorted(h.webhook_id for h in receiver.at("/slow")) == sorted(slow_events)


@pytest.mark.parametrize(
    "damage",
    [
        {"retired_secrets": [{"oops": 1}, "x", {"secret": 5, "expires_at": "later"}]},
        {"retired_secrets": {"not": "a list"}},
        {"secret": "whsec_!!! not base64"},
    ],
    ids=["retired-entries", "retired-not-a-list", "secret"],
)
async def test_a_damaged_endpoint_row_holds_up_no_other_endpoint(
    tenant: Tenant,
    receiver: Receiver,
    sender: StartSender,
    services: Services,
    damage: dict[str, Any],
) -> None:
    """A row that only damage makes (a retired secret that is not one, a secret that is
    not base64) stopped every claim pass (KeyError in the signing secrets) and so every
    endpoint's webhooks, retried forever. Now the damaged part signs nothing: a healthy
    endpoint's delivery arrives, verified; the damaged one's deliveries go out signed by
    what is readable, or fail their attempt with the reason, retried on the schedule."""
    sender()
    healthy = await create_endpoint(tenant, receiver.script("/healthy", answer(200)))
    damaged = await create_endpoint(tenant, receiver.script("/damaged", answer(200)))
    async with services.db.begin() as conn:
        await conn.execute(
            webhook_endpoints.update()
            .where(webhook_endpoints.c.id == uuid.UUID(damaged["id"]))
            .values(**damage)
        )
    damaged_event = await send_test(tenant, damaged["id"])
    healthy_event = await send_test(tenant, healthy["id"])

    await wait_delivery(tenant, healthy["id"], healthy_event, has_status("succeeded"))
    (hit,) = receiver.at("/healthy")
    assert Webhook(healthy["secret"]).verify(hit.body, hit.headers)["type"] == "webhook.test"
    if "secret" in damage:
        delivery = await wait_delivery(
            tenant, damaged["id"], damaged_event, lambda d: d["attempt_count"] >= 1
        )
        assert delivery["status"] == "failing", delivery
        assert "secret" in delivery["attempts"][0]["error"], delivery
        assert receiver.at("/damaged") == []
    else:
        await wait_delivery(tenant, damaged["id"], damaged_event, has_status("succeeded"))
        (hit,) = receiver.at("/damaged")
        assert Webhook(damaged["secret"]).verify(hit.body, hit.headers)["type"] == "webhook.test"


async def test_an_endpoint_failing_longer_than_the_limit_is_disabled(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services
) -> None:
    """With webhook_disable_after_s=1, failures spanning more than 1 s disable the endpoint."""
    sender(webhook_disable_after_s=1)
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500)))
    eid = endpoint["id"]
    event_id = await send_test(tenant, eid)

    async def disabled() -> dict[str, Any] | None:
        got = await get_endpoint(tenant, eid)
        return got if got["status"] == "disabled" else None

    got = await eventually(disabled, 8, "the failing endpoint disabled")
    assert got["disabled_reason"] == "failing"
    delivery = await delivery_of(tenant, eid, event_id)
    times = [at(a["attempted_at"]) for a in delivery["attempts"]]
    assert len(times) >= 2
    assert times[-1] - times[0] >= timedelta(seconds=1)
    assert all(a["status_code"] == 500 for a in delivery["attempts"])
    # Not left `failing` with a retry time that never comes (DESIGN.md: failed).
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None

    trail = [
        e
        for e in await audit_trail(services, tenant.workspace_id)
        if e.action == "webhook.endpoint.disabled"
    ]
    assert [(e.target_id, e.actor_type) for e in trail] == [(eid, "system")]
    assert trail[0].data["reason"] == got["disabled_reason"]


# -- fan-out ---------------------------------------------------------------------------


async def test_the_same_event_consumed_twice_makes_one_delivery_per_endpoint(
    tenant: Tenant, services: Services, dlq: Producer
) -> None:
    """fan_out of a repeated contact.deleted (in one batch and again later) adds nothing."""
    every = await create_endpoint(tenant, "https://hooks.example.com/every")
    deletes = await create_endpoint(
        tenant, "https://hooks.example.com/deletes", event_types=["contact.deleted"]
    )
    dispatcher = Dispatcher(services.settings, services.db, services.metrics)
    event = contact_deleted(tenant.workspace_id)
    assert await dispatcher.fan_out([message(event), message(event, 1)], dlq) == 2
    assert await dispatcher.fan_out([message(event, 2)], dlq) == 0

    async with services.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(webhook_deliveries.c.endpoint_id).where(
                    webhook_deliveries.c.event_id == event.id
                )
            )
        ).all()
    assert sorted(str(r.endpoint_id) for r in rows) == sorted([every["id"], deletes["id"]])
    for endpoint in (every, deletes):
        listed = await list_deliveries(tenant, endpoint["id"])
        assert [(d["event_id"], d["event_type"]) for d in listed] == [(event.id, "contact.deleted")]


async def test_enqueue_many_over_several_statements_returns_exactly_the_new_rows(
    tenant: Tenant, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fan-out's multi-row INSERT, two rows a statement: a repeated (event, endpoint)
    is skipped wherever it falls, the rest come back in order, as stored (lease included)."""
    monkeypatch.setattr(store, "ENQUEUE_CHUNK", 2)
    a = uuid.UUID((await create_endpoint(tenant, "https://hooks.example.com/a"))["id"])
    b = uuid.UUID((await create_endpoint(tenant, "https://hooks.example.com/b"))["id"])
    until = utcnow() + timedelta(minutes=1)

    def event(n: int, leases: dict[uuid.UUID, datetime] | None = None) -> store.NewDeliveries:
        body = f'{{"n":{n},"text":"caf\u00e9 \u0000"}}'.encode()
        return store.NewDeliveries(
            tenant.workspace_id, [a, b], f"evt-{n}", "contact.deleted", body, leases or {}
        )

    async with services.db.begin() as conn:
        first = await store.enqueue_many(conn, services.db, [event(1), event(2, {a: until})])
    async with services.db.begin() as conn:
        again = await store.enqueue_many(conn, services.db, [event(2), event(3), event(1)])

    assert [(r["event_id"], r["endpoint_id"]) for r in first] == [
        ("evt-1", a),
        ("evt-1", b),
        ("evt-2", a),
        ("evt-2", b),
    ]
    assert [(r["event_id"], r["endpoint_id"]) for r in again] == [("evt-3", a), ("evt-3", b)]
    assert [r["claimed_until"] for r in first] == [None, None, until, None]
    d = webhook_deliveries.c
    async with services.db.read() as conn:
        stored = {
            r.id: r
            for r in await conn.execute(
                sa.select(webhook_deliveries).where(d.workspace_id == tenant.workspace_id)
            )
        }
    assert set(stored) == {r["id"] for r in first + again}
    for r in first + again:
        row = stored[r["id"]]
        assert (row.endpoint_id, row.event_id, row.event_type) == (
            r["endpoint_id"],
            r["event_id"],
            "contact.deleted",
        )
        assert bytes(row.payload) == r["payload"] == event(int(r["event_id"][4:])).payload
        assert (row.status, row.attempt_count, row.claimed_until) == (
            "pending",
            0,
            r["claimed_until"],
        )
        assert row.next_attempt_at == row.created_at == r["created_at"]


async def test_event_types_filter_selects_the_endpoints_of_its_workspace(
    tenant: Tenant, other_tenant: Tenant, services: Services, dlq: Producer
) -> None:
    """An endpoint subscribed only to deletion_job.completed gets no contact.deleted, an
    unfiltered one gets both, and another workspace's endpoint gets neither."""
    every = await create_endpoint(tenant, "https://hooks.example.com/every")
    jobs = await create_endpoint(
        tenant, "https://hooks.example.com/jobs", event_types=["deletion_job.completed"]
    )
    stranger = await create_endpoint(other_tenant, "https://hooks.example.com/stranger")
    dispatcher = Dispatcher(services.settings, services.db, services.metrics)
    deleted = contact_deleted(tenant.workspace_id)
    completed = job_completed(tenant.workspace_id)
    assert await dispatcher.fan_out([message(deleted), message(completed, 1)], dlq) == 3

    assert sorted(d["event_type"] for d in await list_deliveries(tenant, every["id"])) == [
        "contact.deleted",
        "deletion_job.completed",
    ]
    assert [d["event_id"] for d in await list_deliveries(tenant, jobs["id"])] == [completed.id]
    assert await list_deliveries(other_tenant, stranger["id"]) == []
    body = json.loads(
        (await delivery_payload(services, completed.id, uuid.UUID(jobs["id"]))).decode()
    )
    assert set(body) == {"type", "timestamp", "data"}
    assert body["type"] == "deletion_job.completed"
    assert body["data"]["deleted_count"] == 1


async def test_an_endpoint_created_between_two_batches_gets_the_second_batch_s_events(
    tenant: Tenant, other_tenant: Tenant, services: Services, dlq: Producer
) -> None:
    """The fan-out reads a workspace's endpoints afresh for every batch (no cache that
    another process's endpoint creation could leave stale): a workspace without endpoints
    gets nothing, and one created meanwhile gets the next batch's event. An event whose
    routing cannot be read is dead-lettered and holds no other back."""
    dispatcher = Dispatcher(services.settings, services.db, services.metrics)
    before = contact_deleted(tenant.workspace_id)
    assert await dispatcher.fan_out([message(before)], dlq) == 0
    endpoint = await create_endpoint(tenant, "https://hooks.example.com/late")
    after = contact_deleted(tenant.workspace_id)
    garbled = InMessage("contact.deleted", 0, 2, b"x", b'{"id": "no routing"}', ())
    with json_logs() as lines:
        created = await dispatcher.fan_out(
            [garbled, message(after, 3), message(contact_deleted(other_tenant.workspace_id), 4)],
            dlq,
        )
    assert created == 1
    assert [d["event_id"] for d in await list_deliveries(tenant, endpoint["id"])] == [after.id]
    dead = lines.events("webhook_event_dead_lettered")
    assert [line["offset"] for line in dead] == [2]


@pytest.fixture
async def alone(
    db_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> AsyncIterator[tuple[Tenant, Services]]:
    """A tenant in a database of its own (the shared one holds other tests' endpoints),
    served by its own API; and that database's services."""
    if db_url.startswith("sqlite"):
        url = f"sqlite+aiosqlite:///{tmp_path / 'alone.db'}"
    else:
        name = f"alone_{uuid.uuid4().hex[:10]}"
        await admin_sql(db_url, f'CREATE DATABASE "{name}"')
        url = f"{db_url.rpartition('/')[0]}/{name}"
    try:
        await upgrade(url)
        async with opened_services(make_settings(url)) as services:
            server = TestServer(create_app(services), host="127.0.0.1")
            await server.start_server()
            try:
                base = str(server.make_url("")).rstrip("/")
                yield await new_tenant(services, base, http), services
            finally:
                await server.close()
    finally:
        if not db_url.startswith("sqlite"):
            await admin_sql(db_url, f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_events_of_a_type_no_endpoint_takes_are_skipped_unread_until_one_does(
    alone: tuple[Tenant, Services], dlq: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the relay's `ce_type` header, an event of a type no endpoint takes is not read
    at all (a garbled one is not even dead-lettered); once an endpoint that takes it is
    created, the next batch's events go to it and are read again (the garbled one
    dead-lettered); a disabled one's are written failed, for recover after enable. An
    event without the header is always read; so is every event while there are more
    endpoints than the fan-out reads at once (`LISTENERS_AT_ONCE`, a size knob set to 1 here)."""
    tenant, services = alone
    dispatcher = Dispatcher(services.settings, services.db, services.metrics)

    def typed(event: CloudEvent | None, offset: int, kind: str = TYPE_CONTACT_DELETED) -> InMessage:
        value = b'{"id": "no routing"}' if event is None else event.model_dump_json().encode()
        kind = kind if event is None else event.type
        return InMessage(kind, 0, offset, b"k", value, (("ce_type", kind.encode()),))

    garbled = InMessage("contact.deleted", 0, 1, b"k", b'{"id": "no routing"}', ())
    with json_logs() as lines:
        # No endpoint at all: nothing read, except the event without the header.
        assert await dispatcher.fan_out([typed(None, 0), garbled], dlq) == 0
        jobs = await create_endpoint(
            tenant, "https://hooks.example.com/jobs", event_types=["deletion_job.completed"]
        )
        # One that takes another type only: the contact.deleted events stay unread.
        completed = job_completed(tenant.workspace_id)
        first = contact_deleted(tenant.workspace_id)
        assert (
            await dispatcher.fan_out([typed(None, 2), typed(first, 3), typed(completed, 4)], dlq)
            == 1
        )
        # Created meanwhile: the next batch's contact.deleted goes to it (and is read).
        late = await create_endpoint(
            tenant, "https://hooks.example.com/late", event_types=["contact.deleted"]
        )
        second = contact_deleted(tenant.workspace_id)
        assert await dispatcher.fan_out([typed(second, 5), typed(None, 6)], dlq) == 1
        # Disabled, its delivery is written failed (recover after enable sends it);
        # enabled, it goes to it again.
        async with services.db.begin() as conn:
            assert await store.disable_endpoint(
                conn,
                services.db,
                tenant.workspace_id,
                uuid.UUID(late["id"]),
                DisabledReason.GONE,
                "test",
            )
        meanwhile = contact_deleted(tenant.workspace_id)
        assert await dispatcher.fan_out([typed(meanwhile, 7)], dlq) == 1
        status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{late['id']}/enable")
        assert status == 200, body
        third = contact_deleted(tenant.workspace_id)
        assert await dispatcher.fan_out([typed(third, 8)], dlq) == 1
        # A type nobody takes is skipped; with more endpoints than the fan-out reads at
        # once, every event is read (the garbled one dead-lettered), and routed as before.
        assert await dispatcher.fan_out([typed(None, 12, "nobody.takes")], dlq) == 0
        monkeypatch.setattr(dispatcher_module, "LISTENERS_AT_ONCE", 1)
        fourth, done = contact_deleted(tenant.workspace_id), job_completed(tenant.workspace_id)
        assert (
            await dispatcher.fan_out(
                [typed(None, 9, "nobody.takes"), typed(fourth, 10), typed(done, 11)], dlq
            )
            == 2
        )

    assert [line["offset"] for line in lines.events("webhook_event_dead_lettered")] == [1, 6, 9]
    assert sorted(d["event_id"] for d in await list_deliveries(tenant, jobs["id"])) == sorted(
        [completed.id, done.id]
    )
    deliveries = {d["event_id"]: d["status"] for d in await list_deliveries(tenant, late["id"])}
    assert sorted(deliveries) == sorted([second.id, meanwhile.id, third.id, fourth.id])
    assert deliveries[meanwhile.id] == "failed"
    assert [
        line["count"] for line in lines.events("webhook_deliveries_failed_endpoint_disabled")
    ] == [1]


async def test_a_new_delivery_to_an_endpoint_this_dispatcher_owns_goes_from_the_fan_out(
    tenant: Tenant, receiver: Receiver, services: Services, sender: StartSender, dlq: Producer
) -> None:
    """Once a dispatcher owns an endpoint, the deliveries its fan-out writes for it are
    claimed by the same INSERT and are in its buffer (or in flight) when fan_out returns,
    with no claim of their own (nor a read of the sender's queues: the sender is woken
    only for a delivery that did not go straight into a buffer); each arrives once,
    signed with the endpoint's secret, and is recorded. Another workspace's event
    written meanwhile is untouched."""
    dispatcher = sender()
    endpoint = await create_endpoint(tenant, receiver.script("/owned", answer(204)))
    eid = uuid.UUID(endpoint["id"])
    first = await send_test(tenant, endpoint["id"])
    await wait_delivery(tenant, endpoint["id"], first, has_status("succeeded"))
    assert dispatcher.slots[eid].owned_until is not None

    events = [contact_deleted(tenant.workspace_id) for _ in range(3)]
    dispatcher.wakeup.clear()
    assert await dispatcher.fan_out([message(e, n) for n, e in enumerate(events)], dlq) == 3
    held = set(dispatcher.held)  # before any other task ran
    assert not dispatcher.wakeup.is_set()
    async with services.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(webhook_deliveries.c.id, webhook_deliveries.c.claimed_until).where(
                    webhook_deliveries.c.event_id.in_([e.id for e in events])
                )
            )
        ).all()
    # Handed over by the fan-out itself: held by this dispatcher the moment fan_out
    # returned, with no pass of the sender in between (a claim would need one).
    assert len(rows) == 3
    assert {r.id for r in rows} <= held
    for event in events:
        delivery = await wait_delivery(tenant, endpoint["id"], event.id, has_status("succeeded"))
        assert delivery["attempt_count"] == 1
    hits = [h for h in receiver.at("/owned") if h.webhook_id != first]
    assert sorted(h.webhook_id for h in hits) == sorted(e.id for e in events)
    for hit in hits:
        payload: Any = Webhook(endpoint["secret"]).verify(hit.body, hit.headers)
        assert payload["type"] == "contact.deleted"

    # An endpoint this dispatcher does not own yet: its delivery is queued for the
    # sender, which is woken for it (and sends it once).
    other = await create_endpoint(tenant, receiver.script("/other", answer(204)))
    late = contact_deleted(tenant.workspace_id)
    dispatcher.wakeup.clear()
    assert await dispatcher.fan_out([message(late, 3)], dlq) == 2
    assert dispatcher.wakeup.is_set()
    await wait_delivery(tenant, other["id"], late.id, has_status("succeeded"))
    assert [h.webhook_id for h in receiver.at("/other")] == [late.id]


async def delivery_payload(services: Services, event_id: str, endpoint_id: uuid.UUID) -> bytes:
    async with services.db.read() as conn:
        payload = (
            await conn.execute(
                sa.select(webhook_deliveries.c.payload).where(
                    webhook_deliveries.c.event_id == event_id,
                    webhook_deliveries.c.endpoint_id == endpoint_id,
                )
            )
        ).scalar_one()
    return bytes(payload)


# -- delivery log and recovery ---------------------------------------------------------


@contextlib.asynccontextmanager
async def dispatchers(services: Services, count: int) -> AsyncIterator[list[Dispatcher]]:
    """`count` senders, each with its own Database (own connections and, on SQLite, its own
    writer taking the file lock), as separate dispatcher processes would have."""
    databases = [Database(services.settings.database_url) for _ in range(count)]
    running = [
        Dispatcher(services.settings, db, services.metrics, asyncio.Event()) for db in databases
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run_sender(stop)) for d in running]
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        for db in databases:
            await db.dispose()


async def recorded_attempts(services: Services, event_ids: Sequence[str]) -> Counter[str]:
    """Attempt rows per event id (of the deliveries of these events)."""
    d, a = webhook_deliveries.c, webhook_attempts.c
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(d.event_id, sa.func.count(a.id))
            .select_from(webhook_deliveries.join(webhook_attempts, a.delivery_id == d.id))
            .where(d.event_id.in_(list(event_ids)))
            .group_by(d.event_id)
        )
        return Counter({event_id: count for event_id, count in rows.all()})


async def sent_as_recorded(
    services: Services, receiver: Receiver, path: str, events: Sequence[str]
) -> None:
    """Every event reached the receiver, and never more often than the dispatchers
    recorded an attempt of it: a request that timed out (the 2 s timeout, on a loaded
    machine, with the receiver in the test's own event loop) is rightly sent again, and
    both attempts are recorded; a webhook sent twice under one attempt is a duplicate.
    (Two full runs under load 15-21 saw one to three extra requests in the two tests
    that use this; counting the receiver's requests alone could not tell a retry after
    a timeout from a duplicate.)"""
    hits = Counter(h.webhook_id for h in receiver.at(path))
    recorded = await recorded_attempts(services, events)
    assert set(hits) == set(events)
    assert not {e: n for e, n in hits.items() if n > recorded[e]}, (hits, recorded)


async def test_max_in_flight_holds_across_three_dispatchers(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """Three dispatchers, an endpoint with max_in_flight 3 and a receiver holding each
    request 0.6 s: never more than 3 requests open at once, and each webhook sent once."""
    url = receiver.script("/held", receiver.sleep(0.6, answer(200)))
    endpoint = await create_endpoint(tenant, url, max_in_flight=3)
    assert endpoint["max_in_flight"] == 3
    events = [await send_test(tenant, endpoint["id"]) for _ in range(12)]

    async with dispatchers(services, 3):
        for event_id in events:
            await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"), 20)

    assert receiver.max_in_flight["/held"] == 3  # the limit, reached and never passed
    await sent_as_recorded(services, receiver, "/held", events)


async def test_max_in_flight_is_set_and_cleared_per_endpoint(tenant: Tenant) -> None:
    """max_in_flight: null (the service default) unless given; 1..100; PATCH changes it."""
    endpoint = await create_endpoint(tenant, "https://hooks.example.com/limits")
    assert endpoint["max_in_flight"] is None
    path = f"{ENDPOINTS}/{endpoint['id']}"
    status, body, _ = await tenant.call("PATCH", path, {"max_in_flight": 1})
    assert (status, body["data"]["max_in_flight"]) == (200, 1), body
    assert (await get_endpoint(tenant, endpoint["id"]))["max_in_flight"] == 1
    status, body, _ = await tenant.call("PATCH", path, {"max_in_flight": None})
    assert (status, body["data"]["max_in_flight"]) == (200, None), body
    for bad in (0, 101, 2.5):
        status, body, _ = await tenant.call("PATCH", path, {"max_in_flight": bad})
        assert (status, body["error"]["code"]) == (400, "validation_error"), body


async def test_one_slot_endpoint_is_served_one_request_at_a_time_by_two_dispatchers(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """max_in_flight 1 with two dispatchers: the receiver never sees two requests at once."""
    url = receiver.script("/one", receiver.sleep(0.3, answer(200)))
    endpoint = await create_endpoint(tenant, url, max_in_flight=1)
    events = [await send_test(tenant, endpoint["id"]) for _ in range(4)]

    async with dispatchers(services, 2):
        for event_id in events:
            await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"), 20)

    assert receiver.max_in_flight["/one"] == 1
    assert len(receiver.at("/one")) == 4


async def test_rate_limit_holds_across_two_dispatchers(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """rate_limit_per_s 4 with two dispatchers: 8 deliveries spread over at least 1.5 s
    (one token bucket for the endpoint; one per dispatcher would take about half that)."""
    url = receiver.script("/paced", answer(200))
    endpoint = await create_endpoint(tenant, url, rate_limit_per_s=4)
    events = [await send_test(tenant, endpoint["id"]) for _ in range(8)]

    async with dispatchers(services, 2):
        for event_id in events:
            await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"), 20)

    hits = receiver.at("/paced")
    assert sorted(h.webhook_id for h in hits) == sorted(events)
    assert hits[-1].at - hits[0].at >= 1.5


async def test_retry_while_in_flight_sends_again_only_after_the_attempt_ends(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """POST .../retry while the receiver holds the first attempt (1.5 s): no second
    concurrent POST; the delivery is sent again once the first attempt is recorded."""
    url = receiver.script("/busy", receiver.sleep(1.5, answer(200)), answer(200))
    endpoint = await create_endpoint(tenant, url)
    event_id = await send_test(tenant, endpoint["id"])

    async with dispatchers(services, 2):
        await eventually(
            lambda: _some(receiver.in_flight["/busy"] == 1), 10, "the first attempt in flight"
        )
        delivery = await delivery_of(tenant, endpoint["id"], event_id)
        status, body, _ = await tenant.call("POST", f"{DELIVERIES}/{delivery['id']}/retry")
        assert status == 202, body
        done = await wait_delivery(
            tenant, endpoint["id"], event_id, lambda d: d["attempt_count"] == 2, 10
        )
        await asyncio.sleep(0.5)  # nothing more goes out

    assert done["status"] == "succeeded"
    assert [a["status_code"] for a in done["attempts"]] == [200, 200]
    assert receiver.max_in_flight["/busy"] == 1
    first, second = receiver.at("/busy")
    assert first.webhook_id == second.webhook_id == event_id
    assert second.at - first.at >= 1.4  # after the held attempt answered
    assert len(receiver.at("/busy")) == 2


class WholeDispatchers:
    """Whole dispatchers (fan-out consumer in one Kafka group, and sender), each with its
    own Database, as separate dispatcher processes would be."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.running: list[Dispatcher] = []
        self.databases: list[Database] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()

    async def add(self) -> Dispatcher:
        """One more dispatcher, returned once every one has its share of the group."""
        db = Database(self.services.settings.database_url)
        dispatcher = Dispatcher(self.services.settings, db, self.services.metrics, asyncio.Event())
        self.databases.append(db)
        self.running.append(dispatcher)
        self.tasks.append(asyncio.create_task(dispatcher.run(self.stop)))
        count = len(self.running)

        async def shared() -> list[float] | None:
            known = [s for s in (d.share() for d in self.running) if s is not None]
            return known if len(known) == count and abs(sum(known) - 1) < 1e-9 else None

        assert await eventually(shared, 30, "every dispatcher in the group") == [1 / count] * count
        return dispatcher

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout=30)
        for db in self.databases:
            await db.dispose()


async def owners(services: Services, endpoint_ids: list[str]) -> dict[str, str | None]:
    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(webhook_endpoints.c.id, webhook_endpoints.c.owner).where(
                webhook_endpoints.c.id.in_([uuid.UUID(e) for e in endpoint_ids])
            )
        )
        return {str(r.id): r.owner for r in rows}


async def test_a_second_dispatcher_joining_busy_endpoints_keeps_limits_and_sends_once(
    tenant: Tenant, receiver: Receiver, services: Services
) -> None:
    """Two endpoints with a backlog (one slot each, the receiver holding every request
    0.4 s: 20 s of work each, so the backlog outlasts a slow group join on a loaded
    machine): a lone dispatcher owns both; then a second one joins the group (and may
    take one over: its fair share is one). The limits hold throughout and every webhook
    goes out once."""
    paths = ["/spread-a", "/spread-b"]
    endpoints = [
        await create_endpoint(
            tenant, receiver.script(p, receiver.sleep(0.4, answer(200))), max_in_flight=1
        )
        for p in paths
    ]
    ids = [e["id"] for e in endpoints]
    events = {e["id"]: [await send_test(tenant, e["id"]) for _ in range(50)] for e in endpoints}
    group = WholeDispatchers(services)
    try:
        first = await group.add()
        first.wakeup.set()

        async def owned_by(instances: set[str]) -> dict[str, str | None] | None:
            seen = await owners(services, ids)
            return seen if set(seen.values()) == instances else None

        await eventually(lambda: owned_by({first.instance}), 10, "the first owns both")
        # Which dispatcher owns what after the second joins is not asserted: the fair-share
        # handover (2.6 s in isolated runs) did not happen within 18 s in 2 of 5 full runs
        # (issue 8 closing note); what must hold with two dispatchers is asserted below.
        await group.add()
        for endpoint_id, sent in events.items():
            for event_id in sent:
                await wait_delivery(tenant, endpoint_id, event_id, has_status("succeeded"), 30)
    finally:
        await group.close()

    for path, endpoint in zip(paths, endpoints, strict=True):
        assert receiver.max_in_flight[path] == 1
        await sent_as_recorded(services, receiver, path, events[endpoint["id"]])


async def test_a_fair_share_counts_only_the_other_dispatchers_endpoints_with_work(
    tenant: Tenant, services: Services
) -> None:
    """A dispatcher's fair share of the endpoints with work is the same whether or not
    another (or a crashed) dispatcher still owns an idle endpoint: an ownership outlives
    its work by up to a lease, and counting such idle ones raised the share (two busy
    endpoints and half of the group: a share of two instead of one), so a busy
    dispatcher never gave an endpoint up to a newcomer (issue 8)."""
    busy = [await create_endpoint(tenant, "https://hooks.example.com/busy") for _ in range(2)]
    idle = await create_endpoint(tenant, "https://hooks.example.com/idle")
    for endpoint in busy:
        await send_test(tenant, endpoint["id"])

    async def quota(idle_owner: str | None) -> int | None:
        async with services.db.begin() as conn:
            await conn.execute(
                webhook_endpoints.update()
                .where(webhook_endpoints.c.id == uuid.UUID(idle["id"]))
                .values(
                    owner=idle_owner,
                    owner_until=utcnow() + timedelta(minutes=5) if idle_owner else None,
                )
            )
        dispatcher = Dispatcher(services.settings, services.db, services.metrics)
        dispatcher.share = lambda: 0.5
        await dispatcher._refill()
        assert {e["id"] for e in busy} <= {str(e) for e in dispatcher.slots}
        return dispatcher._quota

    try:
        alone = await quota(None)
        assert alone is not None and alone >= 1
        assert await quota("gone:1:dispatcher") == alone
    finally:
        await quota(None)


async def test_claim_ahead_is_bounded_by_the_endpoint_s_pace_and_the_lease(
    tenant: Tenant, receiver: Receiver, services: Services, sender: StartSender
) -> None:
    """A slow endpoint (one slot, 0.2 s per request) with a backlog of 12: at most twice
    its limit is claimed ahead (plus the attempt being recorded), each lease ends within
    the ownership lease; a fast endpoint's backlog of 100 is recorded in few group
    commits (one `attempted_at` per recording transaction), not one per delivery."""
    lease = timedelta(seconds=services.settings.webhook_timeout_s * 3 + 10)
    slow = await create_endpoint(
        tenant, receiver.script("/slow", receiver.sleep(0.2, answer(200))), max_in_flight=1
    )
    fast = await create_endpoint(tenant, receiver.script("/fast", answer(200)))
    backlog = [await send_test(tenant, slow["id"]) for _ in range(12)]
    sent = [await send_test(tenant, fast["id"]) for _ in range(100)]
    sender()
    most = 0
    while len(receiver.at("/slow")) < len(backlog):
        async with services.db.read() as conn:
            leases = (
                (
                    await conn.execute(
                        sa.select(webhook_deliveries.c.claimed_until).where(
                            webhook_deliveries.c.endpoint_id == uuid.UUID(slow["id"]),
                            webhook_deliveries.c.claimed_until.is_not(None),
                        )
                    )
                )
                .scalars()
                .all()
            )
        now = utcnow()
        assert all(until <= now + lease for until in leases)
        most = max(most, sum(1 for until in leases if until > now))
        await asyncio.sleep(0.02)
    assert 1 <= most <= 2 * 1 + 1
    assert receiver.max_in_flight["/slow"] == 1
    assert sorted(h.webhook_id for h in receiver.at("/slow")) == sorted(backlog)

    for event_id in sent:
        await wait_delivery(tenant, fast["id"], event_id, has_status("succeeded"), 20)
    async with services.db.read() as conn:
        commits = (
            await conn.execute(
                sa.select(sa.func.count(sa.distinct(webhook_attempts.c.attempted_at)))
                .select_from(
                    webhook_attempts.join(
                        webhook_deliveries,
                        webhook_deliveries.c.id == webhook_attempts.c.delivery_id,
                    )
                )
                .where(webhook_deliveries.c.endpoint_id == uuid.UUID(fast["id"]))
            )
        ).scalar_one()
    assert commits <= len(sent) // 4, commits
    assert sorted(h.webhook_id for h in receiver.at("/fast")) == sorted(sent)


async def test_retry_sends_a_delivery_again_now(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """POST .../retry re-sends a failed delivery at once (and a succeeded one too)."""
    sender(webhook_retry_schedule="0")  # one attempt only: the first failure is final
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500), answer(200)))
    event_id = await send_test(tenant, endpoint["id"])
    failed = await wait_delivery(tenant, endpoint["id"], event_id, has_status("failed"))
    assert failed["attempt_count"] == 1

    status, body, _ = await tenant.call("POST", f"{DELIVERIES}/{failed['id']}/retry")
    assert status == 202, body
    assert body["data"]["status"] == "pending"
    done = await wait_delivery(tenant, endpoint["id"], event_id, has_status("succeeded"), 3)
    assert [a["status_code"] for a in done["attempts"]] == [500, 200]

    status, body, _ = await tenant.call("POST", f"{DELIVERIES}/{failed['id']}/retry")
    assert status == 202, body
    again = await wait_delivery(
        tenant, endpoint["id"], event_id, lambda d: d["attempt_count"] == 3, 3
    )
    assert again["status"] == "succeeded"
    assert [h.webhook_id for h in receiver.at("/hook")] == [event_id] * 3

    status, body, _ = await tenant.call("POST", f"{DELIVERIES}/{uuid.uuid4()}/retry")
    assert status == 404, body


async def test_recover_requeues_the_failed_deliveries_since_a_time(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """recover {since} re-sends every failed delivery created since then, not older ones;
    ?status= filters the delivery list."""
    sender(webhook_retry_schedule="0")
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500)))
    eid = endpoint["id"]
    old = await send_test(tenant, eid)
    await wait_delivery(tenant, eid, old, has_status("failed"))
    await asyncio.sleep(0.05)
    recent = [await send_test(tenant, eid) for _ in range(3)]
    for event_id in recent:
        await wait_delivery(tenant, eid, event_id, has_status("failed"))
    failed = await list_deliveries(tenant, eid, "&status=failed")
    assert sorted(d["event_id"] for d in failed) == sorted([old, *recent])
    assert await list_deliveries(tenant, eid, "&status=succeeded") == []
    since = min(d["created_at"] for d in failed if d["event_id"] in recent)

    receiver.script("/hook", answer(200))
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/recover", {"since": since})
    assert status == 202, body
    assert body["data"]["requeued"] == 3
    for event_id in recent:
        await wait_delivery(tenant, eid, event_id, has_status("succeeded"))
    assert [d["event_id"] for d in await list_deliveries(tenant, eid, "&status=failed")] == [old]
    succeeded = await list_deliveries(tenant, eid, "&status=succeeded")
    assert sorted(d["event_id"] for d in succeeded) == sorted(recent)
    assert (await delivery_of(tenant, eid, old))["attempt_count"] == 1

    naive = since.removesuffix("Z")
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/recover", {"since": naive})
    assert status == 400, body
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/recover", {})
    assert status == 400, body


async def walk_pages(tenant: Tenant, path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Every row of a listing (``path`` with its query), following ``next_cursor``; and the
    size of each page."""
    seen: list[dict[str, Any]] = []
    sizes: list[int] = []
    cursor: str | None = None
    while True:
        status, body, _ = await tenant.call("GET", path + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        seen.extend(body["data"])
        sizes.append(len(body["data"]))
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, sizes


async def test_endpoints_page_with_a_cursor(tenant: Tenant, other_tenant: Tenant) -> None:
    """limit + next_cursor walk the workspace's endpoints once, newest first; bad input 400."""
    created = [
        (await create_endpoint(tenant, f"https://hooks.example.com/p{n}"))["id"] for n in range(5)
    ]
    await create_endpoint(other_tenant, "https://hooks.example.com/theirs")

    seen, sizes = await walk_pages(tenant, f"{ENDPOINTS}?limit=2")
    assert sizes == [2, 2, 1]
    assert [e["id"] for e in seen] == list(reversed(created))
    assert all("secret" not in e for e in seen)
    keys = [(e["created_at"], e["id"]) for e in seen]
    assert keys == sorted(keys, reverse=True)

    status, body, _ = await tenant.call("GET", ENDPOINTS)
    assert status == 200, body
    assert len(body["data"]) == 5
    assert body["next_cursor"] is None
    for bad in ("limit=0", "limit=501", "limit=x", "cursor=not-a-cursor", "status=enabled"):
        status, body, _ = await tenant.call("GET", f"{ENDPOINTS}?{bad}")
        assert status == 400, (bad, body)
        assert body["error"]["code"] == "validation_error", body


async def test_deliveries_page_with_a_cursor(tenant: Tenant) -> None:
    """limit + next_cursor walk every delivery once, newest first; bad input is 400."""
    endpoint = await create_endpoint(tenant, "https://hooks.example.com/paged")
    eid = endpoint["id"]
    events = [await send_test(tenant, eid) for _ in range(5)]

    seen, sizes = await walk_pages(tenant, f"{ENDPOINTS}/{eid}/deliveries?limit=2")
    assert sizes == [2, 2, 1]
    assert [d["event_id"] for d in seen] == list(reversed(events))
    keys = [(d["created_at"], d["id"]) for d in seen]
    assert keys == sorted(keys, reverse=True)

    assert len(await list_deliveries(tenant, eid, "&status=pending")) == 5
    assert await list_deliveries(tenant, eid, "&status=failed") == []
    for bad in ("status=bogus", "limit=0", "limit=501", "cursor=not-a-cursor", "colour=red"):
        status, body, _ = await tenant.call("GET", f"{ENDPOINTS}/{eid}/deliveries?{bad}")
        assert status == 400, (bad, body)
    status, body, _ = await tenant.call("GET", f"{DELIVERIES}/{uuid.uuid4()}")
    assert status == 404, body
    status, body, _ = await tenant.call("GET", f"{DELIVERIES}/not-a-uuid")
    assert status in (400, 404), body


# -- what a new user meets: failing state, disabled endpoints, rotation, logs -------------


async def test_a_delivery_waiting_for_its_retry_is_failing_and_listed_by_status_failing(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """Tried, failed, retry scheduled: `failing` (not `pending`), and `?status=failing`
    lists it; once it succeeds it leaves that list."""
    sender(webhook_retry_schedule="0,2")
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500), answer(200)))
    eid = endpoint["id"]
    event_id = await send_test(tenant, eid)
    failing = await wait_delivery(tenant, eid, event_id, lambda d: d["attempt_count"] >= 1)
    assert failing["status"] == "failing"
    assert failing["next_attempt_at"] is not None
    assert [d["id"] for d in await list_deliveries(tenant, eid, "&status=failing")] == [
        failing["id"]
    ]
    assert await list_deliveries(tenant, eid, "&status=pending") == []
    await wait_delivery(tenant, eid, event_id, has_status("succeeded"))
    assert await list_deliveries(tenant, eid, "&status=failing") == []


async def test_recover_test_and_retry_on_a_disabled_endpoint_answer_409_until_enabled(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """On a disabled endpoint nothing is queued that could not be sent: 409
    endpoint_disabled saying to enable it first; after enable, recover sends them."""
    sender()
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(410)))
    eid = endpoint["id"]
    event_id = await send_test(tenant, eid)
    failed = await wait_delivery(tenant, eid, event_id, has_status("failed"))
    assert (await get_endpoint(tenant, eid))["disabled_reason"] == "gone"

    since = {"since": "2020-01-01T00:00:00Z"}
    for method, path, body in (
        ("POST", f"{ENDPOINTS}/{eid}/recover", since),
        ("POST", f"{ENDPOINTS}/{eid}/test", None),
        ("POST", f"{DELIVERIES}/{failed['id']}/retry", None),
    ):
        status, answer_body, _ = await tenant.call(method, path, body)
        assert status == 409, (path, answer_body)
        error = answer_body["error"]
        assert error["code"] == "endpoint_disabled"
        assert "enable it first" in error["message"] and f"{eid}/enable" in error["message"]
    await asyncio.sleep(0.5)
    assert (await delivery_of(tenant, eid, event_id))["status"] == "failed"
    assert len(receiver.at("/hook")) == 1

    receiver.script("/hook", answer(200))
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/enable")
    assert status == 200, body
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/recover", since)
    assert status == 202, body
    assert body["data"]["requeued"] == 1
    await wait_delivery(tenant, eid, event_id, has_status("succeeded"))


async def test_an_event_while_the_endpoint_is_disabled_is_sent_by_recover_after_enable(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services, dlq: Producer
) -> None:
    """A contact deleted while its subscriber's endpoint is disabled (a 410) was never
    written as a delivery: enable + recover, as the README says, could not send it, and
    the receiver never learnt of the deletion. Now the fan-out writes it `failed`, and
    recover sends it; one waiting for a retry when the endpoint was disabled fails too."""
    sender(webhook_retry_schedule="0,3600")
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500), answer(410)))
    eid = endpoint["id"]
    waiting = await send_test(tenant, eid)
    await wait_delivery(tenant, eid, waiting, has_status("failing"))
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/test")
    assert status == 202, body
    await wait_delivery(tenant, eid, body["data"]["event_id"], has_status("failed"))
    assert (await get_endpoint(tenant, eid))["status"] == "disabled"
    assert (await delivery_of(tenant, eid, waiting))["status"] == "failed"

    deleted = contact_deleted(tenant.workspace_id)
    dispatcher = Dispatcher(services.settings, services.db, services.metrics)
    assert await dispatcher.fan_out([message(deleted)], dlq) == 1
    assert (await delivery_of(tenant, eid, deleted.id))["status"] == "failed"

    receiver.script("/hook", answer(200))
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/enable")
    assert status == 200, body
    since = {"since": "2020-01-01T00:00:00Z"}
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/recover", since)
    assert status == 202, body
    assert body["data"]["requeued"] == 3
    await wait_delivery(tenant, eid, deleted.id, has_status("succeeded"))
    await wait_delivery(tenant, eid, waiting, has_status("succeeded"))
    got = [json.loads(r.body)["type"] for r in receiver.at("/hook")]
    assert "contact.deleted" in got


async def test_recover_after_an_outage_sends_the_failing_deliveries_now_too(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """A delivery that failed once waits for its scheduled retry (hours, in the default
    schedule): recover makes it due now, beside the failed ones, and counts it; one
    created before `since` keeps its schedule."""
    sender(webhook_retry_schedule="0,3600")
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500)))
    eid = endpoint["id"]
    older = await send_test(tenant, eid)
    await wait_delivery(tenant, eid, older, has_status("failing"))
    since = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    event_id = await send_test(tenant, eid)
    failing = await wait_delivery(tenant, eid, event_id, has_status("failing"))
    assert failing["attempt_count"] == 1

    receiver.script("/hook", answer(200))
    status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/recover", {"since": since})
    assert status == 202, body
    assert body["data"]["requeued"] == 1
    done = await wait_delivery(tenant, eid, event_id, has_status("succeeded"))
    assert done["attempt_count"] == 2
    assert (await delivery_of(tenant, eid, older))["status"] == "failing"


async def test_a_deleted_endpoints_unsent_delivery_fails_and_is_not_sent_again(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """Deleting an endpoint fails its unsent deliveries (DESIGN.md: `failed` covers
    "endpoint disabled or deleted"; earlier versions said `cancelled`, a state a client
    filtering on the documented ones never saw). Retry on one was a 202 that set it
    `pending` for good (nothing can send it): 409 endpoint_deleted, and it stays failed."""
    sender(webhook_retry_schedule="0,3600")
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(500)))
    eid = endpoint["id"]
    event_id = await send_test(tenant, eid)
    failing = await wait_delivery(tenant, eid, event_id, has_status("failing"))
    status, body, _ = await tenant.call("DELETE", f"{ENDPOINTS}/{eid}")
    assert status == 204, body

    status, body, _ = await tenant.call("POST", f"{DELIVERIES}/{failing['id']}/retry")
    assert status == 409, body
    assert body["error"]["code"] == "endpoint_deleted"
    status, body, _ = await tenant.call("GET", f"{DELIVERIES}/{failing['id']}")
    assert status == 200, body
    assert body["data"]["status"] == "failed"
    assert body["data"]["next_attempt_at"] is None


async def test_every_secret_younger_than_the_overlap_signs_up_to_five(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """Two rotations within the overlap: the first secret still verifies (it used to be
    dropped at the second rotation). At most five live secrets: the oldest goes first."""
    sender()
    url = receiver.script("/hook", answer(200))
    endpoint = await create_endpoint(tenant, url)
    eid = endpoint["id"]
    secrets = [endpoint["secret"]]
    for _ in range(2):
        status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/rotate-secret")
        assert status == 200, body
        secrets.append(body["data"]["secret"])
    await wait_delivery(tenant, eid, await send_test(tenant, eid), has_status("succeeded"))
    hit = receiver.at("/hook")[-1]
    assert len(hit.headers["webhook-signature"].split(" ")) == 3
    for secret in secrets:
        Webhook(secret).verify(hit.body, hit.headers)  # raises if it does not verify

    for _ in range(4):
        status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/rotate-secret")
        assert status == 200, body
        secrets.append(body["data"]["secret"])
    await wait_delivery(tenant, eid, await send_test(tenant, eid), has_status("succeeded"))
    hit = receiver.at("/hook")[-1]
    assert len(hit.headers["webhook-signature"].split(" ")) == 5
    for secret in secrets[-5:]:
        Webhook(secret).verify(hit.body, hit.headers)
    for secret in secrets[:-5]:
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(hit.body, hit.headers)


async def test_rotation_with_no_overlap_signs_with_the_new_secret_only(
    tenant: Tenant, receiver: Receiver, sender: StartSender, services: Services
) -> None:
    sender()
    endpoint = await create_endpoint(tenant, receiver.script("/hook", answer(200)))
    eid = endpoint["id"]
    async with services.db.begin() as conn:
        await conn.execute(
            sa.text("UPDATE webhook_endpoints SET retired_secrets = :r WHERE id = :i").bindparams(
                sa.bindparam("r", type_=sa.JSON()), sa.bindparam("i", type_=sa.Uuid())
            ),
            {
                "r": [{"secret": random_secret(), "expires_at": "2000-01-01T00:00:00Z"}],
                "i": uuid.UUID(eid),
            },
        )
    await wait_delivery(tenant, eid, await send_test(tenant, eid), has_status("succeeded"))
    hit = receiver.at("/hook")[-1]
    assert len(hit.headers["webhook-signature"].split(" ")) == 1  # the expired one is gone
    Webhook(endpoint["secret"]).verify(hit.body, hit.headers)


async def test_delivery_outcomes_and_endpoint_state_changes_leave_log_lines(
    tenant: Tenant, receiver: Receiver, sender: StartSender
) -> None:
    """retry scheduled, succeeded, disabled by 410, enabled, secret rotated: one JSON line
    each, with ids and codes, never the receiver's URL or a secret."""
    with json_logs() as logs:
        sender()
        url = receiver.script("/hook", answer(500), answer(200), answer(410))
        endpoint = await create_endpoint(tenant, url)
        eid = endpoint["id"]
        first = await send_test(tenant, eid)
        await wait_delivery(tenant, eid, first, has_status("succeeded"))
        second = await send_test(tenant, eid)
        await wait_delivery(tenant, eid, second, has_status("failed"))
        status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/enable")
        assert status == 200, body
        status, body, _ = await tenant.call("POST", f"{ENDPOINTS}/{eid}/rotate-secret")
        assert status == 200, body
        new_secret = body["data"]["secret"]
        # The dispatcher logs an outcome once it is recorded, which the API shows first.
        await logs.wait_for("webhook_delivery_succeeded", endpoint_id=eid, event_id=first)
        await logs.wait_for("webhook_delivery_failed", endpoint_id=eid, event_id=second)
        await logs.wait_for("webhook_endpoint_disabled", endpoint_id=eid)

    retry = logs.events("webhook_delivery_retry_scheduled", endpoint_id=eid, event_id=first)
    assert [(r["attempt"], r["status_code"], r["error"]) for r in retry] == [(1, 500, "http_500")]
    ok = logs.events("webhook_delivery_succeeded", endpoint_id=eid, event_id=first)
    assert [(r["attempt"], r["status_code"]) for r in ok] == [(2, 200)]
    gone = logs.events("webhook_delivery_failed", endpoint_id=eid, event_id=second)
    assert [r["status_code"] for r in gone] == [410]
    assert [r["reason"] for r in logs.events("webhook_endpoint_disabled", endpoint_id=eid)] == [
        "gone"
    ]
    assert len(logs.events("webhook_endpoint_enabled", endpoint_id=eid)) == 1
    rotated = logs.events("webhook_secret_rotated", endpoint_id=eid)
    assert [r["live_secrets"] for r in rotated] == [2]
    for secret in (endpoint["secret"], new_secret, "whsec_"):
        assert secret not in logs.text
    assert url not in logs.text and "/hook" not in logs.text
