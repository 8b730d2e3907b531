"""The distillation recipe: prepare the student, train it on Ray Train, evaluate, record in MLflow.

One module, one job: `setup` resolves models and the MLflow run, `train` runs a `TorchTrainer`
(one CPU worker with gloo up to many GPU workers with NCCL), `evaluate` scores student and
teacher with reasoning on and off, `record` registers the model version with lineage tags.
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
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from anneal.api.common import now_iso
from anneal.api.distillation import DistillationJobSpec
from anneal.tracking import mlflow_store as store

log = logging.getLogger(__name__)

RECIPE = "anneal.distill.recipe"
STATE_FILE = "anneal_state.json"
TAG_RESUMED_FROM = "anneal.resumed_from_step"


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
    """The directory of the student's starting checkpoint, and figures about how it was made."""
    from anneal.modeling.tiny import LlamaShape, build_llama, count_parameters, save_pretrained
    from anneal.modeling.tokenizer import builtin_tokenizer
    from transformers import AutoTokenizer

    init_dir = Path(ctx.work_dir) / "student-init"
    info: dict[str, Any] = {}
    student = spec.student
    ref_uri = model_uri_of(student.uri, ctx, "student")
    if ref_uri is not None:
        return resolve_dir(ref_uri, ctx), {"studentSource": ref_uri}
    if (init_dir / "config.json").exists():
        return init_dir, {"studentSource": "resumed"}  # a retried job starts from the same init
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
        _atomic_save(model, tokenizer, init_dir, save_pretrained)
        return init_dir, info
    if student.from_teacher is not None:
        assert teacher_dir is not None
        from anneal.distill.students import derive_student

        model, tokenizer, report = derive_student(teacher_dir, student.from_teacher, ctx.cache_dir)
        info.update(report)
        _atomic_save(model, tokenizer, init_dir, save_pretrained)
        return init_dir, info
    raise ValueError("spec.student: nothing to start from")


def _atomic_save(model: Any, tokenizer: Any, target: Path, save: Callable[..., Any]) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tokenizer, tmp)
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


