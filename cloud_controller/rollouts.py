"""The rollout I/O shell: persists engine state, feeds it events and time, applies its actions.

Every decision is committed (rollout header, changed device rows, events, new desired states)
in one transaction before its desired states are published, so a controller restarted at any
point reloads exactly the counts it had and re-publishes what the broker may have missed.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import desired, devices, registry
from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.models import (
    DesiredState,
    Device,
    DeviceSeqFloor,
    Package,
    Rollout,
    RolloutDevice,
    RolloutEvent,
)

log = logging.getLogger(__name__)

HealthFn = Callable[[Session, E.RolloutState], E.Health | None]


class RolloutError(Exception):
    """A refused rollout request; `code` names the reason, `status` is the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


class _Stale(Exception):
    """Another controller (replica) changed this rollout since we loaded it."""

    def __init__(self, rollout_id: str) -> None:
        super().__init__(rollout_id)
        self.rollout_id = rollout_id


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _live(state: E.RolloutState) -> bool:
    """Still needs events: running, waiting for devices to confirm a rollback, or (after a
    plain cancel) following devices that were still at work."""
    if state.phase not in E.TERMINAL_PHASES:
        return True
    assert state.tally is not None and state.rollbacks is not None
    return bool(state.rollbacks.get("requested")) or any(
        st == E.DevState.IN_PROGRESS for _, st in state.tally
    )


def spec_from_request(body: dict[str, Any], rollout_id: str | None = None) -> E.RolloutSpec:
    """Build a spec from the API's JSON body (unknown fields are refused by name)."""
    body = dict(body)
    allowed = {f for f in E.RolloutSpec.__dataclass_fields__ if f != "rollout_id"}
    unknown = set(body) - allowed
    if unknown:
        raise RolloutError("invalid_spec", f"unknown fields {sorted(unknown)}", 422)
    for f in ("model", "version"):
        if not isinstance(body.get(f), str) or not body[f]:
            raise RolloutError("invalid_spec", f"{f} is required", 422)
    body.setdefault("seed", secrets.randbits(31))
    try:
        spec = E.spec_from_dict({"rollout_id": rollout_id or uuid.uuid4().hex[:12], **body})
        E.validate_spec(spec)
    except E.SpecError as e:
        raise RolloutError("invalid_spec", str(e), 422) from e
    except (TypeError, ValueError) as e:
        raise RolloutError("invalid_spec", str(e), 422) from e
    if spec.target.empty:
        raise RolloutError("invalid_spec", "target: give device_ids, groups or tags", 422)
    return spec


def default_health(session: Session, state: E.RolloutState) -> E.Health | None:
    """Health figures for the soak gates, from `cloud_controller.drift.health`."""
    from edgefleet.cloud_controller.drift.health import rollout_health as fn

    moved = [d.device_id for d in state.devices.values() if d.state in E.MOVED]
    prevs = Counter(d.previous_version for d in state.devices.values() if d.previous_version)
    prev = [v for v, _ in prevs.most_common(1)]
    try:
        h = fn(
            session,
            model=state.spec.model,
            version=state.spec.version,
            previous_version=prev[-1] if prev else None,
            device_ids=moved,
            since=_utc(state.created_at),
        )
    except Exception:  # the gates are optional: a broken figure must not stop the engine
        log.exception("rollout health figures failed; gates not checked this tick")
        return None
    if h is None:
        return None
    get = h.get if isinstance(h, dict) else lambda k: getattr(h, k, None)
    return E.Health(get("p95_ratio"), get("error_rate"), get("drift"))


def _check_control(state: E.RolloutState, event: E.Event) -> None:
    """Refuse an approve with nothing to approve, a pause of a paused rollout, and so on."""
    rid = state.spec.rollout_id
    if isinstance(event, E.Approve):
        if event.wave is None:
            if state.phase != E.Phase.AWAITING_APPROVAL:
                raise RolloutError(
                    "nothing_to_approve",
                    f"rollout {rid} is {state.phase}, not waiting for approval",
                )
        elif not state.wave <= event.wave < len(state.wave_sizes):
            raise RolloutError(
                "nothing_to_approve",
                f"rollout {rid} has waves 1..{len(state.wave_sizes)}, now at {state.wave + 1}: "
                f"wave {event.wave + 1} cannot be approved",
            )
        elif (
            event.wave in state.approved
            or (event.wave == state.wave and state.phase != E.Phase.AWAITING_APPROVAL)
            or (state.wave_plan or range(len(state.wave_sizes)))[event.wave]
            not in state.spec.approval_waves
        ):
            raise RolloutError(
                "nothing_to_approve", f"wave {event.wave + 1} of {rid} needs no approval"
            )
    elif isinstance(event, E.Pause) and state.paused:
        raise RolloutError("already_paused", f"rollout {rid} is already paused")
    elif isinstance(event, E.Resume) and not state.paused:
        raise RolloutError("not_paused", f"rollout {rid} is not paused")
    elif isinstance(event, E.Abort) and event.on_abort not in (None, *(m.value for m in E.OnAbort)):
        raise RolloutError(
            "invalid_on_abort",
            f"{event.on_abort!r}: use one of {[m.value for m in E.OnAbort]}",
            422,
        )


