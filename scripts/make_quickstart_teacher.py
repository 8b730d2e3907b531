"""Train the quickstart's teacher: the small checkpoint shipped in deploy/quickstart/math-teacher.

A model that has learned the built-in task takes longer to train on two CPU cores than the
quickstart's five minutes, so the quickstart imports this one (`training.steps: 0`) and spends its
time on what it demonstrates: distilling, quantizing and serving. This script is how the shipped
checkpoint was made, with Anneal's own tokenizer, data, model builder and evaluation, in one
process, seeded; the figures it measured are written next to the weights (`figures.json`,
`README.md`).

    .venv/bin/python scripts/make_quickstart_teacher.py            # ~40 min on 2 idle cores
    .venv/bin/python scripts/make_quickstart_teacher.py --steps 200 --out /tmp/t   # a quick look

Results are deterministic for one torch version and thread count (`--threads`); another machine
gives close, not bit-identical, weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Phase:
    """One stretch of training: problems of these difficulties, its own schedule and optimizer."""

    difficulties: tuple[int, ...]
    samples: int  # rows per difficulty (problems rendered with reasoning on and off)
    steps: int
    learning_rate: float
    warmup: int

    @classmethod
    def parse(cls, text: str) -> "Phase":
        """`DIFFICULTIES:SAMPLES:STEPS:LR:WARMUP`, e.g. `1,2:30000:5000:0.002:50`."""
        try:
            d, n, steps, lr, warmup = text.split(":")
            return cls(tuple(int(x) for x in d.split(",")), int(n), int(steps), float(lr), int(warmup))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: want DIFFICULTIES:SAMPLES:STEPS:LR:WARMUP ({exc})") from exc


#: A curriculum: one-step problems first (the arithmetic facts: ~0.95 after 3000 steps), then
#: two-step ones (chaining two facts through the written steps, which is what reasoning "on" has
#: over "off"). Measured on the way here: two-step problems from scratch were at 0.09 with
#: reasoning on after 1000 steps; a second phase mixing one- and two-step problems reached 0.39
#: after 3000 steps, where this one (two-step only) reached 0.80.
DEFAULT_PHASES = [Phase((1,), 40000, 3000, 3e-3, 50), Phase((2,), 40000, 5000, 2e-3, 50)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "deploy" / "quickstart" / "math-teacher")
    p.add_argument("--phase", type=Phase.parse, action="append", dest="phases",
                   help="DIFFICULTIES:SAMPLES:STEPS:LR:WARMUP, repeatable (default: "
                   + " then ".join(f"{','.join(map(str, x.difficulties))}:{x.samples}:{x.steps}:{x.learning_rate}:{x.warmup}"
                                   for x in DEFAULT_PHASES) + ")")
    p.add_argument("--seed", type=int, default=7, help="the data set's seed (builtin://reasoning?seed=)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=100, help="questions per mode at each checkpoint")
    p.add_argument("--final-eval-samples", type=int, default=400, help="questions per mode at the end")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("ANNEAL_HOME", "~/.anneal")).expanduser() / "cache")
    args = p.parse_args(argv)
    args.phases = args.phases or DEFAULT_PHASES
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from anneal.compress.evaluation import EvalPlan, evaluate
    from anneal.data.datasets import collate, load_samples, tokenize_sample
    from anneal.modeling.chat import pad_id
    from anneal.modeling.tiny import LlamaShape, build_llama, count_parameters, save_pretrained
    from anneal.modeling.tokenizer import builtin_tokenizer

    def uri(difficulty: int) -> str:
        return f"builtin://reasoning?difficulty={difficulty}&seed={args.seed}"

    shape = LlamaShape(hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384)
    tokenizer = builtin_tokenizer(args.cache / "tokenizers")
    model = build_llama(shape, tokenizer, seed=0)
    target = uri(max(args.phases[-1].difficulties))  # the task the teacher is for

    def score(task: str, n: int) -> dict[str, float]:
        model.eval()
        metrics, _ = evaluate(model, tokenizer, EvalPlan(dataset_uri=task, samples=n, max_new_tokens=64, perplexity=False))
        model.train()
        return {k: round(v, 4) for k, v in metrics.items()}

    print(f"{count_parameters(model)} parameters; phases {[asdict(x) for x in args.phases]}", flush=True)
    curve = []
    train_seconds = 0.0
    loss = float("nan")
    model.train()
    for number, phase in enumerate(args.phases, 1):
        samples = []
        for difficulty in phase.difficulties:
            samples += load_samples(uri(difficulty), split="train", format="chat", samples=phase.samples, reasoning="both")
        data = [tokenize_sample(tokenizer, s, 160) for s in samples]
        task = uri(max(phase.difficulties))
        optimizer = torch.optim.AdamW(model.parameters(), lr=phase.learning_rate, weight_decay=0.0)

        def lr_at(step: int, phase: Phase = phase) -> float:  # linear warmup, cosine to 10 % (the harness's)
            if step < phase.warmup:
                return phase.learning_rate * (step + 1) / phase.warmup
            progress = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
            return phase.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

        rng = random.Random(0)
        order: list[int] = []
        for step in range(phase.steps):
            t0 = time.perf_counter()
            if not order:
                order = list(range(len(data)))
                rng.shuffle(order)
            batch = collate([data[order.pop()] for _ in range(min(args.batch_size, len(order)))], pad_id(tokenizer))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            loss = out.loss.item()
            train_seconds += time.perf_counter() - t0
            if (step + 1) % args.eval_every == 0 or step + 1 == phase.steps:
                point = {"phase": number, "step": step + 1, "task": task, "loss": round(loss, 4),
                         "trainSeconds": round(train_seconds, 1), **score(task, args.eval_samples)}
                curve.append(point)
                print(json.dumps(point), flush=True)
    final = {"task": target, "questionsPerMode": args.final_eval_samples, "loss": round(loss, 4),
             "trainSeconds": round(train_seconds, 1), **score(target, args.final_eval_samples)}
    print(json.dumps(final), flush=True)

    out_dir = save_pretrained(model, tokenizer, args.out)
    figures = {
        "dataset": target,
        "shape": {"hiddenSize": shape.hidden_size, "layers": shape.layers, "heads": shape.heads,
                  "kvHeads": shape.kv_heads, "intermediateSize": shape.intermediate_size},
        "parameters": count_parameters(model),
        "phases": [asdict(x) for x in args.phases],
        "batchSize": args.batch_size,
        "evalQuestionsPerMode": {"checkpoints": args.eval_samples, "final": args.final_eval_samples},
        "curve": curve,
        "final": final,
        "torch": torch.__version__,
        "threads": args.threads,
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }
    (out_dir / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(figures))
    print(f"wrote {out_dir}", flush=True)
    return 0


def model_card(f: dict) -> str:
    """The checkpoint's README: what it is, how it was made, what it scores."""
    final = f["final"]
    rows = "\n".join(
        f"| {p['phase']} | {p['step']} | {p['task'].split('?', 1)[1]} | {p['loss']} | {p['accuracyOn']} | {p['accuracyOff']} |"
        for p in f["curve"]
    )
    phases = "\n".join(
        f"{i}. difficulties {', '.join(map(str, x['difficulties']))}: {x['samples']} rows each, {x['steps']} steps, "
        f"learning rate {x['learning_rate']} (warmup {x['warmup']}, cosine to 10 %), a fresh AdamW"
        for i, x in enumerate(f["phases"], 1)
    )
    return f"""# math-teacher: the quickstart's teacher

A {f['parameters']:,}-parameter Llama ({f['shape']['layers']} layers, hidden {f['shape']['hiddenSize']},
{f['shape']['heads']} heads / {f['shape']['kvHeads']} KV heads, FFN {f['shape']['intermediateSize']}), random
init, with Anneal's built-in byte-level BPE tokenizer (512 tokens, chat template), trained on the
built-in reasoning task by `scripts/make_quickstart_teacher.py` (one process, CPU, {f['threads']} thread(s),
torch {f['torch']}). `deploy/examples/pipeline.yaml` imports it (`training.steps: 0`) as `math-teacher`.

## Figures

Exact-answer accuracy on `{final['task']}`, eval split, {final['questionsPerMode']} questions per mode,
greedy, 64 new tokens at most:

| reasoning on | reasoning off | training seconds |
|---|---|---|
| {final['accuracyOn']} | {final['accuracyOff']} | {final['trainSeconds']} |

Thinking on writes each step (`<think> 5 + 3 = 8 / 8 × 2 = 16 </think> Answer: 16`); off, the
model has to chain both steps within one forward pass per token, which a 4-layer model of this size
mostly cannot: that is the gap.

## Recipe

Batch {f['batchSize']}, loss on the answer only, gradient clipping at 1.0, no weight decay.

{phases}

## Learning curve ({f['evalQuestionsPerMode']['checkpoints']} questions per mode at each checkpoint)

| phase | step | task | loss | on | off |
|---|---|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    raise SystemExit(main())
