"""The Grafana dashboard shipped in the chart, and the operator's rollout metrics it draws.

The dashboard's queries are checked against the pages the real code serves: the operator's
`OperatorMetrics` over HTTP (its own server, on loopback) and the router's `/-/metrics` text
(`ServiceMetrics.prometheus_text`, the function the route returns). The live router page of a
running Serve app is checked in tests/integration/test_rollout.py, the live operator's in
tests/e2e/test_rollout_operator.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from anneal_operator.metrics import OperatorMetrics
from tests import dashboard

CHART = Path(__file__).resolve().parents[2] / "charts" / "anneal"


def _spec():
    from anneal.api import parse_manifest

    return parse_manifest({
        "apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": "svc"},
        "spec": {"variants": [{"name": "stable", "model": {"uri": "/m/a"}, "weight": 100},
                              {"name": "canary", "model": {"uri": "/m/b"}, "weight": 0}],
                 "rollout": {"stable": "stable", "candidate": "canary",
                             "steps": [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}],
                             "analysis": {"gates": [{"metric": "latencyP95Ms", "max": 500}]}}},
    }).spec


class _Status:
    def __init__(self, step, weights, outcome=None):
        self.weights = weights
        self.rollout = type("RS", (), {"step": step, "outcome": outcome})()


def _analysis(verdict, figures, failed=()):
    from anneal.rollout.machine import Event

    return Event("Normal", {"pass": "AnalysisPassed", "wait": "AnalysisWaiting", "fail": "AnalysisFailed"}[verdict],
                 "", {"analysis": {"verdict": verdict, "figures": figures, "failedGates": list(failed)}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _operator_page() -> str:
    """A real operator metrics server's /metrics after a few rollout passes."""
    m = OperatorMetrics()
    spec = _spec()
    m.observe_rollout("ns", "svc", spec, _Status(1, {"stable": 50, "canary": 50}),
                      [_analysis("pass", {"errorRate": 0.0, "latencyP95Ms": 120.0})])
    m.timed("ModelService", "reconcile")(lambda: None)()
    port = _free_port()
    server = m.serve(port, addr="127.0.0.1")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()


def _router_page() -> str:
    from anneal.serve.metrics import ServiceMetrics

    sm = ServiceMetrics(["stable", "canary"])
    sm.record("stable", 12.0, False, 5, 3)
    sm.record("canary", 30.0, True, 5, 0, shadow=True)
    sm.record_route("weighted")
    return sm.prometheus_text("svc", {"stable": 50, "canary": 50}).decode()


def test_every_query_names_a_metric_the_router_or_operator_exports():
    dash = dashboard.load()
    pages = [_operator_page(), _router_page()]
    assert dashboard.unknown_metrics(dash, pages) == []
    # The check can fail: a misspelt metric is reported with its panel.
    typo = {**dash, "panels": [{"type": "timeseries", "title": "typo",
                                "targets": [{"expr": "rate(anneal_serve_requsts_total[5m])"}]}]}
    assert dashboard.unknown_metrics(typo, pages) == [("typo", "anneal_serve_requsts_total")]


def test_the_dashboard_covers_what_people_look_for_and_lays_out_on_the_grid():
    dash = dashboard.load()
    drawn = dashboard.panels(dash)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    names = {m for _, q in dashboard.queries(dash) for m in dashboard.metric_names(q)}
    # traffic split, per-variant errors and latency, rollout step and gate verdicts, reconcile latency
    for metric in ("anneal_serve_weight", "anneal_serve_errors_total", "anneal_serve_latency_ms_bucket",
                   "anneal_operator_rollout_step", "anneal_operator_rollout_gate_passing",
                   "anneal_operator_rollout_gate_value", "anneal_operator_reconcile_seconds_bucket"):
        assert metric in names, metric
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in drawn:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]  # the user's Prometheus, chosen on import


def test_the_chart_ships_it_as_a_labelled_configmap():
    import yaml

    template = (CHART / "templates" / "dashboard.yaml").read_text()
    assert '.Files.Get "dashboards/anneal.json"' in template
    assert "{{ .Values.dashboards.label }}: {{ .Values.dashboards.labelValue | quote }}" in template
    values = yaml.safe_load((CHART / "values.yaml").read_text())["dashboards"]
    assert values == {"enabled": True, "label": "grafana_dashboard", "labelValue": "1", "folder": ""}


def test_operator_rollout_metrics_follow_the_analyses():
    m = OperatorMetrics()
    spec = _spec()
    get = m.registry.get_sample_value
    m.observe_rollout("ns", "svc", spec, _Status(1, {"stable": 50, "canary": 50}),
                      [_analysis("fail", {"errorRate": 0.0, "latencyP95Ms": 900.0}, ["latencyP95Ms"])])
    labels = {"namespace": "ns", "name": "svc"}
    assert get("anneal_operator_rollout_step", labels) == 1
    assert get("anneal_operator_rollout_weight", {**labels, "variant": "canary"}) == 50
    assert get("anneal_operator_rollout_gate_value", {**labels, "gate": "latencyP95Ms"}) == 900.0
    assert get("anneal_operator_rollout_gate_passing", {**labels, "gate": "latencyP95Ms"}) == 0
    assert get("anneal_operator_rollout_gate_passing", {**labels, "gate": "errorRate"}) == 1  # the default gate
    assert get("anneal_operator_rollout_gate_threshold", {**labels, "gate": "latencyP95Ms", "bound": "max"}) == 500
    # Per-gate checks (a rate gate's interval included) decide each gate on its own.
    checks = [{"metric": "errorRate", "bound": "max", "threshold": 0.05, "value": 0.0, "low": 0.0, "high": 0.04,
               "samples": 90, "verdict": "pass"},
              {"metric": "latencyP95Ms", "bound": "max", "threshold": 500, "value": 100.0, "verdict": "wait"}]
    ev = _analysis("wait", {"errorRate": 0.0, "latencyP95Ms": 100.0})
    ev.data["analysis"]["gates"] = checks
    m.observe_rollout("ns", "svc", spec, _Status(1, {"stable": 50, "canary": 50}), [ev])
    assert get("anneal_operator_rollout_gate_interval", {**labels, "gate": "errorRate", "end": "high"}) == 0.04
    assert get("anneal_operator_rollout_gate_passing", {**labels, "gate": "errorRate"}) == 1
    assert get("anneal_operator_rollout_gate_passing", {**labels, "gate": "latencyP95Ms"}) == 0  # waited: unchanged
    # A wait judges nothing: the figure moves, the verdict stays.
    m.observe_rollout("ns", "svc", spec, _Status(1, {"stable": 50, "canary": 50}),
                      [_analysis("wait", {"latencyP95Ms": 100.0})])
    assert get("anneal_operator_rollout_gate_value", {**labels, "gate": "latencyP95Ms"}) == 100.0
    assert get("anneal_operator_rollout_gate_passing", {**labels, "gate": "latencyP95Ms"}) == 0
    assert get("anneal_operator_rollout_analyses_total", {**labels, "verdict": "fail"}) == 1
    assert get("anneal_operator_rollout_analyses_total", {**labels, "verdict": "wait"}) == 2
    # Finished: no step; deleted: no series.
    m.observe_rollout("ns", "svc", spec, _Status(2, {"stable": 100, "canary": 0}, outcome="RolledBack"), [])
    assert get("anneal_operator_rollout_step", labels) == -1
    m.forget_rollout("ns", "svc")
    assert get("anneal_operator_rollout_step", labels) is None
    assert get("anneal_operator_rollout_gate_value", {**labels, "gate": "latencyP95Ms"}) is None
