"""Acting on a signed desired state: verify it, persist its seq, then install and remove.

`DesiredStateHandler.handle(raw)` verifies the envelope (controller key, this device, newer
seq), records the seq before acting (a crash afterwards never acts twice on one state), asks the
pure planner (`agent.mqtt.reconcile`) what to do against the inventory and the installs in
flight, and hands each action to the agent. Every refusal and every action that cannot start is
reported through the ``report`` callback; the update events that follow are the link's.

Anti-rollback does not rest on the stored seq alone (it can be lost with the device's files):
on a device with no seq history left, a desired state that would take a model below the version
it serves, or remove it, is refused when it was issued before that version started serving
(`current_since`) — a replay of an old, still valid state. A genuine rollback is issued after the
version it undoes was installed. While the seq history holds, the seq alone decides: a state
above the highest acted on is newer than all of them, whatever the two clocks say.
A seq below the highest acted on is reported (`seq_regressed`, with ``last_seq``), once per seq,
so the controller learns that its sequence went backwards; a lost or corrupt seq record is
reported at start (`link_state_lost`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.agent.mqtt.reconcile import (
    DesiredStateError,
    ModelTarget,
    parse_removals,
    parse_targets,
    plan,
    plan_removals,
)
from edgefleet.agent.mqtt.state import LinkState
from edgefleet.agent.ports import AgentPort, serving_versions
from edgefleet.agent.update.events import UpdateRequest
from edgefleet.wire.errors import RejectError, ReplayError
from edgefleet.wire.manifest import parse_time
from edgefleet.wire.message import JsonObject, now_iso
from edgefleet.wire.mqtt import verify_desired
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.semver import InvalidVersion, parse_version
from edgefleet.wire.states import UpdateState
from edgefleet.wire.status import StatusReport

log = logging.getLogger("edgefleet.agent.mqtt")

Report = Callable[[StatusReport], None]
#: (model, serving version) -> when that version started serving here (epoch seconds), or None
CurrentSince = Callable[[str, str], float | None]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def is_downgrade(target: str, serving: str) -> bool:
    try:
        return parse_version(target) < parse_version(serving)
    except InvalidVersion:
        return False


def make_update_request(target: ModelTarget) -> UpdateRequest:
    """The agent's request for ``target`` (a rollback when the controller allows a downgrade)."""
    return UpdateRequest(
        model=target.name,
        version=target.version,
        source=target.url,
        sha256=target.sha256,
        size=target.size,
        rollout_id=target.rollout_id,
        allow_downgrade=target.allow_downgrade,
        controller_source=True,
        max_p95_ratio=target.max_p95_ratio,
        shadow=target.shadow.to_dict() if target.shadow is not None else None,
    )


