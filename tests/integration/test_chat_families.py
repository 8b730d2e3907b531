"""A Hugging Face chat model end to end through `anneal run`: sft → kd → W4A16 → served, in its own chat template.

The model is built here in the shape of a real family (`anneal.modeling.families`): random
init, a tokenizer trained locally with the family's special tokens and chat template. The
Llama-3-style one has no pad token (the case that failed: `TypeError: 'NoneType' object
cannot be interpreted as an integer`); the Mistral-style one has none either and folds the
system message into the user turn. Neither declares the reasoning toggle, so no stage puts
"detailed thinking on/off" in its prompts. Real Ray, real MLflow (SQLite), real Serve over HTTP.

The whole chain runs for the Llama-3-style family only: it is ~10 minutes of a 2-core CI
machine a family, and what differs between families (the template training renders equals
the one the server renders, batching and generating without a pad token) is checked for
every family, Mistral's included, in tests/unit/test_chat_families.py. The chain itself is
the same code for all of them.
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
DATA = "builtin://reasoning?difficulty=1&seed=3"


def _chain(family: str, model_dir: Path) -> dict:
    data = {"uri": DATA, "samples": 64, "maxSeqLength": 128}
    evaluation = {"samples": 2, "maxNewTokens": 8}
    training = {"steps": 4, "batchSize": 4, "warmupSteps": 1}
    return {
        "apiVersion": "anneal.dev/v1alpha1", "kind": "ModelPipeline", "metadata": {"name": f"{family}-chain"},
        "spec": {"stages": [
            {"name": "sft", "distillation": {
                "method": "sft", "student": {"uri": str(model_dir)}, "dataset": data, "training": training,
                "evaluation": evaluation, "mlflow": {"registeredModelName": f"{family}-sft"}}},
            {"name": "kd", "distillation": {
                "method": "kd", "teacher": {"fromStage": "sft"},
                "student": {"fromTeacher": {"depth": {"keepLayers": 1},
                                            "calibration": {"uri": DATA, "samples": 8, "maxSeqLength": 128}}},
                "dataset": data, "evaluation": evaluation,
                # as on a GPU node pool: 2 Ray Train workers (gloo here), FSDP2, bf16
                "training": {**training, "strategy": "fsdp", "precision": "bf16"},
                "resources": {"workers": 2, "cpusPerWorker": 0.5},
                "mlflow": {"registeredModelName": f"{family}-kd"}}},
            {"name": "quantized", "compression": {
                "model": {"fromStage": "kd"},
                "quantization": {"scheme": "W4A16", "algorithm": "rtn", "groupSize": 32},
                "evaluation": {"samples": 2, "maxNewTokens": 8},
                "mlflow": {"registeredModelName": f"{family}-w4a16"}}},
            {"name": "serve", "service": {"variants": [
                {"name": "student", "model": {"fromStage": "quantized"}, "weight": 100,
                 "resources": {"cpusPerWorker": 0.25}, "generation": {"maxTokens": 8}}]}},
        ]},
    }


@pytest.mark.parametrize("family", ["llama3"])
def test_a_chat_model_goes_sft_kd_w4a16_and_is_served_in_its_own_template(tmp_path, family):
    from anneal.modeling.families import FAMILIES, save_family_model
    from anneal.modeling.tiny import LlamaShape

    model_dir = save_family_model(family, tmp_path / family,
                                  LlamaShape(hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128))
    manifest = tmp_path / "chain.yaml"
    manifest.write_text(yaml.safe_dump(_chain(family, model_dir)))
    home = tmp_path / "home"
    env = {**os.environ, "ANNEAL_HOME": str(home), "ANNEAL_RAY_NUM_CPUS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "anneal.cli", "run", str(manifest), "--output", "json", "--duration", "3",
         "--port", "0"],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    status = json.loads(proc.stdout)["status"]
    stages = status["stages"]
    assert status["phase"] == "Succeeded", (status.get("message"), stages)
    assert [stages[s]["phase"] for s in ("sft", "kd", "quantized", "serve")] == ["Succeeded"] * 3 + ["Ready"]
    assert stages["quantized"]["modelUri"] == f"models:/{family}-w4a16/1"

    # Every stage's model kept the family's tokenizer as it was: its template, and no pad token added.
    from anneal.modeling.uris import load_tokenizer

    tracking = f"sqlite:///{home / 'mlflow.db'}"
    for stage in ("sft", "kd", "quantized"):
        tok = load_tokenizer(stages[stage]["modelUri"], cache_dir=tmp_path / "dl", tracking_uri=tracking)
        assert tok.chat_template == FAMILIES[family].chat_template, stage
        assert tok.pad_token is None and tok.eos_token == FAMILIES[family].eos, stage
    # The kd stage trained on 2 FSDP workers in bf16 and wrote a bf16 Hugging Face checkpoint.
    from safetensors import safe_open

    from anneal.modeling.uris import resolve_model_dir

    kd_dir = resolve_model_dir(stages["kd"]["modelUri"], cache_dir=tmp_path / "dl", tracking_uri=tracking)
    with safe_open(str(next(Path(kd_dir).glob("*.safetensors"))), framework="pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    # The family's model does not declare the reasoning toggle, and no stage set reasoningToggle: no stage
    # trained or scored it with "detailed thinking on/off" (one accuracy, no per-mode figures), and every
    # output declares so in its config.json, which the serving variant reads (tests/unit/test_reasoning_toggle.py).
    from anneal.modeling.chat import REASONING_TOGGLE_KEY

    for stage in ("sft", "kd"):
        metrics = set(stages[stage]["metrics"])
        assert {"studentAccuracy", "perplexity"} <= metrics and not {"studentAccuracyOn", "studentAccuracyOff"} & metrics
    for stage in ("sft", "kd", "quantized"):
        d = resolve_model_dir(stages[stage]["modelUri"], cache_dir=tmp_path / "dl", tracking_uri=tracking)
        assert json.loads((Path(d) / "config.json").read_text())[REASONING_TOGGLE_KEY] is False, stage
