"""`anneal run` of a DistillationJob (method sft) on a real local Ray and a real MLflow SQLite store."""

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


def small_sft(tmp_path: Path) -> Path:
    doc = yaml.safe_load((ROOT / "deploy/examples/distill-sft.yaml").read_text())
    spec = doc["spec"]
    spec["student"]["config"].update(hiddenSize=64, layers=2, heads=4, kvHeads=2, intermediateSize=128)
    spec["dataset"]["samples"] = 128
    spec["training"].update(steps=12, batchSize=8, checkpointEvery=6)
    spec["evaluation"].update(samples=6, maxNewTokens=16)
    doc["metadata"]["name"] = "tiny-sft"
    spec["mlflow"]["registeredModelName"] = "tiny-sft"
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_anneal_run_sft_registers_a_model(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "ANNEAL_HOME": str(home), "ANNEAL_RAY_NUM_CPUS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "anneal.cli", "run", str(small_sft(tmp_path)), "--output", "json"],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    resource = json.loads(proc.stdout)  # stdout holds nothing but the JSON
    status = resource["status"]
    assert resource["kind"] == "DistillationJob" and status["phase"] == "Succeeded"
    assert status["modelUri"] == "models:/tiny-sft/1"
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 12
    for key in ("studentAccuracyOn", "studentAccuracyOff", "perplexity"):
        assert key in status["metrics"]
    assert status["metrics"]["perplexity"] > 1.0

    from mlflow import MlflowClient

    from anneal.modeling.uris import load_model

    tracking = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version("tiny-sft", "1")
    assert version.run_id == status["mlflowRunId"]
    assert version.tags["anneal.kind"] == "DistillationJob"
    assert version.tags["anneal.name"] == "tiny-sft"
    assert version.tags["anneal.method"] == "sft"
    run = client.get_run(status["mlflowRunId"])
    assert run.data.params["method"] == "sft"
    assert run.data.params["training.steps"] == "12"
    assert run.data.tags["anneal.phase"] == "Succeeded"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 12 and history[-1].value < history[0].value

    # The registered version resolves to a checkpoint that loads and generates.
    model, tokenizer = load_model(status["modelUri"], cache_dir=tmp_path / "dl", tracking_uri=tracking)
    ids = tokenizer("<|user|>hi<|end|><|assistant|>", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_anneal_run_failing_job_ends_failed_with_message(tmp_path):
    doc = yaml.safe_load(small_sft(tmp_path).read_text())
    doc["spec"]["dataset"]["uri"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "ANNEAL_HOME": str(tmp_path / "home"), "ANNEAL_RAY_NUM_CPUS": "2"}
    proc = subprocess.run([sys.executable, "-m", "anneal.cli", "run", str(path), "--output", "json"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 1
    status = json.loads(proc.stdout)["status"]
    assert status["phase"] == "Failed"
    assert "missing.jsonl" in status["message"]
    assert "Traceback" not in proc.stdout
