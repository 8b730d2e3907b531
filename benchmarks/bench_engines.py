"""The engines alone, in one process: vllm vs transformers without Ray Serve, the router or HTTP.

`bench_serving.py` measures the whole serving path (HTTP -> Serve proxy -> router -> variant replica
-> engine, every streamed piece back the same way). This one calls the engines directly on the same
model as it builds (a Llama-3-style chat model, hidden 128, 2 layers, 2 heads of 64, random weights,
bf16 for vLLM), so the two figures side by side say how much of a gap is the engine and how much
the path around it:

- `transformers`: `TransformersEngine.stream`, torch with 1 thread (its replica's 1 CPU), requests
  one after another (a replica's engine thread serves one at a time).
- `vllm`: `VllmEngine.astream` (AsyncLLM), n requests in flight at once (continuous batching).

Every request asks for `--tokens` answer tokens with `ignore_eos`. Per engine and concurrency:
answer tokens/s over the round's wall time and time to the first piece (p50). Prints the load
average before and after. Runs in the serving environment (vLLM pins its own torch):

    .venv-vllm/bin/python benchmarks/bench_engines.py [--tokens 64] [--rounds 2] [--levels 1,8,32] [--eager]
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path


def request(i: int, tokens: int):
    from anneal.serve.engines import GenerateRequest

    return GenerateRequest(messages=[{"role": "user", "content": f"What is {i} + {i % 7}?"}], max_tokens=tokens,
                           temperature=0.0, ignore_eos=True)


def tf_round(engine, n: int, tokens: int) -> dict[str, float]:
    ttft, total = [], 0
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        first = None
        for piece in engine.stream(request(i, tokens)):
            if first is None and piece.text:
                first = time.perf_counter() - s
            if piece.finish_reason:
                total += piece.completion_tokens
        ttft.append(first or 0.0)
    wall = time.perf_counter() - t0
    return {"tokens_per_s": total / wall, "ttft_p50_ms": 1000 * statistics.median(ttft), "pieces": float(total)}


async def vllm_round(engine, n: int, tokens: int) -> dict[str, float]:
    async def one(i: int) -> tuple[float, int, int]:
        s = time.perf_counter()
        first, used, pieces = None, 0, 0
        async for piece in engine.astream(request(i, tokens)):
            if piece.text:
                pieces += 1
                if first is None:
                    first = time.perf_counter() - s
            if piece.finish_reason:
                used = piece.completion_tokens
        return first or 0.0, used, pieces

    t0 = time.perf_counter()
    got = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    return {"tokens_per_s": sum(g[1] for g in got) / wall, "ttft_p50_ms": 1000 * statistics.median(g[0] for g in got),
            "pieces": float(sum(g[2] for g in got))}


def main() -> None:
    from bench_serving import bench_model, parse_args  # the same options and model as the served benchmark

    from anneal.serve.engines import TransformersEngine, VllmEngine

    a = parse_args(__doc__)
    levels = a.levels
    root = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    model = bench_model(root, a)
    load_before = os.getloadavg()
    tf = TransformersEngine(str(model), cache_dir=str(root / "cache"), device="cpu", num_threads=1)
    t0 = time.perf_counter()
    opts = {"dtype": "bfloat16", "max_model_len": 512, "max_num_seqs": max(levels), "kv_cache_memory_bytes": 512 << 20}
    if a.eager:
        opts["enforce_eager"] = True
    vl = VllmEngine(str(model), cache_dir=str(root / "cache"), **opts)
    print(f"vllm engine up in {time.perf_counter() - t0:.0f} s", flush=True)
    loop = asyncio.new_event_loop()
    tf_round(tf, 2, a.tokens)
    loop.run_until_complete(vllm_round(vl, 2, a.tokens))
    rows = {}
    for n in levels:
        hs, vs = [], []
        for _ in range(a.rounds):
            hs.append(tf_round(tf, n, a.tokens))
            vs.append(loop.run_until_complete(vllm_round(vl, n, a.tokens)))
        rows[n] = ({k: statistics.median(r[k] for r in hs) for k in hs[0]},
                   {k: statistics.median(r[k] for r in vs) for k in vs[0]})
        h, v = rows[n]
        print(f"{n:>3} streams  transformers {h['tokens_per_s']:8.1f} tok/s | vllm {v['tokens_per_s']:8.1f} tok/s "
              f"({v['pieces'] / n:.0f} pieces per answer) | {v['tokens_per_s'] / h['tokens_per_s']:.1f}x", flush=True)
    vl.shutdown()
    load_after = os.getloadavg()
    loop.run_until_complete(asyncio.sleep(0.5))  # vLLM's output handler ends on this loop before it closes
    print(f"\nload average {load_before[0]:.1f} -> {load_after[0]:.1f}; {a.tokens} tokens per answer, median of "
          f"{a.rounds} rounds; vLLM {'eager' if a.eager else 'compiled'}; engines called directly (no Serve)")
    print("| streams | transformers tok/s | vllm tok/s | vllm / transformers | transformers TTFT p50 ms "
          "| vllm TTFT p50 ms | vllm pieces per answer |")
    print("|---|---|---|---|---|---|---|")
    for n, (h, v) in rows.items():
        print(f"| {n} | {h['tokens_per_s']:.1f} | {v['tokens_per_s']:.1f} | {v['tokens_per_s'] / h['tokens_per_s']:.1f}x "
              f"| {h['ttft_p50_ms']:.0f} | {v['ttft_p50_ms']:.0f} | {v['pieces'] / n:.0f} |")


if __name__ == "__main__":  # vLLM starts its engine process with spawn: the guard is required
    main()
