"""The compression recipe: pre-flight, prune (+ KD recovery), quantize, evaluate, gate, record in MLflow.

One module, one job: `setup` resolves the source model and the MLflow run and runs the
pre-flight checks; `run` does the steps, each heavy one as a Ray task with the spec's resources
(recovery distillation is the distillation recipe's `TorchTrainer`, called, not copied);
`cleanup` removes intermediate checkpoints. Each step's figures are reported separately
(MLflow keys ``source.*``, ``pruning.*``, ``quantization.*``; flat status keys ``source*``,
``pruned*``, ``quantized*``) and the final model is gated on accuracy retention: below
``evaluation.minRetention`` the job ends ``Rejected`` and its version is registered with a
``rejected`` tag (never an alias). Called by `anneal run` (embedded), by the Ray Jobs API
entrypoint (``python -m anneal.compress.recipe --job job.json``) and inside a KubeRay RayJob.
Work directories must be visible to the Ray workers (one node, or a shared volume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from anneal.api.common import now_iso
from anneal.api.compression import CompressionJobSpec
from anneal.distill.recipe import JobContext, JobResult, model_uri_of, resolve_dir
from anneal.runtime import placement
from anneal.tracking import mlflow_store as store

log = logging.getLogger(__name__)

RECIPE = "anneal.compress.recipe"
TAG_REJECTED = "rejected"
TAG_GATE = "anneal.gate"
TAG_SCHEME = "anneal.scheme"
TAG_PRUNING = "anneal.pruning"
PREFLIGHT_ARTIFACT = "preflight.json"


@dataclass
class CompressionConfig:
    """The typed inputs of one compression run, JSON-serialisable (it travels to Ray tasks)."""

    spec: dict[str, Any]
    context: dict[str, Any]
    source_uri: str = ""
    source_dir: str = ""
    source_version: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def typed_spec(self) -> CompressionJobSpec:
        return CompressionJobSpec.model_validate(self.spec)

    @property
    def ctx(self) -> JobContext:
        return JobContext(**self.context)


def cap(name: str) -> str:
    return name[:1].upper() + name[1:]


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``{"accuracy": x}`` → ``{"prunedAccuracy": x}`` (flat status names)."""
    return {f"{prefix}{cap(k)}": v for k, v in metrics.items()}


def retention(accuracy: float | None, source_accuracy: float | None) -> float | None:
    """Share of the source's accuracy kept; None when the source scores 0 (nothing to keep)."""
    if accuracy is None or not source_accuracy:
        return None
    return accuracy / source_accuracy


def gate(metrics: dict[str, float], min_retention: float | None, questions: int | None = None) -> tuple[bool, str]:
    """(passed, message) of the retention gate; without a retention figure it does not pass.

    A source model that scores 0 leaves nothing to retain: the ratio cannot be computed, so the
    gate cannot be evaluated and the job is `Rejected` (it never passes without evidence).
    """
    from anneal.control.gates import check_threshold

    if min_retention is None:
        return True, "no gate (evaluation.minRetention not set)"
    figures = (f"accuracy {metrics.get('accuracy', float('nan')):.4f} vs source "
               f"{metrics.get('sourceAccuracy', float('nan')):.4f}")
    why = None
    if metrics.get("retention") is None:
        on = f" on {questions} questions" if questions else ""
        why = (f"retention cannot be computed: the source model scores {metrics.get('sourceAccuracy', 0.0):.4g} "
               f"accuracy{on}")
    v = check_threshold(metrics, "retention", min=min_retention, why_missing=why)
    if not v.passed and v.value is None:
        return False, f"{v.reason} ({figures})"
    if not v.passed:
        return False, (f"retention {v.value:.4f} < minRetention {min_retention:g} ({figures}, "
                       f"sizeRatio {metrics.get('sizeRatio', float('nan')):.4f})")
    return True, f"retention {v.value:.4f} >= minRetention {min_retention:g} ({figures})"


# ----------------------------------------------------------------------------- Ray tasks


