"""The quickstart's own figures: `anneal run deploy/examples/pipeline.yaml`, as `make quickstart` runs it.

The pipeline imports the shipped teacher (deploy/quickstart/math-teacher, made by
scripts/make_quickstart_teacher.py), distils a width-pruned student from it (half of each FFN), quantizes the
student to W8A16 and serves both; the test reads the figures from the finished status and
asserts what an ML engineer would check first:

- the teacher has learned the task: exact-answer accuracy with reasoning on >= 0.5, and
  reasoning on beats reasoning off by >= 0.1 (the task's second step is what "off" cannot do);
- the student is below its teacher but keeps most of it: retention in [0.8, 1.0);
- the W8A16 copy keeps the student's accuracy (retention >= 0.97) at under 0.9 of its size.

How many questions, and why: every stage scores the same 200 eval-split questions per mode (the
manifest's `evaluation.samples`). At p ~ 0.6 one accuracy has a binomial standard error of
sqrt(0.6 * 0.4 / 200) = 0.035, so a teacher measured at >= 0.6 is above 0.5 by about three
standard errors; retention compares two models on the *same* questions, so its noise is that
of the answers on which they differ (tens of questions), about +-0.05 around the bounds, which
is why the manifest's student is sized to land near the middle of [0.8, 1.0). The figures are
deterministic for one torch version and thread count: this test guards against a change that
moves them, not against sampling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "deploy/examples/pipeline.yaml"
TEACHER = ROOT / "deploy/quickstart/math-teacher"


def test_the_shipped_teacher_is_what_its_card_says():
    figures = json.loads((TEACHER / "figures.json").read_text())
    doc = yaml.safe_load(PIPELINE.read_text())
    first = doc["spec"]["stages"][0]["distillation"]
    assert first["student"]["uri"] == "deploy/quickstart/math-teacher" and first["training"]["steps"] == 0
    # the stage evaluates on the data set the teacher was trained for
    assert first["dataset"]["uri"] == figures["dataset"]
    final = figures["final"]
    assert final["accuracyOn"] >= 0.5 and final["accuracyOn"] - final["accuracyOff"] >= 0.1, final
    assert (TEACHER / "model.safetensors").stat().st_size < 8 * 2**20  # small enough to live in git


def test_quickstart_figures_are_ones_an_ml_engineer_accepts(tmp_path):
    env = {**os.environ, "ANNEAL_HOME": str(tmp_path / "home"), "ANNEAL_RAY_NUM_CPUS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "anneal.cli", "run", str(PIPELINE), "--duration", "3", "--traffic", "1",
         "--output", "json"],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads(proc.stdout)["status"]
    assert status["phase"] == "Succeeded", status
    stages = status["stages"]
    assert [s["phase"] for s in stages.values()] == ["Succeeded"] * 3 + ["Ready"], stages

    teacher = stages["teacher"]
    assert teacher["modelUri"] == "models:/math-teacher/1"
    t = teacher["metrics"]
    assert t["studentAccuracyOn"] >= 0.5, t
    assert t["studentAccuracyOn"] - t["studentAccuracyOff"] >= 0.1, t

    student = stages["student"]["metrics"]
    # the kd job scores its teacher itself, on the same questions: the import's figures again
    assert student["teacherAccuracyOn"] == pytest.approx(t["studentAccuracyOn"], abs=1e-6)
    assert 0.8 <= student["retention"] < 1.0, student
    assert student["studentAccuracyOn"] > student["studentAccuracyOff"], student

    quantized = stages["quantized"]["metrics"]
    assert quantized["retention"] >= 0.97, quantized
    assert quantized["sizeRatio"] < 0.9, quantized
