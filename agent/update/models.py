"""The versions an update moves between: loading them into sessions, the current/previous
pointers, putting the previous version back, and removing what a failed update left."""

from __future__ import annotations

import logging

from edgefleet.agent import manifest_parts
from edgefleet.agent.journal import UpdateRecord
from edgefleet.agent.sessions import LoadedModel
from edgefleet.agent.states import State, end_of_rollback, failure_route
from edgefleet.agent.store import IntegrityError, Pointers
from edgefleet.agent.update.context import UpdateContext
from edgefleet.wire.message import JsonObject
from edgefleet.wire.reasons import ReasonCode

log = logging.getLogger("edgefleet.agent")

LOAD_ERRORS = (IntegrityError, OSError, RuntimeError, ValueError)


def session_options(ctx: UpdateContext) -> object:
    """An onnxruntime.SessionOptions: only handed to `LoadedModel`, so `object` here."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if ctx.config.intra_op_threads > 0:
        so.intra_op_num_threads = ctx.config.intra_op_threads
    spin = "1" if ctx.config.allow_spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return so


def load(ctx: UpdateContext, name: str, version: str) -> LoadedModel:
    """Load an installed version after re-hashing its files against the install record."""
    rec = ctx.store.check_integrity(name, version)
    lm = LoadedModel(
        name,
        version,
        ctx.store.version_dir(name, version),
        ctx.store.manifest(name, version),
        rec["providers"],
        session_options(ctx),
    )
    v = rec.get("validation") or {}
    lm.baseline_p95_ms = manifest_parts.number(v, "p95_ms")
    lm.memory_mb = float(manifest_parts.number(v, "memory_growth_mb") or 0.0)
    return lm


def load_current_models(ctx: UpdateContext) -> None:
    """Serve each model's current version, or its previous one when the current cannot load
    or its signing key is no longer trusted (revoked, or gone from the trust store)."""
    from edgefleet.agent.update.prepare import key_refusal

    for name in ctx.store.names():
        ptr = ctx.store.pointers(name)
        for version in (ptr.current, ptr.previous):
            if version is None:
                continue
            refused = key_refusal(ctx, name, version)
            if refused is not None:
                log.error("refusing to serve %s %s: %s", name, version, refused.message)
                continue
            try:
                lm = load(ctx, name, version)
            except LOAD_ERRORS as e:
                log.error("cannot serve %s %s: %s", name, version, e)
                continue
            if version != ptr.current:
                ctx.store.set_pointers(name, Pointers(version, None))
            ctx.sessions.install(lm, name)
            ctx.metrics.set_serving(name, version, None)
            break


def trust_fingerprint(ctx: UpdateContext) -> tuple[object, ...]:
    """What the trust store is read from: the trusted key files (path, mtime, size) and the
    revoked key ids. A change means every serving model's key is judged again."""
    files: list[object] = []
    for p in ctx.config.trusted_keys:
        try:
            st = p.stat()
            files.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            files.append((str(p), None, None))
    return (tuple(files), tuple(ctx.config.revoked_key_ids))


def enforce_trust(ctx: UpdateContext) -> list[str]:
    """Stop serving every model whose signing key is no longer trusted; serve its previous
    version instead when that one's key is still trusted and it loads. Returns what stopped."""
    from edgefleet.agent.update.prepare import key_refusal

    stopped = []
    for name in ctx.sessions.names():
        lm = ctx.sessions.get(name)
        if lm is None:
            continue
        refused = key_refusal(ctx, name, lm.version)
        if refused is None:
            continue
        log.error("%s %s stops serving: %s", name, lm.version, refused.message)
        stopped.append(f"{name} {lm.version}")
        ptr = ctx.store.pointers(name)
        replacement = None
        for v in (ptr.current, ptr.previous):
            if v is None or v == lm.version or key_refusal(ctx, name, v) is not None:
                continue
            try:
                replacement = load(ctx, name, v)
                break
            except LOAD_ERRORS as e:
                log.error("cannot serve %s %s: %s", name, v, e)
        ctx.sessions.install(replacement, name)
        ctx.metrics.set_serving(name, replacement.version if replacement else None, lm.version)
        if replacement is not None and replacement.version != ptr.current:
            ctx.store.set_pointers(name, Pointers(replacement.version, None))
    return stopped


