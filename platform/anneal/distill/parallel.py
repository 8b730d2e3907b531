"""How Ray Train workers share a student: DDP or FSDP2, mixed precision, checkpoints of either.

`training.strategy` chooses:

- `ddp`: every worker holds the whole student (fp32 master weights, fp32 AdamW state) and
  gradients are all-reduced (`ray.train.torch.prepare_model`). A checkpoint is the full
  state, written by rank 0 (`model.pt`, `optimizer.pt`).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer and on the root:
  each worker keeps 1/world of the parameters, gradients and optimizer state, and gathers a
  layer's parameters only while it runs. With `precision: bf16` the gathered parameters are
  bf16 (`MixedPrecisionPolicy`), gradients are reduced in fp32, and the shards stay fp32. A
  checkpoint is sharded: every rank writes its part with `torch.distributed.checkpoint` into
  `dcp/`, and Ray Train gathers the parts of all ranks into one checkpoint directory; it
  loads on any number of workers (DCP reshards).

`training.gradientCheckpointing` recomputes each decoder layer's activations in the backward
pass (non-reentrant, so it composes with both strategies). The exported model (the last
checkpoint's `hf/`) is a plain Hugging Face checkpoint, in bf16 when `precision: bf16`.

The loss is token-weighted across workers (`token_weight`): N workers' loss and gradients are
those of one worker with the whole global batch, however the tokens fall between them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "anneal_state.json"
DCP_DIR = "dcp"
FULL_FILES = ("model.pt", "optimizer.pt")


def decoder_layers(model: Any) -> list[Any]:
    """The repeated transformer blocks of a causal LM (each one an FSDP unit)."""
    base = getattr(model, "base_model", model)
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (expected model.model.layers)")
    return list(layers)


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: Any) -> Any:
    """The module under a DDP wrapper (an FSDP2 model is its own module)."""
    return model.module if hasattr(model, "module") else model


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in backward (non-reentrant: works under DDP and FSDP alike)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def shard(model: Any, precision: str, device: Any) -> Any:
    """Apply FSDP2 to every decoder layer, then to the root (embeddings, norm, head)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16" else MixedPrecisionPolicy()
    )
    model.to(device)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare(model: Any, training: Any, device: Any, resume_dir: str | None) -> tuple[Any, list[Any], Any, int]:
    """Wrap the student for its strategy, build AdamW, and resume from a checkpoint if there is one.

    The checkpoint is Ray Train's own (a worker-group restart) or `resume_dir` (the newest one
    a previous attempt left; Ray Train V2 deprecates the trainer's `resume_from_checkpoint`).

    Returns:
        (the prepared model, its trainable parameters, the optimizer, the step to start at).
    """
    import ray.train.torch
    import torch

    if training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    with _checkpoint_dir(resume_dir) as ckpt:
        state = json.loads((Path(ckpt) / STATE_FILE).read_text()) if ckpt else None
        if training.strategy == "fsdp":
            model = shard(model, training.precision, device)
            params = trainable(model)
            optimizer = _adamw(params, training.learning_rate)
            if state is not None:
                _load_sharded(model, optimizer, Path(ckpt) / DCP_DIR)
        else:
            if state is not None:
                model.load_state_dict(torch.load(Path(ckpt) / "model.pt", map_location="cpu"))
            model = ray.train.torch.prepare_model(model)
            params = trainable(model)
            optimizer = _adamw(params, training.learning_rate)
            if state is not None:
                optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu"))
    start = int(state["step"]) if state else 0
    if state:
        log.info("resuming from the checkpoint of step %s (%s)", start, state.get("format", "full"))
    return model, params, optimizer, start


def trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(params: list[Any], learning_rate: float) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


@contextlib.contextmanager
def _checkpoint_dir(resume_dir: str | None):
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            yield d
    else:
        yield resume_dir


def _load_sharded(model: Any, optimizer: Any, where: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(where))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def write_checkpoint(model: Any, optimizer: Any, out: Path, rank: int, world: int, step: int, total: int) -> bool:
    """This rank's part of a training checkpoint in `out`; True where the rank has files to report.

    DDP: rank 0 writes the full state. FSDP: every rank writes its shard (collective). The state
    file is written last, by rank 0: a checkpoint is complete when it and all parts exist.
    """
    import torch

    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / DCP_DIR))
        fmt = "dcp"
    else:
        if rank != 0:
            return False
        torch.save(unwrap(model).state_dict(), out / "model.pt")
        torch.save(optimizer.state_dict(), out / "optimizer.pt")
        fmt = "full"
    if rank == 0:
        (out / STATE_FILE).write_text(json.dumps({"step": step, "total": total, "format": fmt, "world": world}))
    return True


