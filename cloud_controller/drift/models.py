"""Tables of telemetry and drift (schema revision `0002_telemetry`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from edgefleet.cloud_controller.db import Base


class TelemetryRecord(Base):
    """Every telemetry record once (device, record id unique): windows of every kind."""

    __tablename__ = "telemetry_records"
    __table_args__ = (
        UniqueConstraint("device_id", "record_id", name="uq_telemetry_device_record"),
        Index("ix_telemetry_model_version_kind_at", "model", "version", "kind", "at"),
        Index("ix_telemetry_device_kind_at", "device_id", "kind", "at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    version: Mapped[str | None] = mapped_column(String(100), nullable=True)
    requests: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    errors: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class SketchAggregate(Base):
    """Sketches merged by addition per scope (device/group/release/fleet) and time bucket."""

    __tablename__ = "sketch_aggregates"
    __table_args__ = (
        UniqueConstraint(
            "model", "reference_id", "scope", "scope_key", "bucket_start", name="uq_sketch_agg"
        ),
        Index("ix_sketch_agg_model_scope", "model", "scope", "scope_key", "bucket_start"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    reference_id: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))  # device | group | release | fleet
    scope_key: Mapped[str] = mapped_column(String(200))
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    n: Mapped[int] = mapped_column(BigInteger, default=0)
    sketch: Mapped[dict[str, Any]] = mapped_column(JSON)
    versions: Mapped[list[str]] = mapped_column(JSON, default=list)
    evaluated: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DriftReference(Base):
    """A model version's drift reference (from its package manifest, or registered)."""

    __tablename__ = "drift_references"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(100))
    reference: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DriftSettings(Base):
    """Per-model drift settings: the decision's config, buckets, scopes, webhook."""

    __tablename__ = "drift_settings"
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    bucket_s: Mapped[int] = mapped_column(Integer, default=3600)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_secret: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DriftEvent(Base):
    """A drifted window, with its evidence and the webhook delivery state."""

    __tablename__ = "drift_events"
    __table_args__ = (Index("ix_drift_events_model_at", "model", "at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(200))
    reference_id: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    scope_key: Mapped[str] = mapped_column(String(200))
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    versions: Mapped[list[str]] = mapped_column(JSON)
    features: Mapped[list[str]] = mapped_column(JSON)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    webhook_state: Mapped[str] = mapped_column(String(16))  # none|pending|delivered|failed
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    webhook_error: Mapped[str | None] = mapped_column(Text, nullable=True)
