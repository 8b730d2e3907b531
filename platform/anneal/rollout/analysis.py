"""Analysis gates of a rollout: pure evaluation of per-variant figures in a stats window.

The window is what the router's ``GET /-/stats?since=T`` reports for the requests that
finished since the current rollout step began (contract 1 of the serving app) — routed
requests, mirrored (shadow) requests and the pairs of mirrored and user-facing answers — plus
the labelled probe results the controller collected itself over the same span.

Rate gates (`anneal.api.service.RATE_METRICS`) are decided on a confidence interval
(`anneal.rollout.statistics`); latency gates on their figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from anneal.api.service import RATE_METRICS, Analysis, Gate
from anneal.rollout.statistics import Interval, newcombe_difference, wilson

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
class PairWindow:
    """Mirrored answers of one variant paired with the answers users got from another, in the window."""

    mirrored: int = 0
    shadow_errors: int = 0
    pairs: int = 0
    agreements: int = 0
    latency_ratio_p50: float | None = None
    samples: tuple[dict[str, Any], ...] = ()
    judged: int = 0
    wins: int = 0

    @classmethod
    def from_stats(cls, figures: Mapping[str, Any] | None) -> "PairWindow":
        figures = figures or {}
        ratio = figures.get("latencyRatioP50")
        return cls(
            mirrored=int(figures.get("mirrored") or 0),
            shadow_errors=int(figures.get("shadowErrors") or 0),
            pairs=int(figures.get("pairs") or 0),
            agreements=int(figures.get("agreements") or 0),
            latency_ratio_p50=float(ratio) if isinstance(ratio, (int, float)) else None,
            samples=tuple(figures.get("samples") or ()),
            judged=int(figures.get("judged") or 0),
            wins=int(figures.get("wins") or 0),
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
    #: mirrored (shadow) requests per variant over the window
    shadow: dict[str, VariantWindow] = field(default_factory=dict)
    #: (shadow variant, primary variant) → the pairs of their answers over the window
    pairs: dict[tuple[str, str], PairWindow] = field(default_factory=dict)

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
        shadow = {
            # `window` when the stats were asked with `since`; the totals themselves otherwise
            name: VariantWindow.from_stats((body or {}).get("window") if since is not None else body)
            for name, body in (payload.get("shadow") or {}).items()
        }
        pairs = {
            (shadow_name, primary): PairWindow.from_stats(figures)
            for shadow_name, by_primary in (payload.get("pairs") or {}).items()
            for primary, figures in (by_primary or {}).items()
        }
        return cls(
            time=float(payload.get("time") or 0.0),
            since=float(since) if since is not None else None,
            variants=variants,
            probes=dict(probes or {}),
            # Some router replica did not answer: its requests are missing from the figures.
            partial=bool(payload.get("partial")),
            shadow=shadow,
            pairs=pairs,
        )

    def variant(self, name: str) -> VariantWindow:
        return self.variants.get(name) or VariantWindow()


@dataclass(frozen=True)
class GateResult:
    """One gate checked: its figure (None when the window cannot tell yet), for a rate gate the
    confidence interval it was decided on, and the gate's verdict."""

    metric: str
    bound: Literal["max", "min"]
    threshold: float
    value: float | None
    verdict: Verdict
    low: float | None = None
    high: float | None = None
    samples: int | None = None

    @property
    def passed(self) -> bool | None:
        """True (pass), False (fail) or None (cannot tell yet)."""
        return {"pass": True, "fail": False}.get(self.verdict)

    def describe(self) -> str:
        sign = "<=" if self.bound == "max" else ">="
        value = "n/a" if self.value is None else _fmt(self.value)
        interval = ""
        if self.low is not None and self.high is not None:
            interval = f" [{_fmt(self.low)}, {_fmt(self.high)}] over {self.samples}"
        return f"{self.metric} {value}{interval} (want {sign} {_fmt(self.threshold)})"

    def to_check(self) -> dict[str, Any]:
        """As `anneal.api.service.GateCheck` fields (camelCase, what status and MLflow keep)."""
        out: dict[str, Any] = {"metric": self.metric, "bound": self.bound, "threshold": self.threshold,
                               "value": self.value, "verdict": self.verdict}
        for key in ("low", "high", "samples"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class AnalysisOutcome:
    """The result of one analysis: verdict, the figures it saw and why."""

    verdict: Verdict
    figures: dict[str, float | None]
    failed_gates: list[str]
    reason: str
    gates: list[GateResult] = field(default_factory=list)
    #: compared pairs of the window (disagreements first), for the rollout's MLflow run
    pair_samples: tuple[dict[str, Any], ...] = ()


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) >= 1:
        return str(int(value))
    return f"{value:.3g}"


