"""KD cost: step time of `kd` over `sft` for the same student, side by side, vs 1 + N_t / (3 N_s).

For teacher/student parameter ratios of about 2 and 4 it times full optimizer steps of the
recipe's own objectives (`anneal.distill.recipe.build_objective`: sft = the student's CE,
kd = chunked KD with a frozen teacher forward), interleaving sft and kd steps so that machine
load hits both alike, and reports the median ratio next to the analytical floor. N counts the
parameters that take part in matmuls (decoder layers + LM head; the input embedding is a lookup).

    .venv/bin/python benchmarks/bench_kd.py                    # CPU, ~2 minutes
    .venv/bin/python benchmarks/bench_kd.py --device cuda --vocab 32000 --seq 1024 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from anneal.api.distillation import DistillationJobSpec
from anneal.distill.recipe import build_objective


def llama(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128), intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        max_position_embeddings=4096, tie_word_embeddings=False,
    ))


def matmul_params(model: LlamaForCausalLM) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def step_fn(model, objective, optimizer, batch):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(model, batch)
        loss.backward()
        optimizer.step()
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256, help="student hidden size")
    ap.add_argument("--layers", type=int, default=4, help="student layers")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant and pair")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    student = llama(args.hidden, args.layers, args.vocab, 0).to(dev)
    # ratio ~2: twice the depth; ratio ~4: twice the width (4x the layer parameters)
    teachers = {
        "~2": llama(args.hidden, 2 * args.layers, args.vocab, 1),
        "~4": llama(2 * args.hidden, args.layers, args.vocab, 2),
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt, as in the recipe's data
    batch = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev), "labels": labels.to(dev)}
    sft_spec = DistillationJobSpec.model_validate({"method": "sft", "student": {"config": {"hiddenSize": 64, "layers": 1, "heads": 4}}})
    kd_spec = DistillationJobSpec.model_validate({
        "method": "kd", "teacher": {"uri": "x"}, "student": {"config": {"hiddenSize": 64, "layers": 1, "heads": 4}},
        "kd": {"loss": "forward-kl", "temperature": 1.0, "alpha": 0.5, "chunkSize": 1024},
    })
    n_s = matmul_params(student)
    rows = []
    for name, teacher in teachers.items():
        teacher = teacher.to(dev).eval().requires_grad_(False)
        n_t = matmul_params(teacher)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        sft = step_fn(student, build_objective(sft_spec, None), optimizer, batch)
        kd = step_fn(student, build_objective(kd_spec, teacher), optimizer, batch)
        for warm in (sft, kd, sft, kd):
            warm()
        times: dict[str, list[float]] = {"sft": [], "kd": []}
        for _ in range(args.steps):
            for label, fn in (("sft", sft), ("kd", kd)):
                sync(dev)
                t0 = time.perf_counter()
                fn()
                sync(dev)
                times[label].append(time.perf_counter() - t0)
        ratios = [k / s for k, s in zip(times["kd"], times["sft"])]
        floor = 1 + n_t / (3 * n_s)
        ratio = statistics.median(ratios)
        rows.append({
            "pair": name, "teacherParams": n_t, "studentParams": n_s, "paramRatio": round(n_t / n_s, 2),
            "sftStepS": round(statistics.median(times["sft"]), 4), "kdStepS": round(statistics.median(times["kd"]), 4),
            "kdOverSft": round(ratio, 3), "floor": round(floor, 3), "overFloor": round(ratio / floor - 1, 3),
            "withinGoal": ratio <= 1.15 * floor,
        })
        del teacher
    print(json.dumps({"device": dev, "vocab": args.vocab, "seq": args.seq, "batch": args.batch,
                      "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"{'pair':5} {'Nt/Ns':>6} {'sft s':>8} {'kd s':>8} {'kd/sft':>7} {'floor':>6} {'over':>6}")
    for r in rows:
        print(f"{r['pair']:5} {r['paramRatio']:6.2f} {r['sftStepS']:8.4f} {r['kdStepS']:8.4f} "
              f"{r['kdOverSft']:7.3f} {r['floor']:6.3f} {r['overFloor']:+6.1%}")


if __name__ == "__main__":
    main()
