"""A first pass of webhook delivery: a deletion reaches a real receiver, signed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from service.app import Services
from service.config import Settings
from tests.conftest import Tenant, components_running, subscribed_receiver


@pytest.fixture
def settings(kafka_settings: Settings) -> Settings:
    return kafka_settings


@pytest.fixture
async def everything(services: Services) -> AsyncIterator[Services]:
    async with components_running(services, "relay", "worker", "dispatcher"):
        yield services


async def test_deleted_contact_is_announced_signed(tenant: Tenant, everything: Services) -> None:
    received: list[tuple[bytes, dict[str, str]]] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        arrived.set()
        return web.Response(status=204)

    async with subscribed_receiver(tenant, hook) as secret:
        status, created, _ = await tenant.call("POST", "/v1/contacts", {"email": "w@x.io"})
        cid = created["data"]["id"]
        status, job, _ = await tenant.call(
            "POST", "/v1/contacts/bulk-delete", {"contact_ids": [cid]}, {"Prefer": "wait=20"}
        )
        assert status == 200, job
        await asyncio.wait_for(arrived.wait(), timeout=20)
        raw, headers = received[0]
        payload: Any = Webhook(secret).verify(raw, headers)
        assert payload["type"] == "contact.deleted"
        assert payload["data"]["contact_id"] == cid
        assert "w@x.io" not in raw.decode()
