"""What an `openai` variant adds: a ModelService in front of an OpenAI-compatible server vs that server directly.

Both run on one local Ray Serve and take the same requests over real HTTP:

- `direct`: the "existing server", an Anneal app (router → `echo` variant, no model: the
  server's own cost is near zero, so what is measured is the front's).
- `via`: a ModelService whose one variant is `engine: openai` pointing at `direct`'s `/v1`
  (router → openai variant → HTTP → the server).

Latency: sequential requests alternating the two, p50 / p95 (non-streamed), and time to the
first streamed piece. Throughput: closed loop at `--concurrency` for `--seconds`, in rounds
alternating the two. Then the engine alone, in this process: `OpenAIEngine.agenerate` vs a bare
pooled httpx post of the same body to the same server (what the engine adds over the HTTP call
itself). Prints the load average, since the machine is shared.

    .venv/bin/python benchmarks/bench_openai_engine.py [--requests 300] [--seconds 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

import httpx

BODY = {"prompt": "2 + 3 =", "max_tokens": 8}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def sequential(base: str, paths: dict[str, str], n: int, stream: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in paths}
    body = {**BODY, "stream": stream}
    with httpx.Client(base_url=base, timeout=30) as http:
        for name, path in paths.items():  # warm both
            for _ in range(20):
                http.post(path, json=body).raise_for_status()
        for _ in range(n):
            for name, path in paths.items():
                t0 = time.perf_counter()
                if stream:
                    with http.stream("POST", path, json=body) as r:
                        lines = r.iter_lines()
                        for line in lines:
                            if line.startswith("data: ") and '"text":"' in line and '"text":""' not in line:
                                break
                        out[name].append((time.perf_counter() - t0) * 1000)
                        for _ in lines:
                            pass
                else:
                    r = http.post(path, json=body)
                    r.raise_for_status()
                    out[name].append((time.perf_counter() - t0) * 1000)
    return out


async def closed_loop(base: str, path: str, seconds: float, concurrency: int) -> tuple[int, int]:
    ok = errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        async def worker() -> None:
            nonlocal ok, errors
            while time.perf_counter() < deadline:
                r = await http.post(path, json=BODY)
                if r.status_code == 200:
                    ok += 1
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors


async def engine_vs_plain_httpx(url: str, n: int) -> dict[str, float]:
    """The engine's own cost: `OpenAIEngine.agenerate` vs a bare pooled httpx post of the same body."""
    from anneal.serve.engines import GenerateRequest, OpenAIEngine

    engine = OpenAIEngine(url, "direct")
    req = GenerateRequest(prompt=BODY["prompt"], max_tokens=BODY["max_tokens"])
    out: dict[str, list[float]] = {"engine": [], "httpx": []}
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(20):
            await engine.agenerate(req)
            await http.post(url + "/completions", json={**BODY, "model": "direct"})
        for _ in range(n):
            t0 = time.perf_counter()
            await engine.agenerate(req)
            t1 = time.perf_counter()
            r = await http.post(url + "/completions", json={**BODY, "model": "direct"})
            r.json()
            t2 = time.perf_counter()
            out["engine"].append((t1 - t0) * 1000)
            out["httpx"].append((t2 - t1) * 1000)
    await engine.aclose()
    return {k + "_p50_ms": round(statistics.median(v), 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray import serve

    from anneal.api.resources import parse_spec
    from anneal.local.jobs import ray_session
    from anneal.local.service import start_http
    from anneal.serve.app import AppArgs, VariantArgs, args_from_spec, build_serve_config
    from anneal.serve.deploy import deploy_entries
    from anneal.settings import Settings

    settings = Settings()
    settings.ray.num_cpus, settings.ray.address = 2, None
    with ray_session(settings):
        port = start_http("127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}"
        cache = tempfile.mkdtemp()
        direct = AppArgs(service="direct", route_prefix="/direct",
                         variants=[VariantArgs(name="echo", engine="echo", num_cpus=0.1)], weights={"echo": 100},
                         router_num_cpus=0.1, decision_log_rate=0, cache_dir=cache)
        spec = parse_spec("ModelService", {"variants": [{"name": "ext", "engine": "openai", "backend": {
            "url": f"{base}/direct/v1", "model": "direct", "maxConcurrency": 64}}]})
        via = args_from_spec("via", spec, {}, cache_dir=cache, router_num_cpus=0.1, route_prefix="/via",
                             decision_log_rate=0)
        deploy_entries([build_serve_config(direct), build_serve_config(via)], wait_s=300)
        paths = {"direct": "/direct/v1/completions", "via": "/via/v1/completions"}
        load0 = os.getloadavg()
        lat = sequential(base, paths, a.requests, stream=False)
        ttft = sequential(base, paths, max(50, a.requests // 3), stream=True)
        tput: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(a.rounds):
            for name, path in paths.items():
                ok, errors = asyncio.run(closed_loop(base, path, a.seconds, a.concurrency))
                assert errors == 0, (name, errors)
                tput[name].append(ok / a.seconds)
        engine_only = asyncio.run(engine_vs_plain_httpx(f"{base}/direct/v1", a.requests))
        load1 = os.getloadavg()
        result = {
            "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
            "cpus": os.cpu_count(), "requests": a.requests,
        }
        for name in paths:
            result[name] = {"p50_ms": round(statistics.median(lat[name]), 2), "p95_ms": round(pct(lat[name], 95), 2),
                            "ttft_p50_ms": round(statistics.median(ttft[name]), 2),
                            "rps_c%d" % a.concurrency: round(statistics.mean(tput[name]), 1)}
        result["added_p50_ms"] = round(result["via"]["p50_ms"] - result["direct"]["p50_ms"], 2)
        result["added_p95_ms"] = round(result["via"]["p95_ms"] - result["direct"]["p95_ms"], 2)
        result["added_ttft_p50_ms"] = round(result["via"]["ttft_p50_ms"] - result["direct"]["ttft_p50_ms"], 2)
        result["engine_alone"] = engine_only
        key = "rps_c%d" % a.concurrency
        result["throughput_ratio"] = round(result["via"][key] / result["direct"][key], 3)
        print(json.dumps(result, indent=2))
        serve.shutdown()


if __name__ == "__main__":
    main()
