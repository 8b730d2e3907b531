"""The distillation recipe: prepare the student, train it on Ray Train, evaluate, record in MLflow.

One module, one job: `setup` resolves models and the MLflow run, `train` runs `train_loop` on
a `TorchTrainer` (`anneal.distill.harness`, shared with kd-rl: one CPU worker with gloo up to
many GPU workers with NCCL), `evaluate` scores student and teacher with reasoning on and off,
`record` registers the model version with lineage tags.
The same `run` is called by `anneal run` (embedded), by the Ray Jobs API entrypoint
(`python -m anneal.distill.recipe --job job.json`) and inside a KubeRay RayJob.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from anneal.api.common import now_iso
from anneal.api.distillation import DistillationJobSpec
from anneal.distill import parallel
from anneal.distill.harness import (
    TAG_RESUMED_FROM,
    autocast,
    Tokenized,
    dataset_samples,
    global_order,
    is_checkpoint_step,
    load_teacher,
    lr_at,
    maybe_checkpoint,
    run_trainer,
    start_worker,
    student_toggle,
)
from anneal.runtime import placement
from anneal.tracking import mlflow_store as store

log = logging.getLogger(__name__)

RECIPE = "anneal.distill.recipe"


@dataclass
class JobContext:
    """Everything a workload needs besides its spec; JSON-serialisable (it travels to Ray)."""

    kind: str
    namespace: str
    name: str
    uid: str
    tracking_uri: str
    experiment: str
    registered_model_name: str
    work_dir: str
    cache_dir: str
    artifact_root: str | None = None
    run_id: str | None = None
    # ModelRefs resolved to URIs by the caller (fromResource / fromStage → models:/...).
    resolved_uris: dict[str, str] = field(default_factory=dict)
    extra_tags: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> store.TrackingTarget:
        return store.TrackingTarget(
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            artifact_root=self.artifact_root,
            registered_model_name=self.registered_model_name,
            tags=self.extra_tags,
        )

    def run_name(self) -> str:
        return f"{self.namespace}.{self.name}"

    def lineage_tags(self) -> dict[str, str]:
        return {
            store.TAG_KIND: self.kind,
            store.TAG_NAMESPACE: self.namespace,
            store.TAG_NAME: self.name,
            store.TAG_UID: self.uid,
            store.TAG_RECIPE: RECIPE,
            **self.extra_tags,
        }


@dataclass
class JobResult:
    """What a workload reports at the end (also stored on its MLflow run)."""

    phase: str
    message: str = ""
    model_uri: str | None = None
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    start_time: str | None = None
    completion_time: str | None = None

    def to_status(self) -> dict[str, Any]:
        out = {
            "phase": self.phase,
            "message": self.message,
            "modelUri": self.model_uri,
            "mlflowRunId": self.mlflow_run_id,
            "metrics": self.metrics,
            "progress": self.progress,
            "warnings": self.warnings,
            "startTime": self.start_time,
            "completionTime": self.completion_time,
        }
        return {k: v for k, v in out.items() if v not in (None, [], {})}


def model_uri_of(ref_uri: str | None, ctx: JobContext, key: str) -> str | None:
    """A model URI, taking the caller's resolution of fromResource / fromStage refs first."""
    return ctx.resolved_uris.get(key) or ref_uri


# ----------------------------------------------------------------------------- setup


def resolve_dir(uri: str, ctx: JobContext) -> Path:
    from anneal.modeling.uris import resolve_model_dir

    return resolve_model_dir(uri, cache_dir=Path(ctx.cache_dir) / "models", tracking_uri=ctx.tracking_uri)


