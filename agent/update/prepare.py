"""The steps before the new version runs: IDLE, DOWNLOADING, VERIFYING, INSTALLING.

Each does the work of the state the record is in, then journals the next state; each is
idempotent, so a restarted agent re-runs the recorded state's step. Every trust decision is
`edgefleet.wire.trust`'s (through `verify_package` or `check_installed`).

The verification stack (tar reading, signatures, and with them cryptography's native code, about
8 MB resident) is imported by the step that needs it, not with the agent: an agent that has
nothing to update stays that much smaller.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.agent import manifest_parts
from edgefleet.agent.fsio import remove_tree
from edgefleet.agent.journal import UpdateRecord
from edgefleet.agent.states import State
from edgefleet.agent.store import IntegrityError, Pointers
from edgefleet.agent.update.checks import Resources, check_resources
from edgefleet.agent.update.context import UpdateContext
from edgefleet.agent.update.events import StepFailed, agent_version
from edgefleet.agent.update.fetcher import DeltaFetcher, Fetched, FetchError
from edgefleet.wire.errors import RejectError
from edgefleet.wire.message import JsonObject
from edgefleet.wire.reasons import ReasonCode

if TYPE_CHECKING:
    from edgefleet.wire.package import VerifiedPackage, VerifyPolicy
    from edgefleet.wire.trust import Manifest

log = logging.getLogger("edgefleet.agent")


def step_idle(ctx: UpdateContext, rec: UpdateRecord) -> None:
    ptr = ctx.store.pointers(rec.model) if rec.model else Pointers()
    rec.from_version = ptr.current
    rec.from_previous = ptr.previous
    mark_rollback(ctx, rec)
    if rec.action == "remove":
        # Journaled before anything is unloaded or deleted: a restart finishes the removal.
        rec.version = ptr.current or rec.version
        ctx.transition(rec, State.REMOVING)
        return
    ctx.transition(rec, State.DOWNLOADING)


def mark_rollback(ctx: UpdateContext, rec: UpdateRecord) -> None:
    """An asked-for downgrade to a version this device has committed is a rollback: it is not
    held to the forward gates (benchmark, probation), and a failure is ROLLBACK_FAILED."""
    rec.rollback = bool(
        rec.action == "install"
        and rec.allow_downgrade
        and rec.model
        and rec.version
        and rec.version != rec.from_version
        and rec.version in ctx.store.committed_versions(rec.model)
    )


def key_refusal(ctx: UpdateContext, name: str, version: str) -> RejectError | None:
    """Why ``name`` ``version`` may no longer serve here: its signing key is revoked or no
    longer trusted (read from the trust store now); None while it is still trusted."""
    from edgefleet.wire.trust import TrustStore

    try:
        signer = ctx.store.install_record(name, version).get("key_id")
    except (OSError, ValueError) as e:
        return RejectError(ReasonCode.INTEGRITY, f"{name} {version}: no install record ({e})")
    what = f"{name} {version}"
    pol = policy(ctx, UpdateRecord(id="", model=name, version=version, source=""))
    store: TrustStore = pol.trust_store()
    if not isinstance(signer, str):
        return RejectError(ReasonCode.UNTRUSTED_KEY, f"{what} has no recorded signing key")
    if signer.strip().lower() in store.revoked_key_ids:  # canonical forms (wire.keyid)
        return RejectError(ReasonCode.REVOKED_KEY, f"{what} was signed by revoked key {signer}")
    if not store.trusts(signer):
        return RejectError(
            ReasonCode.UNTRUSTED_KEY, f"{what} was signed by key {signer}, no longer trusted"
        )
    return None


def installed_rollback(ctx: UpdateContext, rec: UpdateRecord) -> bool:
    """An asked-for rollback to a version still installed: no download, instant."""
    return bool(
        rec.model
        and rec.version
        and rec.allow_downgrade
        and ctx.store.is_installed(rec.model, rec.version)
    )


def step_download(ctx: UpdateContext, rec: UpdateRecord) -> None:
    if installed_rollback(ctx, rec):
        ctx.transition(rec, State.VERIFYING, figures={"download": "skipped, installed"})
        return
    got, delta = try_delta(ctx, rec)
    try:
        if got is None:
            got = ctx.fetcher.fetch(
                rec.source,
                ctx.package_path(rec),
                sha256=rec.sha256,
                size=rec.size,
                max_bytes=ctx.config.max_package_bytes,
                token=ctx.config.download_token if rec.controller_source else None,
            )
    except FetchError as e:
        raise StepFailed(e.code, e.message) from e
    except OSError as e:
        raise StepFailed(ReasonCode.DOWNLOAD_FAILED, f"{type(e).__name__}: {e}") from e
    ctx.transition(
        rec,
        State.VERIFYING,
        figures={
            "bytes": got.size,
            "sha256": got.sha256,
            "resumed_from": got.resumed_from,
            **delta,
        },
    )


def try_delta(ctx: UpdateContext, rec: UpdateRecord) -> tuple[Fetched | None, JsonObject]:
    """The package fetched as a delta against the version installed now (docs/delta.md), with
    its figures; (None, why) when there is no delta to try or it was refused: the caller then
    downloads the whole package, which alone decides the outcome."""
    from edgefleet.agent.download import is_url

    fetcher = ctx.fetcher
    dest = ctx.package_path(rec)
    current = ctx.store.pointers(rec.model).current if rec.model else None
    if (
        not isinstance(fetcher, DeltaFetcher)
        or not rec.sha256
        or rec.size is None
        or current is None
        or not is_url(rec.source)
        or dest.exists()
        or dest.with_name(dest.name + ".part").exists()  # a full download to resume
    ):
        return None, {}
    try:
        got = fetcher.fetch_delta(
            rec.source,
            dest,
            sha256=rec.sha256,
            size=rec.size,
            max_bytes=ctx.config.max_package_bytes,
            basis=ctx.store.version_dir(rec.model, current),
            trust=policy(ctx, rec).trust_store(),
            expected_name=rec.model,
            token=ctx.config.download_token if rec.controller_source else None,
        )
    except (FetchError, RejectError) as e:
        log.info("delta download of %s refused (%s): %s; full download", rec.id, e.code, e)
        return None, {"delta_fallback": str(e.code), "delta_reason": str(e)[:300]}
    except (OSError, ValueError) as e:
        log.info("delta download of %s failed: %s; full download", rec.id, e)
        return None, {"delta_fallback": str(ReasonCode.DELTA_UNAVAILABLE), "delta_reason": str(e)}
    figures = getattr(got, "figures", None)
    return got, {"delta": dict(figures) if isinstance(figures, dict) else {}}


def policy(ctx: UpdateContext, rec: UpdateRecord) -> VerifyPolicy:
    """The trust store (read now: keys may change between updates) and this device's facts."""
    from edgefleet.keys import load_public_key
    from edgefleet.wire.package import VerifyPolicy

    keys = []
    for p in ctx.config.trusted_keys:
        try:
            keys.append(load_public_key(p))
        except (OSError, ValueError) as e:
            log.error("cannot read trusted key %s: %s", p, e)
    installed = ctx.store.pointers(rec.model).current if rec.model else None
    return VerifyPolicy(
        trusted_keys=keys,
        revoked_key_ids=list(ctx.config.revoked_key_ids),
        max_package_bytes=ctx.config.max_package_bytes,
        max_member_bytes=ctx.config.max_package_bytes,
        expected_name=rec.model or None,
        installed_version=installed,
        allow_version=rec.version if rec.allow_downgrade and rec.version else None,
        profiles=ctx.profiles(),
        available_providers=ctx.providers(),
        agent_version=agent_version(),
    )