def fail(
    ctx: UpdateContext,
    rec: UpdateRecord,
    code: ReasonCode,
    reason: str,
    figures: JsonObject | None = None,
) -> None:
    """Leave the record's state by its failure route (`agent.states.ROUTES`).

    A rollback update that fails ends ROLLBACK_FAILED with code ``rollback_failed``; the code
    that made it fail is kept in its figures (``cause``) and its reason.
    """
    target = failure_route(rec.current, rec.rollback)
    if rec.rollback:
        figures = {**(figures or {}), "cause": str(code)}
        reason = f"rollback to {rec.model} {rec.version} cannot land: {code}: {reason}"
        code = ReasonCode.ROLLBACK_FAILED
    if target in (State.FAILED, State.ROLLBACK_FAILED):
        cleanup_failed(ctx, rec)
        ctx.transition(rec, target, code, reason, figures)
    elif target is State.ROLLING_BACK:
        ctx.transition(rec, State.ROLLING_BACK, code, reason, figures)
        restore_pointers(ctx, rec)
        swap_to_previous(ctx, rec)
        drop_rolled_back(ctx, rec)
        ctx.transition(rec, end_of_rollback(rec.rollback), code, reason, figures)
    else:  # nothing left but finishing: the next start finishes it
        log.error("update %s cannot fail in %s (%s: %s)", rec.id, rec.state, code, reason)


def restore_pointers(ctx: UpdateContext, rec: UpdateRecord) -> None:
    """Put back both pointers as they were when the update started (the previous one too:
    a rollback must not lose the version before it)."""
    if not rec.model or rec.from_version == rec.version:
        return
    prev = rec.from_previous if rec.from_previous != rec.version else None
    if prev is not None and not ctx.store.is_installed(rec.model, prev):
        prev = None
    ctx.store.set_pointers(rec.model, Pointers(rec.from_version, prev))


def drop_rolled_back(ctx: UpdateContext, rec: UpdateRecord) -> None:
    """After a rollback, remove the version this update installed once nothing points to it:
    no stale version is left behind (a version installed before this update is kept)."""
    if not rec.model or not rec.version or not ctx.store.is_installed(rec.model, rec.version):
        return
    ptr = ctx.store.pointers(rec.model)
    serving = ctx.sessions.get(rec.model)
    if rec.version in (ptr.current, ptr.previous) or (
        serving is not None and serving.version == rec.version
    ):
        return
    if installed_by(ctx, rec):
        ctx.store.remove_version(rec.model, rec.version)


def installed_by(ctx: UpdateContext, rec: UpdateRecord) -> bool:
    """This update extracted ``rec.version`` (its install record names the update)."""
    try:
        return ctx.store.install_record(rec.model, rec.version).get("update_id") == rec.id
    except (OSError, ValueError):
        return True  # no readable record: an interrupted install of this update


def swap_to_previous(ctx: UpdateContext, rec: UpdateRecord) -> None:
    name = rec.model
    ctx.discard_download(rec)
    if rec.from_version is None:
        ctx.sessions.install(None, name)
        ctx.metrics.set_serving(name, None, rec.version)
        return
    current = ctx.sessions.get(name)
    if current is not None and current.version == rec.from_version:
        return
    try:
        lm = load(ctx, name, rec.from_version)
    except LOAD_ERRORS as e:
        log.error("rollback of %s cannot load %s: %s", name, rec.from_version, e)
        return
    ctx.sessions.install(lm, name)
    ctx.metrics.set_serving(name, rec.from_version, rec.version)


def cleanup_failed(ctx: UpdateContext, rec: UpdateRecord) -> None:
    """Drop the download and a version installed by this update that nothing points to."""
    ctx.discard_download(rec)
    if rec.model and rec.version and ctx.store.is_installed(rec.model, rec.version):
        ptr = ctx.store.pointers(rec.model)
        if rec.version not in (ptr.current, ptr.previous) and installed_by(ctx, rec):
            ctx.store.remove_version(rec.model, rec.version)


def finish_removal(ctx: UpdateContext, rec: UpdateRecord) -> None:
    """Unload (requests in flight finish on the model they hold; new ones get 404), then
    delete pointers and versions, then REMOVED. Idempotent: re-run after a crash."""
    name = rec.model
    old = ctx.sessions.install(None, name)
    if old is not None:
        ctx.metrics.set_serving(name, None, old.version)
    removed = ctx.store.remove_model(name)
    ctx.transition(
        rec,
        State.REMOVED,
        figures={"versions_removed": [*removed], "was_serving": old.version if old else None},
    )
