"""HTTP API v1: tokens, audit, packages, devices, rollouts."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller import (
    auth,
    desired,
    devices,
    enroll,
    pki,
    registry,
    rollout_views,
    rollouts,
)
from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.db import iso, transaction
from edgefleet.cloud_controller.deps import Principal, audit_detail, controller, need, session
from edgefleet.cloud_controller.models import AuditEntry, DesiredState, Device, Package
from edgefleet.wire import ids
from edgefleet.wire.brokerkind import device_id_for
from edgefleet.wire.manifest import package_filename

router = APIRouter(prefix="/api/v1")
Db = Annotated[Session, Depends(session)]
Reader = Annotated[Principal, Depends(need(auth.Perm.READ))]
Publisher = Annotated[Principal, Depends(need(auth.Perm.UPLOAD))]
Operator = Annotated[Principal, Depends(need(auth.Perm.OPERATE))]
Admin = Annotated[Principal, Depends(need(auth.Perm.ADMIN))]


def fail(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message})


# Every identifier in a request is checked against its grammar (edgefleet.wire.ids) as the body
# is parsed; a refusal is a 422 whose code names the identifier and whose message the grammar.
DeviceId = Annotated[str, AfterValidator(ids.device_id)]
GroupName = Annotated[str, AfterValidator(ids.group)]
TagName = Annotated[str, AfterValidator(ids.tag)]
ModelName = Annotated[str, AfterValidator(ids.model_name)]
VersionText = Annotated[str, AfterValidator(ids.version)]
TokenName = Annotated[str, AfterValidator(ids.token_name)]
# Row ids are BIGINT at most: a larger number names no row (422), it does not reach the driver.
RowId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


# --- tokens and audit ------------------------------------------------------------------------


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: auth.Role
    name: TokenName = "api"


@router.post("/tokens", status_code=201)
def create_token(body: TokenRequest, request: Request, who: Admin) -> dict[str, str]:
    with transaction(controller(request).factory) as s:
        token = auth.create_token(s, body.role.value, body.name)
    audit_detail(request, role=body.role.value, name=body.name)
    return {"token": token, "role": body.role.value, "name": body.name}


@router.get("/tokens")
def list_tokens(db: Db, who: Admin) -> list[dict[str, Any]]:
    """Every API token's id, name, role and dates (never the token itself)."""
    return [auth.token_to_dict(t) for t in auth.list_tokens(db)]


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: RowId, request: Request, who: Admin) -> dict[str, Any]:
    """Revoke a token: it is refused from the next request on. Revoking twice is a no-op."""
    with transaction(controller(request).factory) as s:
        row = auth.revoke_token(s, token_id)
        if row is None:
            raise fail(404, "not_found", f"no token {token_id}")
        out = auth.token_to_dict(row)
    audit_detail(request, token=token_id, name=out["name"])
    return out


@router.get("/audit")
def audit_log(
    db: Db, who: Admin, limit: Annotated[int, Query(ge=1, le=2**63 - 1)] = 100
) -> list[dict[str, Any]]:
    rows = db.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(min(limit, 1000)))
    return [
        {
            "at": iso(r.at),
            "actor": r.actor,
            "action": r.action,
            "target": r.target,
            "outcome": r.outcome,
            "detail": r.detail,
        }
        for r in rows
    ]


@router.get("/keys/controller")
def controller_key(request: Request) -> dict[str, str]:
    """The public key devices trust for desired states (public: it is not a secret)."""
    from edgefleet.keys import key_id, public_pem

    pub = controller(request).signer.key.public_key()
    return {"key_id": key_id(pub), "pem": public_pem(pub).decode()}


# --- packages --------------------------------------------------------------------------------


