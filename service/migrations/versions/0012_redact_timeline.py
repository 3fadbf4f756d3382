"""deletion_jobs.redact_timeline (issue 12)

Revision ID: 0012
Revises: 0001
Create Date: 2026-11-29 13:00:00

The ``redact_timeline`` option of a bulk delete, kept on the job so that the worker (which
may expand a filter job long after the request) applies it to every contact of the job.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_jobs") as batch:
        batch.add_column(
            sa.Column("redact_timeline", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("deletion_jobs") as batch:
        batch.drop_column("redact_timeline")