class DesiredStateHandler:
    """One per link; called from the link's worker thread only."""

    def __init__(
        self,
        agent: AgentPort,
        device_id: str,
        trusted: list[ec.EllipticCurvePublicKey],
        state_path: Path,
        report: Report,
        current_since: CurrentSince | None = None,
        on_desired: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.agent = agent
        # every verified desired state, before it is acted on (agent.capture reads its captures)
        self.on_desired = on_desired
        self.device_id = device_id
        self.trusted = trusted
        self.state_path = state_path
        self.report = report
        self.current_since = current_since or (lambda name, version: None)
        self.ignored: dict[str, int] = {}  # reason code -> count of desired states ignored
        self.regressions_reported: list[int] = []  # seqs reported as seq_regressed (bounded)
        # model -> version being installed; an update the agent resumed after a restart is not
        # submitted again by a retry of the same desired state.
        self.in_flight: dict[str, str] = dict(agent.unfinished_installs())
        installed = serving_versions(agent.inventory())
        self.state = LinkState.load(state_path, expected=bool(installed))
        if self.state.problem is not None:
            log.warning("link state: %s", self.state.problem)
            self._rejected(
                ReasonCode.LINK_STATE_LOST,
                f"the record of the highest desired seq: {self.state.problem}; downgrades are"
                " judged against the installed versions",
                self.state.last_seq,
                figures={
                    "problem": self.state.problem,
                    "last_seq": self.state.last_seq,
                    "seq_lost": self.state.seq_lost,
                },
            )
            self.state.save(state_path)  # both copies sound again, holding what was recovered

    def _ignore(self, code: str, message: str) -> None:
        self.ignored[code] = self.ignored.get(code, 0) + 1
        log.warning("desired state ignored (%s): %s", code, message)

    def _rejected(
        self,
        code: ReasonCode,
        reason: str,
        seq: int | None = None,
        *,
        figures: JsonObject | None = None,
    ) -> None:
        self.report(
            StatusReport(
                device_id=self.device_id,
                at=now_iso(),
                kind="desired_rejected",
                state=None,
                reason_code=code,
                reason=reason,
                desired_seq=seq,
                figures=figures,
            )
        )

    def _regressed(self, raw: bytes, last_seq: int) -> None:
        """A signed state at or below the last seq: the same state again (a retained message
        redelivered) is nothing; a lower one is reported once per seq."""
        try:  # verified again only to read its seq (its expiry does not matter here)
            old = verify_desired(
                raw, self.trusted, device_id=self.device_id, last_seq=None, now=_EPOCH
            )
        except RejectError:
            return
        seq = int(old["seq"])
        if seq >= last_seq or seq in self.regressions_reported:
            return
        self.regressions_reported = [*self.regressions_reported[-63:], seq]
        self._rejected(
            ReasonCode.SEQ_REGRESSED,
            f"desired seq {seq} is below {last_seq}, the highest this device has acted on:"
            " a replay, or the controller's sequence went backwards; a state above"
            f" {last_seq} is needed",
            seq,
            figures={"last_seq": last_seq, "received_seq": seq},
        )

    def _stale(self, name: str, target: str | None, issued: datetime, seq: int) -> str | None:
        """Why a state issued at ``issued`` may not take ``name`` below (``target``) or away
        from (None) the version serving now, or None when it may."""
        serving = serving_versions(self.agent.inventory()).get(name)
        if serving is None or (target is not None and not is_downgrade(target, serving)):
            return None
        since = self.current_since(name, serving)
        # issued_at has whole seconds: a state issued in the second serving began is not older
        if since is None or issued.timestamp() + 1.0 > since:
            return None
        what = f"take {name} from {serving} to {target}" if target else f"remove {name} {serving}"
        started = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
        return (
            f"desired seq {seq} would {what}, but was issued at"
            f" {issued.isoformat(timespec='seconds')}, before {serving} started serving here"
            f" ({started}): a replayed state, refused"
        )

    def _update_report(
        self,
        model: str,
        version: str,
        state: UpdateState,
        reason: str,
        seq: int,
        *,
        code: ReasonCode | str | None,
        rollout_id: str | None,
        already: bool = False,
    ) -> None:
        self.report(
            StatusReport(
                device_id=self.device_id,
                at=now_iso(),
                kind="update",
                state=state,
                model=model,
                version=version,
                reason_code=code,
                reason=reason,
                rollout_id=rollout_id,
                desired_seq=seq,
                already_installed=already,
            )
        )

    def handle(self, raw: bytes) -> None:
        if not raw:
            return  # retained message cleared by the controller
        try:
            desired = verify_desired(
                raw, self.trusted, device_id=self.device_id, last_seq=self.state.last_seq
            )
        except ReplayError as e:
            self.ignored[e.code.value] = self.ignored.get(e.code.value, 0) + 1
            if self.state.last_seq is not None:
                self._regressed(raw, self.state.last_seq)
            return
        except RejectError as e:
            self._ignore(e.code.value, e.message)
            self._rejected(e.code, e.message)
            return
        except ValueError as e:
            self._ignore(ReasonCode.MALFORMED.value, str(e))
            return
        seq = int(desired["seq"])
        if self.on_desired is not None:
            try:
                self.on_desired(desired)
            except Exception:
                log.exception("desired state observer failed")
        try:
            targets = parse_targets(desired)
            removals = parse_removals(desired)
            issued = parse_time(str(desired["issued_at"]))
        except (DesiredStateError, ValueError) as e:
            self.state.last_seq = seq
            self.state.save(self.state_path)
            self._ignore(ReasonCode.MANIFEST_INVALID.value, str(e))
            self._rejected(ReasonCode.MANIFEST_INVALID, str(e), seq)
            return
        # A seq above one this device acted on proves the state is newer than every state it
        # saw, so the seq decides; only a device with no seq history left (its link state
        # lost) falls back on when the serving version started serving.
        seq_history = (self.state.last_seq or 0) > 0
        # Persist the seq before acting: a crash after this never acts twice on one state;
        # the agent's own state machine resumes an update it had accepted.
        self.state.last_seq = seq
        for t in targets:
            self.state.rollouts[f"{t.name}@{t.version}"] = t.rollout_id
        desired_names = {t.name for t in targets}
        self.state.removed = [n for n in self.state.removed if n not in desired_names]
        self.state.save(self.state_path)
        if not seq_history:
            targets, removals = self._refuse_stale(targets, removals, issued, seq)
        # A candidate in shadow learns first whether it is still wanted, promoted or dropped.
        for t in targets:
            self.agent.steer_shadow(t.name, t.version, t.shadow is not None)
        for name in removals:
            self.agent.steer_shadow(name, None, False)
        installed = serving_versions(self.agent.inventory())
        in_flight = dict(self.in_flight)
        for action in plan(targets, installed, in_flight):
            t = action.target
            if action.kind == "report":
                self._update_report(
                    t.name,
                    t.version,
                    UpdateState.COMMITTED,
                    action.reason,
                    seq,
                    code=ReasonCode.ALREADY_INSTALLED,
                    rollout_id=t.rollout_id,
                    already=True,
                )
            else:
                self._install(t, seq, action.reason)
        for name in plan_removals(removals, installed, in_flight, self.state.removed):
            self._remove(name, installed.get(name) or in_flight.get(name), seq)

    def _refuse_stale(
        self, targets: list[ModelTarget], removals: list[str], issued: datetime, seq: int
    ) -> tuple[list[ModelTarget], list[str]]:
        """The targets and removals left once those a replayed state asks for are refused."""
        keep: list[ModelTarget] = []
        for t in targets:
            why = self._stale(t.name, t.version, issued, seq)
            if why is None:
                keep.append(t)
                continue
            self._ignore(ReasonCode.REPLAYED.value, why)
            self._rejected(ReasonCode.REPLAYED, why, seq, figures=_stale_figures(t.name, t.version))
        kept_removals: list[str] = []
        for name in removals:
            why = self._stale(name, None, issued, seq)
            if why is None:
                kept_removals.append(name)
                continue
            self._ignore(ReasonCode.REPLAYED.value, why)
            self._rejected(ReasonCode.REPLAYED, why, seq, figures=_stale_figures(name, None))
        return keep, kept_removals

    def _install(self, target: ModelTarget, seq: int, why: str) -> None:
        log.info("desired seq %d: %s", seq, why)
        try:
            self.in_flight[target.name] = target.version
            self.agent.submit_update(make_update_request(target))
        except Exception as e:  # refused before it was journaled: say so, do not crash
            self.in_flight.pop(target.name, None)
            if isinstance(e, RejectError):
                code: ReasonCode | str = e.code
                message = e.message
            else:
                code, message = ReasonCode.SUBMIT_REFUSED, f"{type(e).__name__}: {e}"
            self._update_report(
                target.name,
                target.version,
                UpdateState.FAILED,
                message,
                seq,
                code=code,
                rollout_id=target.rollout_id,
            )

    def _remove(self, name: str, version: str | None, seq: int) -> None:
        """Queue an explicit removal; its REMOVED event is reported like any other status, with
        the rollout that installed the model when the link knows it."""
        log.info("desired seq %d: remove %s %s", seq, name, version or "(not installed)")
        rollout_id = self.state.rollouts.get(f"{name}@{version}") if version else None
        try:
            self.agent.remove_model(name, rollout_id=rollout_id)
        except Exception as e:
            self._update_report(
                name,
                version or "",
                UpdateState.FAILED,
                f"{type(e).__name__}: {e}",
                seq,
                code=ReasonCode.REMOVE_REFUSED,
                rollout_id=rollout_id,
            )
            return
        # Journaled by the agent now (it finishes after a restart): confirmed on this side.
        if name not in self.state.removed:
            self.state.removed.append(name)
            self.state.removed = self.state.removed[-64:]
            self.state.save(self.state_path)

    def finished(self, model: str, version: str) -> None:
        """An update reached a terminal state: it is no longer in flight."""
        if self.in_flight.get(model) == version:
            self.in_flight.pop(model, None)


def _stale_figures(model: str, version: str | None) -> JsonObject:
    out: dict[str, Any] = {"model": model, "version": version}
    return out