@router.post("/packages", status_code=201)
async def upload_package(request: Request, who: Publisher) -> dict[str, Any]:
    """Body: the `.efpkg` file itself (application/octet-stream)."""
    ctl = controller(request)
    if request.headers.get("content-type", "").startswith("multipart/"):
        raise fail(
            415,
            "unsupported_media_type",
            "send the .efpkg file itself as the body (Content-Type: application/octet-stream), "
            "e.g. curl --data-binary @FILE",
        )
    limit = ctl.settings.max_upload_bytes
    incoming = ctl.settings.package_dir / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=incoming, suffix=".efpkg")
    tmp = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise fail(413, "too_large", f"package is over the {limit} byte limit")
                f.write(chunk)
        if size == 0:
            raise fail(422, "not_a_package", "empty body: send the .efpkg file")

        def store() -> tuple[Package, bool]:
            up = registry.verify_upload(tmp, ctl.trusted_keys, max_bytes=limit)
            return registry.publish_upload(
                ctl.factory, tmp, ctl.settings.package_dir, up, who.actor
            )

        try:
            pkg, created = await run_in_threadpool(store)
        except registry.UploadRejected as e:
            audit_detail(request, rejected=e.code)
            raise fail(e.status, e.code, e.message) from e
    finally:
        tmp.unlink(missing_ok=True)
    audit_detail(request, package=f"{pkg.name} {pkg.version} {pkg.profile}", created=created)
    return {**registry.to_dict(pkg, ctl.settings.base_url), "created": created}


@router.get("/packages")
def list_packages(
    request: Request, db: Db, who: Reader, name: str | None = None
) -> list[dict[str, Any]]:
    base = controller(request).settings.base_url
    return [registry.to_dict(p, base) for p in registry.list_packages(db, name)]


@router.get("/releases")
def list_releases(db: Db, who: Reader) -> list[dict[str, Any]]:
    return registry.releases(db)


@router.get("/packages/{package_id}")
def show_package(package_id: RowId, request: Request, db: Db, who: Reader) -> dict[str, Any]:
    pkg = db.get(Package, package_id)
    if pkg is None:
        raise fail(404, "not_found", f"no package {package_id}")
    return {
        **registry.to_dict(pkg, controller(request).settings.base_url),
        "manifest": pkg.manifest,
    }


@router.get("/packages/{package_id}/download")
def download_package(
    package_id: RowId,
    request: Request,
    db: Db,
    who: Annotated[Principal, Depends(need(auth.Perm.READ, devices_ok=True))],
) -> FileResponse:
    """The package file; HTTP Range requests resume interrupted downloads.

    A device's download token fetches only the packages its current desired state names.
    """
    pkg = db.get(Package, package_id)
    if pkg is None:
        raise fail(404, "not_found", f"no package {package_id}")
    if who.device_id is not None and not registry.desired_names(
        db.get(DesiredState, who.device_id), pkg
    ):
        audit_detail(request, refused="not_in_desired_state", package=package_id)
        raise fail(
            403,
            "not_in_desired_state",
            f"device {who.device_id} is not meant to install package {package_id}",
        )
    audit_detail(request, package=f"{pkg.name} {pkg.version} {pkg.profile}", sha256=pkg.sha256)
    path = controller(request).settings.package_dir / pkg.filename
    if not path.is_file():
        raise fail(410, "package_file_missing", f"{pkg.filename} is gone from the packages dir")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=package_filename(pkg.name, pkg.version, pkg.profile),
        headers={"X-Sha256": pkg.sha256},
    )


# --- devices ---------------------------------------------------------------------------------


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: DeviceId
    groups: list[GroupName] = Field([], max_length=64)
    tags: list[TagName] = Field([], max_length=64)
    rotate_credentials: bool = Field(
        False, description="re-key a registered device (its old credentials stop working)"
    )


class LabelsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[GroupName] | None = Field(None, max_length=64)
    tags: list[TagName] | None = Field(None, max_length=64)


@router.post("/devices", status_code=201)
def register_device(body: RegisterRequest, request: Request, who: Operator) -> dict[str, Any]:
    """Create a device (or rotate its credentials); the secrets are shown only in this reply."""
    ctl = controller(request)
    try:
        # On a NATS deployment a '.' in the id cannot travel in its topics (wire.brokerkind).
        device_id_for(ctl.settings.resolved_broker_kind, body.device_id)
        with transaction(ctl.factory) as s:
            known = s.get(Device, body.device_id)
            if known is not None and known.registered and not body.rotate_credentials:
                raise fail(
                    409,
                    "device_exists",
                    f"{body.device_id} is registered; rotate_credentials re-keys it",
                )
            creds = auth.register_device(s, body.device_id, body.groups, body.tags)
    except ids.IdentifierError as e:
        raise fail(422, e.code, str(e)) from e
    audit_detail(request, device=body.device_id)
    return {
        "device_id": creds.device_id,
        "mqtt_username": creds.mqtt_username,
        "mqtt_password": creds.mqtt_password,
        "download_token": creds.download_token,
        "controller_key": controller_key(request),
    }


