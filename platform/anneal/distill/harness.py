"""The Ray Train harness the distillation loops share: worker start, optimiser, checkpoints, the trainer.

`anneal.distill.recipe` (sft, kd, lora-kd) and `anneal.distill.rl` (kd-rl) each bring their own
worker loop; everything around the loop is here, so that both resume, checkpoint, schedule the
learning rate and read their data the same way. `run_trainer` writes the loop config that
`start_worker` reads back on every worker.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from anneal.api.distillation import DistillationJobSpec
from anneal.distill import parallel
from anneal.distill.parallel import STATE_FILE
from anneal.runtime import accelerators
from anneal.tracking import mlflow_store as store

log = logging.getLogger(__name__)

TAG_RESUMED_FROM = "anneal.resumed_from_step"


@dataclass
class Worker:
    """One Ray Train worker's view of the job: the spec, its place in the group, device and tracking."""

    spec: DistillationJobSpec
    rank: int
    world: int
    device: Any
    student_init: str
    teacher_dir: str | None
    total_steps: int
    resume_dir: str | None
    cache_dir: str
    tracking_uri: str
    run_id: str | None

    def metrics_logger(self) -> Any:
        """The MLflow metrics logger of rank 0 (None on the other ranks and without a run)."""
        return store.MetricsLogger(self.tracking_uri, self.run_id) if self.rank == 0 and self.run_id else None


def start_worker(cfg: dict[str, Any]) -> Worker:
    """Read the loop config `run_trainer` wrote, and seed torch for this worker's rank."""
    import ray.train
    import ray.train.torch
    import torch

    spec = DistillationJobSpec.model_validate(cfg["spec"])
    context = cfg["context"]
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    torch.manual_seed(spec.training.seed + rank)
    return Worker(
        spec=spec, rank=rank, world=world, device=ray.train.torch.get_device(),
        student_init=cfg["student_init"], teacher_dir=cfg.get("teacher_dir"), total_steps=cfg["total_steps"],
        resume_dir=cfg.get("resume_dir"), cache_dir=context["cache_dir"], tracking_uri=context["tracking_uri"],
        run_id=context.get("run_id"),
    )


def dataset_samples(ref: Any, cache_dir: str | Path, toggle: bool = True) -> list[Any]:
    """The samples a DatasetRef names (the one place recipes read their data); `toggle`: see `student_toggle`."""
    from anneal.data.datasets import load_samples

    return load_samples(ref.uri, split=ref.split, format=ref.format, samples=ref.samples,
                        reasoning=ref.reasoning, cache_dir=Path(cache_dir) / "datasets", toggle=toggle)


def student_toggle(spec: DistillationJobSpec, student_init: str | Path) -> bool:
    """Whether the student is trained and scored with the reasoning toggle's system message.

    `spec.reasoningToggle` when set, else what the student's starting checkpoint declares (a fresh or
    derived student's init carries its teacher's declaration, `anneal.distill.recipe.make_student`).
    The driver and every worker read the same init directory, so they agree.
    """
    from anneal.modeling.chat import dir_declares_reasoning_toggle, resolve_reasoning_toggle

    return resolve_reasoning_toggle(spec.reasoning_toggle, dir_declares_reasoning_toggle(student_init))


def global_order(n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless index batches: this rank's share of each global batch of one data order.

    All ranks draw the same permutation of `n` items (a fresh one every epoch, deterministic by
    seed); a global batch is `batch_size × world` consecutive items of it and rank r takes the
    r-th `batch_size` of them. So N workers with batch size B see, step by step, the items one
    worker with batch size N×B sees: losses compare across worker counts. A data set smaller
    than one global batch gives every rank all of it, each step.
    """
    import random

    span = batch_size * world
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(order)
        if len(order) < span:
            yield order
        for i in range(0, len(order) - span + 1, span):
            yield order[i + rank * batch_size : i + (rank + 1) * batch_size]
        epoch += 1


class Tokenized:
    """Samples tokenized on first use, then kept: a rank tokenizes only the samples its batches draw."""

    def __init__(self, samples: list[Any], tokenize: Callable[[Any], dict[str, list[int]]]):
        self.samples, self.tokenize = samples, tokenize
        self.cache: dict[int, dict[str, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if i not in self.cache:
            self.cache[i] = self.tokenize(self.samples[i])
        return self.cache[i]


def load_teacher(teacher_dir: str | Path, precision: str, device: Any) -> Any:
    """The teacher, frozen: eval mode, no gradients, in the compute precision (fp16 → fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from anneal.modeling.layerwise_llama import register as register_anneal_llama

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if getattr(device, "type", str(device)) == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    register_anneal_llama()  # model_type anneal_llama (attention removal, FFN fusion)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def autocast(precision: str, device_type: str):
    """Autocast for `training.precision` (fp16 only on CUDA; fp32 = no autocast)."""
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp16" and device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


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

    A checkpoint holds the trainable state (`anneal.distill.parallel`: full under DDP, one shard
    per rank under FSDP) and the step; the last one also holds the exported HF model (`hf/`:
    merged or adapter for lora-kd, bf16 when training in bf16).
    """
    import ray.train
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
    world = ray.train.get_context().get_world_size()
    precision = spec.training.precision
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        export = parallel.export_state_dict(model, precision) if last and spec.method != "lora-kd" else None
        if last and rank == 0:
            if spec.method == "lora-kd":
                from anneal.distill.lora import finalize_lora

                finalize_lora(parallel.unwrap(model), spec.lora).save_pretrained(out / "hf")
                tokenizer.save_pretrained(out / "hf")
            else:
                parallel.save_export(model, export, tokenizer, out / "hf")
        has_files = parallel.write_checkpoint(model, optimizer, out, rank, world, done, steps)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if has_files else None)


def latest_checkpoint(storage: Path) -> tuple[Any, int] | None:
    """The newest complete checkpoint a previous attempt of this job left, and its step.

    A checkpoint counts only when its state file and every part are there (a run killed while
    a checkpoint was being copied leaves an incomplete one, which is skipped).
    """
    from ray.train import Checkpoint

    best, best_step = None, -1
    for state in storage.glob(f"**/{STATE_FILE}"):
        step = parallel.is_complete(state)
        if step is not None and step > best_step:
            best, best_step = state.parent, step
    return (Checkpoint.from_directory(str(best)), best_step) if best is not None else None


def run_trainer(
    spec: DistillationJobSpec,
    ctx: Any,
    student_init: Path,
    teacher_dir: Path | None,
    steps: int,
    loop: Callable[[dict[str, Any]], None],
) -> Path:
    """Run a TorchTrainer with `loop` on every worker; returns the trained HF checkpoint.

    `ctx` is the job's `anneal.distill.recipe.JobContext`; `loop` reads its share of the job
    back with `start_worker`. A previous attempt's newest checkpoint under the work dir is
    resumed from; the step it was taken at is recorded on the MLflow run as the tag
    `anneal.resumed_from_step`.
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
        loop,
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
            # Ray's name for the GPU ("H100"), whatever spelling the spec used ("H100-PCIe", a GFD product)
            accelerator_type=accelerators.resolve(r.accelerator_type).ray_type if use_gpu and r.accelerator_type
            else None,
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
