"""Router overhead: the ModelService router app vs a single-deployment Serve app, same no-op model.

Both apps run side by side on one local Ray Serve and take the same requests over real HTTP:

- `router`: the real ModelService app (`anneal.serve.app.build_app`): router ingress → one
  variant deployment with the `echo` engine (no model: answers with its prompt).
- `direct`: one Serve deployment that parses the same OpenAI request and calls the same echo
  engine in-process (no routing, no second hop).

Latency: sequential requests, alternating apps, p50 / p99. Throughput: closed loop at a fixed
concurrency for a fixed time, apps alternating in rounds. Then tokens/s of a tiny Llama model
through the router (`--tiny-tokens`).

`--mode shadow` (issue 15) measures shadow pairing instead: three ModelService apps, each with
a `stable` echo variant (`--primary-delay-ms`, 5) taking all user traffic and a `candidate`
echo variant at weight 0, take the same requests in turn:

- `off`: no shadow;
- `on`: `routing.shadow` at percent 100 to a candidate much slower than the stable
  (`--shadow-delay-ms`, 200): a user request that waited for its mirror would take ≥ 200 ms;
- `on-fast`: shadow at percent 100 to a candidate as fast as the stable, so every request's
  mirror comes back and is paired (the router's pairing work at full rate).

User-facing latency (sequential, p50/p95/p99, and how many requests took as long as the slow
mirror), closed-loop throughput and its latency, then each app's `/-/stats` (mirrored calls,
pairs, agreements, mirrors dropped at the in-flight cap) once the mirrors have drained.

    .venv/bin/python benchmarks/bench_router.py [--requests 400] [--seconds 8] [--concurrency 16]
    .venv/bin/python benchmarks/bench_router.py --mode shadow [--requests 400] [--seconds 5]
"""