class RolloutService:
    """Thread-safe: the API, the MQTT bridge and the ticker all call in."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        signer: desired.Signer,
        base_url: str,
        publish: desired.Publish | None = None,
        health: HealthFn | None = default_health,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._factory = factory
        self._signer = signer
        self._base_url = base_url
        self.publish = publish
        self._health = health
        self._clock = clock
        self._lock = threading.RLock()
        self._active: dict[str, E.RolloutState] = {}
        self._rev: dict[str, int] = {}  # revision of each cached rollout row
        self._next_rev: dict[str, int] = {}
        self._last_refresh = 0.0
        self._last_sync = 0.0
        # Controller replicas (`cloud_controller.leader`): the ticker's transactions begin with
        # `fence` (refused once this replica is deposed), and desired states are published
        # only while `may_publish` (the leader); a follower's rows wait, unpublished, for the
        # leader's `publish_pending`.
        self.fence: Callable[[Session], None] | None = None
        self.may_publish: Callable[[], bool] = lambda: True
        self.load()

    @property
    def publish_lock(self) -> threading.RLock:
        """Held around every desired-state publication, so that a state read earlier is
        never published after a newer one."""
        return self._lock

    # --- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        """(Re)load every live rollout from the database."""
        with self._lock, self._factory() as session:
            self._active.clear()
            for row in session.scalars(select(Rollout)):
                if row.phase in E.TERMINAL_PHASES and not row.state.get("open"):
                    continue
                self._active[row.id] = self._read(session, row)
                self._rev[row.id] = row.revision

    def _reload(self, rollout_id: str) -> E.RolloutState | None:
        """Fresh state of one rollout from the database (another replica changed it)."""
        with self._factory() as session:
            row = session.get(Rollout, rollout_id)
            if row is None:
                self._active.pop(rollout_id, None)
                return None
            state = self._read(session, row)
            self._rev[rollout_id] = row.revision
        self._set(state)
        return state

    def sync(self) -> None:
        """Pick up rollouts that other replicas created or changed (cheap: ids and revisions)."""
        recent = _utc(self._clock() - 86400)
        with self._lock:
            with self._factory() as session:
                rows = session.execute(
                    select(Rollout.id, Rollout.revision).where(
                        or_(
                            Rollout.phase.not_in([p.value for p in E.TERMINAL_PHASES]),
                            Rollout.updated_at > recent,
                            Rollout.id.in_(list(self._active)),
                        )
                    )
                ).all()
            for rid, rev in rows:
                if self._rev.get(rid) != rev:
                    self._reload(rid)

    def _read_locked(self, session: Session, rollout_id: str) -> E.RolloutState:
        """The rollout as it is now, read in the step's transaction that holds its row lock
        (its revision becomes the one this replica writes against)."""
        row = session.get(Rollout, rollout_id, populate_existing=True)
        assert row is not None  # locked by the caller
        ours, rev = self._active.get(rollout_id), self._rev.get(rollout_id)
        if ours is None or rev is None:
            state = self._read(session, row)
        else:  # only the device rows written since our revision (each row carries its writer's)
            newer = session.scalars(
                select(RolloutDevice.data).where(
                    RolloutDevice.rollout_id == rollout_id, RolloutDevice.revision > rev
                )
            )
            devs = dict(ours.devices)
            for data in newer:
                d = E.device_from_dict(data)
                devs[d.device_id] = d
            state = E.state_from_parts(ours.spec, row.state, devs.values())
        # committed state: this replica's copy, whether or not the step itself commits
        self._rev[rollout_id] = row.revision
        self._set(state)
        return state

    def _read(self, session: Session, row: Rollout) -> E.RolloutState:
        devs = session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == row.id))
        return E.state_from_parts(
            E.spec_from_dict(row.spec), row.state, (E.device_from_dict(d.data) for d in devs)
        )

    def get_state(self, rollout_id: str) -> E.RolloutState | None:
        """A rollout by id or unique id prefix (None when there is none; RolloutError when the
        prefix is ambiguous)."""
        try:
            rollout_id = self.resolve_id(rollout_id)
        except RolloutError as e:
            if e.code == "not_found":
                return None
            raise
        with self._lock:
            if rollout_id in self._active:
                return self._active[rollout_id]
        with self._factory() as session:
            row = session.get(Rollout, rollout_id)
            return self._read(session, row) if row is not None else None

    # --- requests ----------------------------------------------------------------------------

    def create(self, body: dict[str, Any], actor: str) -> E.RolloutState:
        spec = spec_from_request(body)
        now = self._clock()
        with self._lock:
            with transaction(self._factory) as session:
                running = session.execute(
                    select(Rollout.id, Rollout.phase).where(
                        Rollout.model == spec.model,
                        Rollout.phase.not_in([p.value for p in E.TERMINAL_PHASES]),
                    )
                ).first()
                if running is not None:
                    raise RolloutError(
                        "rollout_conflict",
                        f"rollout {running[0]} of {spec.model} is still {running[1]}",
                    )
                profiles = registry.release_profiles(session, spec.model, spec.version)
                if not profiles:
                    raise RolloutError(
                        "release_not_found", f"no package of {spec.model} {spec.version}", 404
                    )
                infos = devices.device_infos(session, spec.model)
                decision = E.plan(spec, infos, profiles, now)
                if not any(d.wave >= 0 for d in decision.state.devices.values()):
                    raise RolloutError(
                        "no_compatible_devices",
                        f"the target matches {len(decision.state.devices)} devices, none with "
                        f"a profile in {profiles}",
                        422,
                    )
                session.add(
                    Rollout(
                        id=spec.rollout_id,
                        model=spec.model,
                        version=spec.version,
                        phase=decision.state.phase.value,
                        revision=0,
                        spec=E.spec_to_dict(spec),
                        state={},
                        created_at=_utc(now),
                        updated_at=_utc(now),
                        created_by=actor,
                    )
                )
                session.add_all(
                    RolloutDevice(
                        rollout_id=spec.rollout_id,
                        device_id=d.device_id,
                        data=E.device_to_dict(d),
                        state=d.state.value,
                        wave=d.wave,
                    )
                    for d in decision.state.devices.values()
                )
                session.flush()
                self._warn_unrevertable(session, decision.state, now)
                self._rev[spec.rollout_id] = 0
                self._next_rev.clear()
                # the device rows were just written as planned: only the header and actions
                rows = self._apply(session, decision, (), now)
            # the copy and its revision move together (a replica behind merges rows newer
            # than the revision into the copy), before a publish that may fail
            self._rev.update(self._next_rev)
            self._set(decision.state)
            self._publish(rows)
            return decision.state

    def resolve_id(self, prefix: str) -> str:
        """The rollout id that `prefix` names: itself, or the one id it begins (refused when
        it names none or more than one)."""
        with self._factory() as session:
            if session.get(Rollout, prefix) is not None:
                return prefix
            q = select(Rollout.id).where(Rollout.id.startswith(prefix, autoescape=True))
            ids = list(session.scalars(q.limit(6)))
        if not prefix or not ids:
            raise RolloutError("not_found", f"no rollout {prefix}", 404)
        if len(ids) > 1:
            raise RolloutError(
                "ambiguous_id", f"{prefix!r} begins {len(ids)} rollout ids: {', '.join(ids)}", 409
            )
        return ids[0]

    def control(self, rollout_id: str, event: E.Event) -> E.RolloutState:
        """Approve / pause / resume / cancel / abort (a request that would change nothing is
        refused, by name)."""
        with self._lock:
            rollout_id = self.resolve_id(rollout_id)
            state = self._active.get(rollout_id) or self._reload(rollout_id)
            if state is None:
                raise RolloutError("not_found", f"no rollout {rollout_id}", 404)
            if state.phase in E.TERMINAL_PHASES:
                raise RolloutError("finished", f"rollout {rollout_id} is {state.phase}")
            _check_control(state, event)
            return self._step({rollout_id: state}, event)[rollout_id]

    def on_status(self, reports: Iterable[tuple[str, E.StatusReport | E.ShadowReport]]) -> None:
        """Status messages (model, report) from devices, already de-duplicated; one
        transaction for the whole batch."""
        reports = list(reports)
        with self._lock:
            if any(r.rollout_id and r.rollout_id not in self._active for _, r in reports):
                self.sync()  # a rollout another replica created
            events: dict[str, list[E.Event]] = {}
            for model, rep in reports:
                for rid, st in self._active.items():
                    if st.spec.model == model and rep.device_id in st.devices:
                        events.setdefault(rid, []).append(rep)
            if events:
                self._step({rid: self._active[rid] for rid in events}, events)

    def tick(self) -> None:
        """Time passes: timeouts, retries, soak, rate limit; re-sign expiring desired states."""
        now = self._clock()
        with self._lock:
            live = {
                rid: st for rid, st in self._active.items() if st.phase not in E.TERMINAL_PHASES
            }
            if now - self._last_sync > 2:
                self._last_sync = now
                self.sync()
                live = {
                    rid: st for rid, st in self._active.items() if st.phase not in E.TERMINAL_PHASES
                }
            if live:
                self._step(live, None, fenced=True)
            if now - self._last_refresh > 60:
                self._last_refresh = now
                with transaction(self._factory) as session:
                    self._fence(session, True)
                    rows = desired.refresh_expiring(session, self._signer, _utc(now))
                self._publish(rows)

    def publish_pending(self, limit: int = 2000) -> int:
        """Publish desired states committed but not yet published (by a follower replica, or
        before a crash); how many. Only while `may_publish`."""
        if self.publish is None:
            return 0
        with self._lock:
            if not self.may_publish():
                return 0
            with self._factory() as session:
                rows = list(
                    session.scalars(
                        select(DesiredState)
                        .where(DesiredState.published.is_(False))
                        .order_by(DesiredState.device_id)
                        .limit(limit)
                    )
                )
            self._publish(rows)
            return len(rows)

    def publish_committed(self, rows: Sequence[DesiredState]) -> None:
        """Publish desired states committed elsewhere (the bridge's resync); the leader only,
        else they wait for the leader's `publish_pending`."""
        with self._lock:
            self._publish(rows)

    def republish_all(self) -> int:
        """Every device's current desired state again (retained, same seq): on the bridge's
        (re)connect and on taking the lead. The leader only; how many."""
        if self.publish is None:
            return 0
        with self._lock:
            if not self.may_publish():
                return 0
            with self._factory() as session:
                rows = list(session.scalars(select(DesiredState)))
            self._publish(rows)
            return len(rows)

    def _fence(self, session: Session, fenced: bool) -> None:
        if fenced and self.fence is not None:
            self.fence(session)

    def active_ids(self) -> list[str]:
        with self._lock:
            return list(self._active)

    # --- internals ---------------------------------------------------------------------------

    def _step(
        self,
        states: dict[str, E.RolloutState],
        events: E.Event | dict[str, list[E.Event]] | None,
        *,
        fenced: bool = False,
    ) -> dict[str, E.RolloutState]:
        """`_step_once`, again on fresh state when another replica got there first."""
        for _ in range(5):
            try:
                return self._step_once(states, events, fenced=fenced)
            except _Stale as e:
                fresh = self._reload(e.rollout_id)
                states = dict(states)
                if fresh is None:
                    states.pop(e.rollout_id, None)
                else:
                    states[e.rollout_id] = fresh
        raise RolloutError("conflict", "the rollout keeps changing under us; try again", 409)

    def _step_once(
        self,
        states: dict[str, E.RolloutState],
        events: E.Event | dict[str, list[E.Event]] | None,
        *,
        fenced: bool = False,
    ) -> dict[str, E.RolloutState]:
        """Feed events (None = a tick) to each rollout; persist and publish the outcome.
        ``fenced``: the ticker's write, refused (`leader.Fenced`) once this replica is deposed."""
        now = self._clock()
        out: dict[str, E.RolloutState] = {}
        rows: list[DesiredState] = []
        self._next_rev.clear()
        with transaction(self._factory) as session:
            self._fence(session, fenced)
            # Events are applied to the current state only: a report judged on an old copy
            # could be ignored (its device not yet at work there) and then acknowledged, lost.
            # Every rollout of the step is locked (PostgreSQL) first, in id order, before any
            # desired-state row, so replicas never wait on each other in a cycle; a copy
            # reloaded under the lock stays current until this step commits. Replicas sharing
            # the ingest take turns, where re-reading without the lock could lose to another
            # replica again and again.
            current: dict[str, E.RolloutState] = {}
            for rid in sorted(states):
                rev = session.scalar(
                    select(Rollout.revision).where(Rollout.id == rid).with_for_update()
                )
                if rev is None:
                    raise _Stale(rid)  # gone: the retry drops it
                current[rid] = (
                    states[rid] if rev == self._rev.get(rid, 0) else self._read_locked(session, rid)
                )
            for rid, state in current.items():
                evs: list[E.Event]
                if events is None:
                    evs = [E.Tick(self._health_of(session, state))]
                elif isinstance(events, dict):
                    evs = events.get(rid, [])
                else:
                    evs = [events]
                decision = E.handle_all(state, evs, now)
                new = decision.state
                changed = decision.changed
                if changed is None:  # not said: compare
                    changed = frozenset(
                        did for did, dev in new.devices.items() if state.devices.get(did) is not dev
                    )
                if changed or decision.actions or E.header_to_dict(new) != E.header_to_dict(state):
                    rows += self._apply(session, decision, changed, now)
                out[rid] = decision.state
        self._rev.update(self._next_rev)  # with the copies, before a publish that may fail
        for st in out.values():
            self._set(st)
        self._publish(rows)
        return out

    def _health_of(self, session: Session, state: E.RolloutState) -> E.Health | None:
        """Gate figures, only while they are looked at (soaking, with a gate set)."""
        g = state.spec.gates
        gated = (g.max_p95_ratio, g.max_error_rate, g.max_drift) != (None, None, None)
        if self._health is None or not gated or state.phase != E.Phase.SOAKING:
            return None
        return self._health(session, state)

    def _set(self, state: E.RolloutState) -> None:
        if _live(state):
            self._active[state.spec.rollout_id] = state
        else:
            self._active.pop(state.spec.rollout_id, None)

    def _apply(
        self, session: Session, decision: E.Decision, changed: Iterable[str], now: float
    ) -> list[DesiredState]:
        """Write a decision: the rollout's header (its counts from the state's tallies), the
        rows of the devices in `changed` only, and its actions."""
        new, spec = decision.state, decision.state.spec
        rid = spec.rollout_id
        header = E.header_to_dict(new)
        assert new.rollbacks is not None
        header["pending_rollback"] = new.rollbacks.get("requested", 0)
        header["counts"] = E.counts(new)
        header["open"] = _live(new)
        rev = self._rev.get(rid, 0)
        res = session.execute(
            update(Rollout)
            .where(Rollout.id == rid, Rollout.revision == rev)
            .values(phase=new.phase.value, state=header, updated_at=_utc(now), revision=rev + 1)
            .execution_options(synchronize_session=False)
        )
        if getattr(res, "rowcount", 1) != 1:  # optimistic lock: someone else moved it on
            raise _Stale(rid)
        self._next_rev[rid] = rev + 1
        rows_changed = [
            {
                "rollout_id": rid,
                "device_id": did,
                "data": E.device_to_dict(dev),
                "state": dev.state.value,
                "wave": dev.wave,
                "revision": rev + 1,
            }
            for did, dev in ((did, new.devices[did]) for did in sorted(changed))
        ]
        if rows_changed:  # one executemany (ORM bulk UPDATE by primary key)
            session.execute(update(RolloutDevice), rows_changed)
        targets = [a.device_id for a in decision.actions if isinstance(a, E.Dispatch | E.Revert)]
        loaded: list[DesiredState] = []  # held so the identity map keeps them for set_model
        # and each one's seq floor: `desired` issues the wave without a query per device
        known = desired.Known(dict.fromkeys(targets), {})
        for i in range(0, len(targets), 500):  # locked (PostgreSQL): seq + 1 is read-modify-write
            chunk = targets[i : i + 500]
            q = select(DesiredState).where(DesiredState.device_id.in_(chunk)).with_for_update()
            loaded += session.scalars(q)
            floors = select(DeviceSeqFloor.device_id, DeviceSeqFloor.floor)
            for device_id, floor in session.execute(
                floors.where(DeviceSeqFloor.device_id.in_(chunk))
            ):
                known.floors[device_id] = floor
        known.rows.update((r.device_id, r) for r in loaded)
        # their inventory rows too (desired.set_model keeps each one's "in sync" mark)
        devs = (
            []
            if not targets
            else list(session.scalars(select(Device).where(Device.id.in_(targets))))
        )
        rows: list[DesiredState] = []
        packages: dict[tuple[str, str], Package | None] = {}

        def package(version: str, profile: str) -> Package | None:
            if (version, profile) not in packages:
                packages[(version, profile)] = registry.find(session, spec.model, version, profile)
            return packages[(version, profile)]

        when = _utc(now)
        for action in decision.actions:
            if isinstance(action, E.Log):
                session.add(RolloutEvent(rollout_id=rid, at=now, message=action.message))
            elif isinstance(action, E.Dispatch):
                pkg = package(spec.version, action.profile)
                if pkg is None:  # deleted under us: report, the device will time out
                    session.add(RolloutEvent(rollout_id=rid, at=now, message="package missing"))
                    continue
                entry = registry.desired_entry(pkg, self._base_url, rid, False)
                entry["attempt"] = action.attempt
                if spec.gates.max_p95_ratio is not None:
                    # the agent's probation gate judges the release by the rollout's ratio
                    entry["max_p95_ratio"] = spec.gates.max_p95_ratio
                if action.shadow and spec.shadow is not None:
                    # install and verify, then load beside the serving version (docs/shadow.md)
                    entry["shadow"] = E.device_shadow(spec.shadow)
                rows.append(
                    desired.set_model(
                        session,
                        self._signer,
                        action.device_id,
                        spec.model,
                        entry,
                        when,
                        known=known,
                    )
                )
            elif isinstance(action, E.Revert):
                rows.append(self._revert(session, spec, action, package, when, known))
        del devs
        session.flush()  # the rows issued without a flush each (`desired.Known`)
        return rows

    def _warn_unrevertable(self, session: Session, state: E.RolloutState, now: float) -> None:
        """Say up front which devices an abort could not put back (no package of their
        previous version for their profile)."""
        missing: dict[tuple[str, str], list[str]] = {}
        known: dict[tuple[str, str], bool] = {}
        for d in state.devices.values():
            if d.wave < 0 or d.previous_version is None or d.profile is None:
                continue
            k = (d.previous_version, d.profile)
            if k not in known:
                known[k] = registry.find(session, state.spec.model, *k) is not None
            if not known[k]:
                missing.setdefault(k, []).append(d.device_id)
        for (version, profile), ids in sorted(missing.items()):
            session.add(
                RolloutEvent(
                    rollout_id=state.spec.rollout_id,
                    at=now,
                    message=f"warning: {len(ids)} devices run {version} with no {profile} "
                    f"package of it here; an abort cannot restore them ({', '.join(ids[:5])})",
                )
            )

    def _revert(
        self,
        session: Session,
        spec: E.RolloutSpec,
        action: E.Revert,
        package: Callable[[str, str], Package | None],
        when: datetime,
        known: desired.Known | None = None,
    ) -> DesiredState:
        if action.previous_version is None:
            # A first install. Only when the operator asked for removal does the model go on the
            # explicit `remove` list (its REMOVED status confirms the revert); otherwise it just
            # leaves the desired state and the device keeps what it has.
            return desired.set_model(
                session,
                self._signer,
                action.device_id,
                spec.model,
                None,
                when,
                uninstall=action.remove,
                known=known,
            )
        pkg = package(action.previous_version, action.profile or "")
        if pkg is None:
            # Installed outside the registry: there is no package to point the device at, so the
            # model leaves its desired state and the revert stays unconfirmed (visible in counts).
            session.add(
                RolloutEvent(
                    rollout_id=spec.rollout_id,
                    at=when.timestamp(),
                    message=f"{action.device_id}: cannot revert to {action.previous_version}: "
                    f"no {action.profile} package of it in the registry",
                )
            )
            return desired.set_model(
                session, self._signer, action.device_id, spec.model, None, when, known=known
            )
        entry = registry.desired_entry(pkg, self._base_url, spec.rollout_id, True)
        # A version the device ran before: it is not held to the forward gates (agent side).
        entry["rollback"] = True
        return desired.set_model(
            session, self._signer, action.device_id, spec.model, entry, when, known=known
        )

    def _publish(self, rows: Sequence[DesiredState]) -> None:
        """Publish (the leader only; callers hold the lock) and mark each row published at
        the seq it had, so that `publish_pending` skips it."""
        if self.publish is None or not rows or not self.may_publish():
            return
        desired.publish_rows(list(rows), self.publish)
        marks = [{"d": r.device_id, "s": r.seq} for r in rows]
        t = cast(Table, DesiredState.__table__)
        stmt = (
            update(t)
            .where(t.c.device_id == bindparam("d"), t.c.seq == bindparam("s"))
            .values(published=True)
        )
        with transaction(self._factory) as session:
            session.connection().execute(stmt, marks)
