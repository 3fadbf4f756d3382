"""A failed job's reason on the job itself

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 21:30:00

A job ends ``failed`` when it could not run at all (its selection could not be expanded,
for instance). Until now the reason (code and message) was kept only in the job's
``deletion.completed`` audit event, so ``GET /v1/bulk-jobs/{id}`` said ``failed`` without
saying why. Both columns stay null for every other job; existing failed jobs keep null
(their reason is still in the audit trail).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_jobs") as batch:
        batch.add_column(sa.Column("failure_code", sa.String(64), nullable=True))
        batch.add_column(sa.Column("failure_message", sa.String(500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deletion_jobs") as batch:
        batch.drop_column("failure_message")
        batch.drop_column("failure_code")