def eval_plan(spec: CompressionJobSpec) -> Any:
    from anneal.compress.evaluation import EvalPlan

    ev = spec.evaluation
    ds = ev.dataset
    return EvalPlan(
        dataset_uri=ds.uri, split=ds.split, format=ds.format, samples=ds.samples or ev.samples,
        modes=tuple(ev.reasoning_modes), max_new_tokens=ev.max_new_tokens, max_seq_length=ds.max_seq_length,
    )


def evaluate_task(cfg: dict[str, Any], model_dir: str, cache_key: str | None) -> dict[str, float]:
    """Accuracy per reasoning mode and perplexity of one checkpoint (cached when `cache_key` is given)."""
    from anneal.compress.evaluation import cached_evaluate_dir, evaluate_dir

    c = CompressionConfig(**cfg)
    spec, cache = c.typed_spec, Path(c.ctx.cache_dir)
    plan = eval_plan(spec)
    if cache_key:
        return cached_evaluate_dir(model_dir, plan, cache_key, cache, device=placement.device_of(spec.resources))
    return evaluate_dir(model_dir, plan, cache_dir=cache / "datasets", device=placement.device_of(spec.resources))


def attention_maps_task(cfg: dict[str, Any], model_dir: str) -> dict[str, float]:
    """`evaluation.attentionMaps`: the output's maps of N evaluated answers, logged to the run under explain/."""
    from anneal.explain.evaluation import log_attention_maps

    c = CompressionConfig(**cfg)
    spec, ctx = c.typed_spec, c.ctx
    return log_attention_maps(ctx.tracking_uri, ctx.run_id, model_dir, eval_plan(spec), spec.evaluation.attention_maps,
                              Path(ctx.work_dir) / "explain", cache_dir=Path(ctx.cache_dir) / "datasets",
                              device=placement.device_of(spec.resources), model_name=f"compressed {c.source_uri}")


