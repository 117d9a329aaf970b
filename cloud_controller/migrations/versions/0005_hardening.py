"""Desired-state sequence floors reported by devices (recovery after a database restore).

Revision ID: 0005_hardening
Revises: 0003_desired_remove
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_hardening"
down_revision = "0004_rollout_safety"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "device_seq_floors",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("floor", sa.BigInteger, nullable=False),
        sa.Column("reported_at", TS, nullable=False),
        sa.Column("resynced_at", TS, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("device_seq_floors")
