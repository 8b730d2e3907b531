"""`anneal run` of a DistillationJob with method cpt, on a real local Ray (two workers) and a real MLflow store."""

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
NAMES = ["Ana", "Bo", "Cy", "Di", "Ed"]
FRUIT = ["apples", "pears", "plums", "figs"]
WORKERS = 2  # cpt shares the Ray Train loop of sft and kd: two workers, the mean loss logged


def corpus(path: Path) -> list[str]:
    """Raw text documents of one template (a held-out tail of new sentences is learnable from the rest)."""
    docs = [f"{n} has {a} {f}. {n} gives {b} {f} away and keeps {a - b}."
            for n in NAMES for f in FRUIT for a, b in ((9, 4), (7, 2), (12, 5), (8, 3), (6, 1))]
    path.write_text("".join(json.dumps({"text": d, "source": "template"}) + "\n" for d in docs))
    return docs


def tiny_cpt(tmp_path: Path) -> tuple[Path, list[str]]:
    """The example, on a fresh tiny student (no teacher, no earlier jobs) and a .jsonl corpus."""
    doc = yaml.safe_load((ROOT / "deploy/examples/distill-cpt.yaml").read_text())
    spec = doc["spec"]
    docs = corpus(tmp_path / "corpus.jsonl")
    spec.pop("teacher")
    spec.pop("kd")
    spec["student"] = {"config": {"hiddenSize": 64, "layers": 2, "heads": 4, "kvHeads": 2, "intermediateSize": 128}}
    spec["dataset"] = {"uri": str(tmp_path / "corpus.jsonl"), "format": "text", "maxSeqLength": 48}
    spec["training"].update(steps=30, batchSize=4, learningRate=0.003, warmupSteps=3, checkpointEvery=15)
    spec["evaluation"] = {"metrics": ["perplexity"]}
    spec["resources"] = {"workers": WORKERS, "cpusPerWorker": 1}
    doc["metadata"]["name"] = "tiny-cpt"
    spec["mlflow"]["registeredModelName"] = "tiny-cpt"
    path = tmp_path / "cpt.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, docs


def test_anneal_run_cpt_lowers_held_out_perplexity_on_two_workers(tmp_path):
    """Proves: `anneal run` trains a cpt job on packed raw text across two Ray Train workers, holds
    the last tenth of a .jsonl corpus out, reports its perplexity before and after (after < half of
    before), and registers the model with method cpt and its figures on the MLflow run."""
    home = tmp_path / "home"
    manifest, docs = tiny_cpt(tmp_path)
    env = {**os.environ, "ANNEAL_HOME": str(home), "ANNEAL_RAY_NUM_CPUS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "anneal.cli", "run", str(manifest), "--output", "json"],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = json.loads(proc.stdout)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["modelUri"] == "models:/tiny-cpt/1"
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 30
    m = status["metrics"]
    assert m["perplexity"] < m["startPerplexity"] / 2, m
    assert m["heldoutTokens"] > 0 and m["trainLoss"] > 0
    assert not any(k.startswith("studentAccuracy") for k in m)  # raw text has no questions to score

    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from anneal.data.datasets import pack_texts
    from anneal.modeling.uris import resolve_model_dir

    tracking = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    version = client.get_model_version("tiny-cpt", "1")
    assert version.tags["anneal.method"] == "cpt" and "anneal.teacher" not in version.tags
    run = client.get_run(status["mlflowRunId"])
    assert run.data.params["method"] == "cpt"
    assert run.data.params["cpt.heldout"].startswith("the last 10 of 100 documents")
    # the workers trained on the blocks the first 90 documents pack into, nothing more
    local = resolve_model_dir(status["modelUri"], cache_dir=tmp_path / "dl", tracking_uri=tracking)
    blocks = pack_texts(AutoTokenizer.from_pretrained(local), docs[:90], 48)
    assert run.data.metrics["cpt/blocks"] == len(blocks)
    assert run.data.metrics["cpt/heldout_documents"] == 10
    assert run.data.metrics["eval/perplexity"] == pytest.approx(m["perplexity"], rel=1e-5)
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda h: h.step)
    assert len(history) == 30 and history[-1].value < history[0].value / 2
