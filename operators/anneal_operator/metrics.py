"""Prometheus metrics of the operator: reconcile passes, latencies and errors per kind."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class OperatorMetrics:
    """One registry per operator instance (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "anneal_operator_reconciles", "Reconcile passes by kind and handler.",
            ["kind", "handler"], registry=self.registry,
        )
        self.errors = Counter(
            "anneal_operator_reconcile_errors", "Reconcile passes that raised, by kind, handler and error.",
            ["kind", "handler", "error"], registry=self.registry,
        )
        self.latency = Histogram(
            "anneal_operator_reconcile_seconds", "Duration of reconcile passes.",
            ["kind", "handler"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.submissions = Counter(
            "anneal_operator_submissions", "Ray submissions by kind and path (jobs-api, rayjob).",
            ["kind", "path", "outcome"], registry=self.registry,
        )
        self.phases = Counter(
            "anneal_operator_phase_transitions", "Phase changes by kind and new phase.",
            ["kind", "phase"], registry=self.registry,
        )
        self.leader = Gauge("anneal_operator_leader", "1 while this replica holds the Lease.", registry=self.registry)
        # Rollouts, per ModelService: where each stands and what its analyses decide.
        svc = ["namespace", "name"]
        self.rollout_step = Gauge(
            "anneal_operator_rollout_step", "Current rollout step (0-based) of a ModelService; -1 when none runs.",
            svc, registry=self.registry,
        )
        self.rollout_weight = Gauge(
            "anneal_operator_rollout_weight", "Weight (%) the rollout gives each variant.",
            [*svc, "variant"], registry=self.registry,
        )
        self.rollout_analyses = Counter(
            "anneal_operator_rollout_analyses", "Rollout analyses by verdict (pass, wait, fail).",
            [*svc, "verdict"], registry=self.registry,
        )
        self.rollout_gate_value = Gauge(
            "anneal_operator_rollout_gate_value", "A gate's figure at the last analysis that could judge it.",
            [*svc, "gate"], registry=self.registry,
        )
        self.rollout_gate_interval = Gauge(
            "anneal_operator_rollout_gate_interval",
            "Ends of a rate gate's confidence interval at the last analysis that measured it.",
            [*svc, "gate", "end"], registry=self.registry,
        )
        self.rollout_gate_threshold = Gauge(
            "anneal_operator_rollout_gate_threshold", "A gate's threshold.", [*svc, "gate", "bound"],
            registry=self.registry,
        )
        self.rollout_gate_passing = Gauge(
            "anneal_operator_rollout_gate_passing", "1 when a gate held at the last analysis that could judge it, else 0.",
            [*svc, "gate"], registry=self.registry,
        )

    def observe_rollout(self, namespace: str, name: str, spec: Any, status: Any, events: Any) -> None:
        """Record one rollout pass: the step and weights, each analysis' verdict, each gate's figure."""
        rs = status.rollout
        active = rs is not None and rs.outcome is None
        self.rollout_step.labels(namespace, name).set(rs.step if active else -1)
        for variant, weight in (status.weights or {}).items():
            self.rollout_weight.labels(namespace, name, variant).set(weight)
        r = spec.rollout
        gates = r.analysis.effective_gates() if r is not None else []
        for g in gates:
            self.rollout_gate_threshold.labels(namespace, name, g.metric, g.bound).set(g.threshold)
        for ev in events:
            analysis = (ev.data or {}).get("analysis") if ev.reason.startswith("Analysis") else None
            if not analysis:
                continue
            self.rollout_analyses.labels(namespace, name, analysis.get("verdict", "wait")).inc()
            figures = analysis.get("figures") or {}
            checks = {c.get("metric"): c for c in analysis.get("gates") or []}
            for g in gates:
                value = figures.get(g.metric)
                if value is None:
                    continue
                self.rollout_gate_value.labels(namespace, name, g.metric).set(value)
                check = checks.get(g.metric) or {}
                for end in ("low", "high"):
                    if check.get(end) is not None:
                        self.rollout_gate_interval.labels(namespace, name, g.metric, end).set(check[end])
                verdict = check.get("verdict")
                if not checks:  # an analysis without per-gate checks: its failed gates and verdict tell
                    verdict = "fail" if g.metric in (analysis.get("failedGates") or []) else (
                        "pass" if analysis.get("verdict") != "wait" else None)
                if verdict in ("pass", "fail"):  # a gate that waits judged nothing
                    self.rollout_gate_passing.labels(namespace, name, g.metric).set(verdict == "pass")

    def forget_rollout(self, namespace: str, name: str) -> None:
        """Drop a deleted service's series."""
        for metric in (self.rollout_step, self.rollout_weight, self.rollout_analyses, self.rollout_gate_value,
                       self.rollout_gate_interval, self.rollout_gate_threshold, self.rollout_gate_passing):
            for labels in list(metric._metrics):  # noqa: SLF001 - prometheus_client has no public "remove matching"
                if labels[:2] == (namespace, name):
                    metric.remove(*labels)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Start the /metrics HTTP server (a daemon thread); returns the server or None."""
        if port <= 0:
            return None
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def timed(self, kind: str, handler: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Wrap a handler: count it, time it, count its errors (kopf's retry errors included)."""

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def inner(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                self.reconciles.labels(kind, handler).inc()
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    self.errors.labels(kind, handler, type(exc).__name__).inc()
                    raise
                finally:
                    self.latency.labels(kind, handler).observe(time.perf_counter() - started)

            return inner

        return wrap
