"""Compression benchmark: size against the physical floor, accuracy retention, depth-50% + KD recovery, CPU latency.

For every quantization scheme (W8A16, W4A16 with rtn / gptq / awq, W8A8, FP8) the source is
quantized with llm-compressor, reloaded with transformers on CPU and measured:

* ``linear_ratio``: bytes of the quantized Linear layers (packed weights + scales + zero
  points) / the same weights in bf16, against the floor (bits / 16: 0.25 for 4-bit, 0.5 for 8-bit);
  goal: within 0.05 of the floor.
* ``size_ratio``: whole checkpoint on disk / source checkpoint (embeddings and lm_head stay
  unquantized, so this is far above the floor for tiny models).
* ``retention``: accuracy / source accuracy on the evaluation set (goals: >= 0.97 for 8-bit,
  >= 0.93 for W4A16-GPTQ).
* ``ms_per_token``: greedy decoding latency on CPU (batch 1), and its ratio to the source.

Then depth pruning to 50% of the layers, without and with KD recovery (the compression
recipe on a local Ray, recovery through the distillation recipe's trainer); goal: retention >= 0.90.

The default source is a 4-layer Llama (hidden 128, the shape of deploy/examples' math-teacher)
trained here on a copy task whose accuracy is meaningful at this size; ``--source`` takes any
model URI (e.g. ``models:/math-teacher/1`` with ``--tracking-uri``) and ``--eval`` a data set.

    .venv/bin/python benchmarks/bench_compress.py --out benchmarks/results/compress.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

SCHEMES = [("W8A16", "gptq"), ("W8A16", "rtn"), ("W4A16", "gptq"), ("W4A16", "rtn"), ("W4A16", "awq"),
           ("W8A8", "gptq"), ("FP8", "rtn")]


def train_copy_source(root: Path, samples: int, steps: int) -> tuple[Path, str]:
    from anneal.modeling.tiny import LlamaShape, memorize_copy_task

    shape = LlamaShape(hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384)
    source, data = memorize_copy_task(root, shape, samples=samples, max_steps=steps)
    return source, str(data)


def ms_per_token(model_dir: Path, prompt: str, tokens: int = 32, repeats: int = 3) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            if i:  # the first call warms up
                times.append((time.perf_counter() - t0) * 1000 / tokens)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="model URI (default: a copy-task model trained here)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ sources")
    parser.add_argument("--eval", help="evaluation data set URI (default: the copy task, or builtin reasoning)")
    parser.add_argument("--format", default=None, help="evaluation data format")
    parser.add_argument("--samples", type=int, default=48, help="evaluation samples per reasoning mode")
    parser.add_argument("--schemes", default=",".join(f"{s}:{a}" for s, a in SCHEMES))
    parser.add_argument("--recovery-steps", type=int, default=150)
    parser.add_argument("--skip-pruning", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from anneal.compress.evaluation import EvalPlan, evaluate_dir
    from anneal.compress.quantization import (QuantPlan, checkpoint_bytes, linear_size_figures, physical_floor,
                                              quantize, tensor_bytes)
    from anneal.data.datasets import load_samples
    from anneal.modeling.uris import resolve_model_dir

    root = Path(args.work or tempfile.mkdtemp(prefix="bench-compress-"))
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.source:
        source = resolve_model_dir(args.source, cache_dir=root / "models", tracking_uri=args.tracking_uri)
        eval_uri = args.eval or "builtin://reasoning?difficulty=1&seed=7"
        fmt, modes, new_tokens, prompt = args.format or "chat", ("on", "off"), 64, None
    else:
        source, eval_uri = train_copy_source(root, samples=args.samples, steps=400)
        fmt, modes, new_tokens = args.format or "prompt-completion", ("off",), 8
    prompt = load_samples(eval_uri, split="eval", format=fmt, samples=1, reasoning=modes[0])[0].prompt
    plan = EvalPlan(dataset_uri=eval_uri, format=fmt, samples=args.samples, modes=modes, max_new_tokens=new_tokens)
    calibration = load_samples(eval_uri if not args.source else "builtin://reasoning?difficulty=1&seed=7",
                               split="train", format=fmt, samples=64)

    src_eval = evaluate_dir(source, plan)
    src_ms = ms_per_token(source, prompt)
    src_bytes = checkpoint_bytes(source)
    report = {"source": {"uri": args.source or "copy-task (trained here)", "eval": eval_uri, **src_eval,
                         "sizeBytes": src_bytes, "msPerToken": src_ms}, "schemes": [], "pruning": []}
    print(f"source: accuracy {src_eval.get('accuracy'):.3f}  size {src_bytes}  {src_ms:.2f} ms/token", flush=True)

    for item in args.schemes.split(","):
        scheme, algorithm = item.split(":")
        out = root / f"{scheme}-{algorithm}"
        t0 = time.perf_counter()
        try:
            quantize(source, out, QuantPlan(scheme=scheme, algorithm=algorithm, group_size=128), calibration, 128)
        except Exception as exc:
            report["schemes"].append({"scheme": scheme, "algorithm": algorithm, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{scheme}/{algorithm}: FAILED {exc}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        ev = evaluate_dir(out, plan)
        lin = linear_size_figures(tensor_bytes(out), tensor_bytes(source))
        ms = ms_per_token(out, prompt)
        row = {
            "scheme": scheme, "algorithm": algorithm, "groupSize": 128, "quantizeSeconds": round(seconds, 1),
            "accuracy": ev.get("accuracy"), "retention": (ev.get("accuracy", 0) / src_eval["accuracy"]) if src_eval.get("accuracy") else None,
            "perplexity": ev.get("perplexity"), "sizeBytes": checkpoint_bytes(out),
            "sizeRatio": checkpoint_bytes(out) / src_bytes, "linearRatio": lin.get("quantizedLinearRatio"),
            "floor": physical_floor(scheme), "msPerToken": ms, "latencyRatio": ms / src_ms,
        }
        row["linearOverFloor"] = row["linearRatio"] - row["floor"]
        report["schemes"].append(row)
        print(json.dumps(row), flush=True)

    if not args.skip_pruning:
        report["pruning"] = bench_pruning(args, source, eval_uri, fmt, modes, new_tokens, root, src_eval)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


def bench_pruning(args, source: Path, eval_uri: str, fmt: str, modes, new_tokens: int, root: Path, src_eval) -> list[dict]:
    """Depth 50% without and with KD recovery, through the real compression recipe on a local Ray."""
    import ray

    from anneal.api.compression import CompressionJobSpec
    from anneal.compress import recipe

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    data = {"uri": eval_uri, "format": fmt, "samples": 256}
    rows = []
    try:
        for label, recovery in (("depth 50%", None),
                                ("depth 50% + KD", {"steps": args.recovery_steps, "batchSize": 16, "learningRate": 0.003,
                                                    "dataset": {**data, "samples": 2000 if not eval_uri.endswith(".jsonl") else None},
                                                    "kd": {"alpha": 0.5}})):
            if recovery and recovery["dataset"]["samples"] is None:
                recovery["dataset"].pop("samples")
            spec = CompressionJobSpec.model_validate({
                "model": {"uri": str(source)},
                "pruning": {"depth": {"ratio": 0.5}, "calibration": {**data, "samples": 64},
                            **({"recovery": recovery} if recovery else {})},
                "evaluation": {"dataset": {"uri": eval_uri, "format": fmt, "split": "eval"}, "samples": args.samples,
                               "reasoningModes": list(modes), "maxNewTokens": new_tokens},
            })
            uid = uuid.uuid4().hex[:8]
            ctx = recipe.JobContext(kind="CompressionJob", namespace="bench", name=f"depth50-{uid}", uid=uid,
                                    tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="bench-compress",
                                    registered_model_name="bench-depth50", work_dir=str(root / "work" / uid),
                                    cache_dir=str(root / "cache"), artifact_root=str(root / "artifacts"))
            t0 = time.perf_counter()
            result = recipe.run(spec, ctx)
            m = result.metrics
            row = {"label": label, "phase": result.phase, "seconds": round(time.perf_counter() - t0, 1),
                   "accuracy": m.get("accuracy"), "sourceAccuracy": m.get("sourceAccuracy"),
                   "retention": m.get("retention"), "perplexity": m.get("perplexity"),
                   "paramRatio": m.get("prunedParamRatio"), "sizeRatio": m.get("sizeRatio"),
                   "recoveryLoss": m.get("recoveryLoss"), "message": result.message[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    return rows


if __name__ == "__main__":
    sys.exit(main())
