"""Capture on demand (docs/capture.md): capture sessions, captured rows (unique per device
and record id: idempotent ingest) and exported datasets with their lineage.

Revision ID: 0008_capture
Revises: 0007_leader
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_capture"
down_revision = "0007_leader"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "capture_sessions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("devices", sa.JSON, nullable=False),
        sa.Column("group", sa.String(64), nullable=True),
        sa.Column("rows_wanted", sa.Integer, nullable=False),
        sa.Column("rows_per_device", sa.Integer, nullable=False),
        sa.Column("sample_rate", sa.Float, nullable=False),
        sa.Column("max_rows_per_minute", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("drift_event_id", sa.Integer, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("until", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("stats", sa.JSON, nullable=False),
    )
    op.create_index("ix_capture_sessions_model", "capture_sessions", ["model"])
    op.create_index("ix_capture_sessions_state", "capture_sessions", ["state"])
    op.create_index("ix_capture_sessions_created_at", "capture_sessions", ["created_at"])
    op.create_table(
        "captured_rows",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "capture_id",
            sa.String(40),
            sa.ForeignKey("capture_sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("record_id", sa.BigInteger, nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("nbytes", sa.Integer, nullable=False),
        sa.Column("captured_at", sa.String(40), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("device_id", "record_id", name="uq_captured_rows_record"),
    )
    op.create_index("ix_captured_rows_capture_id", "captured_rows", ["capture_id"])
    op.create_index("ix_captured_rows_received_at", "captured_rows", ["received_at"])
    op.create_table(
        "capture_datasets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "capture_id",
            sa.String(40),
            sa.ForeignKey("capture_sessions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("part", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("lineage", sa.JSON, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("npz", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("capture_id", "version", "part", name="uq_dataset_version"),
    )
    op.create_index("ix_capture_datasets_capture_id", "capture_datasets", ["capture_id"])


def downgrade() -> None:
    op.drop_table("capture_datasets")
    op.drop_table("captured_rows")
    op.drop_table("capture_sessions")
