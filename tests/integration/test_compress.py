"""CompressionJob end to end on a real local Ray and a real MLflow (SQLite) store.

One tiny source model is trained once per module on a copy task ("Repeat: 37" → "Answer: 37"),
so that its accuracy is 1.0 and retention means something; it is registered as
``models:/copy-source/1``. Each test then runs the real recipe (pre-flight, Ray tasks,
llm-compressor, evaluation, gate, registration) or the quantizer alone.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from anneal.api.compression import CompressionJobSpec
from anneal.compress import recipe
from anneal.tracking import mlflow_store as store

pytestmark = pytest.mark.integration

NAMESPACE = "it"
SOURCE_NAME = "copy-source"


@pytest.fixture(scope="module")
def source(home):
    """A 4-layer Llama (hidden 64) that has memorised the copy task, registered as models:/copy-source/1."""
    from anneal.modeling.tiny import LlamaShape, memorize_copy_task

    shape = LlamaShape(hidden_size=64, layers=4, heads=4, kv_heads=2, intermediate_size=128)
    src, data = memorize_copy_task(home["root"], shape, samples=16, max_steps=300)  # converges in ~130 steps
    target = store.TrackingTarget(home["tracking_uri"], "it-compress-source", home["artifacts"])
    run_id = store.create_run(target, "source", {store.TAG_KIND: "DistillationJob", store.TAG_NAME: SOURCE_NAME,
                                                 store.TAG_NAMESPACE: NAMESPACE})
    uri = store.register_model(home["tracking_uri"], SOURCE_NAME, store.log_model_dir(home["tracking_uri"], run_id, src),
                               run_id, {})
    store.write_result(home["tracking_uri"], run_id, {"phase": "Succeeded", "modelUri": uri})
    return {"dir": src, "uri": uri, "data": str(data)}


def context(home, name: str) -> recipe.JobContext:
    uid = uuid.uuid4().hex[:10]
    return recipe.JobContext(
        kind="CompressionJob", namespace=NAMESPACE, name=name, uid=uid,
        tracking_uri=home["tracking_uri"], experiment="it-compress", registered_model_name=name,
        work_dir=str(home["root"] / "work" / name / uid), cache_dir=str(home["root"] / "cache"),
        artifact_root=home["artifacts"],
    )


def job(source, **extra) -> CompressionJobSpec:
    body = {
        "model": {"uri": source["uri"]},
        "evaluation": {"dataset": {"uri": source["data"], "format": "prompt-completion"}, "samples": 12,
                       "reasoningModes": ["off"], "maxNewTokens": 6},
        **extra,
    }
    return CompressionJobSpec.model_validate(body)


def reload_and_answer(model_dir: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    enc = tok("Repeat: 42\n", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def version_of(home, uri: str):
    name, version = store.model_version_of(home["tracking_uri"], uri)
    c = store.client(home["tracking_uri"])
    return c.get_model_version(name, version), c.get_registered_model(name)


def test_gptq_w4a16_job_registers_a_reloadable_model_with_lineage(ray_cluster, home, source):
    spec = job(source, quantization={"scheme": "W4A16", "algorithm": "gptq", "groupSize": 32,
                                     "calibration": {"uri": source["data"], "format": "prompt-completion", "samples": 16}},
               evaluation={"dataset": {"uri": source["data"], "format": "prompt-completion"}, "samples": 12,
                           "reasoningModes": ["off"], "maxNewTokens": 6, "minRetention": 0.5})
    result = recipe.run(spec, context(home, "w4a16"))
    assert result.phase == "Succeeded", result.message
    m = result.metrics
    assert m["sourceAccuracy"] == 1.0  # the copy task is learnt: retention is meaningful
    assert m["retention"] == pytest.approx(m["accuracy"] / m["sourceAccuracy"])
    assert m["retention"] >= 0.5
    assert m["sourceSizeBytes"] > m["sizeBytes"] > 0
    assert m["sizeRatio"] == pytest.approx(m["sizeBytes"] / m["sourceSizeBytes"], rel=1e-4)
    assert abs(m["quantizedLinearRatio"] - 0.25) < 0.05 + 4 / 32 / 2  # fp32 scales, one per 32 weights
    assert {"perplexity", "sourcePerplexity", "accuracyOff", "sourceAccuracyOff"} <= set(m)
    assert "minRetention" not in " ".join(result.warnings)
    version, registered = version_of(home, result.model_uri)
    assert version.tags[store.TAG_SOURCE] == source["uri"]
    assert version.tags[store.TAG_SOURCE_VERSION] == "1"
    assert version.tags[store.TAG_RECIPE] == "anneal.compress.recipe"
    assert version.tags["anneal.scheme"] == "W4A16/gptq"
    assert "rejected" not in version.tags
    run = store.client(home["tracking_uri"]).get_run(result.mlflow_run_id)
    assert run.data.params["quantization.scheme"] == "W4A16"
    assert {"quantization.accuracy", "source.accuracy", "quantization.sizeBytes", "retention"} <= set(run.data.metrics)
    from anneal.modeling.uris import resolve_model_dir

    registered_dir = resolve_model_dir(result.model_uri, cache_dir=home["root"] / "dl", tracking_uri=home["tracking_uri"])
    config = json.loads((registered_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert reload_and_answer(registered_dir).strip()


@pytest.mark.parametrize(("scheme", "algorithm"), [("W8A16", "rtn"), ("W8A8", "rtn"), ("FP8", "rtn"), ("W4A16", "awq")])
def test_each_scheme_writes_a_checkpoint_transformers_reloads(home, source, scheme, algorithm):
    from anneal.compress.evaluation import EvalPlan, evaluate_dir
    from anneal.compress.quantization import QuantPlan, checkpoint_bytes, quantize
    from anneal.data.datasets import load_samples

    out = home["root"] / f"q-{scheme}-{algorithm}"
    calibration = load_samples(source["data"], format="prompt-completion", samples=8)
    quantize(source["dir"], out, QuantPlan(scheme=scheme, algorithm=algorithm, group_size=32), calibration, 64)
    assert checkpoint_bytes(out) < checkpoint_bytes(source["dir"])
    assert reload_and_answer(out).strip()
    plan = EvalPlan(dataset_uri=source["data"], format="prompt-completion", samples=12, modes=("off",),
                    max_new_tokens=6, perplexity=False)
    accuracy = evaluate_dir(out, plan)["accuracy"]
    if scheme != "W4A16":  # 8-bit schemes keep a memorised task
        assert accuracy >= 0.75


def test_aggressive_pruning_is_rejected_with_figures(ray_cluster, home, source):
    # One layer of four and a quarter of the hidden and FFN channels: a copy task survives a single
    # layer alone (one attention head can copy), so depth alone does not reliably break it.
    spec = job(source, pruning={"depth": {"keepLayers": 1}, "width": {"hiddenRatio": 0.25, "ffnRatio": 0.25},
                                "calibration": {"uri": source["data"], "format": "prompt-completion"}},
               evaluation={"dataset": {"uri": source["data"], "format": "prompt-completion"}, "samples": 12,
                           "reasoningModes": ["off"], "maxNewTokens": 6, "minRetention": 0.9})
    result = recipe.run(spec, context(home, "too-far"))
    assert result.phase == "Rejected", result.message
    assert "retention" in result.message and "< minRetention 0.9" in result.message
    assert f"vs source {result.metrics['sourceAccuracy']:.4f}" in result.message
    assert result.metrics["retention"] < 0.9
    assert result.metrics["prunedLayers"] == 1
    version, registered = version_of(home, result.model_uri)
    assert version.tags["rejected"] == "true" and version.tags["anneal.gate"] == "rejected"
    assert not version.aliases and not registered.aliases
    run = store.client(home["tracking_uri"]).get_run(result.mlflow_run_id)
    assert run.data.tags[store.TAG_PHASE] == "Rejected"


def test_prune_recover_then_quantize_reports_each_step(ray_cluster, home, source):
    cal = {"uri": source["data"], "format": "prompt-completion", "samples": 16}
    spec = job(source,
               pruning={"depth": {"dropLayers": 1}, "calibration": cal,
                        "recovery": {"steps": 6, "batchSize": 8, "learningRate": 0.003, "dataset": cal}},
               quantization={"scheme": "W8A16", "algorithm": "rtn", "groupSize": 32})
    result = recipe.run(spec, context(home, "prune-w8"))
    assert result.phase == "Succeeded", result.message
    m = result.metrics
    assert m["prunedLayers"] == 3
    assert m["recoverySteps"] == 6 and "recoveryLoss" in m
    for key in ("prunedAccuracy", "prunedSizeBytes", "prunedSizeRatio", "quantizedAccuracy", "quantizedSizeBytes",
                "quantizedLinearRatio", "accuracy", "sizeBytes", "sourceSizeBytes"):
        assert key in m, key
    assert m["sizeBytes"] == m["quantizedSizeBytes"] < m["prunedSizeBytes"] < m["sourceSizeBytes"]
    assert m["accuracy"] == m["quantizedAccuracy"]
    assert any("minRetention: not set" in w for w in result.warnings)
    run = store.client(home["tracking_uri"]).get_run(result.mlflow_run_id)
    assert {"pruning.accuracy", "pruning.sizeBytes", "quantization.accuracy", "train/loss"} <= set(run.data.metrics)
    assert reload_and_answer(Path(recipe.resolve_dir(result.model_uri, context(home, "dl")))).strip()


def test_embedded_run_resolves_from_resource_and_stops_at_preflight(ray_cluster, home, source, monkeypatch):
    """`anneal run`'s path: fromResource → the source's registered version; a plan that leaves nothing stops early."""
    from anneal.api.resources import parse_manifest
    from anneal.local.runner import run_manifest
    from anneal.settings import Settings

    monkeypatch.setenv("ANNEAL_HOME", str(home["root"]))
    monkeypatch.setenv("ANNEAL_MLFLOW_TRACKING_URI", home["tracking_uri"])
    manifest = parse_manifest({
        "apiVersion": "anneal.dev/v1alpha1", "kind": "CompressionJob",
        "metadata": {"name": "nothing-left", "namespace": NAMESPACE},
        "spec": {"model": {"fromResource": {"kind": "DistillationJob", "name": SOURCE_NAME}},
                 "pruning": {"depth": {"ratio": 0.1}},
                 "quantization": {"scheme": "FP8", "algorithm": "rtn"}},
    })
    updates = []
    status = run_manifest(manifest, Settings(), on_progress=updates.append)
    assert status["phase"] == "Rejected"
    assert status["message"].startswith("pre-flight: spec.pruning.depth.ratio: 0.1")
    assert "modelUri" not in status
    assert any("CPU-only" in w for w in status["warnings"])
    assert updates[0]["phase"] == "Submitted"
    run = store.client(home["tracking_uri"]).get_run(status["mlflowRunId"])
    assert run.data.tags[store.TAG_SOURCE] == source["uri"]


def test_a_gate_without_evidence_rejects_a_source_that_scores_zero(ray_cluster, home, source):
    """A source scoring 0 leaves no retention to compute: minRetention 0.99 must reject, not pass unchecked."""
    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_tokenizer

    tokenizer = builtin_tokenizer(home["root"] / "cache" / "tokenizers")
    shape = LlamaShape(hidden_size=64, layers=4, heads=4, kv_heads=2, intermediate_size=128)
    untrained = save_pretrained(build_llama(shape, tokenizer, seed=3), tokenizer, home["root"] / "untrained")
    spec = job({**source, "uri": str(untrained)},
               pruning={"depth": {"keepLayers": 1}, "calibration": {"uri": source["data"],
                                                                  "format": "prompt-completion"}},
               evaluation={"dataset": {"uri": source["data"], "format": "prompt-completion"}, "samples": 12,
                           "reasoningModes": ["off"], "maxNewTokens": 6, "minRetention": 0.99})
    result = recipe.run(spec, context(home, "no-evidence"))
    assert result.metrics["sourceAccuracy"] == 0.0, result.metrics
    assert result.phase == "Rejected", result.message
    assert "retention cannot be computed: the source model scores 0 accuracy on 12 questions" in result.message
    assert "retention" not in result.metrics


def test_attention_removal_and_ffn_fusion_through_anneal_run(ray_cluster, home, source, monkeypatch):
    """`anneal run` on a CompressionJob: drop two adjacent attentions, fuse their FFNs, recover with KD, gate.

    The output is a registered `anneal_llama` checkpoint with one block fewer, which loads through
    anneal.modeling's URIs (as a following DistillationJob's `fromStage` student would) and answers.
    """
    from anneal.api.resources import parse_manifest
    from anneal.local.runner import run_manifest
    from anneal.modeling.uris import load_model
    from anneal.settings import Settings

    monkeypatch.setenv("ANNEAL_HOME", str(home["root"]))
    monkeypatch.setenv("ANNEAL_MLFLOW_TRACKING_URI", home["tracking_uri"])
    cal = {"uri": source["data"], "format": "prompt-completion", "samples": 16}
    manifest = parse_manifest({
        "apiVersion": "anneal.dev/v1alpha1", "kind": "CompressionJob",
        "metadata": {"name": "fused", "namespace": NAMESPACE},
        "spec": {"model": {"fromResource": {"kind": "DistillationJob", "name": SOURCE_NAME}},
                 "pruning": {"attention": {"dropLayers": [1, 2], "fuseFfn": True}, "calibration": cal,
                             "recovery": {"steps": 8, "batchSize": 8, "learningRate": 0.003, "dataset": cal}},
                 "evaluation": {"dataset": {"uri": source["data"], "format": "prompt-completion"}, "samples": 12,
                                "reasoningModes": ["off"], "maxNewTokens": 6, "minRetention": 0.5}},
    })
    status = run_manifest(manifest, Settings())
    m = status["metrics"]
    assert status["phase"] == "Succeeded", (status.get("message"), m)
    assert m["prunedLayers"] == 3 and m["prunedAttentionLayers"] == 2  # 4 blocks → 3, two of them with attention
    assert m["prunedSequentialDepth"] == 5 and m["prunedSequentialDepthRatio"] == pytest.approx(5 / 8)
    assert m["prunedFusedRuns"] == 1 and m["prunedFusionGapKl"] >= 0 and 0 <= m["prunedFusionGapTop1"] <= 1
    assert m["recoverySteps"] == 8 and m["retention"] >= 0.5
    run = store.client(home["tracking_uri"]).get_run(status["mlflowRunId"])
    assert json.loads(run.data.tags["anneal.pruning.fused_runs"]) == [[1, 2]]
    model, tokenizer = load_model(status["modelUri"], cache_dir=home["root"] / "dl", tracking_uri=home["tracking_uri"])
    assert type(model).__name__ == "AnnealLlamaForCausalLM"
    assert model.config.no_attention_layers == [1] and model.config.intermediate_sizes == [128, 256, 128]
    enc = tokenizer("Repeat: 42\n", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
