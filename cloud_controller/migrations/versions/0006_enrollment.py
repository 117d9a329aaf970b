"""One-time enrollment tokens, the device certificates the CA issued, device revocation.

Revision ID: 0006_enrollment
Revises: 0005_hardening
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_enrollment"
down_revision = "0005_hardening"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("group", sa.String(200), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=True),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("used_at", TS, nullable=True),
        sa.Column("used_by", sa.String(128), nullable=True),
    )
    op.create_index(
        "ix_enrollment_tokens_token_hash", "enrollment_tokens", ["token_hash"], unique=True
    )
    op.create_table(
        "device_certificates",
        sa.Column("serial", sa.String(40), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("issued_at", TS, nullable=False),
        sa.Column("not_after", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
    )
    op.create_index("ix_device_certificates_device_id", "device_certificates", ["device_id"])
    op.add_column("devices", sa.Column("revoked_at", TS, nullable=True))


def downgrade() -> None:
    op.drop_column("devices", "revoked_at")
    op.drop_index("ix_device_certificates_device_id", "device_certificates")
    op.drop_table("device_certificates")
    op.drop_index("ix_enrollment_tokens_token_hash", "enrollment_tokens")
    op.drop_table("enrollment_tokens")