def prepare_student(spec: DistillationJobSpec, ctx: JobContext, teacher_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    """The directory of the student's starting checkpoint, and figures about how it was made.

    A registered student is resolved here; a fresh (`config`) or derived (`fromTeacher`) one is
    built on a Ray worker with one training worker's resources (`make_student`: the teacher is
    loaded there, on the GPU when the job has one, not in the driver).
    """
    init_dir = Path(ctx.work_dir) / "student-init"
    ref_uri = model_uri_of(spec.student.uri, ctx, "student")
    if ref_uri is not None:
        return resolve_dir(ref_uri, ctx), {"studentSource": ref_uri}
    if (init_dir / "config.json").exists():
        return init_dir, {"studentSource": "resumed"}  # a retried job starts from the same init
    info = placement.on_a_worker(spec.resources, make_student, spec, ctx, teacher_dir, init_dir,
                                 placement.device_of(spec.resources), name="anneal-make-student",
                                 inline_on_one_node=True)
    return init_dir, info


def make_student(spec: DistillationJobSpec, ctx: JobContext, teacher_dir: Path | None, init_dir: Path,
                 device: str = "cpu") -> dict[str, Any]:
    """Build a fresh (`config`) or derived (`fromTeacher`) student into `init_dir`; figures about it.

    Its init declares the reasoning toggle as its teacher does (`anneal.modeling.chat`);
    without a teacher it is Anneal's own and takes it.
    """
    from anneal.modeling.chat import dir_declares_reasoning_toggle
    from anneal.modeling.tiny import LlamaShape, build_llama, count_parameters, save_pretrained
    from anneal.modeling.tokenizer import builtin_tokenizer
    from transformers import AutoTokenizer

    info: dict[str, Any] = {"madeOn": placement.here(device)}
    student = spec.student
    if student.config is not None:
        c = student.config
        tokenizer = (
            AutoTokenizer.from_pretrained(str(teacher_dir))
            if teacher_dir is not None
            else builtin_tokenizer(Path(ctx.cache_dir) / "tokenizers")
        )
        shape = LlamaShape(
            hidden_size=c.hidden_size,
            layers=c.layers,
            heads=c.heads,
            kv_heads=c.kv_heads or c.heads,
            intermediate_size=c.intermediate_size or 4 * c.hidden_size,
            max_position_embeddings=c.max_position_embeddings,
        )
        model = build_llama(shape, tokenizer, seed=spec.training.seed)
        info["studentParams"] = float(count_parameters(model))
        _atomic_save(model, tokenizer, init_dir, save_pretrained,
                     toggle=dir_declares_reasoning_toggle(teacher_dir) if teacher_dir is not None else True)
        return info
    if student.from_teacher is not None:
        assert teacher_dir is not None
        from anneal.distill.students import derive_student

        model, tokenizer, report = derive_student(teacher_dir, student.from_teacher, ctx.cache_dir, device=device)
        info.update(report)
        _atomic_save(model.to("cpu"), tokenizer, init_dir, save_pretrained,
                     toggle=dir_declares_reasoning_toggle(teacher_dir))
        return info
    raise ValueError("spec.student: nothing to start from")


def _atomic_save(model: Any, tokenizer: Any, target: Path, save: Callable[..., Any], toggle: bool) -> None:
    from anneal.modeling.chat import mark_reasoning_toggle

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tokenizer, tmp)
    mark_reasoning_toggle(tmp, toggle)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


# ----------------------------------------------------------------------------- train


def total_steps(spec: DistillationJobSpec, n_samples: int, workers: int) -> int:
    t = spec.training
    if t.steps is not None:
        return t.steps
    if t.epochs is not None:
        per_step = t.batch_size * t.gradient_accumulation * workers
        return max(1, math.ceil(t.epochs * n_samples / per_step))
    return 100


def _batches(tokenized: Any, batch_size: int, seed: int, pad_id: int, rank: int = 0, world: int = 1):
    """Endless collated batches of this rank's share of each global batch (`harness.global_order`).

    `tokenized` is indexable (a list, or `harness.Tokenized`, which tokenizes a sample the
    first time this rank draws it).
    """
    from anneal.data.datasets import collate

    for idx in global_order(len(tokenized), batch_size, seed, rank, world):
        yield collate([tokenized[j] for j in idx], pad_id)


def build_objective(spec: DistillationJobSpec, teacher: Any | None) -> Callable[[Any, dict[str, Any]], tuple[Any, dict[str, float]]]:
    """The training loss of a method: (model, batch) → (loss, figures to log), token-weighted across workers."""
    loss_of = _method_objective(spec, teacher)

    def weighted(model: Any, batch: dict[str, Any]):
        loss, figures = loss_of(model, batch)
        w = parallel.token_weight(batch["labels"])  # every worker takes part (one all-reduce of a count)
        return loss * w, {k: v * w for k, v in figures.items()}

    return weighted


