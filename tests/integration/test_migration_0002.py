"""Migration 0002 on a database that has data, on SQLite and PostgreSQL: a rotated-out
secret keeps signing, and a disabled endpoint's reason becomes a code."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from service.migrate import upgrade_sync


async def _execute(url: str, statement: str, params: dict[str, object] | None = None) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(statement), params or {})
    finally:
        await engine.dispose()


async def _rows(url: str, statement: str) -> list[dict[str, object]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(sa.text(statement))).mappings()]
    finally:
        await engine.dispose()


@pytest.fixture
def fresh_url(db_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the backend under test."""
    if db_url.startswith("sqlite"):
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
        return
    name = f"mig_{uuid.uuid4().hex[:10]}"
    asyncio.run(_execute(db_url, f'CREATE DATABASE "{name}"'))
    yield f"{db_url.rpartition('/')[0]}/{name}"
    asyncio.run(_execute(db_url, f'DROP DATABASE "{name}"'))


def test_0002_keeps_a_rotated_out_secret_and_codes_the_disabled_reason(fresh_url: str) -> None:
    upgrade_sync(fresh_url, "0001")
    now = datetime.now(UTC)
    insert = (
        "INSERT INTO webhook_endpoints (id, workspace_id, url, description, event_types, "
        "rate_limit_per_s, secret, previous_secret, previous_secret_expires_at, status, "
        "disabled_reason, failing_since, created_at, updated_at) VALUES (:id, :ws, "
        "'https://example.com/h', NULL, :types, NULL, 'whsec_new', :prev, :exp, :status, "
        ":reason, NULL, :now, :now)"
    )
    rows = {
        "rotated": ("whsec_old", now + timedelta(hours=1), "enabled", None),
        "gone": (None, None, "disabled", "the receiver answered 410 Gone"),
        "failing": (None, None, "disabled", "every delivery failed for 5 days"),
    }
    ids = {name: uuid.uuid4() for name in rows}
    sqlite = fresh_url.startswith("sqlite")
    for name, (prev, exp, status, reason) in rows.items():
        asyncio.run(
            _execute(
                fresh_url,
                insert,
                {
                    "id": ids[name].hex if sqlite else ids[name],
                    "ws": uuid.uuid4().hex if sqlite else uuid.uuid4(),
                    "types": "[]",
                    "prev": prev,
                    "exp": exp.replace(tzinfo=None) if sqlite and exp else exp,
                    "status": status,
                    "reason": reason,
                    "now": now.replace(tzinfo=None) if sqlite else now,
                },
            )
        )

    upgrade_sync(fresh_url, "head")

    got = {
        str(r["id"]).replace("-", ""): r
        for r in asyncio.run(
            _rows(
                fresh_url,
                "SELECT id, retired_secrets, disabled_reason, disabled_at FROM webhook_endpoints",
            )
        )
    }
    by_name = {name: got[ids[name].hex] for name in rows}

    def retired(value: object) -> list[dict[str, str]]:
        loaded = json.loads(value) if isinstance(value, str) else value
        assert isinstance(loaded, list)
        return loaded

    kept = retired(by_name["rotated"]["retired_secrets"])
    assert [r["secret"] for r in kept] == ["whsec_old"]
    assert datetime.fromisoformat(kept[0]["expires_at"]) > now
    assert by_name["rotated"]["disabled_reason"] is None
    assert (by_name["gone"]["disabled_reason"], by_name["failing"]["disabled_reason"]) == (
        "gone",
        "failing",
    )
    assert by_name["gone"]["disabled_at"] is not None
    assert retired(by_name["gone"]["retired_secrets"]) == []