def _answered(window: StatsWindow, variant: str) -> tuple[int, int]:
    """(requests, errors) a variant answered in the window: routed and mirrored together."""
    routed, mirrored = window.variant(variant), window.shadow.get(variant) or VariantWindow()
    return routed.requests + mirrored.requests, routed.errors + mirrored.errors


def figures_of(window: StatsWindow, stable: str, candidate: str) -> dict[str, float | None]:
    """Every figure a gate can use (and a few for the record), by camelCase name.

    The candidate's `errorRate` counts every request it answered, routed and mirrored (a
    mirrored request is a real user's request); `requests` the routed ones, `shadowRequests`
    the mirrored ones. Its `latencyP95Ms` is that of routed requests, or of mirrored ones when
    it took no routed traffic (a shadow-only stage).
    """
    cand = window.variant(candidate)
    stab = window.variant(stable)
    mirrored = window.shadow.get(candidate) or VariantWindow()
    pairs = window.pairs.get((candidate, stable)) or PairWindow()
    cand_probes = window.probes.get(candidate, ProbeResults())
    stab_probes = window.probes.get(stable, ProbeResults())
    answered, errors = _answered(window, candidate)
    error_rate = errors / answered if answered else None
    stable_rate = stab.error_rate
    vs_stable = None
    if error_rate is not None:
        # With no stable traffic in the window the comparison is against a perfect stable.
        vs_stable = error_rate - (stable_rate or 0.0)
    latency = cand.latency_p95_ms if cand.requests else mirrored.latency_p95_ms
    return {
        "requests": float(cand.requests),
        "errors": float(errors),
        "errorRate": error_rate,
        "latencyP95Ms": latency,
        "errorRateVsStable": vs_stable,
        "accuracy": cand_probes.accuracy,
        "probes": float(cand_probes.total),
        "shadowRequests": float(mirrored.requests),
        "shadowPairs": float(pairs.pairs),
        "shadowAgreement": pairs.agreements / pairs.pairs if pairs.pairs else None,
        "shadowErrorRate": pairs.shadow_errors / pairs.mirrored if pairs.mirrored else None,
        "shadowLatencyRatio": pairs.latency_ratio_p50,
        "judgeWinRate": pairs.wins / pairs.judged if pairs.judged else None,
        "judged": float(pairs.judged),
        "stableRequests": float(stab.requests),
        "stableErrorRate": stable_rate,
        "stableLatencyP95Ms": stab.latency_p95_ms,
        "stableAccuracy": stab_probes.accuracy,
    }


