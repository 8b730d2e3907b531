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