def is_complete(state_file: Path) -> int | None:
    """The step of a checkpoint whose every part is on disk, or None (a kill mid-copy leaves parts)."""
    try:
        state = json.loads(state_file.read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    d = state_file.parent
    if state.get("format") == "dcp":
        shards = list((d / DCP_DIR).glob("*.distcp"))
        ok = (d / DCP_DIR / ".metadata").is_file() and len(shards) >= int(state.get("world", 1))
    else:
        ok = all((d / f).is_file() and (d / f).stat().st_size > 0 for f in FULL_FILES)
    return step if ok else None


def export_state_dict(model: Any, precision: str) -> dict[str, Any] | None:
    """The full student weights for the exported model, on rank 0 (collective under FSDP).

    Returns None on the other ranks. bf16 training exports bf16 weights.
    """
    import torch

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if torch.distributed.get_rank() != 0:
            return None
    else:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return None
        sd = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    if precision == "bf16":
        sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def save_export(model: Any, state_dict: dict[str, Any], tokenizer: Any, out: Path) -> None:
    """Write the exported student (Hugging Face layout, safetensors) with `state_dict`'s weights.

    A plain model of the student's class is built on the meta device and given the gathered
    weights, so the checkpoint carries neither the DDP/FSDP wrapping nor the training dtype:
    its `config.json` names the dtype of the weights it holds.
    """
    import torch
    from transformers import AutoModelForCausalLM

    inner = unwrap(model)
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(inner.config, dtype=dtype)
    plain.load_state_dict(state_dict, strict=False, assign=True)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the exported student lacks weights for {missing[:5]}")
    plain.config.use_cache = True
    plain.config.dtype = dtype
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def local_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes this worker holds for parameters, gradients and optimizer state (its shards under FSDP)."""
    import torch

    def size(t: Any) -> int:
        if t is None or not isinstance(t, torch.Tensor):
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = list(model.parameters())
    return {
        "parameters": sum(size(p) for p in params),
        "gradients": sum(size(p.grad) for p in params),
        "optimizer": sum(size(v) for s in optimizer.state.values() for v in s.values()),
    }


def clip_grad_norm(params: list[Any], max_norm: float) -> float:
    """Clip the gradients' global norm; returns the norm before clipping (over all shards under FSDP)."""
    import torch

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor: the norm reduced over the shards
        norm = norm.full_tensor()
    return float(norm)


def token_weight(labels: Any) -> float:
    """The factor that makes a worker's mean-over-its-own-tokens loss count by its tokens.

    A worker's loss is a mean over its labelled tokens `n_r` (shifted labels ≠ -100); DDP and FSDP
    average the workers' gradients, and `mean_over_workers` their figures, unweighted. Scaled by
    `n_r × world / N` (N: the tokens of the global batch, one all-reduce of a count), the
    average over the workers is `Σ_r n_r·loss_r / N`: the token-weighted mean one worker with
    the whole global batch computes. 1.0 on one worker, and when no worker has a token.

    Args:
        labels: ``[B, T]`` this worker's labels, aligned with the inputs; ``-100`` = ignore.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return 1.0
    mine = labelled_tokens(labels)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([mine], dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return token_share(mine, int(total.item()), dist.get_world_size())


def labelled_tokens(labels: Any) -> int:
    """The tokens a causal-LM loss averages over: shifted labels ≠ -100."""
    return int((labels[:, 1:] != -100).sum())


def token_share(mine: int, total: int, world: int) -> float:
    """`mine × world / total`: a worker's loss weight when the workers' figures are averaged (1.0 without tokens)."""
    return mine * world / total if total > 0 else 1.0


def mean_over_workers(figures: dict[str, float]) -> dict[str, float]:
    """The mean of each figure over all workers (one all-reduce); unchanged on one worker.

    Each worker's loss is its own share of the global batch, already weighted by its share of
    the tokens (`token_weight`): the mean over the workers is the loss of the step, not rank 0's
    share.
    """
    import torch
    import torch.distributed as dist

    if not figures or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return figures
    keys = sorted(figures)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([float(figures[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))
