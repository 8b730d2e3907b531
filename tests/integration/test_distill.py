"""Distillation recipes end to end on a real local Ray and a real MLflow (SQLite) store.

One small teacher is trained once (sft) and shared by every test; each method then runs the
real recipe (TorchTrainer, evaluation, registration) on tiny shapes for a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from anneal.api.distillation import DistillationJobSpec
from anneal.distill import harness, recipe
from anneal.runtime import placement
from anneal.tracking import mlflow_store as store

pytestmark = pytest.mark.integration

DATA = "builtin://reasoning?difficulty=1&seed=7"
NAMESPACE = "it"


def context(home, name: str, resolved: dict[str, str] | None = None, uid: str | None = None) -> recipe.JobContext:
    uid = uid or uuid.uuid4().hex[:10]
    return recipe.JobContext(
        kind="DistillationJob", namespace=NAMESPACE, name=name, uid=uid,
        tracking_uri=home["tracking_uri"], experiment="it-distill", registered_model_name=name,
        work_dir=str(home["root"] / "work" / name / uid), cache_dir=str(home["root"] / "cache"),
        artifact_root=home["artifacts"], resolved_uris=resolved or {},
    )


def job(method: str, student: dict, **extra) -> DistillationJobSpec:
    body = {
        "method": method,
        "student": student,
        "dataset": {"uri": DATA, "samples": 256, "maxSeqLength": 128, "reasoning": "both"},
        "training": {"steps": 8, "batchSize": 8, "learningRate": 3e-3, "checkpointEvery": 4},
        "evaluation": {"samples": 8, "maxNewTokens": 24},
        **extra,
    }
    if method != "sft":
        body["teacher"] = {"fromResource": {"kind": "DistillationJob", "name": "teacher"}}
    return DistillationJobSpec.model_validate(body)


@pytest.fixture(scope="module")
def teacher(ray_cluster, home):
    """A small sft teacher (shared), resolved the way `fromResource` is: newest successful run.

    Trained only part way (~0.3 exact-answer accuracy on the eval split): enough for kd and
    retention to mean something, and room for kd-rl, which starts from it, to improve on.
    """
    from anneal.local.jobs import mlflow_lookup

    spec = job("sft", {"config": {"hiddenSize": 64, "layers": 3, "heads": 4, "kvHeads": 2, "intermediateSize": 192}},
               training={"steps": 400, "batchSize": 32, "learningRate": 3e-3, "warmupSteps": 10,
                         "checkpointEvery": 200},
               evaluation={"samples": 16, "maxNewTokens": 24})
    spec.dataset.samples = 2000
    result = recipe.run(spec, context(home, "teacher"))
    assert result.phase == "Succeeded", result.message
    uri = mlflow_lookup(home["tracking_uri"])("DistillationJob", NAMESPACE, "teacher")["modelUri"]
    assert uri == result.model_uri
    return uri


def version_of(home, model_uri: str):
    name, version = store.model_version_of(home["tracking_uri"], model_uri)
    return store.client(home["tracking_uri"]).get_model_version(name, version)


def download(home, model_uri: str, dst: Path) -> Path:
    from anneal.modeling.uris import resolve_model_dir

    try:
        return resolve_model_dir(model_uri, cache_dir=dst, tracking_uri=home["tracking_uri"])
    except Exception:  # an adapter has no config.json: fetch the version's files directly
        import mlflow.artifacts

        v = version_of(home, model_uri)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=v.source, dst_path=str(dst),
                                                        tracking_uri=home["tracking_uri"]))


def assert_lineage(home, result, ctx, method: str, teacher_uri: str) -> None:
    assert result.phase == "Succeeded", result.message
    tags = version_of(home, result.model_uri).tags
    assert tags[store.TAG_METHOD] == method
    assert tags[store.TAG_TEACHER] == teacher_uri
    assert tags[store.TAG_TEACHER_VERSION] == teacher_uri.rsplit("/", 1)[1]
    assert tags[store.TAG_DATASET] == DATA
    assert (tags[store.TAG_NAMESPACE], tags[store.TAG_NAME], tags[store.TAG_UID]) == (ctx.namespace, ctx.name, ctx.uid)
    for who in ("student", "teacher"):
        for mode in ("On", "Off"):  # reasoning: both → evaluated in both modes
            assert 0.0 <= result.metrics[f"{who}Accuracy{mode}"] <= 1.0
    assert result.metrics["perplexity"] > 1.0


def test_kd_from_a_depth_and_width_pruned_teacher(home, teacher):
    spec = job("kd", {"fromTeacher": {"depth": {"keepLayers": 2}, "width": {"ffnRatio": 0.5},
                                      "calibration": {"uri": DATA, "samples": 16}}},
               kd={"loss": "forward-kl", "temperature": 2.0, "alpha": 0.5, "chunkSize": 64})
    ctx = context(home, "kd-pruned", {"teacher": teacher})
    result = recipe.run(spec, ctx)
    assert_lineage(home, result, ctx, "kd", teacher)
    metrics = store.latest_metrics(home["tracking_uri"], result.mlflow_run_id)
    assert metrics["studentLayers"] == 2
    assert metrics["studentParams"] < metrics["teacherParams"]
    assert metrics["train/kd"] >= 0 and metrics["train/step"] == 8
    # Where the teacher was pruned and the models scored is on the run. A CPU job on this one-node
    # local Ray: in the driver (this process), which has the node's cores; with GPUs, or on a Ray of
    # several nodes, the same call is a Ray task with one training worker's resources (below).
    tags = store.client(home["tracking_uri"]).get_run(result.mlflow_run_id).data.tags
    for tag in (placement.TAG_STUDENT_MADE_ON, placement.TAG_EVALUATED_ON):
        host_pid, device = tags[tag].split(" ")
        assert device == "(cpu)" and int(host_pid.rsplit(":", 1)[1]) == os.getpid(), (tag, tags[tag])
    # The task path, as distill takes it off one node (and compress always): another process, with
    # the function's own error class when it fails.
    pid, where = placement.on_a_worker(spec.resources, _where)
    assert pid != os.getpid() and where.endswith("(cpu)")
    with pytest.raises(ValueError, match="no such checkpoint"):
        placement.on_a_worker(spec.resources, _fail, "no such checkpoint")


def _where() -> tuple[int, str]:
    return os.getpid(), placement.here("cpu")


def _fail(message: str) -> None:
    raise ValueError(message)


def test_kd_with_a_student_of_another_tokenizer_fails_clearly(home, teacher, tmp_path):
    from transformers import AutoTokenizer

    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import train_tokenizer

    other = train_tokenizer(["Ana has 3 apples. Answer: 3"] * 20, vocab_size=300)
    save_pretrained(build_llama(LlamaShape(32, 1, 4, 2, 64), other), other, tmp_path / "other")
    AutoTokenizer.from_pretrained(tmp_path / "other")
    result = recipe.run(job("kd", {"uri": str(tmp_path / "other")}), context(home, "kd-mismatch", {"teacher": teacher}))
    assert result.phase == "Failed"
    assert "IncompatibleModelsError" in result.message and "share one tokenizer" in result.message


@pytest.mark.parametrize("merge", [True, False])
def test_lora_kd_registers_a_merged_model_or_an_adapter_with_its_base(home, teacher, tmp_path, merge):
    spec = job("lora-kd", {"fromTeacher": {"depth": {"keepLayers": 2}, "calibration": {"uri": DATA, "samples": 16}}},
               lora={"rank": 4, "alpha": 8, "merge": merge})
    ctx = context(home, f"lora-kd-{'merged' if merge else 'adapter'}", {"teacher": teacher})
    result = recipe.run(spec, ctx)
    assert_lineage(home, result, ctx, "lora-kd", teacher)
    local = download(home, result.model_uri, tmp_path / "dl")
    tags = version_of(home, result.model_uri).tags
    if merge:
        assert (local / "config.json").exists() and not (local / "adapter_config.json").exists()
        assert "anneal.adapter_base" not in tags
    else:
        from anneal.modeling.uris import adapter_base, load_adapter_model

        base = adapter_base(local)
        assert base == f"runs:/{result.mlflow_run_id}/base-model" == tags["anneal.adapter_base"]
        model = load_adapter_model(local, cache_dir=tmp_path / "cache", tracking_uri=home["tracking_uri"])
        assert model.get_base_model().config.num_hidden_layers == 2


def test_kd_rl_raises_exact_answer_accuracy_over_its_start(home, teacher):
    # The start is the shared, partly trained sft model (~0.25-0.29). GRPO practises on training
    # prompts and is scored greedily on 256 held-out eval questions, start and result alike
    # (fixed seed): 60 steps of 16 prompts x 16 samples at temperature 0.8. Measured
    # (docs/BENCHMARKS.md): training reward 0.22 -> 0.31, held-out +2 to +6 points depending on
    # the start; a 3-point bar on 256 questions was one standard error, so it failed by chance.
    data = {"uri": DATA, "samples": 512, "maxSeqLength": 128, "reasoning": "off"}
    spec = job("kd-rl", {"fromResource": {"kind": "DistillationJob", "name": "teacher"}},
               dataset=data, evalDataset={**data, "split": "eval", "samples": 256},
               rl={"groupSize": 16, "kdCoef": 0.01, "klCoef": 0.01, "maxNewTokens": 8, "temperature": 0.8},
               training={"steps": 60, "batchSize": 16, "learningRate": 2e-4, "checkpointEvery": 60},
               evaluation={"samples": 256, "reasoningModes": ["off"], "maxNewTokens": 8})
    ctx = context(home, "kd-rl", {"teacher": teacher, "student": teacher})
    result = recipe.run(spec, ctx)
    assert result.phase == "Succeeded", result.message
    m = result.metrics
    assert 0.1 <= m["startAccuracyOff"] <= 0.6, m  # a partly trained start, as intended
    # GRPO learns: the reward on the training prompts (256 samples a step) rises over the run.
    history = store.client(home["tracking_uri"]).get_metric_history(result.mlflow_run_id, "train/reward_mean")
    rewards = [h.value for h in sorted(history, key=lambda h: h.step)]
    first, last = sum(rewards[:15]) / 15, sum(rewards[-15:]) / 15
    assert len(rewards) == 60 and last > first + 0.05, rewards
    # And it carries over to the 256 held-out questions. The start itself varies by a few points
    # between runs (the shared teacher's training is not bit-reproducible across thread counts),
    # and one held-out question is 0.4 points: the figure asked is a gain, not a size of gain.
    assert m["studentAccuracyOff"] > m["startAccuracyOff"], m
    assert m["rlGain"] == pytest.approx(m["studentAccuracy"] - m["startAccuracy"], abs=2e-6)  # 6 decimals each
    assert m["studentAccuracy"] == m["studentAccuracyOff"]  # one mode evaluated: the mean is that mode
    tags = version_of(home, result.model_uri).tags
    assert tags[store.TAG_METHOD] == "kd-rl" and tags[store.TAG_TEACHER] == teacher


# Tests that read the training loss only: the cheapest evaluation a job allows (no generation).
LOSS_ONLY = {"samples": 1, "maxNewTokens": 1, "reasoningModes": ["on"], "metrics": ["perplexity"]}


def losses(home, run_id: str) -> list[float]:
    history = store.client(home["tracking_uri"]).get_metric_history(run_id, "train/loss")
    return [h.value for h in sorted(history, key=lambda h: h.step)]


def test_kd_on_two_workers_ddp_and_fsdp_matches_one_worker(home, teacher):
    # The same global batch (1 worker x 8 = 2 workers x 4, the same samples each step: see
    # harness.global_order), fp32, from the same derived student. Each worker's loss is a mean over
    # its own tokens, weighted by its share of the global batch's tokens (parallel.token_weight), so
    # the logged mean over the workers, and the averaged gradients, are one worker's token-weighted
    # mean: the three runs agree step by step to float rounding. (Unweighted, as before, step 0
    # differed by 2.1% on this data and later steps drifted apart.)
    runs = {}
    for name, workers, batch, strategy in [("one", 1, 8, "ddp"), ("ddp", 2, 4, "ddp"), ("fsdp", 2, 4, "fsdp")]:
        spec = job("kd", {"fromTeacher": {"depth": {"keepLayers": 2}, "calibration": {"uri": DATA, "samples": 16}}},
                   training={"steps": 5, "batchSize": batch, "learningRate": 3e-3, "strategy": strategy},
                   resources={"workers": workers, "cpusPerWorker": 0.5}, evaluation=LOSS_ONLY)
        ctx = context(home, f"kd-{name}", {"teacher": teacher})
        result = recipe.run(spec, ctx)
        assert result.phase == "Succeeded", (name, result.message)
        runs[name] = losses(home, result.mlflow_run_id)
        assert len(runs[name]) == 5, (name, runs[name])
    for step, (one, ddp, fsdp) in enumerate(zip(runs["one"], runs["ddp"], runs["fsdp"])):
        assert ddp == pytest.approx(one, rel=1e-3), (step, runs)
        assert fsdp == pytest.approx(ddp, rel=1e-3), (step, runs)
    # All three learn: the derived student starts close to its teacher (a small KD loss), the
    # first step at this learning rate throws it off, and from there the loss comes down.
    for name in runs:
        assert min(runs[name][1:]) < runs[name][1], (name, runs)


# Both resume tests train in fp32: bf16 on this CPU is ~18x slower a step (docs/BENCHMARKS.md)
# and FSDP's shards are fp32 under bf16 mixed precision too, so the resume path is the same;
# bf16 training and its bf16 safetensors export run on 2 FSDP workers in test_chat_families.py.
@pytest.mark.parametrize("workers,strategy", [(1, "ddp"), (2, "fsdp")], ids=["1-worker-ddp", "2-worker-fsdp"])
def test_a_killed_run_resumes_from_its_last_checkpoint(home, ray_cluster, workers, strategy):
    # FSDP: every worker writes its shard (torch.distributed.checkpoint) and Ray Train gathers
    # them into one checkpoint; the resumed attempt loads the shards back on its workers.
    steps = 20
    spec = job("sft", {"config": {"hiddenSize": 32, "layers": 2, "heads": 4}},
               training={"steps": steps, "batchSize": 4, "learningRate": 1e-3, "checkpointEvery": 5,
                         "strategy": strategy, "gradientCheckpointing": strategy == "fsdp"},
               resources={"workers": workers, "cpusPerWorker": 0.5}, evaluation=LOSS_ONLY)
    ctx = context(home, "resume")
    ctx.run_id = store.create_run(ctx.target, ctx.run_name(), ctx.lineage_tags())
    job_file = home["root"] / "resume-job.json"
    job_file.write_text(json.dumps({"spec": spec.to_dict(), "context": ctx.__dict__}))
    driver = (
        "import json, sys, ray\n"
        "from anneal.api.distillation import DistillationJobSpec\n"
        "from anneal.distill import recipe\n"
        "job = json.load(open(sys.argv[1]))\n"
        "ray.init(address=sys.argv[2], log_to_driver=False)\n"
        "recipe.run(DistillationJobSpec.model_validate(job['spec']), recipe.JobContext(**job['context']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver, str(job_file), ray_cluster],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    storage = Path(ctx.work_dir) / "ray"
    deadline = time.monotonic() + 300
    try:
        while harness.latest_checkpoint(storage) is None:
            assert proc.poll() is None, "the first attempt ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; Ray reaps its trainer and workers
        proc.wait()
    _, killed_at = harness.latest_checkpoint(storage)
    assert 5 <= killed_at < steps
    result = recipe.run(spec, ctx)
    assert result.phase == "Succeeded", result.message
    assert result.progress["resumedFromStep"] >= killed_at  # not step 0
    assert store.latest_metrics(home["tracking_uri"], ctx.run_id)["train/step"] == steps
    kept = sorted(storage.glob(f"**/{harness.STATE_FILE}"))
    assert {json.loads(k.read_text())["format"] for k in kept} == {"dcp" if strategy == "fsdp" else "full"}
    if strategy == "fsdp":  # one shard per worker
        assert all(len(list((k.parent / "dcp").glob("*.distcp"))) == workers for k in kept)
    # The exported model is a plain Hugging Face checkpoint in the training precision.
    from safetensors import safe_open

    local = download(home, result.model_uri, home["root"] / f"dl-{strategy}")
    with safe_open(str(local / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert dtypes == {"torch.float32"}
    assert json.loads((local / "config.json").read_text())["dtype"] == "float32"
