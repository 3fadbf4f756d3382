"""Per-endpoint max_in_flight; endpoint ownership by one dispatcher; retry while in flight

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 14:00:00

- ``webhook_endpoints.max_in_flight``: the endpoint's own limit of concurrent requests
  (null: the service default, WEBHOOK_MAX_IN_FLIGHT_PER_ENDPOINT).
- ``webhook_endpoints.owner`` / ``owner_until``: the dispatcher that alone sends to the
  endpoint, and until when (a lease it renews while it has work; a dispatcher that dies
  lets it lapse). One sender per endpoint is what keeps ``max_in_flight`` and
  ``rate_limit_per_s`` whatever the number of dispatchers.
- ``webhook_deliveries.retry_requested``: a retry asked for while an attempt is in flight;
  the dispatcher re-queues the delivery when it records that attempt, so it is never sent
  twice at once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("max_in_flight", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("owner_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(
            sa.Column("retry_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("retry_requested")
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("owner_until")
        batch.drop_column("owner")
        batch.drop_column("max_in_flight")