def _batches(tokenized: list[dict[str, list[int]]], batch_size: int, seed: int, pad_id: int):
    """Endless shuffled batches (a fresh permutation every epoch, deterministic by seed)."""
    import random

    from anneal.data.datasets import collate

    epoch = 0
    while True:
        order = list(range(len(tokenized)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([tokenized[j] for j in order[i : i + batch_size]], pad_id)
        epoch += 1


def autocast(precision: str, device_type: str):
    """Autocast for `training.precision` (fp16 only on CUDA; fp32 = no autocast)."""
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp16" and device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def build_objective(spec: DistillationJobSpec, teacher: Any | None) -> Callable[[Any, dict[str, Any]], tuple[Any, dict[str, float]]]:
    """The training loss of a method: (model, batch) → (loss, figures to log)."""
    import torch

    if spec.method == "sft":

        def sft(model: Any, batch: dict[str, Any]):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            return out.loss, {"ce": float(out.loss.detach())}

        return sft

    if teacher is None:
        raise ValueError(f"method {spec.method!r} needs a teacher model (spec.teacher)")
    from anneal.distill.losses import chunked_kd_loss

    kd = spec.kd

    def distill(model: Any, batch: dict[str, Any]):
        inner = model.module if hasattr(model, "module") else model
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


def load_teacher(teacher_dir: str | Path, precision: str, device: Any) -> Any:
    """The teacher, frozen: eval mode, no gradients, in the compute precision (fp16 → fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if getattr(device, "type", str(device)) == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def restore(model: Any, resume_dir: str | None = None) -> tuple[int, Any]:
    """Load the checkpoint this attempt resumes from into `model`.

    Ray Train's own checkpoint (a worker-group restart) wins; else `resume_dir`, the newest
    checkpoint a previous attempt of the job left (Ray Train V2 deprecates the trainer's
    `resume_from_checkpoint`, so the path travels in the loop config instead).

    Returns:
        (the step it was taken at, the optimizer state) or (0, None) on a fresh start.
    """
    import contextlib

    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        where = ckpt.as_directory()
    elif resume_dir:
        where = contextlib.nullcontext(resume_dir)
    else:
        return 0, None
    with where as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        model.load_state_dict(torch.load(Path(d) / "model.pt", map_location="cpu"))
        opt_state = torch.load(Path(d) / "optimizer.pt", map_location="cpu")
    log.info("resuming from the checkpoint of step %s", state["step"])
    return int(state["step"]), opt_state


def lr_at(t: Any, steps: int, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of `learningRate`."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, steps - t.warmup_steps)
    return t.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def is_checkpoint_step(spec: DistillationJobSpec, done: int, steps: int) -> bool:
    every = spec.training.checkpoint_every
    return done == steps or bool(every and done % every == 0)


def maybe_checkpoint(
    spec: DistillationJobSpec, model: Any, optimizer: Any, tokenizer: Any, rank: int, done: int, steps: int,
    loss: float, step_times: list[float], log_seconds: float, logger: Any = None,
) -> None:
    """Report a checkpoint to Ray Train every `checkpointEvery` steps and at the end.

    A checkpoint holds the trainable state (`model.pt`, `optimizer.pt`, the step); the last one
    also holds the exported HF model (`hf/`: merged or adapter for lora-kd).
    """
    import ray.train
    import torch
    from ray.train import Checkpoint

    if not is_checkpoint_step(spec, done, steps):
        return
    last = done == steps
    mean_step = sum(step_times) / max(1, len(step_times))
    metrics = {
        "step": done, "loss": loss, "step_time_s": mean_step,
        # inline cost of metric logging (the batched writes happen on a background thread)
        "logging_share": log_seconds / max(1e-9, sum(step_times)),
    }
    if logger is not None:
        logger.log({"train/logging_share": metrics["logging_share"], "train/step_time_mean_s": mean_step}, step=done)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            inner = model.module if hasattr(model, "module") else model
            torch.save(inner.state_dict(), Path(tmp) / "model.pt")
            torch.save(optimizer.state_dict(), Path(tmp) / "optimizer.pt")
            if last:
                export = inner
                if spec.method == "lora-kd":
                    from anneal.distill.lora import finalize_lora

                    export = finalize_lora(inner, spec.lora)
                export.save_pretrained(Path(tmp) / "hf")
                tokenizer.save_pretrained(Path(tmp) / "hf")
            # written last: a checkpoint is complete when its state file exists
            (Path(tmp) / STATE_FILE).write_text(json.dumps({"step": done, "total": steps}))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def dataset_samples(ref: Any, cache_dir: str | Path) -> list[Any]:
    """The samples a DatasetRef names (the one place recipes read their data)."""
    from anneal.data.datasets import load_samples

    return load_samples(ref.uri, split=ref.split, format=ref.format, samples=ref.samples,
                        reasoning=ref.reasoning, cache_dir=Path(cache_dir) / "datasets")


def prepare_optimizer(model: Any, learning_rate: float, opt_state: Any | None) -> tuple[Any, list[Any], Any]:
    """Wrap the model for Ray Train (DDP when there are several workers) and build its AdamW.

    Returns:
        (the prepared model, its trainable parameters, the optimizer with `opt_state` restored).
    """
    import ray.train.torch
    import torch

    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    return model, params, optimizer


def train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker loop of sft, kd and lora-kd (runs on every worker)."""
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.data.datasets import tokenize_sample

    spec = DistillationJobSpec.model_validate(cfg["spec"])
    ctx = JobContext(**cfg["context"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    t = spec.training
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()

    tokenizer = AutoTokenizer.from_pretrained(cfg["student_init"])
    model = AutoModelForCausalLM.from_pretrained(cfg["student_init"], dtype=torch.float32)
    teacher = None
    if spec.method in ("kd", "lora-kd"):
        if not cfg.get("teacher_dir"):
            raise ValueError(f"method {spec.method!r} needs spec.teacher")
        teacher = load_teacher(cfg["teacher_dir"], t.precision, device)
    if spec.method == "lora-kd":
        from anneal.distill.lora import add_lora

        model = add_lora(model, spec.lora)

    start_step, opt_state = restore(model, cfg.get("resume_dir"))
    model, params, optimizer = prepare_optimizer(model, t.learning_rate, opt_state)

    ds = spec.dataset
    samples = dataset_samples(ds, ctx.cache_dir)
    shard = samples[rank::world] or samples
    tokenized = [tokenize_sample(tokenizer, s, ds.max_seq_length) for s in shard]
    steps = cfg["total_steps"]

    objective = build_objective(spec, teacher)
    batches = _batches(tokenized, t.batch_size, t.seed + rank, tokenizer.pad_token_id)
    for _ in range(start_step * t.gradient_accumulation):
        next(batches)  # resume at the same place in the data order
    logger = store.MetricsLogger(ctx.tracking_uri, ctx.run_id) if rank == 0 and ctx.run_id else None
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
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step_times.append(time.perf_counter() - t0)
            done = step + 1
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


def latest_checkpoint(storage: Path) -> tuple[Any, int] | None:
    """The newest complete checkpoint a previous attempt of this job left, and its step.

    A checkpoint counts only when its state file and both weight files are there (a run killed
    while a checkpoint was being copied leaves an incomplete one, which is skipped).
    """
    from ray.train import Checkpoint

    best, best_step = None, -1
    for state in storage.glob(f"**/{STATE_FILE}"):
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
        complete = all((state.parent / f).is_file() and (state.parent / f).stat().st_size > 0 for f in ("model.pt", "optimizer.pt"))
        if complete and step > best_step:
            best, best_step = state.parent, step
    return (Checkpoint.from_directory(str(best)), best_step) if best is not None else None


def train(
    spec: DistillationJobSpec,
    ctx: JobContext,
    student_init: Path,
    teacher_dir: Path | None,
    steps: int,
    loop: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run the TorchTrainer (`loop` per worker, default `train_loop`); returns the trained HF checkpoint.

    A previous attempt's newest checkpoint under the work dir is resumed from; the step it was
    taken at is recorded on the MLflow run as the tag `anneal.resumed_from_step`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = spec.resources
    use_gpu = r.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": r.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = r.gpus_per_worker
    storage = Path(ctx.work_dir) / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    found = latest_checkpoint(storage)
    resume, resumed_from = found if found else (None, 0)
    if ctx.run_id:
        store.set_tags(ctx.tracking_uri, ctx.run_id, {TAG_RESUMED_FROM: str(resumed_from)})
    trainer = TorchTrainer(
        loop or train_loop,
        train_loop_config={
            "spec": spec.to_dict(),
            "context": asdict(ctx),
            "student_init": str(student_init),
            "teacher_dir": str(teacher_dir) if teacher_dir else None,
            "total_steps": steps,
            "resume_dir": resume.path if resume is not None else None,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=r.workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
            accelerator_type=r.accelerator_type if use_gpu else None,
        ),
        run_config=RunConfig(
            name=f"train-{int(time.time())}",
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    out = Path(ctx.work_dir) / "student-final"
    shutil.rmtree(out, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "hf", out)
    return out


# -------------------------------------------------------------------------- evaluate


def evaluate(
    spec: DistillationJobSpec, ctx: JobContext, student_dir: Path, teacher_dir: Path | None, teacher_uri: str | None,
    cache_key: str | None = None,
) -> dict[str, float]:
    """Student (and cached teacher) accuracy per reasoning mode, retention and perplexity.

    With `cache_key`, the student's figures are cached too (a retried kd-rl job scores its
    starting point once).
    """
    from anneal.compress.evaluation import EvalPlan, cached_evaluate_dir, evaluate_dir, model_key

    ev, ds = spec.evaluation, spec.eval_dataset_ref()
    plan = EvalPlan(
        dataset_uri=ds.uri, split=ds.split, format=ds.format, samples=ds.samples or ev.samples,
        modes=tuple(ev.reasoning_modes), max_new_tokens=ev.max_new_tokens, max_seq_length=ds.max_seq_length,
        perplexity="perplexity" in ev.metrics,
    )
    cache = Path(ctx.cache_dir)
    if cache_key is not None:
        student = cached_evaluate_dir(student_dir, plan, f"{cache_key}|{model_key(student_dir)}", cache)
    else:
        student = evaluate_dir(student_dir, plan, cache_dir=cache / "datasets")
    metrics = {("perplexity" if k == "perplexity" else f"student{k[0].upper()}{k[1:]}"): v for k, v in student.items()}
    if teacher_dir is not None:
        key = f"{teacher_uri}|{model_key(teacher_dir)}"
        teacher = cached_evaluate_dir(teacher_dir, plan, key, cache)
        for k, v in teacher.items():
            metrics[f"teacher{k[0].upper()}{k[1:]}"] = v
        if teacher.get("accuracy"):
            metrics["retention"] = student.get("accuracy", 0.0) / teacher["accuracy"]
    return metrics


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
        if teacher_dir is not None and spec.method != "sft" and spec.student.config is None and spec.student.from_teacher is None:
            from anneal.distill.students import check_tokenizers_match

            check_tokenizers_match(teacher_dir, student_init)
        tags = {store.TAG_METHOD: spec.method, store.TAG_DATASET: spec.dataset.uri}
        if teacher_uri:
            tags[store.TAG_TEACHER] = teacher_uri
            version = _registry_version(ctx, teacher_uri)
            if version:
                tags[store.TAG_TEACHER_VERSION] = version
        store.set_tags(ctx.tracking_uri, run_id, tags)
        if info:
            store.log_metrics(ctx.tracking_uri, run_id, {k: v for k, v in info.items() if isinstance(v, (int, float))})
        # Read the data once up front: a bad data set fails here, clearly, before any worker starts.
        n_samples = len(dataset_samples(spec.dataset, ctx.cache_dir))
        steps = total_steps(spec, n_samples, spec.resources.workers)
        result.progress = {"step": 0, "totalSteps": steps}
        if on_progress:
            on_progress(result.to_status())
        start_metrics: dict[str, float] = {}
        if spec.method == "kd-rl":
            from anneal.distill.rl import train_rl

            # RL must beat its own starting point: score the start with the same plan first
            start_metrics = evaluate(spec, ctx, student_init, None, None, cache_key=f"start|{student_init}")
            final_dir = train_rl(spec, ctx, student_init, teacher_dir, steps)
        else:
            final_dir = train(spec, ctx, student_init, teacher_dir, steps)
        final_metrics = store.latest_metrics(ctx.tracking_uri, run_id)
        run_tags = store.client(ctx.tracking_uri).get_run(run_id).data.tags
        result.progress = {"step": steps, "totalSteps": steps, "loss": final_metrics.get("train/loss"),
                           "resumedFromStep": int(run_tags.get(TAG_RESUMED_FROM, 0))}
        if on_progress:
            on_progress({**result.to_status(), "phase": "Running", "message": "evaluating"})
        metrics = evaluate(spec, ctx, final_dir, teacher_dir, teacher_uri)
        for k, v in start_metrics.items():
            if k.startswith("student"):
                metrics["start" + k[len("student"):]] = v
        if "studentAccuracy" in metrics and "studentAccuracy" in start_metrics:
            metrics["rlGain"] = metrics["studentAccuracy"] - start_metrics["studentAccuracy"]
        if "train/logging_share" in final_metrics:
            metrics["loggingShare"] = final_metrics["train/logging_share"]
        store.log_metrics(ctx.tracking_uri, run_id, {f"eval/{k}": v for k, v in metrics.items()})
        from anneal.distill.lora import TAG_ADAPTER_BASE, adapter_base, point_adapter_at

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
            description=f"{spec.method} student of {teacher_uri or 'labels'} ({ctx.namespace}/{ctx.name})",
        )
        result.metrics = {k: round(float(v), 6) for k, v in metrics.items()}
        result.phase = "Succeeded"
        result.message = f"registered {result.model_uri}"
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
