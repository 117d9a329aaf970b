"""ORM tables of the controller (schema revision `0001_initial`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from edgefleet.cloud_controller.db import Base


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEntry(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(200))
    target: Mapped[str] = mapped_column(String(500))
    outcome: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    registered: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(300), nullable=True)
    download_token_hash: Mapped[str | None] = mapped_column(
        String(64), nullable=True, unique=True, index=True
    )
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    agent_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    execution_providers: Mapped[list[str]] = mapped_column(JSON, default=list)
    profiles: Mapped[list[str]] = mapped_column(JSON, default=list)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    installed: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    recent_status_seqs: Mapped[list[int]] = mapped_column(JSON, default=list)
    last_status: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # When its installed models first differed from its desired state (None: in sync).
    out_of_sync_since: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    # When `devices revoke` cut it off (schema `0006_enrollment`): no credentials, no desired
    # state, its certificates in the CRL, left out of new rollouts. Enrolling again clears it.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DesiredState(Base):
    __tablename__ = "desired_states"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    models: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Models the device must uninstall (an aborted first install); None/[]: nothing.
    remove: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    # False until the leader handed this seq to the broker (`RolloutService.publish_pending`)
    published: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class Package(Base):
    __tablename__ = "packages"
    __table_args__ = (UniqueConstraint("name", "version", "profile", name="uq_package_nvp"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(100))
    profile: Mapped[str] = mapped_column(String(100))
    filename: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    uploaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    uploaded_by: Mapped[str] = mapped_column(String(200))


class Rollout(Base):
    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(100))
    phase: Mapped[str] = mapped_column(String(32), index=True)
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"
    rollout_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(32))
    wave: Mapped[int] = mapped_column(Integer)
    # the rollout's revision that last wrote this row: a replica behind reads only newer rows
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (Index("ix_rollout_devices_rollout_revision", "rollout_id", "revision"),)


class RolloutEvent(Base):
    __tablename__ = "rollout_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[float] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)


class DeviceSeqFloor(Base):
    """The highest desired-state seq a device says it has accepted (schema `0005_hardening`).

    Kept apart from `desired_states` so that a database restored from a backup still learns,
    from the devices themselves, where each sequence must continue: a device drops any state
    whose seq is not above this floor.
    """

    __tablename__ = "device_seq_floors"
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    floor: Mapped[int] = mapped_column(BigInteger)
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resynced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EnrollmentToken(Base):
    """A one-time, expiring enrollment token (schema `0006_enrollment`): only its hash is kept.

    Bound to a group (and optionally one device id and tags); ``used_at``/``used_by`` are set,
    once, by the enrollment that spends it.
    """

    __tablename__ = "enrollment_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    group: Mapped[str] = mapped_column(String(200))
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class DeviceCertificate(Base):
    """Every client certificate the controller's CA issued a device (schema `0006_enrollment`);
    a revoked one is in the CRL. The serial is hex: X.509 serials are up to 159 bits."""

    __tablename__ = "device_certificates"
    serial: Mapped[str] = mapped_column(String(40), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    not_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ControllerLease(Base):
    """The leader's lease (`cloud_controller.leader`): who holds it, until when (database
    time), and the fencing epoch, raised by one on every change of holder."""

    __tablename__ = "controller_leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200), nullable=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    acquired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CaptureSession(Base):
    """A capture on demand (docs/capture.md): what was asked of which devices, and how it went.

    ``stats`` holds per device ``{"rows", "bytes", "refused": {reason: n}, "forbidden",
    "done"}``; written by the bridge under a row lock (``SELECT … FOR UPDATE``)."""

    __tablename__ = "capture_sessions"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    devices: Mapped[list[str]] = mapped_column(JSON)  # the targets, resolved at start
    group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rows_wanted: Mapped[int] = mapped_column(Integer)  # in all; each device is asked its share
    rows_per_device: Mapped[int] = mapped_column(Integer)
    sample_rate: Mapped[float] = mapped_column(Float)
    max_rows_per_minute: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)  # active|complete|stopped|expired
    created_by: Mapped[str] = mapped_column(String(200))
    drift_event_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class CapturedRow(Base):
    """One captured record (a sampled request): its tensors as the wire carried them."""

    __tablename__ = "captured_rows"
    __table_args__ = (UniqueConstraint("device_id", "record_id", name="uq_captured_rows_record"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    capture_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("capture_sessions.id", ondelete="CASCADE"), index=True
    )
    device_id: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[str] = mapped_column(String(128))
    rows: Mapped[int] = mapped_column(Integer)
    nbytes: Mapped[int] = mapped_column(Integer)
    captured_at: Mapped[str] = mapped_column(String(40))  # the device's clock, as sent
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)  # JSON: {"inputs", "outputs"}


class CaptureDataset(Base):
    """An export of a capture: a versioned dataset with its lineage and the .npz bytes."""

    __tablename__ = "capture_datasets"
    __table_args__ = (UniqueConstraint("capture_id", "version", "part", name="uq_dataset_version"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    capture_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("capture_sessions.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, … per capture
    part: Mapped[str] = mapped_column(String(16))  # calibration | holdout
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON)
    rows: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    npz: Mapped[bytes] = mapped_column(LargeBinary)
