"""A first end-to-end pass through the pipeline: request -> outbox -> Kafka -> worker."""

from __future__ import annotations

import pytest

from service.app import Services
from service.config import Settings
from tests.conftest import Tenant


@pytest.fixture
def settings(kafka_settings: Settings) -> Settings:
    return kafka_settings


async def test_bulk_delete_by_ids_completes(tenant: Tenant, pipeline: Services) -> None:
    ids = []
    for n in range(3):
        status, body, _ = await tenant.call("POST", "/v1/contacts", {"email": f"p{n}@x.io"})
        assert status == 201
        ids.append(body["data"]["id"])
    status, body, _ = await tenant.call(
        "POST", "/v1/contacts/bulk-delete", {"contact_ids": ids}, {"Prefer": "wait=20"}
    )
    assert status == 200, body
    assert body["data"]["deleted_count"] == 3
    assert body["data"]["status"] == "completed"
