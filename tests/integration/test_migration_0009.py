"""Migration 0009 (SQLite and PostgreSQL): deliveries earlier versions left ``cancelled``
when their endpoint was deleted become ``failed``, the state DESIGN.md gives them; every
other delivery keeps its state."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from service.migrate import upgrade_sync
from tests.integration.test_migration_0002 import _execute, _rows, fresh_url  # noqa: F401


def test_0009_fails_the_deliveries_of_deleted_endpoints_and_nothing_else(fresh_url: str) -> None:  # noqa: F811
    upgrade_sync(fresh_url, "0008")
    sqlite = fresh_url.startswith("sqlite")
    now = datetime.now(UTC).replace(tzinfo=None) if sqlite else datetime.now(UTC)
    before = {"a": "cancelled", "b": "pending", "c": "failing", "d": "succeeded", "e": "failed"}
    for name, status in before.items():
        asyncio.run(
            _execute(
                fresh_url,
                "INSERT INTO webhook_deliveries (id, workspace_id, endpoint_id, event_id, "
                "event_type, payload, status, attempt_count, created_at, completed_at) VALUES "
                "(:id, :ws, :ep, :event, 'contact.deleted', :payload, :status, 1, :now, :now)",
                {
                    "id": uuid.uuid4().hex if sqlite else uuid.uuid4(),
                    "ws": uuid.uuid4().hex if sqlite else uuid.uuid4(),
                    "ep": uuid.uuid4().hex if sqlite else uuid.uuid4(),
                    "event": name,
                    "payload": b"{}",
                    "status": status,
                    "now": now,
                },
            )
        )

    upgrade_sync(fresh_url, "head")

    got = {
        r["event_id"]: r["status"]
        for r in asyncio.run(_rows(fresh_url, "SELECT event_id, status FROM webhook_deliveries"))
    }
    assert got == before | {"a": "failed"}