def _method_objective(spec: DistillationJobSpec, teacher: Any | None) -> Callable[[Any, dict[str, Any]], tuple[Any, dict[str, float]]]:
    """A method's loss on this worker's batch, a mean over its labelled tokens."""
    import torch

    if spec.method == "sft" or (spec.method == "cpt" and teacher is None):
        # sft: labels on the completion; cpt: labels on every token of a packed text block

        def sft(model: Any, batch: dict[str, Any]):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            return out.loss, {"ce": float(out.loss.detach())}

        return sft

    if teacher is None:
        raise ValueError(f"method {spec.method!r} needs a teacher model (spec.teacher)")
    from anneal.distill.losses import chunked_kd_loss

    kd = spec.kd

    def distill(model: Any, batch: dict[str, Any]):
        inner = parallel.unwrap(model)
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            logits_to_keep=1,  # the chunked loss computes logits itself
        )
        with torch.no_grad():
            t_out = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        res = chunked_kd_loss(
            out.hidden_states[-1],
            t_out.last_hidden_state,
            inner.get_output_embeddings(),
            teacher.get_output_embeddings(),
            batch["labels"],
            kind=kd.loss,
            temperature=kd.temperature,
            alpha=kd.alpha,
            chunk_size=kd.chunk_size,
        )
        return res.loss, {"kd": float(res.kd.detach()), "ce": float(res.ce.detach())}

    return distill


