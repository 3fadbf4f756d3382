"""Per-endpoint max_in_flight; claims as counted leases; retry while in flight (issue 8)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 14:00:00

- ``webhook_endpoints.max_in_flight``: the endpoint's own limit of concurrent requests
  (null: the service default, WEBHOOK_MAX_IN_FLIGHT_PER_ENDPOINT).
- ``ix_webhook_deliveries_claimed_until``: a delivery whose ``claimed_until`` lies ahead is
  in flight somewhere; the dispatchers count those (a handful of index entries) under the
  endpoint's row lock to keep the limit whatever the number of dispatchers.
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
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(
            sa.Column("retry_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_index("ix_webhook_deliveries_claimed_until", "webhook_deliveries", ["claimed_until"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_claimed_until", table_name="webhook_deliveries")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("retry_requested")
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("max_in_flight")
