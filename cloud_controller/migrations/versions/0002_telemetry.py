"""Telemetry records, sketch aggregates, drift references, settings and events.

Revision ID: 0002_telemetry
Revises: 0001_initial
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_telemetry"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "telemetry_records",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("record_id", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("version", sa.String(100), nullable=True),
        sa.Column("requests", sa.BigInteger, nullable=True),
        sa.Column("errors", sa.BigInteger, nullable=True),
        sa.Column("p95_ms", sa.Float, nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.UniqueConstraint("device_id", "record_id", name="uq_telemetry_device_record"),
    )
    op.create_index(
        "ix_telemetry_model_version_kind_at",
        "telemetry_records",
        ["model", "version", "kind", "at"],
    )
    op.create_index("ix_telemetry_device_kind_at", "telemetry_records", ["device_id", "kind", "at"])
    op.create_table(
        "sketch_aggregates",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("reference_id", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("scope_key", sa.String(200), nullable=False),
        sa.Column("bucket_start", TS, nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.Column("sketch", sa.JSON, nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("evaluated", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("result", sa.JSON, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint(
            "model", "reference_id", "scope", "scope_key", "bucket_start", name="uq_sketch_agg"
        ),
    )
    op.create_index(
        "ix_sketch_agg_model_scope",
        "sketch_aggregates",
        ["model", "scope", "scope_key", "bucket_start"],
    )
    op.create_table(
        "drift_references",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("reference", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_drift_references_model", "drift_references", ["model"])
    op.create_table(
        "drift_settings",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("bucket_s", sa.Integer, nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("webhook_url", sa.Text, nullable=True),
        sa.Column("webhook_secret", sa.Text, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "drift_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("reference_id", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("scope_key", sa.String(200), nullable=False),
        sa.Column("bucket_start", TS, nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("features", sa.JSON, nullable=False),
        sa.Column("evidence", sa.JSON, nullable=False),
        sa.Column("webhook_state", sa.String(16), nullable=False),
        sa.Column("webhook_attempts", sa.Integer, nullable=False),
        sa.Column("webhook_error", sa.Text, nullable=True),
    )
    op.create_index("ix_drift_events_model_at", "drift_events", ["model", "at"])


def downgrade() -> None:
    for table in (
        "drift_events",
        "drift_settings",
        "drift_references",
        "sketch_aggregates",
        "telemetry_records",
    ):
        op.drop_table(table)
