"""Migration 0012: on SQLite the contacts table is stored in id order (``WITHOUT ROWID``),
every contact and index kept both ways (PostgreSQL: unchanged); and why: a batch of
contacts deleted in id order, as a filter job deletes them, writes fewer pages to the
write-ahead log than the rowid table made it write."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path

from alembic import command

from service.migrate import alembic_config, upgrade_sync
from tests.integration.test_migration_0002 import _execute, _rows, fresh_url  # noqa: F401

CONTACTS = 50
INDEXES = {
    "ix_contacts_workspace_id_id",
    "ix_contacts_workspace_id_email",
    "ix_contacts_workspace_id_last_name",
}


def _insert_contacts(url: str, workspace: uuid.UUID, count: int) -> set[str]:
    sqlite = url.startswith("sqlite")
    ids: set[str] = set()
    for n in range(count):
        contact = uuid.uuid4()
        ids.add(contact.hex)
        asyncio.run(
            _execute(
                url,
                "INSERT INTO contacts (id, workspace_id, email, last_name, properties, "
                "has_billing_subscription, created_at, updated_at) VALUES (:id, :ws, :email, "
                "'Smith', '{}', false, '2026-11-30 10:00:00', '2026-11-30 10:00:00')",
                {
                    "id": contact.hex if sqlite else contact,
                    "ws": workspace.hex if sqlite else workspace,
                    "email": f"c{n}@example.com",
                },
            )
        )
    return ids


def _layout(url: str) -> tuple[bool, set[str]]:
    """Whether the contacts table is WITHOUT ROWID (SQLite), and its index names."""
    if url.startswith("sqlite"):
        table = asyncio.run(_rows(url, "SELECT sql FROM sqlite_master WHERE name = 'contacts'"))
        indexes = asyncio.run(
            _rows(
                url,
                "SELECT name FROM sqlite_master "
                "WHERE tbl_name = 'contacts' AND type = 'index' AND sql IS NOT NULL",
            )
        )
        return "WITHOUT ROWID" in str(table[0]["sql"]).upper(), {str(r["name"]) for r in indexes}
    indexes = asyncio.run(
        _rows(url, "SELECT indexname AS name FROM pg_indexes WHERE tablename = 'contacts'")
    )
    return False, {str(r["name"]) for r in indexes} - {"pk_contacts"}


def _stored_ids(url: str) -> set[str]:
    rows = asyncio.run(_rows(url, "SELECT id FROM contacts"))
    return {uuid.UUID(str(r["id"])).hex for r in rows}


def test_0012_keeps_every_contact_and_index_both_ways(fresh_url: str) -> None:  # noqa: F811
    upgrade_sync(fresh_url, "0011")
    sqlite = fresh_url.startswith("sqlite")
    ids = _insert_contacts(fresh_url, uuid.uuid4(), CONTACTS)
    assert _layout(fresh_url) == (False, INDEXES)

    upgrade_sync(fresh_url, "head")
    assert _layout(fresh_url) == (sqlite, INDEXES)
    assert _stored_ids(fresh_url) == ids

    command.downgrade(alembic_config(fresh_url), "0011")
    assert _layout(fresh_url) == (False, INDEXES)
    assert _stored_ids(fresh_url) == ids
    upgrade_sync(fresh_url, "head")
    assert _layout(fresh_url) == (sqlite, INDEXES)
    assert _stored_ids(fresh_url) == ids


def _pages_written_deleting_a_batch(path: Path, revision: str) -> int:
    """Frames the commit of one worker-sized batch of deletions (500 contacts, the next in
    id order among 4,000 inserted in random id order, sharing a last name) adds to the log."""
    url = f"sqlite+aiosqlite:///{path}"
    upgrade_sync(url, revision)
    workspace = uuid.uuid4().hex
    ids = [uuid.uuid4().hex for _ in range(4000)]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO contacts (id, workspace_id, email, last_name, properties, "
            "has_billing_subscription, created_at, updated_at) VALUES (?, ?, ?, 'Smith', '{}', "
            "0, '2026-11-30 10:00:00', '2026-11-30 10:00:00')",
            [(cid, workspace, f"c{n}@example.com") for n, cid in enumerate(ids)],
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        batch = sorted(ids)[1000:1500]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "DELETE FROM contacts WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(batch),),
        )
        conn.execute("COMMIT")
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        assert conn.execute("SELECT count(*) FROM contacts").fetchone()[0] == 3500
        # Read while the connection is open: the last one to close removes the log.
        log_bytes = path.with_name(path.name + "-wal").stat().st_size
    finally:
        conn.close()
    return (log_bytes - 32) // (page_size + 24)


def test_a_batch_deleted_in_id_order_writes_fewer_pages_than_with_the_rowid_table(
    tmp_path: Path,
) -> None:
    """SQLite: the same deletions write at most three quarters of the pages they wrote
    before 0012 (here about half: the rows and the last-name index entries of a batch
    are neighbours, and there is no separate primary-key index)."""
    before = _pages_written_deleting_a_batch(tmp_path / "rowid.db", "0011")
    after = _pages_written_deleting_a_batch(tmp_path / "clustered.db", "head")
    assert after * 4 <= before * 3, (before, after)
