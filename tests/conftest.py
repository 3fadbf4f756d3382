"""Shared fixtures: both databases, the real broker, the running API and tenants.

Every database-touching test takes the `db_url` fixture (directly or through another
fixture), which is parametrized over SQLite and PostgreSQL. Each test makes its own
workspace, so tests share a migrated database per backend without seeing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from service.app import Services, create_app, run_components
from service.config import Settings
from service.db import Database
from service.httpserver import EnvelopeRunner
from service.keys import SCOPES, create_key
from service.logs import configure_logging
from service.migrate import upgrade_sync

pytest_plugins = ["tests.plugins.kafka", "tests.plugins.postgres", "tests.plugins.order"]

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    configure_logging("json", "WARNING")


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture(scope="session")
def db_url(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A migrated database of the backend under test, shared by the session."""
    if backend == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "test.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_sync(url)
    yield url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """The database under test, opened for one test (its own connections)."""
    database = Database(db_url)
    try:
        yield database
    finally:
        await database.dispose()


def contact_row(workspace_id: uuid.UUID, contact_id: uuid.UUID, at: datetime) -> dict[str, Any]:
    """A plain contact (an address from its id, no name, phone or role) for
    ``contacts.insert()``, created and updated ``at``."""
    return {
        "id": contact_id,
        "workspace_id": workspace_id,
        "email": f"{contact_id.hex}@example.com",
        "first_name": None,
        "last_name": None,
        "phone": None,
        "properties": {},
        "member_role": None,
        "has_billing_subscription": False,
        "created_at": at,
        "updated_at": at,
    }


def make_settings(db_url: str, **overrides: Any) -> Settings:
    """Settings for a test: high rate limits, private webhook targets allowed."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "rate_limit_per_s": 10_000.0,
        "rate_limit_burst": 10_000,
        "webhook_allow_private_networks": True,
        "kafka_bootstrap_servers": "127.0.0.1:1",
        "kafka_topic_prefix": f"t{uuid.uuid4().hex[:10]}.",
        "kafka_consumer_group_prefix": f"g{uuid.uuid4().hex[:10]}",
        "kafka_partitions": 2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(db_url: str) -> Settings:
    return make_settings(db_url)


@contextlib.asynccontextmanager
async def own_database(
    db_url: str, tmp_path: Path, prefix: str, *, options: str = "", migrate: bool = True
) -> AsyncIterator[str]:
    """A database of the test's own beside the shared one (tests whose work reads every
    row of a kind, which the shared database holds other tests' of): an SQLite file in
    `tmp_path`, or a new PostgreSQL database on the test cluster created with `options`
    and dropped afterwards; migrated unless `migrate` is false."""
    from service.db import admin_sql
    from service.migrate import upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    sqlite = db_url.startswith("sqlite")
    if sqlite:
        url = f"sqlite+aiosqlite:///{tmp_path / (name + '.db')}"
    else:
        await admin_sql(db_url, f'CREATE DATABASE "{name}" {options}'.strip())
        url = f"{db_url.rpartition('/')[0]}/{name}"
    try:
        if migrate:
            await upgrade(url)
        yield url
    finally:
        if not sqlite:
            await admin_sql(db_url, f'DROP DATABASE "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def opened_services(settings: Settings) -> AsyncIterator[Services]:
    """The process resources of a service with these settings, closed afterwards."""
    svc = Services(settings=settings, db=Database.from_settings(settings))
    try:
        yield svc
    finally:
        await svc.close()


@contextlib.asynccontextmanager
async def components_running(services: Services, *names: str) -> AsyncIterator[None]:
    """The named components (relay, worker, dispatcher...) running in this process."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_components(services, list(names), stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


@pytest.fixture
def kafka_settings(db_url: str, kafka_bootstrap: str) -> Settings:
    """Settings against the real broker (topics and groups unique to the test)."""
    return make_settings(db_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def pipeline(services: Services) -> AsyncIterator[Services]:
    """Relay and worker running in this process against the test's database and broker."""
    async with components_running(services, "relay", "worker"):
        yield services


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    async with opened_services(settings) as svc:
        yield svc


@pytest.fixture
async def api(services: Services) -> AsyncIterator[str]:
    """The HTTP API served on a real socket as `service.app.run_api` serves it (its
    EnvelopeRunner: aiohttp's TestServer cancels a handler whose client went away, which the
    service's runner does not); yields its base URL."""
    runner = EnvelopeRunner(create_app(services), services.metrics)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@dataclass
class Tenant:
    """A workspace with a key, and an HTTP session that sends the key."""

    base: str
    key: str
    key_id: uuid.UUID
    workspace_id: uuid.UUID
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return self.base + path

    async def call(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        """Send a request with this tenant's key; returns (status, JSON body, headers)."""
        all_headers = {"Authorization": f"Bearer {self.key}", **(headers or {})}
        async with self.http.request(
            method, self.url(path), json=json, headers=all_headers
        ) as response:
            body = await response.json(content_type=None) if await response.read() else None
            return response.status, body, response.headers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def new_tenant(
    services: Services, base: str, http: aiohttp.ClientSession, scopes: list[str] | None = None
) -> Tenant:
    """A fresh workspace and key (all scopes unless told otherwise)."""
    created = await create_key(services.db, f"ws-{uuid.uuid4().hex[:12]}", list(scopes or SCOPES))
    return Tenant(base, created.key, created.key_id, created.workspace_id, http)


@contextlib.asynccontextmanager
async def subscribed_receiver(
    tenant: Tenant, hook: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> AsyncIterator[str]:
    """A real receiver on 127.0.0.1 answering with `hook` at /hook, subscribed to
    contact.deleted for this tenant; yields the endpoint's signing secret."""
    app = web.Application()
    app.router.add_post("/hook", hook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        status, body, _ = await tenant.call(
            "POST",
            "/v1/webhooks/endpoints",
            {"url": str(server.make_url("/hook")), "event_types": ["contact.deleted"]},
        )
        assert status == 201, body
        yield str(body["data"]["secret"])
    finally:
        await server.close()


@pytest.fixture
async def tenant(services: Services, api: str, http: aiohttp.ClientSession) -> Tenant:
    return await new_tenant(services, api, http)


@pytest.fixture
async def other_tenant(services: Services, api: str, http: aiohttp.ClientSession) -> Tenant:
    return await new_tenant(services, api, http)
