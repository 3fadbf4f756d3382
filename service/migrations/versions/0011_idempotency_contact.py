"""Idempotency answers that show a contact are erased with it; expired keys are pruned

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 16:00:00

A kept answer to ``POST /v1/contacts`` holds the contact's address, names and phone, and
one to ``POST /v1/contacts/{id}/notes`` (…) the timeline item with its back-reference; a
deletion left both, and nothing pruned expired keys (an operator's trial: `erasure check`
found the deleted address in ``idempotency_keys``). ``contact_id`` names the contact an
answer shows (service.routing), and the deleting transaction erases those answers
(service.idempotency.erase_answers). Here: expired keys (more than an hour past their
window) are deleted, every other kept answer gets its ``contact_id``, and one that shows a
contact already deleted is erased now.
"""

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LINKED = "contact_id IS NOT NULL"
ERASED_BODY = (
    b'{"error":{"code":"answer_erased","message":"The answer to this request showed a '
    b"contact that has since been deleted; it is no longer kept, and the request is not "
    b'run again.","details":{}}}'
)


def _shown(body: bytes | None) -> uuid.UUID | None:
    try:
        data = json.loads(body).get("data") if body else None
        if isinstance(data, dict):
            if isinstance(data.get("contact_id"), str):
                return uuid.UUID(data["contact_id"])
            if "email" in data and isinstance(data.get("id"), str):
                return uuid.UUID(data["id"])
    except (ValueError, AttributeError):
        return None
    return None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("contact_id", sa.Uuid(as_uuid=True), nullable=True))
    op.create_index(
        "ix_idempotency_keys_contact_id",
        "idempotency_keys",
        ["contact_id"],
        postgresql_where=sa.text(LINKED),
        sqlite_where=sa.text(LINKED),
    )
    keys = sa.table(
        "idempotency_keys",
        sa.column("workspace_id", sa.Uuid(as_uuid=True)),
        sa.column("key", sa.String),
        sa.column("expires_at", sa.DateTime(timezone=True)),
        sa.column("response_status", sa.Integer),
        sa.column("response_headers", sa.JSON),
        sa.column("response_body", sa.LargeBinary),
        sa.column("contact_id", sa.Uuid(as_uuid=True)),
    )
    contacts = sa.table("contacts", sa.column("id", sa.Uuid(as_uuid=True)))
    bind = op.get_bind()
    cutoff = datetime.now(UTC) - timedelta(hours=1)
    if bind.dialect.name == "sqlite":  # stored as naive UTC text
        cutoff = cutoff.replace(tzinfo=None)
    bind.execute(keys.delete().where(keys.c.expires_at < cutoff))
    rows = bind.execute(
        sa.select(keys.c.workspace_id, keys.c.key, keys.c.response_body).where(
            keys.c.response_body.is_not(None)
        )
    ).all()
    for workspace_id, key, body in rows:
        shown = _shown(body)
        if shown is None:
            continue
        where = sa.and_(keys.c.workspace_id == workspace_id, keys.c.key == key)
        alive = bind.execute(sa.select(contacts.c.id).where(contacts.c.id == shown)).first()
        if alive is not None:
            bind.execute(keys.update().where(where).values(contact_id=shown))
        else:
            bind.execute(
                keys.update()
                .where(where)
                .values(
                    response_status=410,
                    response_headers={"Content-Type": "application/json; charset=utf-8"},
                    response_body=ERASED_BODY,
                )
            )


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_contact_id", table_name="idempotency_keys")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("contact_id")
