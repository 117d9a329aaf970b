"""Devices: since when each one differs from its desired state (the "in sync" column).

Revision ID: 0004_rollout_safety
Revises: 0003_desired_remove
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_rollout_safety"
down_revision = "0003_desired_remove"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "devices", sa.Column("out_of_sync_since", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("out_of_sync_since")
