"""LoRA-KD (LLM-NEO) vs full KD: peak training memory and step time at equal batch, and accuracy.

Memory and time: each variant runs in its own fresh process (so peaks do not mix): the same
student and frozen teacher, the recipe's kd objective, AdamW; LoRA-KD trains only rank-r
branches on every linear layer (`anneal.distill.lora.add_lora`). Reported: peak memory above
the state after loading the models (CUDA: max allocated; CPU: peak RSS, high-water mark reset
before the steps, glibc mmap threshold pinned low as in bench_kd_loss_memory.py), and the median step time.

Accuracy (`--teacher DIR`): a student pruned from that teacher (depth: all layers but one) is
trained `--train-steps` steps by kd and by lora-kd on the built-in task (same data, batch and
schedule), then both are scored with the evaluation the recipe uses (reasoning off and on).

    .venv/bin/python benchmarks/bench_lora_kd.py
    .venv/bin/python benchmarks/bench_lora_kd.py --teacher ~/.anneal/cache/models/mlflow/math-teacher/1
    .venv/bin/python benchmarks/bench_lora_kd.py --accuracy-only --teacher DIR   # accuracy alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark (Linux clear_refs) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def child(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from anneal.api.distillation import DistillationJobSpec, LoraConfig
    from anneal.distill.lora import add_lora
    from anneal.distill.recipe import build_objective

    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
            num_key_value_heads=max(1, hidden // 128), intermediate_size=int(hidden * 8 / 3) // 8 * 8,
            max_position_embeddings=4096, tie_word_embeddings=False,
        ))

    student = llama(args.hidden, args.layers, 0)
    teacher = llama(args.hidden, 2 * args.layers, 1).to(dev).eval().requires_grad_(False)
    if args.variant == "lora-kd":
        student = add_lora(student, LoraConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0))
    student = student.to(dev).train()
    spec = DistillationJobSpec.model_validate({
        "method": "kd", "teacher": {"uri": "x"}, "student": {"config": {"hiddenSize": 64, "layers": 1, "heads": 4}},
    })
    objective = build_objective(spec, teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100
    batch = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev), "labels": labels.to(dev)}
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(student, batch)
        loss.backward()
        optimizer.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss() - base
    print(json.dumps({"variant": args.variant, "peakBytes": peak, "stepS": statistics.median(times),
                      "trainable": sum(p.numel() for p in params)}))


def accuracy(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train kd and lora-kd from the same pruned student (no Ray: the objectives are the recipe's)."""
    import math
    import random
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.api.distillation import DistillationJobSpec, FromTeacher, LoraConfig
    from anneal.compress.evaluation import EvalPlan, evaluate
    from anneal.data.datasets import collate, load_samples, tokenize_sample
    from anneal.distill.lora import add_lora, finalize_lora
    from anneal.distill.recipe import build_objective
    from anneal.distill.students import derive_student

    uri = "builtin://reasoning?difficulty=1&seed=7"
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval().requires_grad_(False)
    layers = teacher.config.num_hidden_layers
    plan = FromTeacher.model_validate({"depth": {"keepLayers": max(1, layers - 1)}, "calibration": {"uri": uri, "samples": 32}})
    spec = DistillationJobSpec.model_validate({"method": "kd", "teacher": {"uri": "x"}, "student": {"fromTeacher": plan.to_dict()},
                                               "kd": {"alpha": 0.7}})
    samples = load_samples(uri, samples=2000, reasoning="both")
    tokenized = [tokenize_sample(tokenizer, s, 160) for s in samples]
    eval_plan = EvalPlan(dataset_uri=uri, samples=args.eval_samples, max_new_tokens=48, perplexity=False)
    out = {}
    for variant, lr in (("kd", args.lr), ("lora-kd", args.lr * 3)):
        student, _, _ = derive_student(args.teacher, plan, Path(args.cache))
        if variant == "lora-kd":
            student = add_lora(student, LoraConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.0))
        objective = build_objective(spec, teacher)
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        rng = random.Random(0)
        student.train()
        t0 = time.perf_counter()
        for step in range(args.train_steps):
            for group in opt.param_groups:
                group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.train_steps)))
            b = collate(rng.sample(tokenized, 32), tokenizer.pad_token_id)
            loss, _ = objective(student, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t0
        if variant == "lora-kd":
            student = finalize_lora(student, LoraConfig(merge=True))
        metrics, _ = evaluate(student.eval(), tokenizer, eval_plan)
        out[variant] = {**metrics, "trainS": train_s}
    teacher_metrics, _ = evaluate(teacher, tokenizer, eval_plan)
    out["teacher"] = teacher_metrics
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help="a teacher checkpoint directory: also compare final accuracy")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-samples", type=int, default=128, help="eval questions per reasoning mode")
    ap.add_argument("--accuracy-only", action="store_true", help="with --teacher: skip the memory/time runs")
    ap.add_argument("--cache", default="/tmp/anneal-bench-cache")
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy_only:
        if not args.teacher:
            ap.error("--accuracy-only needs --teacher DIR")
        print(json.dumps({"accuracy": accuracy(args)}, indent=1))
        return
    rows = {}
    argv = [a for a in sys.argv[1:]]
    for variant in ("kd", "lora-kd", "kd", "lora-kd"):  # alternate, keep the better of two runs
        # every tensor its own mmap, so RSS follows live tensors (as bench_kd_loss_memory.py does)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True,
                             check=True, env=env)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        best = rows.get(variant)
        rows[variant] = row if best is None else {**row, "peakBytes": min(row["peakBytes"], best["peakBytes"]),
                                                   "stepS": min(row["stepS"], best["stepS"])}
    kd, lo = rows["kd"], rows["lora-kd"]
    report = {
        "device": args.device, "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "rank": args.rank,
        "kd": kd, "lora-kd": lo,
        "memorySaving": round(1 - lo["peakBytes"] / kd["peakBytes"], 3),
        "timeSaving": round(1 - lo["stepS"] / kd["stepS"], 3),
    }
    if args.teacher:
        report["accuracy"] = accuracy(args)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
