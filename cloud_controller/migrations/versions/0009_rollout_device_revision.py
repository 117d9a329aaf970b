"""Rollout device rows carry the rollout revision that last wrote them: a replica whose copy
of a rollout is behind reads only the rows written since its revision, not the whole rollout.

Revision ID: 0009_rollout_device_revision
Revises: 0008_capture
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_rollout_device_revision"
down_revision = "0008_capture"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollout_devices") as batch:
        batch.add_column(sa.Column("revision", sa.Integer, nullable=False, server_default="0"))
    op.create_index(
        "ix_rollout_devices_rollout_revision", "rollout_devices", ["rollout_id", "revision"]
    )


def downgrade() -> None:
    op.drop_index("ix_rollout_devices_rollout_revision", table_name="rollout_devices")
    with op.batch_alter_table("rollout_devices") as batch:
        batch.drop_column("revision")