def verify(
    ctx: UpdateContext, rec: UpdateRecord, extract_to: Path | None = None
) -> VerifiedPackage:
    from edgefleet.wire.package import verify_package

    try:
        return verify_package(ctx.package_path(rec), policy(ctx, rec), extract_to=extract_to)
    except RejectError as e:
        raise StepFailed(e.code, e.message) from e


def verify_installed(ctx: UpdateContext, rec: UpdateRecord) -> None:
    """Re-check an installed version: its files against the install record, then trust's
    `check_installed` (its key still trusted and not revoked, the manifest policy)."""
    from edgefleet.wire.trust import check_installed

    try:
        inst = ctx.store.check_integrity(rec.model, rec.version)
    except IntegrityError as e:
        raise StepFailed(ReasonCode.DIGEST_MISMATCH, str(e)) from e
    pol = policy(ctx, rec)
    manifest = ctx.store.manifest(rec.model, rec.version)
    try:
        verdict = check_installed(
            manifest,
            inst.get("key_id"),
            inst["member_digests"],
            pol.trust_store(),
            pol.device_facts(),
            pol.clock(),
        )
    except RejectError as e:
        raise StepFailed(e.code, e.message) from e
    rec.profile = manifest_parts.profile(manifest)
    ctx.transition(rec, State.INSTALLING, figures={"key_id": verdict.key_id, "installed": True})


