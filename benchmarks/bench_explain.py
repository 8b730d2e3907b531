"""Attention maps benchmark: does a trained model look at the numbers, and what does a map cost?

A 4-layer copy-task Llama ("Repeat: 42" → "Answer: 42", as in bench_compress.py) is trained here
and compared, on the same prompts, with the same model before training (random init):

* ``numberAttention``: of the answer's attention on the prompt, the share on numeric tokens
  (`anneal.explain.attention`), mean over the prompts, with ``numberTokenShare`` (what uniform
  attention gives) beside it; on the memorised numbers and on held-out ones;
* ``numberAttentionOfDigitTokens``: the same share for the answer's digit tokens only (the rows
  that copy), and ``layerNumberAttention``, each layer's;
* ``accuracy``: the share of answers stating the number (a model that copies must look at it);
* timings, one process, CPU, batch 1: ``mapMs`` (greedy answer + the eager forward pass),
  ``renderMs`` (PNG + HTML), ``htmlBytes``, median over the prompts (the first render, which
  imports matplotlib, is reported apart as ``firstRenderMs``).

    .venv/bin/python benchmarks/bench_explain.py --out /tmp/bench-explain.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def measure(model, tokenizer, numbers: list[int], out_dir: Path) -> dict[str, float]:
    from anneal.data.reasoning import check_answer
    from anneal.explain.attention import explain_prompt
    from anneal.explain.render import render_html, render_png

    from anneal.explain.attention import is_numeric, number_attention

    na, share, ok, map_ms, render_ms, size, digit_rows, layers = [], [], [], [], [], [], [], []
    first_render = None
    for x in numbers:
        t0 = time.perf_counter()
        m = explain_prompt(model, tokenizer, f"Repeat: {x}\n", max_new_tokens=6, question=f"Repeat: {x}")
        t1 = time.perf_counter()
        page = render_html(m, render_png(m))
        t2 = time.perf_counter()
        if first_render is None:
            first_render = (t2 - t1) * 1000
            (out_dir / f"repeat-{x}.html").write_text(page)
        else:
            render_ms.append((t2 - t1) * 1000)
        map_ms.append((t1 - t0) * 1000)
        size.append(len(page.encode()))
        na.append(m.number_attention)
        share.append(m.number_token_share)
        ok.append(check_answer(m.answer, x))
        layers.append(m.layer_number_attention())
        rows = [i for i, t in enumerate(m.answer_tokens) if is_numeric(t)]  # the answer's own digits
        if rows:
            digit_rows.append(number_attention(m.weights[:, rows], m.numeric))
    return {"numberAttention": statistics.mean(na), "numberAttentionMin": min(na), "numberAttentionMax": max(na),
            "numberTokenShare": statistics.mean(share), "accuracy": sum(ok) / len(ok),
            "numberAttentionOfDigitTokens": statistics.mean(digit_rows) if digit_rows else None,
            "layerNumberAttention": [round(statistics.mean(v), 3) for v in zip(*layers)],
            "mapMs": statistics.median(map_ms), "renderMs": statistics.median(render_ms or [first_render]),
            "firstRenderMs": first_render, "htmlBytes": statistics.median(size), "prompts": len(numbers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--samples", type=int, default=16, help="memorised copy-task numbers")
    args = parser.parse_args(argv)

    import torch

    from anneal.modeling.tiny import LlamaShape, build_llama, memorize_copy_task
    from anneal.modeling.tokenizer import builtin_tokenizer
    from anneal.modeling.uris import load_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    shape = LlamaShape(hidden_size=64, layers=4, heads=4, kv_heads=2, intermediate_size=128)
    root = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    t0 = time.perf_counter()
    src, data = memorize_copy_task(root, shape, samples=args.samples, max_steps=300)
    train_s = time.perf_counter() - t0
    seen = [json.loads(line)["answer"] for line in data.read_text().splitlines()]
    held_out = [x for x in range(10, 100) if x not in seen][: len(seen)]
    trained, tokenizer = load_model(str(src), cache_dir=root / "cache")
    random_init = build_llama(shape, builtin_tokenizer(root / "cache" / "tokenizers"), seed=1).eval()  # its start
    results = {
        "trained, memorised numbers": measure(trained, tokenizer, seen, root),
        "trained, held-out numbers": measure(trained, tokenizer, held_out, root),
        "random init, same prompts": measure(random_init, tokenizer, seen, root),
    }
    doc = {"shape": shape.__dict__, "trainSeconds": round(train_s, 1), "results": results,
           "pages": str(root), "torchThreads": torch.get_num_threads()}
    print(f"{'model':30} {'numberAttention':>16} {'digit rows':>10} {'uniform':>8} {'per layer':>24} "
          f"{'accuracy':>9} {'map ms':>7} {'render ms':>9}")
    for name, r in results.items():
        digits = r["numberAttentionOfDigitTokens"]
        print(f"{name:30} {r['numberAttention']:16.3f} {'-' if digits is None else f'{digits:.3f}':>10} "
              f"{r['numberTokenShare']:8.3f} {str(r['layerNumberAttention']):>24} {r['accuracy']:9.2f} "
              f"{r['mapMs']:7.0f} {r['renderMs']:9.0f}")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