def rate_interval(metric: str, window: StatsWindow, stable: str, candidate: str,
                  confidence: float) -> Interval | None:
    """The confidence interval of a rate gate's figure; None when it has no sample yet."""
    if metric in ("errorRate", "errorRateVsStable"):
        answered, errors = _answered(window, candidate)
        if not answered:
            return None
        if metric == "errorRate":
            return wilson(errors, answered, confidence)
        stab = window.variant(stable)
        return newcombe_difference(errors, answered, stab.errors, stab.requests, confidence)
    if metric == "accuracy":
        probes = window.probes.get(candidate, ProbeResults())
        return wilson(probes.correct, probes.total, confidence) if probes.total else None
    pairs = window.pairs.get((candidate, stable)) or PairWindow()
    if metric == "shadowAgreement":
        return wilson(pairs.agreements, pairs.pairs, confidence) if pairs.pairs else None
    if metric == "shadowErrorRate":
        return wilson(pairs.shadow_errors, pairs.mirrored, confidence) if pairs.mirrored else None
    if metric == "judgeWinRate":
        return wilson(pairs.wins, pairs.judged, confidence) if pairs.judged else None
    raise ValueError(f"{metric} is not a rate gate")


def check_gate(gate: Gate, figures: Mapping[str, float | None], min_probes: int,
               interval: Interval | None = None) -> GateResult:
    """Check one gate; ``wait`` when its figure is missing (or, for accuracy, too few probes).

    A rate gate given its `interval` is decided on it (pass: the whole interval on the right
    side of the threshold; fail: wholly on the wrong side; wait: it straddles); any other gate
    on its figure.
    """
    value = figures.get(gate.metric)
    if gate.metric == "accuracy" and (figures.get("probes") or 0) < min_probes:
        value = None  # too few labelled answers to judge quality yet
    if value is None:
        return GateResult(gate.metric, gate.bound, gate.threshold, None, "wait")
    if interval is not None:
        return GateResult(gate.metric, gate.bound, gate.threshold, value,
                          interval.decide(gate.bound, gate.threshold),
                          round(interval.low, 6), round(interval.high, 6), interval.samples)
    return GateResult(gate.metric, gate.bound, gate.threshold, value, "pass" if gate.holds(value) else "fail")


def evaluate(analysis: Analysis, window: StatsWindow, stable: str, candidate: str) -> AnalysisOutcome:
    """Run the gates of `analysis` over `window`.

    Rules, in order:
      1. fewer than `minRequests` candidate requests (routed and mirrored) in the window →
         `wait` (the figures are too thin to pass or fail anything);
      2. any gate that fails — a rate gate whose whole confidence interval is on the wrong
         side of its threshold, another gate whose figure is → `fail`;
      3. any gate that cannot be judged yet (its interval straddles the threshold, no latency
         yet, fewer than `probes.perInterval` labelled answers for `accuracy`) → `wait`;
      4. otherwise → `pass`.

    Returns:
        The outcome: verdict, figures, each gate's check, names of the failed gates, a
        one-line reason, and the window's compared pairs (disagreements first).
    """
    figures = figures_of(window, stable, candidate)
    routed = int(figures["requests"] or 0)
    requests = routed + int(figures["shadowRequests"] or 0)
    results = [
        check_gate(g, figures, analysis.probes.per_interval,
                   rate_interval(g.metric, window, stable, candidate, analysis.confidence)
                   if g.metric in RATE_METRICS else None)
        for g in analysis.effective_gates()
    ]
    samples = (window.pairs.get((candidate, stable)) or PairWindow()).samples
    if requests < analysis.min_requests:
        return AnalysisOutcome(
            "wait", figures, [],
            f"{requests} of {analysis.min_requests} candidate requests (minRequests) so far", results, samples,
        )
    failed = [r for r in results if r.verdict == "fail"]
    if failed:
        return AnalysisOutcome(
            "fail", figures, [r.metric for r in failed],
            "; ".join(r.describe() for r in failed), results, samples,
        )
    unknown = [r for r in results if r.verdict == "wait"]
    if unknown:
        return AnalysisOutcome(
            "wait", figures, [], "not decided yet: " + "; ".join(r.describe() for r in unknown), results, samples,
        )
    reason = "; ".join(r.describe() for r in results) if results else f"{requests} requests, no gates"
    return AnalysisOutcome("pass", figures, [], reason, results, samples)
