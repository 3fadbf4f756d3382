"""Deletion-request outbox rows written before the ``job-id`` header existed get it

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 06:40:00

Since the header exists (service.outbox), a deletion request's outbox row and message name
their job in a ``job-id`` header, so that one whose payload cannot be read still fails its
item (service.deletion.giveup.unreadable_commands) instead of leaving it pending forever:
its key, the contact's id, may be an item of several jobs. Rows written before that and
not yet published (nor set aside) named no job. Each gets the header, its job taken from:

- its payload, when that reads as JSON with a ``data.job_id`` (the payload is what the
  relay will publish, so this is the job the row is for);
- else the one job with an item still ``pending`` for the contact its key names;
- else (no such item, or several jobs: it cannot be known) nothing: the row stays as it
  was, and if it cannot be read either, it is set aside without failing an item, as before.

Rows already published cannot be mended (their messages are in Kafka as they are). Rows
are read in id order, 1,000 at a time, and the rows given the same headers are updated in
one statement. The names and values here are this migration's snapshot of the format at
0008 (service.events defines them for the running code).

Downgrade leaves the headers: the code before 0008 ignores a header it does not know.
"""

import json
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TYPE_HEADER = "ce_type"
JOB_HEADER = "job-id"
DELETION_REQUESTED = "contact.deletion_requested"
PAGE = 1000

_outbox = sa.table(
    "outbox",
    sa.column("id", sa.BigInteger),
    sa.column("key", sa.String),
    sa.column("payload", sa.LargeBinary),
    sa.column("headers", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")),
    sa.column("published_at", sa.DateTime),
    sa.column("failed_at", sa.DateTime),
)
_items = sa.table(
    "deletion_job_items",
    sa.column("job_id", sa.Uuid),
    sa.column("contact_id", sa.Uuid),
    sa.column("status", sa.String),
)


def _headers(value: Any) -> list[list[Any]] | None:
    """The stored headers as ``[[name, value], ...]``, or None if they are not that."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, list) or not all(
        isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) for h in value
    ):
        return None
    return value


def _job_in_payload(payload: Any) -> str | None:
    try:
        job_id = json.loads(bytes(payload))["data"]["job_id"]
        return str(uuid.UUID(str(job_id)))
    except (ValueError, TypeError, KeyError):
        return None


def _job_of_pending_item(conn: sa.Connection, key: Any) -> str | None:
    try:
        contact_id = uuid.UUID(str(key))
    except ValueError:
        return None
    jobs = (
        conn.execute(
            sa.select(_items.c.job_id)
            .where(_items.c.contact_id == contact_id, _items.c.status == "pending")
            .distinct()
            .limit(2)
        )
        .scalars()
        .all()
    )
    return str(jobs[0]) if len(jobs) == 1 else None


def upgrade() -> None:
    conn = op.get_bind()
    after = 0
    while True:
        rows = conn.execute(
            sa.select(_outbox.c.id, _outbox.c.key, _outbox.c.payload, _outbox.c.headers)
            .where(
                _outbox.c.published_at.is_(None),
                _outbox.c.failed_at.is_(None),
                _outbox.c.id > after,
            )
            .order_by(_outbox.c.id)
            .limit(PAGE)
        ).all()
        if not rows:
            return
        after = rows[-1].id
        mended: dict[str, list[int]] = {}
        for row in rows:
            headers = _headers(row.headers)
            if headers is None:
                continue
            names = {name: value for name, value in headers}
            if names.get(TYPE_HEADER) != DELETION_REQUESTED or JOB_HEADER in names:
                continue
            job_id = _job_in_payload(row.payload) or _job_of_pending_item(conn, row.key)
            if job_id is not None:
                text = json.dumps([*headers, [JOB_HEADER, job_id]])
                mended.setdefault(text, []).append(row.id)
        for text, ids in mended.items():
            conn.execute(
                _outbox.update().where(_outbox.c.id.in_(ids)).values(headers=json.loads(text))
            )


def downgrade() -> None:
    """Nothing to undo: the headers stay (see the module)."""
