"""`evaluation.attentionMaps` through `anneal run`: the maps of evaluated answers are in MLflow and render in a browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.browser import non_white_share, screenshot
from tests.integration.test_embedded_sft import small_sft

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_anneal_run_logs_attention_maps_that_open_from_mlflow(tmp_path):
    path = small_sft(tmp_path)
    doc = yaml.safe_load(path.read_text())
    # As little training and scoring as a job can do: the maps are what is tested.
    doc["spec"]["evaluation"].update(samples=2, attentionMaps=2, reasoningModes=["off"], maxNewTokens=8,
                                     metrics=["accuracy"])
    doc["spec"]["dataset"]["samples"] = 16
    doc["spec"]["training"].update(steps=1, checkpointEvery=1)
    path.write_text(yaml.safe_dump(doc))
    home = tmp_path / "home"
    env = {**os.environ, "ANNEAL_HOME": str(home), "ANNEAL_RAY_NUM_CPUS": "2"}
    proc = subprocess.run([sys.executable, "-m", "anneal.cli", "run", str(path), "--output", "json"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads(proc.stdout)["status"]
    assert status["phase"] == "Succeeded", status
    assert 0.0 <= status["metrics"]["numberAttention"] <= 1.0

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    run_id = status["mlflowRunId"]
    names = sorted(a.path for a in client.list_artifacts(run_id, "explain"))
    assert names == ["explain/q0-off.html", "explain/q0-off.json", "explain/q0-off.png",
                     "explain/q1-off.html", "explain/q1-off.json", "explain/q1-off.png", "explain/summary.json"]
    history = client.get_metric_history(run_id, "explain/numberAttention")
    assert [round(m.value, 6) for m in history] == [status["metrics"]["numberAttention"]]

    local = Path(client.download_artifacts(run_id, "explain", str(tmp_path / "dl")))
    summary = json.loads((local / "summary.json").read_text())
    assert summary["mode"] == "off" and len(summary["maps"]) == 2
    assert all(m["layers"] == [0, 1] and m["correct"] in (True, False) for m in summary["maps"])
    assert np.mean([m["numberAttention"] for m in summary["maps"]]) == pytest.approx(summary["numberAttention"])
    page = local / "q0-off.html"
    question = summary["maps"][0]["question"]
    assert "Where the answer looked" in page.read_text() and question.split()[0] in page.read_text()

    shot = screenshot(page, tmp_path / "shot.png", width=1000, height=900)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 20, "the page rendered as (nearly) one colour"
    assert non_white_share(shot) > 0.03
    heat = ((pixels[:, 0] > 150) & (pixels[:, 1] < 120) & (pixels[:, 2] < 120)).sum()
    assert heat > 500, "no prompt token is coloured by attention"


def test_a_compression_job_logs_maps_of_an_attention_removed_model(tmp_path):
    """The CompressionJob's step (`attention_maps_task`, inline without Ray) on an `anneal_llama`
    whose block 1 has no attention: the run gets the maps, which name the skipped block."""
    import uuid
    from dataclasses import asdict

    from anneal.compress import recipe
    from anneal.modeling.layerwise_llama import AnnealLlamaForCausalLM, from_llama_config
    from anneal.modeling.tiny import LlamaShape, build_llama, copy_task, save_pretrained
    from anneal.modeling.tokenizer import builtin_tokenizer
    from anneal.tracking import mlflow_store as store

    tokenizer = builtin_tokenizer(tmp_path / "tok")
    llama = build_llama(LlamaShape(hidden_size=32, layers=3, heads=4, kv_heads=2, intermediate_size=64), tokenizer)
    model = AnnealLlamaForCausalLM(from_llama_config(llama.config, no_attention_layers=[1]))
    model_dir = save_pretrained(model, tokenizer, tmp_path / "pruned")
    data = copy_task(tmp_path / "copy.jsonl", 4)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = store.create_run(store.TrackingTarget(tracking, "it-explain", str(tmp_path / "artifacts")), "cj", {})
    spec = {"model": {"uri": str(model_dir)}, "quantization": {"scheme": "W8A16"},
            "evaluation": {"dataset": {"uri": str(data), "format": "prompt-completion"}, "samples": 4,
                           "attentionMaps": 3, "reasoningModes": ["off"], "maxNewTokens": 4}}
    ctx = recipe.JobContext(kind="CompressionJob", namespace="it", name="cj", uid=uuid.uuid4().hex[:8],
                            tracking_uri=tracking, experiment="it-explain", registered_model_name="cj",
                            work_dir=str(tmp_path / "work"), cache_dir=str(tmp_path / "cache"),
                            artifact_root=str(tmp_path / "artifacts"), run_id=run_id)
    cfg = recipe.CompressionConfig(spec=spec, context=asdict(ctx), source_uri=str(model_dir))
    figures = recipe.attention_maps_task(asdict(cfg), str(model_dir))
    assert set(figures) == {"numberAttention"} and 0.0 <= figures["numberAttention"] <= 1.0

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    names = sorted(a.path for a in client.list_artifacts(run_id, "explain"))
    assert len(names) == 3 * 3 + 1 and "explain/q2-off.html" in names
    summary = json.loads(Path(client.download_artifacts(run_id, "explain/summary.json", str(tmp_path / "dl")))
                         .read_text())
    assert [(m["layers"], m["skippedLayers"]) for m in summary["maps"]] == [([0, 2], [1])] * 3
    assert all(m["question"].startswith("Repeat: ") for m in summary["maps"])
