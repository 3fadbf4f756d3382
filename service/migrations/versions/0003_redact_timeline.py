"""deletion_jobs.redact_timeline (issue 12)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 13:00:00

The ``redact_timeline`` option of a bulk delete, kept on the job so that the worker (which
may expand a filter job long after the request) applies it to every contact of the job.

On PostgreSQL, no planner statistics on the columns that hold a contact's personal values:
ANALYZE would copy sample values (most common values, histogram bounds) into the
``pg_statistic`` catalog, where deleting the contact does not reach them. These columns are
looked up by equality through their indexes, for which the default estimates suffice.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


PERSONAL_COLUMNS = {
    "contacts": ("email", "first_name", "last_name", "phone"),
    "activities": ("subject", "body"),
    "notes": ("body",),
    "tasks": ("title", "body"),
}


def upgrade() -> None:
    with op.batch_alter_table("deletion_jobs") as batch:
        batch.add_column(
            sa.Column("redact_timeline", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in PERSONAL_COLUMNS.items():
            for column in columns:
                op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STATISTICS 0")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in PERSONAL_COLUMNS.items():
            for column in columns:
                op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STATISTICS -1")
    with op.batch_alter_table("deletion_jobs") as batch:
        batch.drop_column("redact_timeline")
