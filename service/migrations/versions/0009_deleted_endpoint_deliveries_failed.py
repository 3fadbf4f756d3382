"""A deleted endpoint's unsent deliveries are ``failed``, as DESIGN.md "Webhooks" says

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 09:30:00

DESIGN.md lists a delivery's states as ``pending``, ``failing``, ``succeeded`` and
``failed`` ("exhausted, endpoint disabled or deleted"). Earlier versions set the unsent
(``pending`` or ``failing``) deliveries of a deleted endpoint to a fifth state,
``cancelled``, that a client filtering on the documented states never saw. Those rows
become ``failed`` (their ``completed_at`` stays: it is when the endpoint was deleted).

Downgrade leaves them ``failed``: the code before 0009 reads ``failed`` as it reads it here
(not sent again unless retried, and a retry finds the endpoint gone either way).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        sa.text("UPDATE webhook_deliveries SET status = 'failed' WHERE status = 'cancelled'")
    )


def downgrade() -> None:
    """Nothing to undo (see the module)."""
