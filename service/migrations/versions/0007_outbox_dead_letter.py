"""Outbox rows the broker refused: set aside with their reason, never retried

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 21:45:00

- ``outbox.failed_at`` / ``outbox.error``: when the relay set the row aside and why (the
  broker refused the record for good: too large, invalid topic, corrupt; or the stored row
  cannot be read). Such a row is never published and never retried; its job item or job
  fails instead (service.relay).
- ``ix_outbox_unpublished`` now holds only the rows still to publish (neither published
  nor set aside), the relay's claim reads exactly those.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = "published_at IS NULL AND failed_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("error", sa.String(500), nullable=True))
        batch.drop_index("ix_outbox_unpublished")
        batch.create_index(
            "ix_outbox_unpublished",
            ["id"],
            unique=False,
            postgresql_where=sa.text(PENDING),
            sqlite_where=sa.text(PENDING),
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_unpublished")
        batch.create_index(
            "ix_outbox_unpublished",
            ["id"],
            unique=False,
            postgresql_where=sa.text("published_at IS NULL"),
            sqlite_where=sa.text("published_at IS NULL"),
        )
        batch.drop_column("error")
        batch.drop_column("failed_at")
