"""Partial indexes on a job's not_found and failed items

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 15:40:00

The job object lists its first not_found refs and errors (``LIST_CAP``) in request order.
Through ``(job_id, position)`` alone, finding them reads every item of the job: a million
rows for each GET of a million-contact filter job that has none. These two partial
indexes hold only the items with those outcomes, so the lists cost what they return; the
items of the usual outcomes (pending, deleted) are not in them and cost them nothing.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTCOMES = ("not_found", "failed")


def upgrade() -> None:
    for status in OUTCOMES:
        where = sa.text(f"status = '{status}'")
        op.create_index(
            f"ix_deletion_job_items_{status}",
            "deletion_job_items",
            ["job_id", "position"],
            postgresql_where=where,
            sqlite_where=where,
        )


def downgrade() -> None:
    for status in OUTCOMES:
        op.drop_index(f"ix_deletion_job_items_{status}", table_name="deletion_job_items")
