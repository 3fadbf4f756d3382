"""Fewer index writes per deleted contact: timeline back-references indexed only while
set, and no unique index on the audit event id

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 09:35:00

Every deletion writes index entries at random places (issue 8: on SQLite the commit's page
writes bound a filter job). Two of them served no query:

- ``ix_{activities,notes,tasks}_contact_id`` held an entry for every timeline row,
  including the orphaned ones: nulling a deleted contact's back-references moved each of
  its two or three rows' entries from its contact into the (NULL, row) run, at a place as
  random as the row's. Every reader of the index names contacts (``contact_id = ?``,
  ``IN``, ``= ANY``), which implies ``IS NOT NULL``: the index is now partial, and nulling
  only removes entries. Orphaned rows are read by their ids (the deletion's audit event
  lists them), on the primary key.
- ``uq_audit_events_id``: no query reads an event by its id alone (the API and the chain
  walk go by workspace and seq, target, job or email HMAC). Ids are random (v4, 122 bits,
  ``service.db.new_ids``), so the index only cost a random insert per event. SQLite drops
  a table constraint by copying the table (Alembic's batch mode: the rows, their hashes
  and the other indexes are kept as they are).

Downgrade restores both (it fails if two events share an id, which the unique index
would then have refused).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMELINES = ("activities", "notes", "tasks")
LINKED = "contact_id IS NOT NULL"


def upgrade() -> None:
    for table in TIMELINES:
        op.drop_index(f"ix_{table}_contact_id", table_name=table)
        op.create_index(
            f"ix_{table}_contact_id",
            table,
            ["contact_id"],
            postgresql_where=sa.text(LINKED),
            sqlite_where=sa.text(LINKED),
        )
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_constraint("uq_audit_events_id", type_="unique")


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.create_unique_constraint("uq_audit_events_id", ["id"])
    for table in TIMELINES:
        op.drop_index(f"ix_{table}_contact_id", table_name=table)
        op.create_index(f"ix_{table}_contact_id", table, ["contact_id"])