@router.get("/devices")
def list_devices(
    db: Db, who: Reader, group: str | None = None, tag: str | None = None
) -> list[dict[str, Any]]:
    out = []
    wanted = {r.device_id: r for r in db.scalars(select(DesiredState))}
    for d in devices.list_devices(db):
        if (group and group not in d.groups) or (tag and tag not in d.tags):
            continue
        out.append({**devices.to_dict(d), "sync": desired.sync_view(d, wanted.get(d.id))})
    return out


@router.get("/devices/{device_id}")
def show_device(device_id: str, db: Db, who: Reader) -> dict[str, Any]:
    dev = db.get(Device, device_id)
    if dev is None:
        raise fail(404, "not_found", f"no device {device_id}")
    row = db.get(DesiredState, device_id)
    return {**devices.to_dict(dev, row), "sync": desired.sync_view(dev, row)}


@router.patch("/devices/{device_id}")
def label_device(
    device_id: str, body: LabelsRequest, request: Request, who: Operator
) -> dict[str, Any]:
    with transaction(controller(request).factory) as s:
        if s.get(Device, device_id) is None:
            raise fail(404, "not_found", f"no device {device_id}")
        try:
            dev = devices.set_labels(s, device_id, body.groups, body.tags)
        except ids.IdentifierError as e:
            raise fail(422, e.code, str(e)) from e
        out = devices.to_dict(dev)
    audit_detail(request, groups=body.groups, tags=body.tags)
    return out


# --- rollouts --------------------------------------------------------------------------------


def _rollout_error(e: rollouts.RolloutError) -> HTTPException:
    return fail(e.status, e.code, e.message)


class TargetModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_ids: list[DeviceId] = []
    groups: list[GroupName] = []
    tags: list[TagName] = []


class GatesModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_p95_ratio: float | None = Field(
        default=None, description="p95 latency new/previous version"
    )
    max_error_rate: float | None = Field(default=None, description="errors per request")
    max_drift: float | None = Field(default=None, description="drift score of the moved devices")


class ShadowModel(BaseModel):
    """Each wave runs the release in shadow first (docs/shadow.md)."""

    model_config = ConfigDict(extra="forbid")
    requests: int = Field(200, ge=1, le=1_000_000, description="compared requests per device")
    min_agreement: float = Field(0.99, ge=0, le=1, description="agreeing share, to promote")
    max_p95_ratio: float = Field(1.5, gt=0, description="candidate/serving per-sample p95")
    sample: float = Field(1.0, gt=0, le=1, description="share of live requests mirrored")
    timeout_s: float = Field(900.0, gt=0, description="from the wave's first dispatch")
    window_s: float = Field(10.0, ge=0.1, le=3600, description="device report interval")
    rtol: float = Field(1e-3, ge=0, description="tolerance of score outputs (relative)")
    atol: float = Field(1e-4, ge=0, description="tolerance of score outputs (absolute)")
    compare: Literal["auto", "top1", "tolerance", "exact"] = "auto"


class RolloutRequest(BaseModel):
    """A staged rollout of one release (see docs/controller.md for the rules)."""

    model_config = ConfigDict(extra="forbid")
    model: ModelName
    version: VersionText
    target: TargetModel
    waves: list[float] = Field([5.0, 25.0, 100.0], description="cumulative %, last = 100")
    device_timeout_s: float = 600.0
    max_retries: int = Field(
        E.DEFAULT_RETRIES, description="attempts after the first, for transient failures"
    )
    retry_backoff_s: float = Field(30.0, description="first retry delay; doubles each time")
    success_threshold_pct: float = Field(100.0, description="% of a wave that must succeed")
    abort_failure_pct: float = Field(20.0, description="abort when failures exceed this % ...")
    abort_min_finished: int | None = Field(
        None,
        description="... of max(finished, this many); default max(5, 2 % of planned devices)",
    )
    approval_waves: list[int] = Field([], description="0-based waves that wait for approval")
    rate_per_min: int | None = Field(default=None, description="dispatches per minute")
    soak_s: float = Field(0.0, description="health-gated wait after each wave")
    gates: GatesModel = Field(default_factory=GatesModel)
    seed: int | None = Field(default=None, description="wave membership seed; random when absent")
    on_abort: Literal["halt", "rollback"] = Field(
        "halt", description="what an abort does to devices that took the release"
    )
    remove_first_installs: bool = Field(
        False, description="let a rollback uninstall a first install (no previous version)"
    )
    shadow: ShadowModel | None = Field(
        None, description="shadow each wave first; promote or drop on its figures"
    )