# No `from __future__ import annotations`: the FastAPI routes below need real types.
import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_app():
    """A single-deployment app answering /v1/completions with the echo engine, no router."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="direct", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512)
    @serve.ingress(api)
    class Direct:
        def __init__(self):
            from anneal.serve.engines import EchoEngine

            self.engine = EchoEngine()

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            from anneal.serve import protocol
            from anneal.serve.engines import GenerateRequest

            parsed = protocol.parse_request(protocol.parse_json(await request.body(), 1 << 20), "completion", 4096)
            r = self.engine.generate(GenerateRequest(prompt=parsed.prompt, max_tokens=parsed.max_tokens or 16))
            return JSONResponse(protocol.completion_body("completion", protocol.new_id("completion"), "direct",
                                                         r.text, r.finish_reason, r.prompt_tokens,
                                                         r.completion_tokens))

    return Direct.bind()


def router_app(variant_engine: str = "echo", model_uri: str | None = None, service: str = "bench-router"):
    from anneal.serve.app import AppArgs, VariantArgs, build_app

    args = AppArgs(
        service=service,
        variants=[VariantArgs(name="v", engine=variant_engine, model_uri=model_uri, num_cpus=0.1,
                              max_ongoing_requests=64)],
        weights={"v": 100},
        router_num_cpus=0.1,
        decision_log_rate=0.0,
    )
    return build_app(args)


def shadow_app(service: str, shadow: bool, primary_delay_ms: float, candidate_delay_ms: float):
    """A ModelService app: `stable` takes every user request; `candidate` (weight 0) gets a copy
    of each when `shadow` is on (`routing.shadow` at percent 100)."""
    from anneal.serve.app import AppArgs, VariantArgs, build_app

    args = AppArgs(
        service=service,
        variants=[VariantArgs(name=name, engine="echo", engine_options={"delay_ms": delay}, num_cpus=0.1,
                              max_ongoing_requests=64)
                  for name, delay in (("stable", primary_delay_ms), ("candidate", candidate_delay_ms))],
        weights={"stable": 100, "candidate": 0},
        shadow_variant="candidate" if shadow else None,
        shadow_percent=100.0 if shadow else 0.0,
        router_num_cpus=0.1,
        decision_log_rate=0.0,
    )
    return build_app(args)


BODY = {"prompt": "ping", "max_tokens": 1}


def _percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"p50Ms": round(statistics.median(xs), 2), "p95Ms": round(xs[int(0.95 * (len(xs) - 1))], 2),
            "p99Ms": round(xs[int(0.99 * (len(xs) - 1))], 2)}


def latency(base: str, prefixes: list[str], n: int, samples: dict[str, list[float]] | None = None
            ) -> dict[str, dict[str, float]]:
    samples = samples if samples is not None else {}
    for p in prefixes:
        samples.setdefault(p, [])
    with httpx.Client(base_url=base, timeout=30) as c:
        for p in prefixes:  # warm up
            for _ in range(20):
                c.post(p + "/v1/completions", json=BODY).raise_for_status()
        for _ in range(n):
            for p in prefixes:
                t = time.perf_counter()
                c.post(p + "/v1/completions", json=BODY).raise_for_status()
                samples[p].append((time.perf_counter() - t) * 1000)
    return {p: _percentiles(xs) for p, xs in samples.items()}


async def _closed_loop(base: str, prefix: str, concurrency: int, seconds: float,
                       latencies: list[float] | None = None) -> tuple[int, int]:
    ok = errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as c:
        async def worker():
            nonlocal ok, errors
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                r = await c.post(prefix + "/v1/completions", json=BODY)
                if latencies is not None:
                    latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code == 200:
                    ok += 1
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors


def throughput(base: str, prefixes: list[str], concurrency: int, seconds: float, rounds: int,
               latencies: dict[str, list[float]] | None = None) -> dict[str, float]:
    totals = {p: 0 for p in prefixes}
    errors = {p: 0 for p in prefixes}
    for _ in range(rounds):
        for p in prefixes:
            lat = latencies.setdefault(p, []) if latencies is not None else None
            ok, err = asyncio.run(_closed_loop(base, p, concurrency, seconds, lat))
            totals[p] += ok
            errors[p] += err
    return {p: round(totals[p] / (seconds * rounds), 1) for p in prefixes} | {"errors": sum(errors.values())}


def tiny_tokens_per_second(base: str, prefix: str, concurrency: int, seconds: float, max_tokens: int) -> float:
    body = {"prompt": "Ana has 3 apples.", "max_tokens": max_tokens, "ignore_eos": True}
    tokens = 0

    async def run():
        nonlocal tokens
        deadline = time.perf_counter() + seconds
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            async def worker():
                nonlocal tokens
                while time.perf_counter() < deadline:
                    r = await c.post(prefix + "/v1/completions", json=body)
                    r.raise_for_status()
                    tokens += r.json()["usage"]["completion_tokens"]
            await asyncio.gather(*(worker() for _ in range(concurrency)))

    start = time.perf_counter()
    asyncio.run(run())
    return round(tokens / (time.perf_counter() - start), 1)


def shadow_figures(base: str, prefix: str, wait_s: float) -> dict[str, Any]:
    """The app's shadow figures from `/-/stats`, once its mirrored calls stopped coming back
    (or after `wait_s`)."""
    deadline = time.perf_counter() + wait_s
    last = None
    with httpx.Client(base_url=base, timeout=30) as c:
        while True:
            doc = c.get(prefix + "/-/stats").raise_for_status().json()
            mirrored = (doc.get("shadow", {}).get("candidate") or {}).get("requests", 0)
            if mirrored == last or time.perf_counter() > deadline:
                break
            last = mirrored
            time.sleep(1.0)
    pairs = (doc.get("pairs", {}).get("candidate") or {}).get("stable") or {}
    shadow = doc.get("shadow", {}).get("candidate") or {}
    return {
        "userRequests": doc["variants"]["stable"]["total"]["requests"],
        "mirrored": shadow.get("requests", 0), "mirrorErrors": shadow.get("errors", 0),
        "mirrorP95Ms": shadow.get("latencyP95Ms"), "dropped": doc.get("shadow_dropped", 0),
        "pairs": pairs.get("pairs", 0), "agreements": pairs.get("agreements", 0),
        "latencyRatioP50": pairs.get("latencyRatioP50"),
    }


def shadow_main(opts: argparse.Namespace, base: str) -> dict:
    """`--mode shadow`: user-facing latency and throughput with shadow pairing off / on / on-fast."""
    from ray import serve

    slow, fast = opts.shadow_delay_ms, opts.primary_delay_ms
    serve.run(shadow_app("bench-shadow-off", False, fast, slow), name="bench-shadow-off", route_prefix="/off")
    serve.run(shadow_app("bench-shadow-on", True, fast, slow), name="bench-shadow-on", route_prefix="/on")
    serve.run(shadow_app("bench-shadow-fast", True, fast, fast), name="bench-shadow-fast", route_prefix="/on-fast")
    prefixes = ["/off", "/on", "/on-fast"]
    seq: dict[str, list[float]] = {}
    lat = latency(base, prefixes, opts.requests, seq)
    # Mirrors still queued at the slow candidate (at most the router's in-flight cap) drain at
    # one per shadow delay: wait for them before reading the pair counts. Read once after the
    # sequential phase (the pair ring holds ≥ 1024 pairs: all of them) and once at the end.
    wait_s = 64 * slow / 1000 + 10
    after_sequential = {p: shadow_figures(base, p, wait_s) for p in ("/on", "/on-fast")}
    loop_lat: dict[str, list[float]] = {}
    thr = throughput(base, prefixes, opts.concurrency, opts.seconds, opts.rounds, loop_lat)
    off = lat["/off"]
    result = {
        "latency": lat,
        "atLeastShadowDelay": {p: sum(x >= slow for x in xs) for p, xs in seq.items()},
        "sequentialRequests": {p: len(xs) for p, xs in seq.items()},
        "addedMs": {p: {"p50": round(lat[p]["p50Ms"] - off["p50Ms"], 2),
                        "p95": round(lat[p]["p95Ms"] - off["p95Ms"], 2)} for p in ("/on", "/on-fast")},
        "throughputRps": thr,
        "throughputRatio": {p: round(thr[p] / thr["/off"], 3) if thr["/off"] else None for p in ("/on", "/on-fast")},
        "closedLoopLatency": {p: _percentiles(xs) for p, xs in loop_lat.items()},
        "closedLoopAtLeastShadowDelay": {p: sum(x >= slow for x in xs) for p, xs in loop_lat.items()},
        "shadowAfterSequential": after_sequential,
        "shadowAtEnd": {p: shadow_figures(base, p, wait_s) for p in ("/on", "/on-fast")},
        "config": vars(opts),
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="sequential requests per app for latency")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per throughput round per app")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds (apps alternate)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--tiny-tokens", type=int, default=32, help="max_tokens for the tiny-model tokens/s run (0: skip)")
    ap.add_argument("--mode", choices=["direct", "shadow"], default="direct",
                    help="direct: router vs a single deployment; shadow: shadow pairing off / on (issue 15)")
    ap.add_argument("--primary-delay-ms", type=float, default=5.0, help="shadow mode: the stable echo's delay")
    ap.add_argument("--shadow-delay-ms", type=float, default=200.0, help="shadow mode: the slow candidate's delay")
    ap.add_argument("--json", help="also write the results here")
    opts = ap.parse_args(argv)

    import ray
    from ray import serve

    ray.init(num_cpus=opts.num_cpus, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    if opts.mode == "shadow":
        result = shadow_main(opts, base)
        serve.shutdown()
        ray.shutdown()
        _report(result, opts.json)
        return result
    serve.run(router_app(), name="bench-router", route_prefix="/router")
    serve.run(direct_app(), name="bench-direct", route_prefix="/direct")
    prefixes = ["/router", "/direct"]
    lat = latency(base, prefixes, opts.requests)
    thr = throughput(base, prefixes, opts.concurrency, opts.seconds, opts.rounds)
    result = {
        "latency": lat,
        "throughputRps": thr,
        "addedP50Ms": round(lat["/router"]["p50Ms"] - lat["/direct"]["p50Ms"], 2),
        "throughputRatio": round(thr["/router"] / thr["/direct"], 3) if thr["/direct"] else None,
        "config": vars(opts),
    }
    if opts.tiny_tokens:
        from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
        from anneal.modeling.tokenizer import builtin_corpus, train_tokenizer

        tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
        tok = train_tokenizer(builtin_corpus(20), vocab_size=300)
        path = save_pretrained(build_llama(LlamaShape(hidden_size=64, layers=2, heads=4, kv_heads=2,
                                                      intermediate_size=128), tok), tok, tmp / "tiny")
        serve.run(router_app("transformers", str(path), "bench-tiny"), name="bench-tiny", route_prefix="/tiny")
        tiny_tokens_per_second(base, "/tiny", 2, 2.0, opts.tiny_tokens)  # warm up
        result["tinyTokensPerSecond"] = tiny_tokens_per_second(base, "/tiny", 4, opts.seconds, opts.tiny_tokens)
    serve.shutdown()
    ray.shutdown()
    _report(result, opts.json)
    return result


def _report(result: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