def step_verify(ctx: UpdateContext, rec: UpdateRecord) -> None:
    if installed_rollback(ctx, rec):
        return verify_installed(ctx, rec)
    if not rec.model:  # model name unknown until now: read it unverified, then verify by it
        from edgefleet.wire.package import read_name

        try:
            rec.model = read_name(ctx.package_path(rec))
        except RejectError as e:  # a structural refusal keeps its own code
            raise StepFailed(e.code, f"cannot read the package's name: {e.message}") from e
        ptr = ctx.store.pointers(rec.model)
        rec.from_version, rec.from_previous = ptr.current, ptr.previous
    vp = verify(ctx, rec)
    m = vp.manifest
    if rec.version and m["version"] != rec.version:
        raise StepFailed(
            ReasonCode.VERSION_MISMATCH,
            f"package holds version {m['version']}, the update asked for {rec.version}",
        )
    rec.version = m["version"]
    rec.profile = m["profile"]
    mark_rollback(ctx, rec)
    device_checks(ctx, rec, m)
    ctx.transition(
        rec,
        State.INSTALLING,
        figures={
            "key_id": vp.key_id,
            "providers": [*vp.providers],
            "cpu_fallback_used": vp.cpu_fallback_used,
        },
        reason_code=ReasonCode.CPU_FALLBACK if vp.cpu_fallback_used else None,
        reason=(
            f"{[ep['name'] for ep in m['execution_providers']]} missing here;"
            " the profile allows CPU fallback"
            if vp.cpu_fallback_used
            else None
        ),
    )


def device_checks(ctx: UpdateContext, rec: UpdateRecord, manifest: Manifest) -> None:
    """Measure free disk and memory, and let `check_resources` judge."""
    import psutil

    cfg = ctx.config
    installed = ctx.store.is_installed(rec.model, rec.version)
    avail_mb = psutil.virtual_memory().available / 2**20
    if cfg.swap.memory_budget_mb is not None:
        avail_mb = min(avail_mb, float(cfg.swap.memory_budget_mb))
    have = Resources(
        free_disk=None if installed else shutil.disk_usage(ctx.data_dir).free,
        available_mb=avail_mb,
        disk_headroom=cfg.disk_headroom_bytes,
        memory_headroom_mb=cfg.memory_headroom_mb,
    )
    check_resources(manifest, have)


def step_install(ctx: UpdateContext, rec: UpdateRecord) -> None:
    name, version = rec.model, rec.version
    intact = False
    if ctx.store.is_installed(name, version):
        try:
            ctx.store.check_integrity(name, version)
            intact = True
        except IntegrityError as e:
            ptr = ctx.store.pointers(name)
            if version in (ptr.current, ptr.previous):
                raise StepFailed(ReasonCode.INTEGRITY, str(e)) from e
            remove_tree(ctx.store.version_dir(name, version))
    if not intact:
        vdir = ctx.store.version_dir(name, version)
        if vdir.exists():  # an interrupted install left a directory without a record
            remove_tree(vdir)
        vp = verify(ctx, rec, extract_to=vdir)
        ctx.store.record_install(
            name,
            version,
            {
                "member_digests": vp.member_digests,
                "key_id": vp.key_id,
                "providers": vp.providers,
                "cpu_fallback_used": vp.cpu_fallback_used,
                "installed_at": time.time(),
                "update_id": rec.id,
            },
        )
    ctx.transition(rec, State.VALIDATING)
