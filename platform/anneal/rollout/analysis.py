"""Analysis gates of a rollout: pure evaluation of per-variant figures in a stats window.

The window is what the router's ``GET /-/stats?since=T`` reports for the requests that
finished since the current rollout step began (contract 1 of the serving app), plus the
labelled probe results the controller collected itself over the same span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from anneal.api.service import Analysis, Gate

Verdict = Literal["pass", "fail", "wait"]


@dataclass(frozen=True)
class VariantWindow:
    """One variant's figures over the window (requests that finished since `since`)."""

    requests: int = 0
    errors: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None

    @property
    def error_rate(self) -> float | None:
        """Errors / requests, or None when the variant served nothing in the window."""
        return self.errors / self.requests if self.requests else None

    @classmethod
    def from_stats(cls, figures: Mapping[str, Any] | None) -> "VariantWindow":
        """From one `window` (or `total`) object of `/-/stats`."""
        figures = figures or {}

        def num(key: str) -> float | None:
            value = figures.get(key)
            return float(value) if isinstance(value, (int, float)) else None

        return cls(
            requests=int(figures.get("requests") or 0),
            errors=int(figures.get("errors") or 0),
            latency_p50_ms=num("latencyP50Ms"),
            latency_p95_ms=num("latencyP95Ms"),
            latency_p99_ms=num("latencyP99Ms"),
        )


@dataclass(frozen=True)
class ProbeResults:
    """Labelled probe requests sent to one variant and how many it answered exactly."""

    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def __add__(self, other: "ProbeResults") -> "ProbeResults":
        return ProbeResults(self.correct + other.correct, self.total + other.total)


@dataclass(frozen=True)
class StatsWindow:
    """What the controller observed since the current step began.

    Attributes:
        time: the router's clock when the stats were read (unix seconds).
        since: start of the window (unix seconds), None for the totals since start-up.
        variants: per-variant figures over the window.
        probes: per-variant labelled probe results over the same span (from the controller).
    """

    time: float
    since: float | None
    variants: dict[str, VariantWindow] = field(default_factory=dict)
    probes: dict[str, ProbeResults] = field(default_factory=dict)
    partial: bool = False

    @classmethod
    def from_stats(
        cls, payload: Mapping[str, Any], probes: Mapping[str, ProbeResults] | None = None
    ) -> "StatsWindow":
        """Build from the JSON of ``GET /-/stats?since=T``: each variant's `window` object.

        When the payload has no `since` (the totals since start-up), `total` is used instead.
        """
        since = payload.get("since")
        key = "window" if since is not None else "total"
        variants = {
            name: VariantWindow.from_stats((body or {}).get(key))
            for name, body in (payload.get("variants") or {}).items()
        }
        return cls(
            time=float(payload.get("time") or 0.0),
            since=float(since) if since is not None else None,
            variants=variants,
            probes=dict(probes or {}),
            # Some router replica did not answer: its requests are missing from the figures.
            partial=bool(payload.get("partial")),
        )

    def variant(self, name: str) -> VariantWindow:
        return self.variants.get(name) or VariantWindow()


@dataclass(frozen=True)
class GateResult:
    """One gate checked: its figure (None when the window cannot tell yet) and the outcome."""

    metric: str
    bound: Literal["max", "min"]
    threshold: float
    value: float | None
    passed: bool | None

    def describe(self) -> str:
        sign = "<=" if self.bound == "max" else ">="
        value = "n/a" if self.value is None else _fmt(self.value)
        return f"{self.metric} {value} (want {sign} {_fmt(self.threshold)})"


@dataclass(frozen=True)
class AnalysisOutcome:
    """The result of one analysis: verdict, the figures it saw and why."""

    verdict: Verdict
    figures: dict[str, float | None]
    failed_gates: list[str]
    reason: str
    gates: list[GateResult] = field(default_factory=list)


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) >= 1:
        return str(int(value))
    return f"{value:.3g}"


def figures_of(window: StatsWindow, stable: str, candidate: str) -> dict[str, float | None]:
    """Every figure a gate can use (and a few for the record), by camelCase name."""
    cand = window.variant(candidate)
    stab = window.variant(stable)
    cand_probes = window.probes.get(candidate, ProbeResults())
    stab_probes = window.probes.get(stable, ProbeResults())
    stable_rate = stab.error_rate
    vs_stable = None
    if cand.error_rate is not None:
        # With no stable traffic in the window the comparison is against a perfect stable.
        vs_stable = cand.error_rate - (stable_rate or 0.0)
    return {
        "requests": float(cand.requests),
        "errors": float(cand.errors),
        "errorRate": cand.error_rate,
        "latencyP95Ms": cand.latency_p95_ms,
        "errorRateVsStable": vs_stable,
        "accuracy": cand_probes.accuracy,
        "probes": float(cand_probes.total),
        "stableRequests": float(stab.requests),
        "stableErrorRate": stable_rate,
        "stableLatencyP95Ms": stab.latency_p95_ms,
        "stableAccuracy": stab_probes.accuracy,
    }


def check_gate(gate: Gate, figures: Mapping[str, float | None], min_probes: int) -> GateResult:
    """Check one gate against the figures; undetermined (passed None) when the figure is missing."""
    value = figures.get(gate.metric)
    if gate.metric == "accuracy" and (figures.get("probes") or 0) < min_probes:
        value = None  # too few labelled answers to judge quality yet
    if value is None:
        return GateResult(gate.metric, gate.bound, gate.threshold, None, None)
    return GateResult(gate.metric, gate.bound, gate.threshold, value, gate.holds(value))


def evaluate(analysis: Analysis, window: StatsWindow, stable: str, candidate: str) -> AnalysisOutcome:
    """Run the gates of `analysis` over `window`.

    Rules, in order:
      1. fewer than `minRequests` candidate requests in the window → `wait` (the figures
         are too thin to pass or fail anything);
      2. any gate whose figure violates its threshold → `fail`;
      3. any gate that cannot be judged yet (no latency, fewer than `probes.perInterval`
         labelled answers for `accuracy`) → `wait`;
      4. otherwise → `pass`.

    Returns:
        The outcome: verdict, figures, names of the failed gates and a one-line reason.
    """
    figures = figures_of(window, stable, candidate)
    requests = int(figures["requests"] or 0)
    results = [check_gate(g, figures, analysis.probes.per_interval) for g in analysis.effective_gates()]
    if requests < analysis.min_requests:
        return AnalysisOutcome(
            "wait", figures, [],
            f"{requests} of {analysis.min_requests} candidate requests (minRequests) so far", results,
        )
    failed = [r for r in results if r.passed is False]
    if failed:
        return AnalysisOutcome(
            "fail", figures, [r.metric for r in failed],
            "; ".join(r.describe() for r in failed), results,
        )
    unknown = [r for r in results if r.passed is None]
    if unknown:
        return AnalysisOutcome(
            "wait", figures, [], "not enough data for " + ", ".join(r.metric for r in unknown), results,
        )
    reason = "; ".join(r.describe() for r in results) if results else f"{requests} requests, no gates"
    return AnalysisOutcome("pass", figures, [], reason, results)
