"""The rollout tick, once for both drivers: observation → `machine.step` → what to apply, record and probe.

A driver (the operator's timer, or `anneal run`'s loop) calls `tick` about once a second
with what it observed — the router's ``/-/stats`` window since the current step began (or
why it could not be read), the labelled probe answers collected over the same span, and a
manual command — and then acts on the `Tick`: apply `weights` (when not None), emit
`events`, hand `registry` to the MLflow tracker, point its probe loop at `probes`, and
persist `status`. Nothing here reads or writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from anneal.api.service import ModelServiceSpec, ModelServiceStatus
from anneal.rollout import machine
from anneal.rollout.analysis import ProbeResults, StatsWindow
from anneal.rollout.machine import ACTIVE, Command, Event, Reason

__all__ = ["Observation", "ProbePlan", "RegistryAction", "Tick", "registry_actions", "stats_since", "tick"]


@dataclass(frozen=True)
class Observation:
    """What a driver saw this tick.

    Attributes:
        stats: the JSON of ``GET {endpoint}/-/stats?since=stats_since(status)``; None when
            it could not be read (or the app is not serving), with `unavailable` saying why.
        unavailable: why there are no stats (e.g. ``Serve app ns_x: DEPLOYING``).
        probes: labelled probe answers per variant since the current step began.
        command: a manual override (CLI file or annotation) not acted on yet.
    """

    stats: Mapping[str, Any] | None = None
    unavailable: str | None = None
    probes: Mapping[str, ProbeResults] = field(default_factory=dict)
    command: Command | None = None


@dataclass(frozen=True)
class RegistryAction:
    """What MLflow should record: aliases, the rolled-back tag, the rollout run's metrics."""

    kind: Literal["started", "analysed", "promoted", "rolled_back"]
    candidate_model: str | None = None
    stable_model: str | None = None
    attempt: int = 1
    analysis: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    #: for ``started``: the gates every analysis checks, ``{"metric", "bound", "threshold"}``
    gates: tuple[dict[str, Any], ...] = ()
    #: for ``analysed``: the window's compared shadow pairs (`anneal.serve.shadow.Pair.sample`)
    pairs: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class ProbePlan:
    """Where the driver's probe loop should be: the step it measures (its start) and whether to send."""

    step_started_at: float | None
    active: bool


@dataclass(frozen=True)
class Tick:
    status: ModelServiceStatus
    weights: dict[str, int] | None
    events: list[Event]
    registry: list[RegistryAction]
    probes: ProbePlan
    #: Whether the command of the observation was acted on (False: ignored, with an event).
    command_accepted: bool | None = None


def stats_since(status: ModelServiceStatus) -> float | None:
    """The start of the stats window to ask the router for (None: the totals since start-up)."""
    rs = status.rollout
    return rs.step_started_at if rs is not None and status.phase in ACTIVE else None


def wants_probes(spec: ModelServiceSpec) -> bool:
    """Whether this service's analyses need labelled probes (an ``accuracy`` gate)."""
    return spec.rollout is not None and any(g.metric == "accuracy" for g in spec.rollout.analysis.gates)


def tick(
    spec: ModelServiceSpec,
    status: ModelServiceStatus,
    observation: Observation,
    now: float,
    desired_models: Mapping[str, str] | None = None,
) -> Tick:
    """One pass of a ModelService's rollout.

    Args:
        spec: the service spec as it is now.
        status: the status the last tick returned (read back from where the driver keeps it).
        observation: what the driver saw (see `Observation`).
        now: the driver's clock, unix seconds.
        desired_models: variant → resolved model URI (``fromResource`` references resolved).

    Returns:
        The `Tick`: new status, weights to apply, events, registry actions and the probe plan.
    """
    window = None
    if observation.stats is not None:
        window = StatsWindow.from_stats(observation.stats, observation.probes)
    t = machine.step(spec, status, window, now, observation.command, desired_models,
                     unavailable=observation.unavailable)
    accepted = None
    if observation.command is not None:
        accepted = not any(e.reason == Reason.COMMAND_IGNORED for e in t.events)
    return Tick(t.status, t.weights, t.events, registry_actions(t.events, t.status),
                _probe_plan(spec, t.status), accepted)


def _probe_plan(spec: ModelServiceSpec, status: ModelServiceStatus) -> ProbePlan:
    rs, r = status.rollout, spec.rollout
    if r is None or rs is None or not wants_probes(spec):
        return ProbePlan(None, False)
    current = r.steps[rs.step] if rs.step < len(r.steps) else None
    # Probes are wanted when an analysis can run: the candidate takes traffic or an analysis step waits.
    active = (
        status.phase in ACTIVE
        and (status.weights.get(r.candidate, 0) > 0 or (current is not None and current.analysis is not None))
        and rs.paused_reason != "AnalysisFailed"
    )
    return ProbePlan(rs.step_started_at, active)


def registry_actions(events: list[Event], status: ModelServiceStatus) -> list[RegistryAction]:
    """What MLflow should record for the events of one step."""
    rs = status.rollout
    out: list[RegistryAction] = []
    for ev in events:
        d = ev.data
        if ev.reason in (Reason.STARTED, Reason.RESTARTED, Reason.RETRIED):
            out.append(RegistryAction("started", d.get("candidate_model"), d.get("stable_model"),
                                      int(d.get("attempt") or 1), gates=tuple(d.get("gates") or ())))
        elif ev.reason in (Reason.ANALYSIS_PASSED, Reason.ANALYSIS_FAILED, Reason.ANALYSIS_WAITING):
            out.append(RegistryAction("analysed", analysis=dict(d.get("analysis") or {}),
                                      pairs=tuple(d.get("pairs") or ())))
        elif ev.reason == Reason.PROMOTED:
            out.append(RegistryAction("promoted", d.get("candidate_model"),
                                      reason=str(rs.reason or "") if rs is not None else ""))
        elif ev.reason == Reason.ROLLED_BACK:
            out.append(RegistryAction("rolled_back", d.get("candidate_model"), reason=str(d.get("why") or "rolled back")))
    return out
