"""The end of a run, for people (`anneal.report`, `anneal run`'s last lines): named figures, the stage table, what is missing and why."""

from __future__ import annotations

from pathlib import Path

import yaml

from anneal import report
from anneal.api import parse_manifest
from anneal.control.pipeline import advance

ROOT = Path(__file__).resolve().parents[2]

KD = {"studentAccuracy": 0.44, "studentAccuracyOn": 0.55, "studentAccuracyOff": 0.33, "perplexity": 3.1,
      "teacherAccuracy": 0.5, "teacherAccuracyOn": 0.62, "teacherAccuracyOff": 0.38, "retention": 0.88,
      "loggingShare": 0.01}
COMPRESSED = {"accuracy": 0.3, "accuracyOn": 0.39, "accuracyOff": 0.21, "sourceAccuracy": 0.31,
              "sizeBytes": 1.2e6, "sourceSizeBytes": 4.0e6, "sizeRatio": 0.3, "retention": 0.968}


def test_job_figures_are_grouped_by_the_model_they_describe_and_named():
    figs = report.figures(KD, "DistillationJob")
    assert [f.group for f in figs] == ["student"] * 4 + ["teacher"] * 3 + ["comparison", "training"]
    named = {f.key: f.label for f in figs}
    assert named["studentAccuracyOn"] == "accuracy, thinking on" and named["perplexity"] == "perplexity"
    assert named["retention"] == "retention (student / teacher accuracy)"
    comp = {f.key: (f.group, f.label) for f in report.figures(COMPRESSED, "CompressionJob")}
    assert comp["accuracyOn"] == ("compressed model", "accuracy, thinking on")
    assert comp["sourceSizeBytes"] == ("source model", "size")
    assert comp["retention"] == ("comparison", "retention (compressed / source accuracy)")
    assert report.format_value("sizeBytes", 1.2e6) == "1.20 MB" and report.format_value("x", 0.123456) == "0.1235"


def test_a_figure_that_cannot_be_computed_says_why():
    zero_teacher = {**KD, "teacherAccuracy": 0.0}
    del zero_teacher["retention"]
    (why,) = report.missing_figures(zero_teacher, "DistillationJob")
    assert why.startswith("retention: not computed") and "teacherAccuracy 0" in why
    assert report.missing_figures(KD, "DistillationJob") == []
    zero_source = {k: v for k, v in COMPRESSED.items() if k != "retention"} | {"sourceAccuracy": 0.0}
    assert "sourceAccuracy 0" in report.missing_figures(zero_source, "CompressionJob")[0]
    # A student above its teacher is not reported as a success.
    (above,) = report.comparison_notes({**KD, "retention": 1.52}, "DistillationJob")
    assert "1.52 > 1" in above and "under-trained" in above
    assert report.comparison_notes(KD, "DistillationJob") == []


def _finished_quickstart_status() -> dict:
    """The quickstart pipeline's status as `anneal.control.pipeline.advance` builds it from its finished stages."""
    doc = yaml.safe_load((ROOT / "deploy/examples/pipeline.yaml").read_text())
    m = parse_manifest(doc)
    children_status = {
        "teacher": {"phase": "Succeeded", "modelUri": "models:/math-teacher/1", "startTime": "2026-12-03T10:00:00Z",
                    "completionTime": "2026-12-03T10:02:05Z",
                    "metrics": {"studentAccuracy": 0.5, "studentAccuracyOn": 0.62, "studentAccuracyOff": 0.38}},
        "student": {"phase": "Succeeded", "modelUri": "models:/math-student/1", "startTime": "2026-12-03T10:02:06Z",
                    "completionTime": "2026-12-03T10:03:00Z", "metrics": KD},
        "quantized": {"phase": "Succeeded", "modelUri": "models:/math-student-w8a16/1",
                      "startTime": "2026-12-03T10:03:01Z", "completionTime": "2026-12-03T10:03:40Z",
                      "metrics": COMPRESSED},
        "serve": {"phase": "Ready", "endpoint": "http://127.0.0.1:8000"},
    }
    status: dict = {}
    children: dict = {}
    for _ in range(len(m.spec.stages) + 1):
        status, child, _ = advance(m.spec, status, children, m.name, m.namespace)
        if child is None:
            break
        stage = child["metadata"]["labels"]["anneal.dev/stage"]
        children[stage] = {"metadata": child["metadata"], "status": children_status[stage]}
    return status


def test_the_stage_table_of_a_finished_pipeline():
    status = _finished_quickstart_status()
    assert status["phase"] == "Succeeded"
    rows = report.stage_rows(status)
    assert [r["stage"] for r in rows] == ["teacher", "student", "quantized", "serve"]
    assert all(list(r) == list(report.STAGE_COLUMNS) for r in rows)
    teacher, student, quantized, serve = rows
    assert (teacher["kind"], teacher["phase"], teacher["model"]) == ("DistillationJob", "Succeeded",
                                                                    "models:/math-teacher/1")
    assert (teacher["accuracy on"], teacher["accuracy off"], teacher["duration"]) == ("0.62", "0.38", "2m05s")
    assert (student["accuracy on"], student["retention"], student["gate"]) == ("0.55", "0.88", status["stages"][
        "student"]["gate"])
    assert student["gate"].startswith("passed")
    assert (quantized["kind"], quantized["retention"], quantized["size ratio"]) == ("CompressionJob", "0.968", "0.3")
    assert (serve["kind"], serve["model"], serve["duration"]) == ("ModelService", "http://127.0.0.1:8000", "-")
    assert report.stage_notes(status) == []


def test_anneal_run_ends_with_the_stage_table_and_notes(monkeypatch):
    from anneal import cli

    status = _finished_quickstart_status()
    status["stages"]["student"]["metrics"] = {**KD, "retention": 1.52}
    monkeypatch.setattr(cli.err, "width", 200)
    with cli.err.capture() as captured:
        cli._print_status(status, "ModelPipeline")
    out = captured.get()
    for column in report.STAGE_COLUMNS:
        assert column in out, out
    assert "models:/math-student-w8a16/1" in out and "2m05s" in out
    assert "note: stage student: retention 1.52 > 1" in " ".join(out.split())


def test_anneal_run_ends_with_a_jobs_named_figures():
    from anneal import cli

    metrics = {**KD, "teacherAccuracy": 0.0}
    del metrics["retention"]
    with cli.err.capture() as captured:
        cli._print_status({"phase": "Succeeded", "modelUri": "models:/s/1", "metrics": metrics}, "DistillationJob")
    out = " ".join(captured.get().split())
    assert "accuracy, thinking on" in out and "teacher" in out
    assert "note: retention: not computed" in out