def prune_task(cfg: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Prune the source by `spec.pruning` (importance on its calibration data); save to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.compress.ffn_fusion import prune_with_attention
    from anneal.compress.pruning import PruningPlan
    from anneal.distill.students import calibration_batches
    from anneal.modeling.chat import dir_declares_reasoning_toggle, mark_reasoning_toggle
    from anneal.modeling.layerwise_llama import register
    from anneal.modeling.tiny import save_pretrained

    c = CompressionConfig(**cfg)
    p = c.typed_spec.pruning
    assert p is not None
    register()
    tokenizer = AutoTokenizer.from_pretrained(c.source_dir)
    model = AutoModelForCausalLM.from_pretrained(c.source_dir, dtype="auto").eval()
    source_dtype = next(model.parameters()).dtype
    model = model.float()  # importance in fp32
    plan = PruningPlan.from_spec(p.to_dict(), field_prefix="spec.pruning")
    toggle = dir_declares_reasoning_toggle(c.source_dir)  # calibrated on the prompts the model was trained on
    batches = list(calibration_batches(tokenizer, p.calibration, c.ctx.cache_dir, toggle=toggle))
    pruned, report = prune_with_attention(model, plan, batches)
    pruned = pruned.to(source_dtype)  # keep the source's storage dtype: sizes compare like for like
    tmp = Path(out_dir + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(pruned, tokenizer, tmp)
    mark_reasoning_toggle(tmp, toggle)  # the pruned model is the source's: it takes the toggle as the source did
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    figures: dict[str, Any] = {
        "params": float(report["paramsBefore"]),
        "prunedParams": float(report["paramsAfter"]),
        "prunedParamRatio": float(report["paramRatio"]),
        "prunedLayers": float(report["config"]["numHiddenLayers"]),
        "keptLayers": report["keptLayers"],
        "config": report["config"],
    }
    attention = report.get("attention")
    if attention is not None:
        # sequential depth = attention + FFN sub-layers a token passes one after another
        figures.update({
            "prunedAttentionLayers": float(report["config"]["numHiddenLayers"]
                                           - len(report["config"]["noAttentionLayers"])),
            "prunedSequentialDepth": float(attention["sequentialDepthAfter"]),
            "prunedSequentialDepthRatio": attention["sequentialDepthAfter"] / report["sequentialDepthBefore"],
            "prunedFusedRuns": float(len(attention["fusedRuns"])),
            "droppedAttention": attention["droppedAttention"],
            "fusedRuns": attention["fusedRuns"],
        })
        for key in ("fusionGapKl", "fusionGapTop1"):
            if key in attention:
                figures[f"pruned{key[0].upper()}{key[1:]}"] = float(attention[key])
    return figures


def quantize_task(cfg: dict[str, Any], model_dir: str, out_dir: str) -> dict[str, Any]:
    """Quantize `model_dir` by `spec.quantization` into a compressed-tensors checkpoint in `out_dir`."""
    from anneal.compress.quantization import QuantPlan, quantize
    from anneal.data.datasets import load_samples
    from anneal.modeling.chat import dir_declares_reasoning_toggle, mark_reasoning_toggle

    c = CompressionConfig(**cfg)
    q = c.typed_spec.quantization
    assert q is not None
    plan = QuantPlan.from_spec(q)
    samples = None
    toggle = dir_declares_reasoning_toggle(model_dir)
    if plan.needs_data:
        ds = q.calibration
        samples = load_samples(ds.uri, split=ds.split, format=ds.format, samples=ds.samples or 64,
                               reasoning=ds.reasoning, cache_dir=Path(c.ctx.cache_dir) / "datasets", toggle=toggle)
    tmp = Path(out_dir + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    figures = quantize(Path(model_dir), tmp, plan, samples, q.calibration.max_seq_length)
    mark_reasoning_toggle(tmp, toggle)  # the quantized model takes the toggle as its source did
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return figures


# ----------------------------------------------------------------------------- setup


def setup(spec: CompressionJobSpec, ctx: JobContext) -> CompressionConfig:
    """Resolve the source model, create / reuse the MLflow run, log params and lineage tags."""
    Path(ctx.work_dir).mkdir(parents=True, exist_ok=True)
    if ctx.run_id is None:
        ctx.run_id = store.create_run(ctx.target, ctx.run_name(), {**ctx.lineage_tags(), store.TAG_RECIPE: RECIPE})
    store.log_params(ctx.tracking_uri, ctx.run_id, dict(store.iter_params(spec.to_dict())))
    source_uri = model_uri_of(spec.model.uri, ctx, "model")
    if not source_uri:
        raise ValueError("spec.model: nothing to compress (give uri or fromResource)")
    source_dir = resolve_dir(source_uri, ctx)
    version = None
    try:
        found = store.model_version_of(ctx.tracking_uri, source_uri)
        version = found[1] if found else None
    except Exception:
        version = None
    tags = {store.TAG_SOURCE: source_uri, store.TAG_RECIPE: RECIPE}
    if version:
        tags[store.TAG_SOURCE_VERSION] = version
    if spec.quantization is not None:
        tags[TAG_SCHEME] = f"{spec.quantization.scheme}/{spec.quantization.algorithm}"
    if spec.pruning is not None:
        tags[TAG_PRUNING] = json.dumps(spec.pruning.to_dict(), sort_keys=True)[:4000]
    store.set_tags(ctx.tracking_uri, ctx.run_id, tags)
    return CompressionConfig(spec=spec.to_dict(), context=asdict(ctx), source_uri=source_uri,
                             source_dir=str(source_dir), source_version=version)


def preflight(spec: CompressionJobSpec, cfg: CompressionConfig) -> list[str]:
    """Run the pre-flight checks; returns the errors (warnings go onto `cfg.warnings`)."""
    from anneal.compress.preflight import check_model, static_advice

    cfg.warnings = static_advice(spec)
    config = json.loads((Path(cfg.source_dir) / "config.json").read_text())
    found = check_model(spec, config)
    cfg.warnings += found.warnings
    ctx = cfg.ctx
    try:
        store.client(ctx.tracking_uri).log_dict(
            ctx.run_id, {"errors": found.errors, "warnings": cfg.warnings, "figures": found.figures}, PREFLIGHT_ARTIFACT
        )
        if found.figures:
            store.log_metrics(ctx.tracking_uri, ctx.run_id, {f"preflight.{k}": v for k, v in found.figures.items()})
    except Exception as exc:
        log.warning("could not record pre-flight findings: %s", exc)
    return found.errors


# ----------------------------------------------------------------------------- run


def _recover(spec: CompressionJobSpec, cfg: CompressionConfig, pruned_dir: Path) -> tuple[Path, dict[str, float]]:
    """KD from the unpruned source into the pruned model with the distillation recipe's trainer."""
    from anneal.api.distillation import DistillationJobSpec
    from anneal.distill.recipe import train

    p = spec.pruning
    assert p is not None and p.recovery is not None
    r = p.recovery
    dspec = DistillationJobSpec.model_validate({
        "method": "kd",
        "teacher": {"uri": cfg.source_dir},
        "student": {"uri": str(pruned_dir)},
        "dataset": r.dataset.to_dict(),
        "kd": r.kd.to_dict(),
        "training": {"steps": r.steps, "batchSize": r.batch_size, "learningRate": r.learning_rate,
                     "warmupSteps": min(10, r.steps // 10), "precision": "fp32"},
        "resources": spec.resources.to_dict(),
    })
    ctx = cfg.ctx
    sub = JobContext(**{**asdict(ctx), "work_dir": str(Path(ctx.work_dir) / "recovery")})
    out = train(dspec, sub, pruned_dir, Path(cfg.source_dir), r.steps)
    figures: dict[str, float] = {"recoverySteps": float(r.steps)}
    last = store.latest_metrics(ctx.tracking_uri, ctx.run_id)
    if "train/loss" in last:
        figures["recoveryLoss"] = float(last["train/loss"])
    return out, figures


def _progress(result: JobResult, on_progress: Callable[[dict[str, Any]], None] | None, step: int, total: int,
              message: str) -> None:
    result.progress = {"step": step, "totalSteps": total}
    if on_progress:
        on_progress({**result.to_status(), "phase": "Running", "message": message})


def compress(spec: CompressionJobSpec, cfg: CompressionConfig, result: JobResult,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, float]]:
    """The steps: source evaluation, pruning (+ recovery), quantization, each evaluated; returns (final dir, metrics)."""
    from anneal.compress.evaluation import model_key
    from anneal.compress.quantization import checkpoint_bytes, linear_size_figures, physical_floor, tensor_bytes

    ctx = cfg.ctx
    work = Path(ctx.work_dir)
    stages = 1 + (2 if spec.pruning else 0) + (1 if spec.pruning and spec.pruning.recovery else 0) + (
        2 if spec.quantization else 0)
    step = 0
    metrics: dict[str, float] = {}
    mlflow_metrics: dict[str, float] = {}
    source_dir = Path(cfg.source_dir)

    _progress(result, on_progress, step, stages, "evaluating the source model")
    source_eval = placement.on_a_worker(spec.resources, evaluate_task, asdict(cfg), str(source_dir),
                                        f"{cfg.source_uri}|{model_key(source_dir)}")
    step += 1
    source_size = checkpoint_bytes(source_dir)
    metrics.update(prefixed("source", source_eval))
    metrics["sourceSizeBytes"] = float(source_size)
    mlflow_metrics.update({f"source.{k}": v for k, v in source_eval.items()})
    mlflow_metrics["source.sizeBytes"] = float(source_size)

    current = source_dir
    current_eval = source_eval
    if spec.pruning is not None:
        _progress(result, on_progress, step, stages, "pruning")
        report = placement.on_a_worker(spec.resources, prune_task, asdict(cfg), str(work / "pruned"))
        step += 1
        current = work / "pruned"
        figures = {k: v for k, v in report.items() if isinstance(v, float)}
        if spec.pruning.recovery is not None:
            _progress(result, on_progress, step, stages, f"recovering with KD ({spec.pruning.recovery.steps} steps)")
            recovered, rec = _recover(spec, cfg, current)
            step += 1
            current = recovered
            figures.update(rec)
        _progress(result, on_progress, step, stages, "evaluating the pruned model")
        current_eval = placement.on_a_worker(spec.resources, evaluate_task, asdict(cfg), str(current), None)
        step += 1
        size = checkpoint_bytes(current)
        pruned_metrics = {**current_eval, "sizeBytes": float(size), "sizeRatio": size / source_size}
        ret = retention(current_eval.get("accuracy"), source_eval.get("accuracy"))
        if ret is not None:
            pruned_metrics["retention"] = ret
        metrics.update(prefixed("pruned", pruned_metrics))
        metrics.update({k: v for k, v in figures.items() if k.startswith(("pruned", "recovery"))})
        mlflow_metrics.update({f"pruning.{k}": v for k, v in {**pruned_metrics, **figures}.items()})
        tags = {"anneal.pruning.kept_layers": json.dumps(report["keptLayers"])}
        if "droppedAttention" in report:
            tags["anneal.pruning.dropped_attention"] = json.dumps(report["droppedAttention"])
            tags["anneal.pruning.fused_runs"] = json.dumps(report["fusedRuns"])
        store.set_tags(ctx.tracking_uri, ctx.run_id, tags)

    if spec.quantization is not None:
        q = spec.quantization
        _progress(result, on_progress, step, stages, f"quantizing {q.scheme} ({q.algorithm})")
        before = current
        qfig = placement.on_a_worker(spec.resources, quantize_task, asdict(cfg), str(before), str(work / "quantized"))
        step += 1
        current = work / "quantized"
        _progress(result, on_progress, step, stages, "evaluating the quantized model")
        current_eval = placement.on_a_worker(spec.resources, evaluate_task, asdict(cfg), str(current), None)
        step += 1
        size = checkpoint_bytes(current)
        linear = linear_size_figures(tensor_bytes(current), tensor_bytes(before))
        qmetrics = {**current_eval, "sizeBytes": float(size), "sizeRatio": size / source_size,
                    "linearRatio": linear.get("quantizedLinearRatio", float("nan")),
                    "linearFloor": physical_floor(q.scheme), "modules": linear["quantizedModules"],
                    "calibrationSamples": float(qfig["calibrationSamples"])}
        ret = retention(current_eval.get("accuracy"), source_eval.get("accuracy"))
        if ret is not None:
            qmetrics["retention"] = ret
        metrics.update(prefixed("quantized", {k: v for k, v in qmetrics.items() if k != "calibrationSamples"}))
        mlflow_metrics.update({f"quantization.{k}": v for k, v in qmetrics.items()})

    final_size = checkpoint_bytes(current)
    metrics.update(current_eval)
    metrics["sizeBytes"] = float(final_size)
    metrics["sizeRatio"] = final_size / source_size
    ret = retention(current_eval.get("accuracy"), source_eval.get("accuracy"))
    if ret is not None:
        metrics["retention"] = ret
    if spec.evaluation.attention_maps:
        _progress(result, on_progress, stages, stages, "drawing attention maps")
        metrics.update(placement.on_a_worker(spec.resources, attention_maps_task, asdict(cfg), str(current)))
    mlflow_metrics.update({k: v for k, v in metrics.items() if not k.startswith(("source", "pruned", "quantized"))})
    store.log_metrics(ctx.tracking_uri, ctx.run_id, {k: v for k, v in mlflow_metrics.items() if v == v})
    result.progress = {"step": stages, "totalSteps": stages}
    return current, metrics


def run(spec: CompressionJobSpec, ctx: JobContext, on_progress: Callable[[dict[str, Any]], None] | None = None) -> JobResult:
    """Run the whole job and record it; never raises for a job failure (returns phase Failed / Rejected)."""
    result = JobResult(phase="Running", start_time=now_iso())
    cfg: CompressionConfig | None = None
    try:
        cfg = setup(spec, ctx)
        result.mlflow_run_id = ctx.run_id
        errors = preflight(spec, cfg)
        result.warnings = list(cfg.warnings)
        if errors:
            # The spec cannot work on this model: stop before any work (and do not retry).
            result.phase = "Rejected"
            result.message = "pre-flight: " + "; ".join(errors)
        else:
            if on_progress:
                on_progress({**result.to_status(), "phase": "Running", "message": "pre-flight passed"})
            final_dir, metrics = compress(spec, cfg, result, on_progress)
            result.metrics = {k: round(float(v), 6) for k, v in metrics.items() if v == v}
            passed, verdict = gate(metrics, spec.evaluation.min_retention, spec.evaluation.samples)
            result.model_uri = record(spec, cfg, final_dir, passed, verdict)
            result.phase = "Succeeded" if passed else "Rejected"
            result.message = f"registered {result.model_uri}; {verdict}" if passed else (
                f"rejected: {verdict}; registered {result.model_uri} with tag rejected=true (no alias)")
    except Exception as exc:  # the job ends with a phase and a message, never a traceback
        log.error("compression %s/%s failed: %s", ctx.namespace, ctx.name, exc)
        log.debug("%s", traceback.format_exc())
        result.phase = "Failed"
        result.message = f"{type(exc).__name__}: {exc}"[:2000]
    result.completion_time = now_iso()
    if ctx.run_id:
        try:
            store.write_result(ctx.tracking_uri, ctx.run_id, result.to_status())
            from mlflow.entities import RunStatus

            store.client(ctx.tracking_uri).set_terminated(
                ctx.run_id, RunStatus.to_string(RunStatus.FINISHED if result.phase == "Succeeded" else RunStatus.FAILED)
            )
        except Exception as exc:
            log.warning("could not record the result in MLflow: %s", exc)
    return result


def record(spec: CompressionJobSpec, cfg: CompressionConfig, final_dir: Path, passed: bool, verdict: str) -> str:
    """Upload the checkpoint and register it with lineage tags; a rejected version is tagged and never aliased."""
    ctx = cfg.ctx
    source = store.log_model_dir(ctx.tracking_uri, ctx.run_id, final_dir)
    tags = {**ctx.lineage_tags(), store.TAG_RECIPE: RECIPE, store.TAG_SOURCE: cfg.source_uri,
            "anneal.mlflow_run_id": ctx.run_id, TAG_GATE: "passed" if passed else "rejected",
            "anneal.gate_message": verdict[:4000]}
    if cfg.source_version:
        tags[store.TAG_SOURCE_VERSION] = cfg.source_version
    if spec.quantization is not None:
        tags[TAG_SCHEME] = f"{spec.quantization.scheme}/{spec.quantization.algorithm}"
    if spec.pruning is not None:
        tags[TAG_PRUNING] = json.dumps(spec.pruning.to_dict(), sort_keys=True)[:4000]
    if not passed:
        tags[TAG_REJECTED] = "true"
    steps = " + ".join(s for s in (
        "pruned" if spec.pruning else "", spec.quantization.scheme if spec.quantization else "") if s)
    return store.register_model(ctx.tracking_uri, ctx.registered_model_name, source, ctx.run_id, tags,
                                description=f"{steps} of {cfg.source_uri} ({ctx.namespace}/{ctx.name})")


def cleanup(ctx: JobContext, keep: bool = False) -> None:
    """Remove the intermediate checkpoints of a finished job (the result lives in MLflow)."""
    if not keep:
        for name in ("pruned", "quantized", "recovery"):
            shutil.rmtree(Path(ctx.work_dir) / name, ignore_errors=True)


# ------------------------------------------------------------------------ entrypoint


def main(argv: list[str] | None = None) -> int:
    """Entry point on a Ray cluster: ``python -m anneal.compress.recipe --job job.json``."""
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="path to (or inline) JSON {spec, context}")
    parser.add_argument("--keep-work", action="store_true", help="keep intermediate checkpoints")
    args = parser.parse_args(argv)
    text = Path(args.job).read_text() if os.path.exists(args.job) else args.job
    job = json.loads(text)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = CompressionJobSpec.model_validate(job["spec"])
    ctx = JobContext(**job["context"])
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), ignore_reinit_error=True)
    result = run(spec, ctx)
    cleanup(ctx, keep=args.keep_work)
    print(json.dumps({"anneal_result": result.to_status()}))
    return 0 if result.phase == "Succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
