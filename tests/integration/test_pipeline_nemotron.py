"""The Llama-Nemotron pipeline example (deploy/examples/pipeline-nemotron.yaml) end to end through `anneal run`.

What the always-on tests prove: the example parses, every technique of the recipe is a stage in the
recipe's order, each stage feeds the next by `fromStage`, every stage but the service is gated, and
the advice knows the cpt stage is the fused stage's recovery.

What `test_nemotron_pipeline_runs_end_to_end` proves (opt-in, `ANNEAL_SLOW_TESTS=1`: seven stages
on a real local Ray take minutes on CPU, past what CI can spend): the same seven stages, the
example's structure and gate metrics kept, with models, steps and samples scaled down and the gate
thresholds set to what such small models reach (written below, next to the example's) — teacher sft
→ attention removal + FFN fusion → cpt + KD → sft → kd-rl → W4A16 → a ModelService — each job
stage Succeeded with its gate passed, the fusion real (a fused FFN run, sequential depth down),
cpt lowering the fused model's held-out text perplexity, and the service Ready with the W4A16
stage's registered version at weight 100 (its MLflow deployment record), the reasoning toggle
configured. It does not check answers with thinking on and off (tests/integration/test_serve.py
does, on the router), nor that accuracy rises stage by stage (16 questions at this size).
Measured once by hand: 12 min 43 s on two shared cores (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy/examples/pipeline-nemotron.yaml"
ORDER = ["teacher", "fused", "cpt", "sft", "rl", "w4a16", "serve"]
DATA = "builtin://reasoning?difficulty=1&seed=7"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_the_example_is_the_nemotron_recipe_in_order_and_gated():
    from anneal.api import parse_manifest
    from anneal.api.advice import advice

    manifest = parse_manifest(example())
    stages = {s.name: s for s in manifest.spec.stages}
    assert [s.name for s in manifest.spec.stages] == ORDER
    fused = stages["fused"].spec.pruning.attention
    assert fused.fuse_ffn and fused.drop_layers == [2, 3]
    assert stages["cpt"].spec.method == "cpt" and stages["cpt"].spec.teacher.from_stage == "teacher"
    assert stages["cpt"].spec.student.from_stage == "fused"
    assert (stages["sft"].spec.method, stages["sft"].spec.student.from_stage) == ("sft", "cpt")
    assert (stages["rl"].spec.method, stages["rl"].spec.student.from_stage) == ("kd-rl", "sft")
    assert stages["w4a16"].spec.quantization.scheme == "W4A16" and stages["w4a16"].spec.model.from_stage == "rl"
    serve = stages["serve"].spec
    assert serve.variants[0].model.from_stage == "w4a16" and serve.routing.reasoning is not None
    assert all(stages[n].gate is not None for n in ORDER[:-1])
    # the cpt stage is the fused stage's recovery: no "set pruning.recovery" advice for it
    assert not any("recovery" in w for w in advice("ModelPipeline", manifest.spec))


def small(doc: dict) -> dict:
    """The example at test size: the same stages, fields and gate metrics; small numbers."""
    doc = copy.deepcopy(doc)
    st = {s["name"]: s for s in doc["spec"]["stages"]}
    teacher = st["teacher"]["distillation"]
    teacher["student"]["config"].update(hiddenSize=64, layers=4, heads=4, kvHeads=2, intermediateSize=128)
    teacher["training"].update(steps=240, batchSize=32, learningRate=0.004, warmupSteps=10, checkpointEvery=240)
    teacher["dataset"]["samples"] = 1500
    for name in ("teacher", "cpt", "sft", "rl"):
        st[name]["distillation"]["evaluation"] = {"samples": 16, "maxNewTokens": 24, "reasoningModes": ["off"]}
    for name in ("fused", "w4a16"):
        ev = st[name]["compression"]["evaluation"]
        ev.update(samples=16, maxNewTokens=24, reasoningModes=["off"])
        st[name]["compression"]["pruning" if name == "fused" else "quantization"]["calibration"]["samples"] = 8
    st["w4a16"]["compression"]["evaluation"]["minRetention"] = 0.5  # example: 0.8
    cpt = st["cpt"]["distillation"]
    cpt["dataset"].update(samples=400, maxSeqLength=128)
    cpt["training"].update(steps=30, batchSize=8, checkpointEvery=30)
    sft = st["sft"]["distillation"]
    sft["dataset"]["samples"] = 400
    sft["training"].update(steps=30, batchSize=16, checkpointEvery=30)
    rl = st["rl"]["distillation"]
    rl["rl"].update(groupSize=4, maxNewTokens=12)
    rl["dataset"].update(samples=64, reasoning="off")
    rl["training"].update(steps=4, batchSize=4, checkpointEvery=4)
    # gate thresholds at what these small models reach (the example's in comments)
    st["teacher"]["gate"]["min"] = 0.05  # example: 0.2
    st["cpt"]["gate"]["min"] = 0.2  # example: 0.5
    st["sft"]["gate"]["min"] = 0.02  # example: 0.2
    st["rl"]["gate"]["min"] = 0.2  # example: 0.5
    st["serve"]["service"]["variants"][0]["generation"]["maxTokens"] = 16
    return doc


@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("ANNEAL_SLOW_TESTS") != "1",
                    reason="seven stages on CPU take minutes; ANNEAL_SLOW_TESTS=1 runs it (figures: docs/BENCHMARKS.md)")
def test_nemotron_pipeline_runs_end_to_end(tmp_path):
    path = tmp_path / "nemotron.yaml"
    path.write_text(yaml.safe_dump(small(example())))
    env = {**os.environ, "ANNEAL_HOME": str(tmp_path / "home"), "ANNEAL_RAY_NUM_CPUS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "anneal.cli", "run", str(path), "--output", "json", "--duration", "8",
         "--traffic", "1", "--port", "8791"],
        capture_output=True, text=True, env=env, timeout=3600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    status = json.loads(proc.stdout)["status"]
    (tmp_path / "status.json").write_text(json.dumps(status, indent=1))
    print(json.dumps(status, indent=1))  # the figures, for docs/BENCHMARKS.md
    assert status["phase"] == "Succeeded", status.get("message")
    stages = status["stages"]
    assert list(stages) == ORDER
    for name in ORDER[:-1]:
        assert stages[name]["phase"] == "Succeeded", (name, stages[name])
        assert stages[name]["gate"].startswith("passed"), (name, stages[name]["gate"])
    m = stages["fused"]["metrics"]
    assert m["prunedFusedRuns"] >= 1 and m["prunedSequentialDepthRatio"] < 0.8
    m = stages["cpt"]["metrics"]
    assert m["perplexity"] < m["startPerplexity"], m  # continued pretraining recovered the fused model's text
    assert stages["w4a16"]["metrics"]["sizeRatio"] < 0.6
    assert stages["serve"]["phase"] in ("Ready", "Promoted")

    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    served = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
              if r.data.tags.get("anneal.kind") == "ModelService"]
    assert len(served) == 1, served
    assert served[0].data.tags["anneal.deployed.nemotron"] == stages["w4a16"]["modelUri"]
    assert served[0].data.metrics["deployed.weight.nemotron"] == 100
