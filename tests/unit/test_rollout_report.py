"""The rollout report: weights and gate figures over time, from the rollout's MLflow run.

The rendering tests are pure; the tracker test uses a real local SQLite MLflow store (marked
`integration`, as in test_rollout_aliases.py) and opens the logged HTML in a real headless
Chromium (tests/browser.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from anneal.api.service import Gate
from anneal.rollout.report import (
    AnalysisPoint,
    RolloutHistory,
    _parse_gate,
    gate_params,
    read_history,
    render_html,
    render_png,
)
from tests.browser import CHART_COLOURS, colour_share, non_white_share, screenshot


def _history(**kw) -> RolloutHistory:
    t0 = 1_000.0
    base = dict(
        run_id="r1", service="svc", outcome="RolledBack", reason="errorRate failed 2 analyses in a row",
        candidate="models:/m/2", stable="models:/m/1", started=t0, ended=t0 + 9,
        gates=[Gate(metric="errorRate", max=0.02), Gate(metric="accuracy", min=0.5)],
        weights={"stable": [(t0, 100), (t0 + 1, 50), (t0 + 9, 100)], "cand": [(t0, 0), (t0 + 1, 50), (t0 + 9, 0)]},
        analyses=[AnalysisPoint(0, t0 + 3, "wait", 1, 50, {"requests": 3}),
                  AnalysisPoint(1, t0 + 5, "fail", 1, 50, {"errorRate": 0.3, "accuracy": 0.75, "requests": 12}),
                  AnalysisPoint(2, t0 + 7, "fail", 1, 50, {"errorRate": 0.25, "accuracy": 0.25, "requests": 20})],
    )
    base.update(kw)
    return RolloutHistory(**base)


def test_gate_params_round_trip():
    params = gate_params([{"metric": "errorRate", "bound": "max", "threshold": 0.02},
                          {"metric": "accuracy", "bound": "min", "threshold": 0.5}])
    assert params == {"gate.errorRate": "max 0.02", "gate.accuracy": "min 0.5"}
    assert _parse_gate("errorRate", params["gate.errorRate"]) == Gate(metric="errorRate", max=0.02)
    assert _parse_gate("x", "between 1") is None and _parse_gate("x", "max lots") is None


def test_html_has_a_row_per_analysis_with_each_gate_judged():
    h = _history()
    page = render_html(h, render_png(h))
    assert page.count("<tr><td>") == 3  # three analyses
    assert "errorRate &lt;= 0.02, accuracy &gt;= 0.5" in page  # the gates, escaped
    # Each gate's cell is coloured by whether that figure holds: errorRate 0.3 fails, accuracy 0.75 holds.
    assert '<td class="fail">0.3</td><td class="pass">0.75</td>' in page
    assert '<td class="fail">fail</td>' in page and '<td class="wait">wait</td>' in page
    assert 'src="data:image/png;base64,' in page and "RolledBack" in page


def test_png_draws_both_weight_lines_and_a_panel_per_gate():
    from PIL import Image

    img = Image.open(io.BytesIO(render_png(_history()))).convert("RGB")
    one_gate = Image.open(io.BytesIO(render_png(_history(gates=[Gate(metric="errorRate", max=0.02)]))))
    assert img.height > one_gate.height and img.width == one_gate.width  # a panel per gate, stacked
    colours = set(img.getdata())
    for c in CHART_COLOURS:
        assert any(all(abs(a - b) <= 24 for a, b in zip(p, c)) for p in colours), c


def test_a_history_with_nothing_recorded_still_renders():
    h = _history(gates=[], weights={}, analyses=[], outcome="running", ended=None)
    page = render_html(h, render_png(h))
    assert "no analyses recorded" in page


@pytest.mark.integration
def test_a_finished_rollout_logs_a_report_that_renders_in_a_browser(tmp_path):
    from mlflow import MlflowClient

    from anneal.control.rollout import RegistryAction
    from anneal.rollout.aliases import RolloutTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("rollouts", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=str(tmp_path))
    client.set_registered_model_alias("m", "champion", "1")

    class Status:  # what the tracker reads of a ModelServiceStatus
        def __init__(self, weights, outcome=None):
            self.weights = weights
            self.rollout = type("RS", (), {"mlflow_run_id": None, "outcome": outcome})()

    t = RolloutTracker(uri, "rollouts", "svc")
    gates = ({"metric": "errorRate", "bound": "max", "threshold": 0.02},)
    t.apply([RegistryAction("started", "models:/m/2", "models:/m@champion", gates=gates)],
            Status({"stable": 100, "cand": 0}))
    run_id = t.run_id
    t.apply([], Status({"stable": 50, "cand": 50}))
    t.apply([], Status({"stable": 50, "cand": 50}))  # unchanged: not logged again
    for verdict, rate in [("wait", None), ("fail", 0.3), ("fail", 0.25)]:
        analysis = {"verdict": verdict, "step": 1, "candidateWeight": 50,
                    "figures": {"errorRate": rate, "requests": 12.0}}
        t.apply([RegistryAction("analysed", analysis=analysis)], Status({"stable": 50, "cand": 50}))
    t.apply([RegistryAction("rolled_back", "models:/m/2", reason="errorRate failed")],
            Status({"stable": 100, "cand": 0}, outcome="RolledBack"))
    t.wait_reports()  # drawn off the tick; a driver that stops waits for it like this

    assert {a.path for a in client.list_artifacts(run_id, "rollout")} == {"rollout/report.png", "rollout/report.html"}
    h = read_history(client, run_id)
    assert h.outcome == "RolledBack" and h.gates == [Gate(metric="errorRate", max=0.02)]
    assert [w for _, w in h.weights["cand"]] == [0, 50, 0]  # each change once, the final split included
    assert [a.verdict for a in h.analyses] == ["wait", "fail", "fail"]
    assert [a.figures.get("errorRate") for a in h.analyses] == [None, 0.3, 0.25]

    page = client.download_artifacts(run_id, "rollout/report.html", str(tmp_path / "dl"))
    shot = screenshot(Path(page), tmp_path / "shot.png")
    # Not blank: the page drew, and so did the chart inside it (both weight lines' colours).
    assert non_white_share(shot) > 0.01, non_white_share(shot)
    for c in CHART_COLOURS:
        assert colour_share(shot, c) > 0.0005, (c, colour_share(shot, c))
