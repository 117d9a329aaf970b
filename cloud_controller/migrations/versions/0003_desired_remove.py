"""Desired states: the explicit `remove` list (models a device must uninstall).

Revision ID: 0003_desired_remove
Revises: 0002_telemetry
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_desired_remove"
down_revision = "0002_telemetry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("desired_states", sa.Column("remove", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("desired_states") as batch:
        batch.drop_column("remove")
