"""`/api/v1/captures/...` and `/api/v1/datasets/...` (docs/capture.md).

Roles: an operator starts and stops captures, a viewer lists and shows them (counts only, never
data), a publisher exports a capture and downloads its datasets (raw field data)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.auth import Perm
from edgefleet.cloud_controller.capture import service as svc
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.deps import Principal, audit_detail, controller, need, session
from edgefleet.cloud_controller.models import CaptureDataset, CaptureSession
from edgefleet.wire import ids

router = APIRouter(prefix="/api/v1", tags=["capture"])
Db = Annotated[Session, Depends(session)]
Reader = Annotated[Principal, Depends(need(Perm.READ))]
Publisher = Annotated[Principal, Depends(need(Perm.UPLOAD))]
Operator = Annotated[Principal, Depends(need(Perm.OPERATE))]
DeviceId = Annotated[str, AfterValidator(ids.device_id)]


def _fail(e: svc.CaptureRequestError) -> HTTPException:
    return HTTPException(e.status, detail={"code": e.code, "message": e.message})


class CaptureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, AfterValidator(ids.model_name)]
    devices: list[DeviceId] | None = Field(None, max_length=svc.MAX_DEVICES)
    group: Annotated[str, AfterValidator(ids.group)] | None = None
    rows: int = Field(ge=1)
    sample_rate: float = Field(0.1, gt=0, le=1)
    max_rows_per_minute: int = Field(60, ge=1)
    hours: float = Field(24.0, gt=0, le=720)
    drift_event_id: int | None = Field(None, ge=1, le=2**31 - 1)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    holdout: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0, le=2**32 - 1)


@router.post("/captures", status_code=201)
def start(body: CaptureRequest, request: Request, who: Operator) -> dict[str, Any]:
    ctl = controller(request)
    try:
        with transaction(ctl.factory) as s:
            cap = svc.start_capture(
                s,
                model=body.model,
                devices=body.devices,
                group=body.group,
                rows=body.rows,
                sample_rate=body.sample_rate,
                max_rows_per_minute=body.max_rows_per_minute,
                hours=body.hours,
                drift_event_id=body.drift_event_id,
                created_by=who.actor,
            )
            rows = svc.activate(s, ctl.signer)
            out = svc.view(cap)
            for r in {id(r): r for r in rows}.values():
                s.expunge(r)
    except svc.CaptureRequestError as e:
        raise _fail(e) from e
    except ids.IdentifierError as e:
        raise HTTPException(422, detail={"code": e.code, "message": str(e)}) from e
    ctl.rollouts.publish_committed(list({id(r): r for r in rows}.values()))
    audit_detail(request, capture=out["id"], model=body.model, rows=body.rows)
    return out


@router.get("/captures")
def list_captures(
    db: Db, who: Reader, model: str | None = Query(None, max_length=128)
) -> list[dict[str, Any]]:
    q = select(CaptureSession).order_by(CaptureSession.created_at.desc()).limit(500)
    if model:
        q = q.where(CaptureSession.model == model)
    return [svc.view(c) for c in db.scalars(q)]


@router.get("/captures/{capture_id}")
def show(capture_id: str, db: Db, who: Reader) -> dict[str, Any]:
    try:
        cap = svc.get(db, capture_id)
    except svc.CaptureRequestError as e:
        raise _fail(e) from e
    out = svc.view(cap)
    out["datasets"] = [
        svc.dataset_view(d)
        for d in db.scalars(
            select(CaptureDataset)
            .where(CaptureDataset.capture_id == cap.id)
            .order_by(CaptureDataset.version, CaptureDataset.part)
        )
    ]
    return out


@router.post("/captures/{capture_id}/stop")
def stop(capture_id: str, request: Request, who: Operator) -> dict[str, Any]:
    ctl = controller(request)
    try:
        with transaction(ctl.factory) as s:
            cap, rows = svc.stop_capture(s, ctl.signer, capture_id, datetime.now(UTC))
            out = svc.view(cap)
            for r in rows:
                s.expunge(r)
    except svc.CaptureRequestError as e:
        raise _fail(e) from e
    ctl.rollouts.publish_committed(rows)
    audit_detail(request, capture=capture_id)
    return out


@router.post("/captures/{capture_id}/export", status_code=201)
def export(
    capture_id: str, body: ExportRequest, request: Request, who: Publisher
) -> list[dict[str, Any]]:
    ctl = controller(request)
    try:
        with transaction(ctl.factory) as s:
            out = [
                svc.dataset_view(d)
                for d in svc.export(
                    s, capture_id, holdout=body.holdout, seed=body.seed, created_by=who.actor
                )
            ]
    except svc.CaptureRequestError as e:
        raise _fail(e) from e
    audit_detail(request, capture=capture_id, datasets=[d["id"] for d in out])
    return out


@router.post("/captures/purge")
def purge(request: Request, who: Operator) -> dict[str, int]:
    """Retention now (the leader's ticker also does it): ended captures past the retention."""
    ctl = controller(request)
    with transaction(ctl.factory) as s:
        n = svc.purge(s, datetime.now(UTC))
    audit_detail(request, deleted=n)
    return {"deleted": n}


@router.get("/datasets/{dataset_id}")
def show_dataset(dataset_id: str, db: Db, who: Reader) -> dict[str, Any]:
    ds = db.get(CaptureDataset, dataset_id) if len(dataset_id) <= 40 else None
    if ds is None:
        raise HTTPException(404, detail={"code": "dataset_not_found", "message": dataset_id})
    return svc.dataset_view(ds)


@router.get("/datasets/{dataset_id}/npz")
def download_dataset(dataset_id: str, db: Db, who: Publisher) -> Response:
    ds = db.get(CaptureDataset, dataset_id) if len(dataset_id) <= 40 else None
    if ds is None:
        raise HTTPException(404, detail={"code": "dataset_not_found", "message": dataset_id})
    return Response(
        ds.npz,
        media_type="application/octet-stream",
        headers={"X-Edgefleet-Sha256": ds.sha256},
    )