def train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker loop of sft, cpt, kd and lora-kd (runs on every worker)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.data.datasets import tokenize_sample
    from anneal.modeling.layerwise_llama import register as register_anneal_llama

    worker = start_worker(cfg)
    spec, rank, device = worker.spec, worker.rank, worker.device
    t = spec.training

    register_anneal_llama()  # model_type anneal_llama (attention removal, FFN fusion)
    tokenizer = AutoTokenizer.from_pretrained(worker.student_init)
    model = AutoModelForCausalLM.from_pretrained(worker.student_init, dtype=torch.float32)
    teacher = None
    if spec.method == "cpt" and worker.teacher_dir:  # cpt with a teacher: KD + next-token loss
        teacher = load_teacher(worker.teacher_dir, t.precision, device)
    if spec.method in ("kd", "lora-kd"):
        if not worker.teacher_dir:
            raise ValueError(f"method {spec.method!r} needs spec.teacher")
        teacher = load_teacher(worker.teacher_dir, t.precision, device)
    if spec.method == "lora-kd":
        from anneal.distill.lora import add_lora

        model = add_lora(model, spec.lora)

    model, params, optimizer, start_step = parallel.prepare(model, t, device, worker.resume_dir)

    ds = spec.dataset
    if spec.method == "cpt":
        from anneal.data.datasets import pack_texts
        from anneal.distill.cpt import documents

        tokenized = pack_texts(tokenizer, documents(spec, worker.cache_dir).train, ds.max_seq_length)
    else:
        toggle = student_toggle(spec, worker.student_init)  # its system message only if the student takes it
        # tokenized on first draw: a rank tokenizes its share of the data, not all of it
        tokenized = Tokenized(dataset_samples(ds, worker.cache_dir, toggle),
                              lambda s: tokenize_sample(tokenizer, s, ds.max_seq_length))
    steps = worker.total_steps

    objective = build_objective(spec, teacher)
    from anneal.modeling.chat import pad_id

    batches = _batches(tokenized, t.batch_size, t.seed, pad_id(tokenizer), rank, worker.world)
    for _ in range(start_step * t.gradient_accumulation):
        next(batches)  # resume at the same place in the data order
    logger = worker.metrics_logger()
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" and device.type == "cuda" else None
    model.train()
    step_times: list[float] = []
    log_seconds = 0.0
    try:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(t, steps, step)
            optimizer.zero_grad(set_to_none=True)
            figures: dict[str, float] = {}
            loss_sum = 0.0
            for _ in range(t.gradient_accumulation):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                with autocast(t.precision, device.type):
                    loss, figures = objective(model, batch)
                loss = loss / t.gradient_accumulation
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += float(loss.detach())
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = parallel.clip_grad_norm(params, 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step_times.append(time.perf_counter() - t0)
            done = step + 1
            figures = parallel.mean_over_workers({**figures, "loss": loss_sum})  # every worker takes part
            loss_sum = figures.pop("loss")
            if logger is not None:
                l0 = time.perf_counter()
                logger.log(
                    {"train/loss": loss_sum, "train/lr": lr_at(t, steps, step), "train/grad_norm": grad_norm,
                     "train/step": done, "train/total_steps": steps, "train/step_time_s": step_times[-1],
                     **{f"train/{k}": v for k, v in figures.items()}},
                    step=done,
                )
                log_seconds += time.perf_counter() - l0
            maybe_checkpoint(spec, model, optimizer, tokenizer, rank, done, steps, loss_sum, step_times, log_seconds, logger)
            if is_checkpoint_step(spec, done, steps):
                step_times, log_seconds = [], 0.0
    finally:
        if logger is not None:
            logger.close()


def train(spec: DistillationJobSpec, ctx: JobContext, student_init: Path, teacher_dir: Path | None, steps: int) -> Path:
    """Train the student with `train_loop` on Ray Train; returns the trained HF checkpoint."""
    return run_trainer(spec, ctx, student_init, teacher_dir, steps, loop=train_loop)


# -------------------------------------------------------------------------- evaluate


def eval_plan(spec: DistillationJobSpec, toggle: bool | None = None) -> Any:
    """The questions the student is scored on (an `EvalPlan`), or None where there are none (cpt without them).

    `toggle`: the student's reasoning toggle (`student_toggle`); None scores a model as it declares.
    """
    from anneal.compress.evaluation import EvalPlan

    ev, ds = spec.evaluation, spec.accuracy_dataset_ref()
    if spec.method == "cpt" and (ds is None or "accuracy" not in ev.metrics):
        return None
    assert ds is not None
    return EvalPlan(
        dataset_uri=ds.uri, split=ds.split, format=ds.format, samples=ds.samples or ev.samples,
        modes=tuple(ev.reasoning_modes), max_new_tokens=ev.max_new_tokens, max_seq_length=ds.max_seq_length,
        # cpt reports the held-out text's perplexity under that name; the chat answers' would overwrite it
        perplexity="perplexity" in ev.metrics and spec.method != "cpt", toggle=toggle,
    )


def attention_maps(spec: DistillationJobSpec, ctx: JobContext, student_dir: Path, result: JobResult,
                   toggle: bool | None = None) -> dict[str, float]:
    """`evaluation.attentionMaps`: the student's maps of N evaluated answers, logged to the run under explain/."""
    plan = eval_plan(spec, toggle)
    if plan is None:
        result.warnings.append("evaluation.attentionMaps: this cpt job scores no questions (set evaluation.dataset); "
                               "no attention maps were made")
        return {}
    return placement.on_a_worker(
        spec.resources, _attention_maps_task, ctx.tracking_uri, ctx.run_id, student_dir, plan,
        spec.evaluation.attention_maps, Path(ctx.work_dir) / "explain", Path(ctx.cache_dir) / "datasets",
        placement.device_of(spec.resources), f"student of {ctx.namespace}/{ctx.name}", name="anneal-attention-maps",
        inline_on_one_node=True)


def _attention_maps_task(tracking_uri: str, run_id: str, student_dir: Path, plan: Any, n: int, out_dir: Path,
                         cache_dir: Path, device: str, model_name: str) -> dict[str, float]:
    from anneal.explain.evaluation import log_attention_maps

    return log_attention_maps(tracking_uri, run_id, student_dir, plan, n, out_dir, cache_dir=cache_dir,
                              device=device, model_name=model_name)


def evaluate(
    spec: DistillationJobSpec, ctx: JobContext, student_dir: Path, teacher_dir: Path | None, teacher_uri: str | None,
    cache_key: str | None = None, toggle: bool | None = None,
) -> dict[str, float]:
    """Student (and cached teacher) accuracy per reasoning mode, retention and perplexity.

    Scored on a Ray worker with one training worker's resources (`score_models`; on its GPU when
    the job has one), not in the driver. With `cache_key`, the student's figures are cached too
    (a retried kd-rl job scores its starting point once). The student is scored with `toggle`
    (its training's reasoning toggle), the teacher as it declares.
    """
    plan = eval_plan(spec, toggle)
    if plan is None:
        return {}  # cpt's perplexity is on held-out text (`anneal.distill.cpt`); no questions to score
    student, teacher, where = placement.on_a_worker(
        spec.resources, score_models, plan, Path(ctx.cache_dir), student_dir, cache_key, teacher_dir, teacher_uri,
        placement.device_of(spec.resources), name="anneal-evaluate", inline_on_one_node=True)
    if ctx.run_id:
        store.set_tags(ctx.tracking_uri, ctx.run_id, {placement.TAG_EVALUATED_ON: where})
    metrics = {("perplexity" if k == "perplexity" else f"student{k[0].upper()}{k[1:]}"): v for k, v in student.items()}
    if teacher is not None:
        for k, v in teacher.items():
            metrics[f"teacher{k[0].upper()}{k[1:]}"] = v
        if teacher.get("accuracy"):
            metrics["retention"] = student.get("accuracy", 0.0) / teacher["accuracy"]
    return metrics


def score_models(plan: Any, cache: Path, student_dir: Path, cache_key: str | None, teacher_dir: Path | None,
                 teacher_uri: str | None, device: str = "cpu") -> tuple[dict[str, float], dict[str, float] | None, str]:
    """The student's figures under `plan`, the teacher's as it declares (cached per teacher version), and where."""
    import dataclasses

    from anneal.compress.evaluation import cached_evaluate_dir, evaluate_dir, model_key

    if cache_key is not None:
        student = cached_evaluate_dir(student_dir, plan, f"{cache_key}|{model_key(student_dir)}", cache, device=device)
    else:
        student = evaluate_dir(student_dir, plan, cache_dir=cache / "datasets", device=device)
    teacher = None
    if teacher_dir is not None:
        key = f"{teacher_uri}|{model_key(teacher_dir)}"
        teacher = cached_evaluate_dir(teacher_dir, dataclasses.replace(plan, toggle=None), key, cache, device=device)
    return student, teacher, placement.here(device)


# ----------------------------------------------------------------------------- run


def run(spec: DistillationJobSpec, ctx: JobContext, on_progress: Callable[[dict[str, Any]], None] | None = None) -> JobResult:
    """Run the whole job and record it; never raises for a job failure (returns phase Failed)."""
    started = now_iso()
    result = JobResult(phase="Running", start_time=started)
    Path(ctx.work_dir).mkdir(parents=True, exist_ok=True)
    run_id = ctx.run_id
    try:
        if run_id is None:
            run_id = store.create_run(ctx.target, ctx.run_name(), ctx.lineage_tags())
            ctx.run_id = run_id
        result.mlflow_run_id = run_id
        store.log_params(ctx.tracking_uri, run_id, dict(store.iter_params(spec.to_dict())))
        teacher_uri = model_uri_of(spec.teacher.uri if spec.teacher else None, ctx, "teacher")
        teacher_dir = resolve_dir(teacher_uri, ctx) if teacher_uri else None
        student_init, info = prepare_student(spec, ctx, teacher_dir)
        toggle = student_toggle(spec, student_init)
        if teacher_dir is not None and spec.method != "sft" and spec.student.config is None and spec.student.from_teacher is None:
            from anneal.distill.students import check_tokenizers_match

            check_tokenizers_match(teacher_dir, student_init)
        tags = {store.TAG_METHOD: spec.method, store.TAG_DATASET: spec.dataset.uri}
        if spec.imports:
            tags[store.TAG_METHOD] = "import"
            tags["anneal.imported_from"] = model_uri_of(spec.student.uri, ctx, "student") or ""
        if teacher_uri:
            tags[store.TAG_TEACHER] = teacher_uri
            version = _registry_version(ctx, teacher_uri)
            if version:
                tags[store.TAG_TEACHER_VERSION] = version
        store.set_tags(ctx.tracking_uri, run_id, tags)
        if info:
            store.log_metrics(ctx.tracking_uri, run_id, {k: v for k, v in info.items() if isinstance(v, (int, float))})
        if "madeOn" in info:
            store.set_tags(ctx.tracking_uri, run_id, {placement.TAG_STUDENT_MADE_ON: info["madeOn"]})
        # Read the data once up front: a bad data set fails here, clearly, before any worker starts.
        docs = None
        if spec.method == "cpt":
            docs, n_samples = _cpt_data(spec, ctx, student_init, run_id)
        else:
            n_samples = len(dataset_samples(spec.dataset, ctx.cache_dir))
        steps = total_steps(spec, n_samples, spec.resources.workers)
        result.progress = {"step": 0, "totalSteps": steps}
        if on_progress:
            on_progress(result.to_status())
        start_metrics: dict[str, float] = {}
        if spec.method == "kd-rl":
            from anneal.distill.rl import train_rl

            # RL must beat its own starting point: score the start with the same plan first
            start_metrics = evaluate(spec, ctx, student_init, None, None, cache_key=f"start|{student_init}",
                                     toggle=toggle)
            final_dir = train_rl(spec, ctx, student_init, teacher_dir, steps)
        elif spec.imports:  # no Ray Train workers: the model is evaluated and registered as it is
            final_dir = student_init
        else:
            final_dir = train(spec, ctx, student_init, teacher_dir, steps)
        final_dir = _declare_toggle(final_dir, toggle, ctx)
        final_metrics = store.latest_metrics(ctx.tracking_uri, run_id)
        run_tags = store.client(ctx.tracking_uri).get_run(run_id).data.tags
        result.progress = {"step": steps, "totalSteps": steps, "loss": final_metrics.get("train/loss"),
                           "resumedFromStep": int(run_tags.get(TAG_RESUMED_FROM, 0))}
        if on_progress:
            on_progress({**result.to_status(), "phase": "Running", "message": "evaluating"})
        metrics = evaluate(spec, ctx, final_dir, teacher_dir, teacher_uri, toggle=toggle)
        if docs is not None:
            from anneal.distill.cpt import heldout_metrics

            metrics.update(placement.on_a_worker(spec.resources, heldout_metrics, spec, docs, final_dir, student_init,
                                                 teacher_dir, placement.device_of(spec.resources),
                                                 name="anneal-heldout-perplexity", inline_on_one_node=True))
            if final_metrics.get("train/loss") is not None:
                metrics["trainLoss"] = final_metrics["train/loss"]
        for k, v in start_metrics.items():
            if k.startswith("student"):
                metrics["start" + k[len("student"):]] = v
        if "studentAccuracy" in metrics and "studentAccuracy" in start_metrics:
            metrics["rlGain"] = metrics["studentAccuracy"] - start_metrics["studentAccuracy"]
        if spec.evaluation.attention_maps:
            if on_progress:
                on_progress({**result.to_status(), "phase": "Running", "message": "drawing attention maps"})
            metrics.update(attention_maps(spec, ctx, final_dir, result, toggle))
        if "train/logging_share" in final_metrics:
            metrics["loggingShare"] = final_metrics["train/logging_share"]
        store.log_metrics(ctx.tracking_uri, run_id, {f"eval/{k}": v for k, v in metrics.items()})
        from anneal.distill.lora import TAG_ADAPTER_BASE, point_adapter_at
        from anneal.modeling.uris import adapter_base

        if adapter_base(final_dir):  # lora-kd with merge: false registers the adapter alone
            base_uri = model_uri_of(spec.student.uri, ctx, "student")
            if base_uri is None:  # a fresh or pruned student exists only in the work dir: keep it with the run
                store.log_model_dir(ctx.tracking_uri, run_id, student_init, artifact_path="base-model")
                base_uri = f"runs:/{run_id}/base-model"
            point_adapter_at(final_dir, base_uri)
            tags[TAG_ADAPTER_BASE] = base_uri
            store.set_tags(ctx.tracking_uri, run_id, {TAG_ADAPTER_BASE: base_uri})
        source = store.log_model_dir(ctx.tracking_uri, run_id, final_dir)
        version_tags = {**ctx.lineage_tags(), **tags, "anneal.mlflow_run_id": run_id}
        result.model_uri = store.register_model(
            ctx.tracking_uri, ctx.registered_model_name, source, run_id, version_tags,
            description=(f"imported from {tags['anneal.imported_from']}" if spec.imports else
                         f"{spec.method} student of {teacher_uri or ('raw text' if spec.method == 'cpt' else 'labels')}")
            + f" ({ctx.namespace}/{ctx.name})",
        )
        result.metrics = {k: round(float(v), 6) for k, v in metrics.items()}
        from anneal.report import comparison_notes, missing_figures

        # A figure that cannot be computed (or one above what it is compared with) says why, in status.
        result.warnings.extend(missing_figures(result.metrics, "DistillationJob")
                               + comparison_notes(result.metrics, "DistillationJob"))
        result.phase = "Succeeded"
        result.message = f"registered {result.model_uri}"
        if spec.imports:
            student_uri = model_uri_of(spec.student.uri, ctx, "student") or spec.student.uri
            result.message = f"imported {student_uri} (no training): registered {result.model_uri}"
    except Exception as exc:  # the job ends with a phase and a message, never a traceback
        log.error("distillation %s/%s failed: %s", ctx.namespace, ctx.name, exc)
        log.debug("%s", traceback.format_exc())
        from anneal.runtime.errors import short_error

        result.phase = "Failed"
        result.message = short_error(exc)
    result.completion_time = now_iso()
    if run_id:
        try:
            store.write_result(ctx.tracking_uri, run_id, result.to_status())
            from mlflow.entities import RunStatus

            store.client(ctx.tracking_uri).set_terminated(
                run_id, RunStatus.to_string(RunStatus.FINISHED if result.phase == "Succeeded" else RunStatus.FAILED)
            )
        except Exception as exc:
            log.warning("could not record the result in MLflow: %s", exc)
    return result


def _declare_toggle(model_dir: Path, toggle: bool, ctx: JobContext) -> Path:
    """The output model, declaring in its config.json whether it was trained with the reasoning toggle.

    An imported model is its source's directory (a download cache, or the user's own path): it is
    copied into the work dir first, and only when the declaration changes.
    """
    from anneal.modeling.chat import dir_declares_reasoning_toggle, mark_reasoning_toggle

    work = Path(ctx.work_dir).resolve()
    if work not in model_dir.resolve().parents:
        if dir_declares_reasoning_toggle(model_dir) == toggle:
            return model_dir
        out = work / "student-declared"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(model_dir, out)
        model_dir = out
    mark_reasoning_toggle(model_dir, toggle)
    return model_dir


def _cpt_data(spec: DistillationJobSpec, ctx: JobContext, student_init: Path, run_id: str) -> tuple[Any, int]:
    """A cpt job's documents and how many packed blocks they make (what `epochs` counts)."""
    from transformers import AutoTokenizer

    from anneal.data.datasets import pack_texts
    from anneal.distill.cpt import documents

    from anneal.modeling.layerwise_llama import register as register_anneal_llama

    docs = documents(spec, ctx.cache_dir)
    register_anneal_llama()  # AutoTokenizer reads config.json's model_type (a fused student's is anneal_llama)
    tokenizer = AutoTokenizer.from_pretrained(str(student_init))
    blocks = pack_texts(tokenizer, docs.train, spec.dataset.max_seq_length)
    tokens = sum(len(b["input_ids"]) for b in blocks)
    store.log_params(ctx.tracking_uri, run_id, {"cpt.heldout": docs.heldout_source[:500]})
    store.log_metrics(ctx.tracking_uri, run_id, {
        "cpt/documents": float(len(docs.train)), "cpt/heldout_documents": float(len(docs.heldout)),
        "cpt/blocks": float(len(blocks)), "cpt/tokens": float(tokens),
    })
    return docs, len(blocks)


def _registry_version(ctx: JobContext, uri: str) -> str | None:
    try:
        found = store.model_version_of(ctx.tracking_uri, uri)
    except Exception:
        return None
    return found[1] if found else None


# ------------------------------------------------------------------------ entrypoint


def main(argv: list[str] | None = None) -> int:
    """Entry point on a Ray cluster: ``python -m anneal.distill.recipe --job job.json``."""
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="path to (or inline) JSON {spec, context}")
    args = parser.parse_args(argv)
    text = Path(args.job).read_text() if os.path.exists(args.job) else args.job
    job = json.loads(text)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = DistillationJobSpec.model_validate(job["spec"])
    ctx = JobContext(**job["context"])
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), ignore_reinit_error=True)
    result = run(spec, ctx)
    print(json.dumps({"anneal_result": result.to_status()}))
    return 0 if result.phase == "Succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
