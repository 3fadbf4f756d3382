"""job estimate, endpoint disabled_at, several retired secrets

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 13:00:00

- ``deletion_jobs.estimated_total``: the match count of a filter/search job at acceptance.
- ``webhook_endpoints.disabled_at`` and ``disabled_reason`` reduced to a code
  (``gone`` | ``failing``).
- ``webhook_endpoints.retired_secrets`` replaces ``previous_secret`` and
  ``previous_secret_expires_at``: every rotated-out secret younger than the overlap keeps
  signing, not only the last one.
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("deletion_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("estimated_total", sa.Integer(), nullable=True))
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("retired_secrets", JSON, nullable=True))
    bind = op.get_bind()
    endpoints = sa.table(
        "webhook_endpoints",
        sa.column("id", sa.Uuid()),
        sa.column("previous_secret", sa.String()),
        sa.column("previous_secret_expires_at", sa.DateTime(timezone=True)),
        sa.column("disabled_reason", sa.String()),
        sa.column("updated_at", sa.DateTime(timezone=True)),
        sa.column("status", sa.String()),
        sa.column("disabled_at", sa.DateTime(timezone=True)),
        sa.column("retired_secrets", JSON),
    )
    rows = bind.execute(sa.select(endpoints)).mappings().all()
    for row in rows:
        retired = []
        if row["previous_secret"] and row["previous_secret_expires_at"] is not None:
            expires = row["previous_secret_expires_at"]
            if isinstance(expires, str):
                expires = datetime.fromisoformat(expires)
            # SQLite hands back naive datetimes; every time the service stores is UTC.
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=UTC)
            text = expires.astimezone(UTC).isoformat().replace("+00:00", "Z")
            retired.append({"secret": row["previous_secret"], "expires_at": text})
        reason = row["disabled_reason"]
        if row["status"] == "disabled":
            reason = "gone" if reason and "410" in reason else "failing"
        else:
            reason = None
        bind.execute(
            endpoints.update()
            .where(endpoints.c.id == row["id"])
            .values(
                retired_secrets=json.loads(json.dumps(retired)),
                disabled_reason=reason,
                disabled_at=row["updated_at"] if reason else None,
            )
        )
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.alter_column("retired_secrets", existing_type=JSON, nullable=False)
        batch_op.drop_column("previous_secret")
        batch_op.drop_column("previous_secret_expires_at")


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_secret", sa.String(length=100), nullable=True))
        batch_op.add_column(
            sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.drop_column("retired_secrets")
        batch_op.drop_column("disabled_at")
    with op.batch_alter_table("deletion_jobs", schema=None) as batch_op:
        batch_op.drop_column("estimated_total")
