"""The rollout state machine: (spec, status, stats window, now, command) → (status, weights, events).

Pure: it reads nothing and touches nothing. The embedded driver and the operator call
`step` about once a second, apply the weights it returns (when not None) through the
router's ``reconfigure``, record the events, and persist the status it returns.

Life of a rollout (see docs/rollouts.md):

* It **starts** when the candidate variant's model differs from the one the last rollout
  was for (or the candidate is new): stable takes the whole pool, the candidate 0, step 0.
* Each call completes **at most one step**: ``setWeight`` applies the weight; a timed
  ``pause`` ends once its duration has passed since the step began; ``pause: {}`` waits for a
  promote; ``analysis`` waits for a passing analysis.
* **Analyses** run every ``analysis.interval`` while the candidate takes traffic (and on an
  ``analysis`` step), over the window since the current step began. ``failureLimit + 1``
  failed analyses in a row roll back (``autoRollback``) or pause the rollout.
* It **ends** ``Promoted`` (the candidate takes the whole pool; the variant names stay as
  written — make the candidate the new stable by editing the spec) or ``RolledBack``
  (stable takes the whole pool, candidate 0).

"Pool" is the share the stable and candidate hold together: 100 minus the declared weights
of any other variants, which the rollout leaves alone. ``setWeight: N`` gives the candidate
N% of the pool (N% of all traffic when the service has only these two variants).

* Without evidence (no stats window, or a partial one) it **holds**: no step advances and no
  analysis runs; after ``progressDeadline`` of holding it is rolled back with the reason.

Its state is `status.rollout` (`RolloutStatus`, every field declared so the CRD keeps it):
``candidate``, ``stable`` (variant names the rollout is for), ``stepsHash``,
``lastAnalysisAt``, ``pausedReason`` (PauseStep | WaitingForPromote | AnalysisFailed),
``attempt``, ``startedAt``, ``finishedAt``, ``reason`` (why it ended), ``analyses`` (count),
``holding``/``holdingSince`` and ``handledCommands`` (annotation → value already acted on).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Mapping

from anneal.api.common import parse_duration
from anneal.api.service import (
    AnalysisResult,
    GateCheck,
    ModelServiceSpec,
    ModelServiceStatus,
    RolloutStatus,
    RolloutStep,
    ServicePhase,
)
from anneal.rollout.analysis import ProbeResults, StatsWindow, evaluate

__all__ = [
    "HISTORY_LIMIT",
    "Command",
    "Event",
    "Phase",
    "ProbeResults",
    "Reason",
    "StatsWindow",
    "Transition",
    "candidate_share",
    "rollout_weights",
    "step",
]

HISTORY_LIMIT = 50


class Phase:
    """The ModelService phases a rollout moves through (`anneal.api.service.ServicePhase`'s values)."""

    READY = ServicePhase.READY.value
    ROLLING_OUT = ServicePhase.ROLLING_OUT.value
    PAUSED = ServicePhase.PAUSED.value
    PROMOTED = ServicePhase.PROMOTED.value
    ROLLED_BACK = ServicePhase.ROLLED_BACK.value


ACTIVE = (Phase.ROLLING_OUT, Phase.PAUSED)
TERMINAL = (Phase.PROMOTED, Phase.ROLLED_BACK)


class Reason:
    """Event reasons (the `reason` of a Kubernetes event)."""

    STARTED = "RolloutStarted"
    RESTARTED = "RolloutRestarted"
    RETRIED = "RolloutRetried"
    WEIGHT_SET = "WeightSet"
    PAUSED = "Paused"
    WAITING_FOR_PROMOTE = "WaitingForPromote"
    PAUSE_ENDED = "PauseEnded"
    STEP_PROMOTED = "StepPromoted"
    ANALYSIS_PASSED = "AnalysisPassed"
    ANALYSIS_FAILED = "AnalysisFailed"
    ANALYSIS_WAITING = "AnalysisWaiting"
    ROLLOUT_PAUSED = "RolloutPaused"
    PROMOTED = "RolloutPromoted"
    ROLLED_BACK = "RolledBack"
    ABORTED = "RolloutAborted"
    STEPS_CHANGED = "StepsChanged"
    CLOCK_SKEW = "ClockWentBackwards"
    COMMAND_IGNORED = "CommandIgnored"
    REMOVED = "RolloutRemoved"
    HOLDING = "RolloutHolding"
    RESUMED = "RolloutResumed"


CommandKind = Literal["promote", "abort", "retry"]


@dataclass(frozen=True)
class Command:
    """A manual override.

    Attributes:
        kind: ``promote`` (skip the current step — a pause, a waiting or failed analysis;
            with ``full`` end Promoted now), ``abort`` (roll back now), ``retry`` (start a
            rolled-back or failure-paused rollout again from step 0).
        full: with ``promote``: skip every remaining step.
        reason: free text recorded in events and in the rollback reason.
        source: where it came from, e.g. ``("anneal.dev/promote", "2")`` for an annotation;
            the machine records annotation sources in ``handledCommands`` so the same value
            is acted on once.
    """

    kind: CommandKind
    full: bool = False
    reason: str = ""
    source: tuple[str, str] | None = None


@dataclass(frozen=True)
class Event:
    """Something worth a Kubernetes event and a log line."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Transition:
    """The result of one `step`: the new status, weights to apply (None: unchanged), events."""

    status: ModelServiceStatus
    weights: dict[str, int] | None
    events: list[Event]


# ----------------------------------------------------------------------------- helpers


def _iso(now: float) -> str:
    try:
        return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return str(now)


def steps_hash(steps: list[RolloutStep]) -> str:
    body = json.dumps([s.to_dict() for s in steps], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def pool(spec: ModelServiceSpec) -> int:
    """The share stable and candidate hold together (100 minus the other variants' weights)."""
    assert spec.rollout is not None
    declared = spec.weights()
    others = sum(w for n, w in declared.items() if n not in (spec.rollout.stable, spec.rollout.candidate))
    return max(0, 100 - others)


def rollout_weights(spec: ModelServiceSpec, candidate_percent: int) -> dict[str, int]:
    """All variants' weights with the candidate at `candidate_percent`% of the pool."""
    assert spec.rollout is not None
    r = spec.rollout
    weights = spec.weights()
    share = pool(spec)
    cand = int(round(share * max(0, min(100, candidate_percent)) / 100))
    weights[r.candidate] = cand
    weights[r.stable] = share - cand
    return weights


def candidate_share(spec: ModelServiceSpec, weights: Mapping[str, int]) -> int:
    """The candidate's current weight as a percent of the pool."""
    assert spec.rollout is not None
    share = pool(spec)
    return int(round(100 * weights.get(spec.rollout.candidate, 0) / share)) if share else 0


def summary(weights: Mapping[str, int]) -> str:
    return " / ".join(f"{name} {w}" for name, w in weights.items())


def desired_model(spec: ModelServiceSpec, variant: str, desired_models: Mapping[str, str] | None) -> str:
    """The model a variant should serve: from `desired_models` (resolved by the caller) or the spec."""
    if desired_models and variant in desired_models:
        return desired_models[variant]
    v = spec.variant(variant)
    return v.model.describe() if v.model is not None else (v.served_model() or "")


class _Pass:
    """Mutable working state of one `step` call."""

    def __init__(self, spec: ModelServiceSpec, status: ModelServiceStatus, now: float):
        self.spec = spec
        self.status = status
        self.now = now
        self.events: list[Event] = []
        self.weights: dict[str, int] = dict(status.weights)

    @property
    def rs(self) -> RolloutStatus:
        assert self.status.rollout is not None
        return self.status.rollout

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str, **data: Any) -> None:
        self.events.append(Event(type_, reason, message, data))

    def set_weights(self, weights: dict[str, int]) -> None:
        self.weights = dict(weights)

    def advance(self) -> None:
        self.rs.step += 1
        self.rs.step_started_at = self.now
        self.rs.paused_reason = None
        self.status.phase = Phase.ROLLING_OUT

    def finish(self, phase: str, reason: str) -> None:
        rs = self.rs
        r = self.spec.rollout
        assert r is not None
        rs.holding = rs.holding_since = None
        self.status.phase = phase
        rs.outcome = phase
        rs.paused_reason = None
        rs.finished_at = self.now
        rs.reason = reason
        if phase == Phase.PROMOTED:
            self.set_weights(rollout_weights(self.spec, 100))
            self.event("Normal", Reason.PROMOTED, f"candidate {r.candidate} ({rs.candidate_model}) promoted: {reason}",
                       candidate_model=rs.candidate_model)
        else:
            self.set_weights(rollout_weights(self.spec, 0))
            self.event("Warning", Reason.ROLLED_BACK,
                       f"rolled back to {r.stable}; candidate {r.candidate} ({rs.candidate_model}) at 0: {reason}",
                       candidate_model=rs.candidate_model, why=reason)


# -------------------------------------------------------------------------------- step


def step(
    spec: ModelServiceSpec,
    status: ModelServiceStatus,
    window: StatsWindow | None,
    now: float,
    command: Command | None = None,
    desired_models: Mapping[str, str] | None = None,
    unavailable: str | None = None,
) -> Transition:
    """Advance a ModelService's rollout by at most one step.

    Args:
        spec: the service spec as it is now (it may have been edited mid-rollout).
        status: the status the last call returned (or a fresh `ModelServiceStatus()`);
            never modified.
        window: the router's stats since `status.rollout.step_started_at` (with probe
            results), or None when they could not be read. Without a complete window (None,
            or `partial`) the rollout holds: no step advances, no analysis runs, and after
            `progressDeadline` of holding it is rolled back.
        now: the controller's clock, unix seconds.
        command: a manual override to apply in this call.
        desired_models: variant → model the spec asks for, when the caller resolved
            references (e.g. ``fromResource``) to URIs; default ``variant.model.describe()``.
        unavailable: why there is no window (the candidate is not serving yet, the stats
            endpoint failed), for the hold's message and the rollback reason.

    Returns:
        The new status, the weights to apply (None when unchanged) and the events.
    """
    st = status.model_copy(deep=True)
    p = _Pass(spec, st, now)
    r = spec.rollout
    if r is None:
        _without_rollout(p, command)
        return _done(p, status)

    candidate_model = desired_model(spec, r.candidate, desired_models)
    stable_model = desired_model(spec, r.stable, desired_models)
    started = _start_if_needed(p, candidate_model, stable_model)
    if not started and st.rollout is None:
        # The candidate already serves this model and no rollout ever ran: nothing to roll out.
        st.phase = Phase.READY
        p.set_weights(spec.weights())
        return _done(p, status)
    _track_steps(p)
    acted = _apply_command(p, command) if command is not None else False
    if not (started or acted):
        _advance(p, window, unavailable)
    return _done(p, status)


def _done(p: _Pass, before: ModelServiceStatus) -> Transition:
    st = p.status
    st.weights = dict(p.weights)
    st.weights_summary = summary(st.weights) if st.weights else None
    changed = p.weights != dict(before.weights)
    return Transition(st, dict(p.weights) if changed else None, p.events)


def _without_rollout(p: _Pass, command: Command | None) -> None:
    st = p.status
    if st.rollout is not None and st.phase in ACTIVE:
        st.rollout.reason = "rollout section removed from the spec"
        st.rollout.outcome = "Removed"
        p.event("Warning", Reason.REMOVED, "the rollout section was removed mid-rollout; declared weights apply")
    st.phase = Phase.READY
    p.set_weights(p.spec.weights())
    if command is not None:
        p.event("Warning", Reason.COMMAND_IGNORED, f"{command.kind}: the service has no rollout section")
        _mark_handled(p, command)


def _start_if_needed(p: _Pass, candidate_model: str, stable_model: str) -> bool:
    r = p.spec.rollout
    assert r is not None
    st = p.status
    rs = st.rollout
    if rs is None:
        if st.models.get(r.candidate) == candidate_model:
            return False
        reason, message = Reason.STARTED, f"candidate {r.candidate} is new ({candidate_model})"
    elif (
        rs.candidate_model == candidate_model
        and rs.candidate == r.candidate
        and rs.stable == r.stable
    ):
        return False
    elif st.phase in ACTIVE:
        reason, message = Reason.RESTARTED, (
            f"candidate changed mid-rollout ({rs.candidate_model} → {candidate_model}); starting again"
        )
    else:
        reason, message = Reason.STARTED, f"candidate {r.candidate} changed to {candidate_model}"
    _begin(p, candidate_model, stable_model, previous=rs, reason=reason, message=message)
    return True


def _begin(
    p: _Pass,
    candidate_model: str,
    stable_model: str,
    *,
    previous: RolloutStatus | None,
    reason: str,
    message: str,
) -> None:
    r = p.spec.rollout
    assert r is not None
    rs = RolloutStatus(
        step=0,
        step_started_at=p.now,
        candidate_model=candidate_model,
        consecutive_failures=0,
        last_analysis=previous.last_analysis if previous else None,
        history=list(previous.history) if previous else [],
    )
    rs.candidate = r.candidate
    rs.stable = r.stable
    rs.stable_model = stable_model
    rs.steps_hash = steps_hash(r.steps)
    rs.attempt = (previous.attempt or 0) + 1 if previous else 1
    rs.started_at = p.now
    rs.last_analysis_at = None
    rs.paused_reason = None
    rs.analyses = 0
    rs.handled_commands = dict(previous.handled_commands) if previous else {}
    p.status.rollout = rs
    p.status.phase = Phase.ROLLING_OUT
    p.status.models[r.candidate] = candidate_model
    p.status.models[r.stable] = stable_model
    p.set_weights(rollout_weights(p.spec, 0))
    p.status.message = message
    gates = [{"metric": g.metric, "bound": g.bound, "threshold": g.threshold} for g in r.analysis.effective_gates()]
    p.event("Normal", reason, message, candidate_model=candidate_model, stable_model=stable_model,
            attempt=rs.attempt, gates=gates)


def _track_steps(p: _Pass) -> None:
    """Notice edited steps; clamp the step index into the new list."""
    r = p.spec.rollout
    assert r is not None
    rs = p.rs
    digest = steps_hash(r.steps)
    if rs.steps_hash == digest:
        return
    rs.steps_hash = digest
    if p.status.phase not in ACTIVE:
        return
    message = f"steps changed mid-rollout ({len(r.steps)} steps now)"
    if rs.step >= len(r.steps) and r.steps:
        rs.step = len(r.steps) - 1
        rs.step_started_at = p.now
        message += f"; continuing at the last step ({rs.step})"
    p.event("Normal", Reason.STEPS_CHANGED, message)


def _mark_handled(p: _Pass, command: Command) -> None:
    if command.source is None or p.status.rollout is None:
        return
    handled = dict(p.status.rollout.handled_commands)
    key, value = command.source
    handled[key] = value
    p.status.rollout.handled_commands = handled


def _apply_command(p: _Pass, command: Command) -> bool:
    """Apply a manual command; True when it changed the rollout (the call ends there)."""
    st = p.status
    rs = p.rs
    r = p.spec.rollout
    assert r is not None
    _mark_handled(p, command)
    why = f" ({command.reason})" if command.reason else ""
    if command.kind == "abort":
        if st.phase in ACTIVE:
            p.event("Warning", Reason.ABORTED, f"rollout aborted by the user{why}")
            p.finish(Phase.ROLLED_BACK, f"aborted{why}")
            return True
    elif command.kind == "promote":
        if st.phase in ACTIVE:
            if command.full or rs.step >= len(r.steps) - 1:
                p.finish(Phase.PROMOTED, f"promoted by the user{why}")
                return True
            skipped = describe_step(r.steps[min(rs.step, len(r.steps) - 1)])
            rs.consecutive_failures = 0
            p.advance()
            p.event("Normal", Reason.STEP_PROMOTED, f"step {rs.step - 1} ({skipped}) skipped by the user{why}")
            return True
    elif command.kind == "retry":
        if st.phase == Phase.ROLLED_BACK or (st.phase == Phase.PAUSED and rs.paused_reason == "AnalysisFailed"):
            _begin(
                p, rs.candidate_model or "", rs.stable_model or "", previous=rs,
                reason=Reason.RETRIED, message=f"rollout of {rs.candidate_model} retried from step 0{why}",
            )
            return True
    p.event("Warning", Reason.COMMAND_IGNORED,
            f"{command.kind} ignored: the rollout is {st.phase}"
            + (" (retry a rolled-back or failure-paused rollout)" if command.kind == "retry" else ""))
    return False


def describe_step(s: RolloutStep) -> str:
    if s.set_weight is not None:
        return f"setWeight {s.set_weight}"
    if s.pause is not None:
        return "pause {}" if isinstance(s.pause, dict) else f"pause {s.pause}"
    return "analysis"


def _hold(p: _Pass, why: str) -> None:
    """No evidence this tick: nothing advances; past `progressDeadline` the rollout rolls back."""
    rs, r = p.rs, p.spec.rollout
    assert r is not None
    if rs.holding is None or rs.holding_since is None:
        rs.holding_since = p.now
        p.event("Warning", Reason.HOLDING, f"step {rs.step}: holding, no evidence: {why}")
    rs.holding = why
    deadline = parse_duration(r.progress_deadline)
    held = p.now - rs.holding_since
    if held >= deadline:
        p.finish(Phase.ROLLED_BACK, f"no evidence for {math.floor(held)}s (progressDeadline {r.progress_deadline}): {why}")
        return
    p.status.message = f"holding at step {rs.step} ({math.ceil(deadline - held)}s to progressDeadline): {why}"


def _advance(p: _Pass, window: StatsWindow | None, unavailable: str | None = None) -> None:
    st = p.status
    rs = p.rs
    r = p.spec.rollout
    assert r is not None
    if st.phase in TERMINAL:
        # Keep the outcome's weights even when other variants' declared weights changed.
        p.set_weights(rollout_weights(p.spec, 100 if st.phase == Phase.PROMOTED else 0))
        return
    if st.phase == Phase.PAUSED and rs.paused_reason == "AnalysisFailed":
        return  # waits for promote, abort or retry
    started_at = rs.step_started_at if rs.step_started_at is not None else p.now
    last = rs.last_analysis_at
    if p.now < started_at or (last is not None and p.now < last):
        # The clock went backwards: restart the step's timers from now, never advance.
        rs.step_started_at = p.now
        if last is not None and last > p.now:
            rs.last_analysis_at = None
        p.event("Warning", Reason.CLOCK_SKEW, "the clock went backwards; the current step's timers restart now")
        return
    if window is None or window.partial:
        _hold(p, unavailable or ("the stats are partial: a router replica did not answer"
                                 if window is not None else "the router's stats could not be read"))
        return
    if rs.holding is not None:
        p.event("Normal", Reason.RESUMED, f"step {rs.step}: evidence again after {p.now - (rs.holding_since or p.now):.0f}s")
        # The held time is not the step's: its pause and analysis timers start again.
        rs.step_started_at = started_at = p.now
        rs.holding = rs.holding_since = None
    if rs.step >= len(r.steps):
        p.finish(Phase.PROMOTED, "all steps completed")
        return
    current = r.steps[rs.step]
    if _analysis_due(p, current, started_at):
        if _analyse(p, window, current):
            return
    if current.set_weight is not None:
        p.set_weights(rollout_weights(p.spec, current.set_weight))
        p.advance()
        p.event("Normal", Reason.WEIGHT_SET, f"step {rs.step - 1}: candidate {r.candidate} at {current.set_weight}%",
                weights=dict(p.weights))
        st.message = f"candidate at {current.set_weight}%"
    elif isinstance(current.pause, str):
        duration = parse_duration(current.pause)
        left = started_at + duration - p.now
        if left <= 0:
            p.advance()
            p.event("Normal", Reason.PAUSE_ENDED, f"step {rs.step - 1}: pause {current.pause} over")
        else:
            if rs.paused_reason != "PauseStep":
                p.event("Normal", Reason.PAUSED, f"step {rs.step}: pausing {current.pause}")
            st.phase = Phase.PAUSED
            rs.paused_reason = "PauseStep"
            st.message = f"paused: {math.ceil(left)}s left of {current.pause}"
    elif current.pause is not None:
        if rs.paused_reason != "WaitingForPromote":
            p.event("Normal", Reason.WAITING_FOR_PROMOTE,
                    f"step {rs.step}: waiting for a promote (anneal rollout promote / annotation anneal.dev/promote)")
        st.phase = Phase.PAUSED
        rs.paused_reason = "WaitingForPromote"
        st.message = "paused: waiting for promote"
    else:
        st.phase = Phase.ROLLING_OUT
        interval = parse_duration(r.analysis.interval)
        anchor = max(started_at, rs.last_analysis_at if rs.last_analysis_at is not None else -math.inf)
        st.message = f"step {rs.step}: analysis, next in {max(0, math.ceil(anchor + interval - p.now))}s"


def _analysis_due(p: _Pass, current: RolloutStep, started_at: float) -> bool:
    r = p.spec.rollout
    assert r is not None
    rs = p.rs
    # Analyses run on an analysis step, and in the background while the candidate takes traffic.
    if current.analysis is None and p.weights.get(r.candidate, 0) <= 0:
        return False
    interval = parse_duration(r.analysis.interval)
    anchor = max(started_at, rs.last_analysis_at if rs.last_analysis_at is not None else -math.inf)
    return p.now - anchor >= interval


def _analyse(p: _Pass, window: StatsWindow, current: RolloutStep) -> bool:
    """Run one analysis; True when it completed the step or ended/paused the rollout."""
    r = p.spec.rollout
    assert r is not None
    st, rs = p.status, p.rs
    outcome = evaluate(r.analysis, window, r.stable, r.candidate)
    rs.last_analysis_at = p.now
    rs.analyses = (rs.analyses or 0) + 1
    if outcome.verdict == "fail":
        rs.consecutive_failures += 1
    elif outcome.verdict == "pass":
        rs.consecutive_failures = 0
    result = AnalysisResult(
        time=_iso(p.now), step=rs.step, verdict=outcome.verdict, figures=outcome.figures,
        failed_gates=outcome.failed_gates, reason=outcome.reason,
        gates=[GateCheck.model_validate(g.to_check()) for g in outcome.gates], confidence=r.analysis.confidence,
    )
    result.consecutive_failures = rs.consecutive_failures
    result.candidate_weight = p.weights.get(r.candidate, 0)
    rs.last_analysis = result
    rs.history = (rs.history + [result])[-HISTORY_LIMIT:]
    limit = r.analysis.failure_limit
    # The compared pairs go to MLflow with the analysis, never into status (prompts, answers, size).
    data = {"analysis": result.to_dict(), "pairs": list(outcome.pair_samples)}
    if outcome.verdict == "pass":
        p.event("Normal", Reason.ANALYSIS_PASSED, f"step {rs.step}: analysis passed: {outcome.reason}", **data)
    elif outcome.verdict == "wait":
        p.event("Normal", Reason.ANALYSIS_WAITING, f"step {rs.step}: analysis inconclusive: {outcome.reason}", **data)
    else:
        p.event("Warning", Reason.ANALYSIS_FAILED,
                f"step {rs.step}: analysis failed ({rs.consecutive_failures}/{limit + 1}): {outcome.reason}", **data)
        if rs.consecutive_failures > limit:
            why = f"{', '.join(outcome.failed_gates)} failed {rs.consecutive_failures} analyses in a row: {outcome.reason}"
            if r.auto_rollback:
                p.finish(Phase.ROLLED_BACK, why)
            else:
                st.phase = Phase.PAUSED
                rs.paused_reason = "AnalysisFailed"
                st.message = f"paused after failed analyses (autoRollback off): {why}"
                p.event("Warning", Reason.ROLLOUT_PAUSED,
                        f"{why}; autoRollback is off: promote to go on, abort to roll back")
            return True
    if current.analysis is not None and outcome.verdict == "pass":
        p.advance()
        st.message = f"step {rs.step - 1}: analysis passed"
        return True
    return False