@router.post("/rollouts", status_code=201)
def create_rollout(body: RolloutRequest, request: Request, who: Operator) -> dict[str, Any]:
    """Start a rollout; devices whose profiles have no package are reported as incompatible."""
    spec = body.model_dump(exclude_none=False)
    if spec.get("seed") is None:
        spec.pop("seed")
    try:
        state = controller(request).rollouts.create(spec, who.actor)
    except rollouts.RolloutError as e:
        raise _rollout_error(e) from e
    audit_detail(request, rollout=state.spec.rollout_id, seed=state.spec.seed)
    return rollout_views.summary(state)


@router.get("/rollouts")
def list_rollouts(db: Db, who: Reader) -> list[dict[str, Any]]:
    return rollout_views.list_rollouts(db)


@router.get("/rollouts/{rollout_id}")
def show_rollout(rollout_id: str, request: Request, db: Db, who: Reader) -> dict[str, Any]:
    """One rollout, by id or a unique id prefix."""
    try:
        state = controller(request).rollouts.get_state(rollout_id)
    except rollouts.RolloutError as e:
        raise _rollout_error(e) from e
    if state is None:
        raise fail(404, "not_found", f"no rollout {rollout_id}")
    return rollout_views.detail(db, state)


class ControlRequest(BaseModel):
    wave: int | None = None  # approve: a wave index (0-based); default the waiting one
    rollback: bool = False  # cancel: also revert moved devices
    reason: str = "aborted by operator"  # abort
    on_abort: Literal["halt", "rollback"] | None = None  # abort: None = the rollout's own


@router.post("/rollouts/{rollout_id}/{action}")
def control_rollout(
    rollout_id: str,
    action: str,
    request: Request,
    who: Operator,
    body: ControlRequest | None = None,
) -> dict[str, Any]:
    b = body or ControlRequest()
    events: dict[str, E.Event] = {
        "approve": E.Approve(b.wave),
        "pause": E.Pause(),
        "resume": E.Resume(),
        "cancel": E.Cancel(b.rollback),
        "abort": E.Abort(f"{b.reason} ({who.actor})", b.on_abort),
    }
    if action not in events:
        raise fail(404, "unknown_action", f"{action!r}: use one of {sorted(events)}")
    try:
        state = controller(request).rollouts.control(rollout_id, events[action])
    except rollouts.RolloutError as e:
        raise _rollout_error(e) from e
    return rollout_views.summary(state)


# --- enrollment, certificates, revocation (docs/security.md) -------------------------------


class EnrollTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group: GroupName
    ttl_s: int = Field(enroll.DEFAULT_TTL_S, ge=1, le=enroll.MAX_TTL_S)
    device_id: DeviceId | None = None
    tags: list[TagName] = Field([], max_length=64)


@router.post("/enroll-tokens", status_code=201)
def create_enroll_token(body: EnrollTokenRequest, request: Request, who: Admin) -> dict[str, Any]:
    """A one-time enrollment token for one gateway (`edgefleet agent enroll`); shown once."""
    with transaction(controller(request).factory) as s:
        token, row = enroll.create_token(
            s, body.group, who.actor, body.ttl_s, body.device_id, body.tags
        )
        out = enroll.token_to_dict(row)
    audit_detail(request, enroll_token=out["id"], group=body.group, device=body.device_id)
    return {"token": token, **out}


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=200)
    device_id: str = Field(max_length=200)
    csr_pem: str = Field(max_length=pki.MAX_CSR_BYTES)


def _device_info(request: Request) -> dict[str, Any]:
    """What every enrolled device is told to trust and where to connect."""
    from edgefleet.keys import key_id, public_pem

    ctl = controller(request)
    return {
        "ca_pem": ctl.ca.cert_pem.decode(),
        "broker_urls": list(ctl.settings.device_broker_urls),
        "broker_kind": ctl.settings.resolved_broker_kind,
        "controller_url": ctl.settings.base_url,
        "controller_key": controller_key(request),
        "trusted_keys": [
            {"key_id": key_id(k), "pem": public_pem(k).decode()} for k in ctl.trusted_keys
        ],
    }


