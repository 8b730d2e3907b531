"""Attention removal + FFN fusion benchmark: decode latency and sequential depth before/after, fusion exactness, gap.

Part 1 (always), on one Llama built here (random init, ``--layers``/``--hidden``), measured side by
side in one process on CPU, batch 1, greedy decoding with the KV cache:

* ``source``: the Llama as built;
* ``attention removed``: the blocks ``--drop`` lose their attention (``anneal.compress.ffn_fusion.drop_attention``);
* ``removed + fused``: and each run of consecutive attention-free blocks is one wider FFN (``fuse_ffn``).

For each: decoder blocks, sequential depth (attention + FFN sub-layers in sequence), parameters,
median ms per generated token over ``--repeats`` rounds (the three models take turns within each
round, so machine load hits them alike), and the ratio to the source. Also:

* ``fusionMaxAbsError``: max |fused block(x) − (x + Σ_k FFN_k(norm_k(x)))| over random hidden
  states — the fused FFN against the parallel form it implements (fp32; 0 up to rounding);
* ``parallelVsSequential``: how far the fused model is from the unfused attention-removed one on
  random token sequences: mean KL(p_sequential ‖ p_fused) per token, top-1 agreement, and the
  relative L2 error of the fused block's output against the two sequential blocks on the same input.

Part 2 (``--retention``): the issue's figure on one model. A copy-task Llama (hidden 128,
``--retention-layers`` blocks) is trained here on ``--retention-samples`` items and put through
the real compression recipe on a local Ray: ``--retention-drop`` attention sub-layers removed
(a count: the least important on the calibration data, as ``dropLayers: N`` does; or indices),
FFNs fused, without and with KD recovery. Accuracy retention is scored on ``--held-out`` numbers
the model never saw (copying, not recall), or on the trained items when 0; then the source and
the recovered model it became are timed side by side as in part 1.

    .venv/bin/python benchmarks/bench_ffn_fusion.py --out /tmp/bench-ffn-fusion.json [--retention]
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


def build(layers: int, hidden: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 2), num_key_value_heads=max(hidden // 128, 1),
                         max_position_embeddings=1024, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # distinct norm weights, as in a trained model, so that fusion folds them
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def decode_ms(model, prompt, tokens: int) -> float:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False, pad_token_id=0)
    return (time.perf_counter() - t0) * 1000 / tokens


def side_by_side(models: dict, prompt, tokens: int, repeats: int) -> dict[str, float]:
    """Median ms per generated token of each model, measured in turns within each round.

    Each model is warmed up first; the model going first rotates every round, so load that drifts
    within a round hits them alike.
    """
    for model in models.values():
        decode_ms(model, prompt, 4)
    times = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(decode_ms(models[name], prompt, tokens))
    return {name: statistics.median(t) for name, t in times.items()}


def exactness_and_gap(dropped, fused, runs, layers_hidden: int, seed: int = 0) -> dict:
    import torch

    from anneal.compress.ffn_fusion import fusion_gap

    g = torch.Generator().manual_seed(seed)
    run = runs[0]
    x = torch.randn(4, 32, layers_hidden, generator=g)
    src = dropped.model.layers
    new_index = run[0] - sum(len(r) - 1 for r in runs if r[0] < run[0])
    with torch.no_grad():
        parallel = x + sum(src[i].mlp(src[i].post_attention_layernorm(x)) for i in run)
        out = fused.model.layers[new_index](x, attention_mask=None, position_embeddings=None)
        sequential = x
        for i in run:
            sequential = src[i](sequential, attention_mask=None, position_embeddings=None)
    batches = [{"input_ids": torch.randint(1, 512, (2, 64), generator=g), "attention_mask": torch.ones(2, 64, dtype=torch.long)}
               for _ in range(4)]
    gap = fusion_gap(dropped, fused, batches)
    return {
        "fusionMaxAbsError": float((out - parallel).abs().max()),
        "fusionOutputMaxAbs": float(parallel.abs().max()),
        "parallelVsSequential": {
            "blockRelL2": float((out - sequential).norm() / (sequential - x).norm()),
            "logitsKl": gap["kl"],
            "top1Agreement": gap["top1"],
        },
    }


def part1(args) -> dict:
    import torch

    from anneal.compress.ffn_fusion import drop_attention, fuse_ffn, sequential_depth
    from anneal.compress.pruning import count_parameters

    source = build(args.layers, args.hidden)
    drop = [int(i) for i in args.drop.split(",")]
    dropped = drop_attention(source, drop)
    fused, runs = fuse_ffn(dropped)
    models = {"source": source, "attention removed": dropped, "removed + fused": fused}
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 512, (1, args.prompt), generator=g)
    medians = side_by_side(models, prompt, args.tokens, args.repeats)
    rows = []
    base = medians["source"]
    for name, model in models.items():
        ms = medians[name]
        rows.append({"model": name, "blocks": len(model.model.layers), "sequentialDepth": sequential_depth(model),
                     "params": count_parameters(model), "msPerToken": round(ms, 3),
                     "latencyRatio": round(ms / base, 3), "speedup": round(base / ms, 3),
                     "depthRatio": round(sequential_depth(model) / sequential_depth(source), 3)})
        print(json.dumps(rows[-1]), flush=True)
    return {"shape": {"layers": args.layers, "hidden": args.hidden, "ffn": args.hidden * 3, "drop": drop,
                      "fusedRuns": runs, "threads": torch.get_num_threads(), "promptTokens": args.prompt,
                      "newTokens": args.tokens, "repeats": args.repeats},
            "rows": rows, **exactness_and_gap(dropped, fused, runs, args.hidden)}


def _drop_spec(text: str) -> int | list[int]:
    """``--retention-drop``: a count (the least important by the recipe's measure) or block indices."""
    return [int(i) for i in text.split(",")] if "," in text else int(text)


def part2(args, root: Path) -> dict:
    """Retention and decode latency on the same trained model, through the real compression recipe."""
    import mlflow
    import ray
    import torch

    from anneal.api.compression import CompressionJobSpec
    from anneal.compress import recipe
    from anneal.compress.ffn_fusion import sequential_depth
    from anneal.modeling.tiny import LlamaShape, held_out_path, memorize_copy_task
    from anneal.modeling.uris import load_model

    shape = LlamaShape(hidden_size=128, layers=args.retention_layers, heads=4, kv_heads=2, intermediate_size=384)
    t0 = time.perf_counter()
    source_dir, data = memorize_copy_task(root, shape, samples=args.retention_samples, max_steps=600,
                                          held_out=args.held_out)
    scored = held_out_path(data) if args.held_out else data  # numbers never trained on, or the trained
    n_scored = args.held_out or args.retention_samples
    trained_s = round(time.perf_counter() - t0, 1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    cal = {"uri": str(data), "format": "prompt-completion", "samples": min(args.retention_samples, 64)}
    drop = args.retention_drop
    rows, outputs = [], {}
    try:
        for label, recovery in (("removed + fused", None),
                                (f"+ KD recovery ({args.recovery_steps} steps)",
                                 {"steps": args.recovery_steps, "batchSize": 8, "learningRate": 0.003,
                                  "dataset": cal, "kd": {"alpha": 0.5}})):
            spec = CompressionJobSpec.model_validate({
                "model": {"uri": str(source_dir)},
                "pruning": {"attention": {"dropLayers": drop, "fuseFfn": True}, "calibration": cal,
                            **({"recovery": recovery} if recovery else {})},
                "evaluation": {"dataset": {"uri": str(scored), "format": "prompt-completion"}, "samples": n_scored,
                               "reasoningModes": ["off"], "maxNewTokens": 8},
            })
            uid = uuid.uuid4().hex[:8]
            ctx = recipe.JobContext(kind="CompressionJob", namespace="bench", name=f"fusion-{uid}", uid=uid,
                                    tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="bench-ffn-fusion",
                                    registered_model_name="bench-ffn-fusion", work_dir=str(root / "work" / uid),
                                    cache_dir=str(root / "cache"), artifact_root=str(root / "artifacts"))
            t1 = time.perf_counter()
            result = recipe.run(spec, ctx)
            m = result.metrics
            row = {"label": label, "phase": result.phase, "seconds": round(time.perf_counter() - t1, 1),
                   **{k: m.get(k) for k in ("sourceAccuracy", "accuracy", "retention", "perplexity",
                                            "sourcePerplexity", "prunedSequentialDepth", "prunedSequentialDepthRatio",
                                            "prunedFusionGapKl", "prunedFusionGapTop1", "prunedParamRatio",
                                            "recoveryLoss")},
                   "message": result.message[:300]}
            if result.mlflow_run_id:  # which blocks the recipe chose (by importance, for a count)
                tags = mlflow.MlflowClient(ctx.tracking_uri).get_run(result.mlflow_run_id).data.tags
                row["droppedAttention"] = json.loads(tags.get("anneal.pruning.dropped_attention", "null"))
            rows.append(row)
            outputs[label] = result.model_uri
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    # Decode latency of the source and the recovered model it became, side by side (as part 1).
    source, tokenizer = load_model(str(source_dir), cache_dir=root / "cache")
    final_label = rows[-1]["label"]
    final, _ = load_model(outputs[final_label], cache_dir=root / "cache", tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    prompt = tokenizer("Repeat: 42\n", return_tensors="pt").input_ids
    models = {"source": source, final_label: final}
    medians = side_by_side(models, prompt, args.tokens, args.repeats)
    base = medians["source"]
    latency = []
    for name, model in models.items():
        ms = medians[name]
        latency.append({"model": name, "blocks": len(model.model.layers), "sequentialDepth": sequential_depth(model),
                        "msPerToken": round(ms, 3), "speedup": round(base / ms, 3)})
        print(json.dumps(latency[-1]), flush=True)
    return {"shape": {"layers": shape.layers, "hidden": shape.hidden_size, "ffn": shape.intermediate_size,
                      "drop": drop, "threads": torch.get_num_threads(), "trainSeconds": trained_s,
                      "trainItems": args.retention_samples, "scoredItems": n_scored,
                      "scoredOn": "held-out numbers" if args.held_out else "the trained items"},
            "rows": rows, "latency": latency}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--drop", default="2,3,4,5,6", help="blocks whose attention is removed")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per measurement")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--retention", action="store_true", help="also run part 2 (trains a copy-task model)")
    parser.add_argument("--recovery-steps", type=int, default=40)
    parser.add_argument("--retention-layers", type=int, default=8, help="blocks of part 2's copy-task model")
    parser.add_argument("--retention-samples", type=int, default=16, help="part 2: copy items trained on")
    parser.add_argument("--held-out", type=int, default=0,
                        help="part 2: score on this many numbers never trained on (0: on the trained items)")
    parser.add_argument("--retention-drop", default="4", type=_drop_spec,
                        help="part 2: attention sub-layers removed: a count (least important) or block indices")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root = Path(args.work or tempfile.mkdtemp(prefix="bench-ffn-fusion-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"latency": part1(args)}
    if args.retention:
        report["retention"] = part2(args, root)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
