"""The leader's lease row (controller replicas on PostgreSQL: election and fencing epoch), and
an index on desired_states.published (the leader publishes what followers committed).

Revision ID: 0007_leader
Revises: 0005_hardening
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_leader"
down_revision = "0006_enrollment"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "controller_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("acquired_at", TS, nullable=True),
    )
    op.create_index("ix_desired_states_published", "desired_states", ["published"])


def downgrade() -> None:
    op.drop_index("ix_desired_states_published", table_name="desired_states")
    op.drop_table("controller_leases")