@router.post("/enroll", status_code=201)
def enroll_device(body: EnrollRequest, request: Request) -> dict[str, Any]:
    """Enroll a gateway with a one-time token (no bearer token: the enrollment token is the
    credential). The device sends a CSR for the key it made (CN = its id) and gets its
    certificate, the CA, the broker URL(s), the controller's key, the trusted packaging keys
    and its download token. Refusals name their code (`wire.reasons.EnrollReason`)."""
    ctl = controller(request)
    valid = ids.is_valid(ids.DEVICE_ID, body.device_id)
    request.state.actor = f"enroll:{body.device_id if valid else '(invalid id)'}"
    validity = timedelta(days=ctl.settings.device_cert_days)
    try:
        with transaction(ctl.factory) as s:
            done = enroll.enroll(
                s,
                ctl.ca,
                body.token,
                body.device_id,
                body.csr_pem,
                validity,
                broker_kind=ctl.settings.resolved_broker_kind,
            )
    except enroll.EnrollRefused as e:
        audit_detail(request, refused=e.code.value)
        raise fail(e.status, e.code.value, e.message) from e
    audit_detail(request, device=done.device_id, serial=f"{done.certificate.serial_number:x}")
    return {
        "device_id": done.device_id,
        "groups": done.groups,
        "tags": done.tags,
        "certificate_pem": pki.cert_pem(done.certificate).decode(),
        "not_after": iso(done.certificate.not_valid_after_utc),
        "download_token": done.download_token,
        **_device_info(request),
    }


class RenewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    csr_pem: str = Field(max_length=pki.MAX_CSR_BYTES)


@router.post("/devices/{device_id}/certificate", status_code=201)
def renew_certificate(
    device_id: str,
    body: RenewRequest,
    request: Request,
    who: Annotated[Principal, Depends(need(auth.Perm.OPERATE, devices_ok=True))],
) -> dict[str, Any]:
    """A new client certificate for a device, from a CSR for a (new) key it made; the device
    authenticates with its download token and may renew only its own."""
    if who.device_id is not None and who.device_id != device_id:
        raise fail(403, "forbidden", f"device {who.device_id} may not renew {device_id}")
    ctl = controller(request)
    validity = timedelta(days=ctl.settings.device_cert_days)
    try:
        with transaction(ctl.factory) as s:
            dev = s.get(Device, device_id)
            if dev is None:
                raise fail(404, "not_found", f"no device {device_id}")
            cert = enroll.renew(s, ctl.ca, dev, body.csr_pem, validity)
    except enroll.EnrollRefused as e:
        audit_detail(request, refused=e.code.value)
        raise fail(e.status, e.code.value, e.message) from e
    audit_detail(request, device=device_id, serial=f"{cert.serial_number:x}")
    return {
        "device_id": device_id,
        "certificate_pem": pki.cert_pem(cert).decode(),
        "not_after": iso(cert.not_valid_after_utc),
        "ca_pem": ctl.ca.cert_pem.decode(),
    }


@router.post("/devices/{device_id}/revoke")
def revoke_device(device_id: str, request: Request, who: Operator) -> dict[str, Any]:
    """Cut a device off: its certificates go into the CRL (and the broker reloads it), its
    session is taken over, its MQTT password and download token stop working, its desired
    state is withdrawn, and no new rollout includes it. Enroll it again with a new token."""
    ctl = controller(request)
    with transaction(ctl.factory) as s:
        dev = enroll.revoke_device(s, device_id)
        if dev is None:
            raise fail(404, "not_found", f"no device {device_id}")
        out = devices.to_dict(dev)
    steps = ctl.refresh_crl()
    if ctl.bridge is not None:
        from edgefleet.wire.mqtt import topic

        ctl.bridge.publish(topic(device_id, "desired"), b"")  # clear the retained state
        if ctl.bridge.take_over(device_id):
            steps.append(f"the broker session of {device_id} was closed")
    audit_detail(request, device=device_id)
    return {**out, "steps": steps}
