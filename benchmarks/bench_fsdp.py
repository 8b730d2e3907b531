"""Training strategies side by side: FSDP vs DDP memory per worker, bf16 vs fp32 step time and memory.

Two CPU workers (gloo, `torch.multiprocessing`) train the same Llama-shaped student (random
init, built-in tokenizer's vocabulary) with the code the recipe uses (`anneal.distill.parallel`):

* ``state_bytes``: what one worker holds for parameters + gradients + AdamW state after a step
  (its local shards under FSDP, counted from the tensors); goal FSDP <= 0.6x DDP.
* ``peak_rss_mb``: the worker process's peak resident memory (includes the interpreter, torch
  and activations, so the ratio is closer to 1 than the state ratio).
* ``step_s``: median step time, one worker, fp32 vs bf16 (autocast on CPU), with and without
  gradient checkpointing.
* ``precision_memory``: one worker process per precision (the step-time student, autocast as the
  recipe runs it): the bytes autograd saves for backward in one training forward (activations,
  counted from the saved tensors' storages), parameters + gradients + AdamW state, the frozen
  teacher's weights as `harness.load_teacher` loads them, and the process's peak RSS.

    .venv/bin/python benchmarks/bench_fsdp.py --out benchmarks/results/fsdp.json
    .venv/bin/python benchmarks/bench_fsdp.py --parts precision_memory   # that part alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

SHAPE = {"hidden_size": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate_size": 1536}
# The step-time comparison uses a smaller student: CPU bf16 autocast (no AMX here) made the
# large one run past 10 minutes on a 2-core machine.
TIMING_SHAPE = {"hidden_size": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate_size": 768}
VOCAB = 512


def _model(seed: int = 0, shape: dict | None = None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or SHAPE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden_size"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      intermediate_size=shape["intermediate_size"], max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _batch(batch: int, seq: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _worker(rank: int, world: int, strategy: str, port: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from anneal.distill import parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    if strategy == "fsdp":
        model = parallel.shard(model, "fp32", torch.device("cpu"))
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(steps):
        loss = model(**_batch(2, 64, seed=step * world + rank)).loss
        loss.backward()
        optimizer.step()
        if step < steps - 1:
            optimizer.zero_grad(set_to_none=True)
    state = parallel.local_bytes(model, optimizer)
    state["total"] = sum(state.values())
    state["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{strategy}-{rank}.json").write_text(json.dumps(state))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(steps: int, tmp: Path) -> dict:
    import torch.multiprocessing as mp

    out = {}
    for strategy in ("ddp", "fsdp"):
        mp.spawn(_worker, args=(2, strategy, _free_port(), steps, str(tmp)), nprocs=2)
        ranks = [json.loads((tmp / f"{strategy}-{r}.json").read_text()) for r in range(2)]
        out[strategy] = {k: max(r[k] for r in ranks) for k in ranks[0]}
    out["state_ratio_fsdp_vs_ddp"] = out["fsdp"]["total"] / out["ddp"]["total"]
    out["rss_ratio_fsdp_vs_ddp"] = out["fsdp"]["peak_rss_mb"] / out["ddp"]["peak_rss_mb"]
    return out


def step_times(steps: int) -> dict:
    import torch

    from anneal.distill import harness, parallel

    out = {}
    for precision in ("fp32", "bf16"):
        for checkpointing in (False, True):
            model = _model(shape=TIMING_SHAPE)
            if checkpointing:
                parallel.enable_gradient_checkpointing(model)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            times = []
            for step in range(steps + 2):  # two warm-up steps
                t0 = time.perf_counter()
                with harness.autocast(precision, "cpu"):
                    loss = model(**_batch(4, 64, seed=step)).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            key = f"{precision}{'+gc' if checkpointing else ''}"
            out[key] = statistics.median(times[2:])
            print(f"{key}: {out[key]:.3f} s/step", file=sys.stderr, flush=True)
    out["bf16_vs_fp32"] = out["bf16"] / out["fp32"]
    out["gc_vs_none_fp32"] = out["fp32+gc"] / out["fp32"]
    return out


def _precision_worker(rank: int, precision: str, steps: int, teacher_dir: str, out: str) -> None:
    import torch

    from anneal.distill import harness, parallel

    torch.set_num_threads(1)
    model = _model(shape=TIMING_SHAPE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    saved: dict[int, tuple] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = (storage.nbytes(), t)
        return t

    casts = []
    for step in range(steps):
        hooks = None
        if step == steps - 1:
            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            # autocast keeps a bf16 copy of each weight it casts for the backward pass: counted apart
            casts = [p.detach().to(torch.bfloat16) for p in model.parameters() if p.dim() == 2]
        with harness.autocast(precision, "cpu"), (hooks or _null()):
            loss = model(**_batch(4, 64, seed=step)).loss
        loss.backward()
        optimizer.step()
        if step < steps - 1:
            optimizer.zero_grad(set_to_none=True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # a saved weight is state, not activation
    copies = {ptr for ptr, (_, t) in saved.items()
              if ptr not in weights and t.dtype == torch.bfloat16
              and any(torch.equal(c, t) or (c.t().shape == t.shape and torch.equal(c.t(), t)) for c in casts)}
    state = parallel.local_bytes(model, optimizer)
    teacher = harness.load_teacher(teacher_dir, precision, torch.device("cpu"))
    result = {
        "activation_bytes": sum(n for ptr, (n, _) in saved.items() if ptr not in weights | copies),
        "weight_copy_bytes": sum(saved[ptr][0] for ptr in copies),
        "state_bytes": sum(state.values()),
        "teacher_weight_bytes": sum(p.numel() * p.element_size() for p in teacher.parameters()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(out, f"precision-{precision}.json").write_text(json.dumps(result))


def _null():
    import contextlib

    return contextlib.nullcontext()


def precision_memory(steps: int, tmp: Path) -> dict:
    """bf16 vs fp32 on one CPU worker: activations saved for backward, training state, teacher weights, RSS."""
    import torch.multiprocessing as mp

    teacher_dir = tmp / "teacher"
    _model(seed=1, shape=TIMING_SHAPE).save_pretrained(teacher_dir)
    out: dict = {"student": TIMING_SHAPE, "batch": [4, 64]}
    for precision in ("fp32", "bf16"):  # a fresh process each: the peak RSS is that precision's alone
        mp.spawn(_precision_worker, args=(precision, steps, str(teacher_dir), str(tmp)), nprocs=1)
        out[precision] = json.loads((tmp / f"precision-{precision}.json").read_text())
        print(f"{precision}: {out[precision]}", file=sys.stderr, flush=True)
    for key in ("activation_bytes", "state_bytes", "teacher_weight_bytes", "peak_rss_mb"):
        out[f"{key}_bf16_vs_fp32"] = out["bf16"][key] / out["fp32"][key]
    return out


def main() -> int:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--parts", default="memory,step_time,precision_memory",
                        help="comma-separated: memory (FSDP vs DDP), step_time, precision_memory (bf16 vs fp32)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    params = sum(p.numel() for p in _model().parameters())
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "loadavg_before": os.getloadavg(),
            "torch": torch.__version__,
            "student": {**SHAPE, "vocab": VOCAB, "parameters": params},
        }
        if "memory" in parts:
            result["memory_2_workers"] = memory(args.steps, Path(tmp))
        if "step_time" in parts:
            result["step_time_1_worker"] = {"student": TIMING_SHAPE, **step_times(args.timing_steps)}
        if "precision_memory" in parts:
            result["precision_memory_1_worker"] = precision_memory(args.timing_steps, Path(tmp))
        result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
