"""Rollout benchmark: time to roll back a faulty candidate, and requests lost on the stable variant.

Runs a real local Ray Serve app (the serving app's `echo` / `faulty` test engines) under
generated load and drives real rollouts with `anneal.local.rollout.drive`:

* ``errors``  — a candidate failing 20 % of requests (gate errorRate ≤ 2 %);
* ``slow``    — a candidate 5× slower than the stable (gate latencyP95Ms);
* ``promote`` — a good candidate promoted 10 → 25 → 50 → 100.

For each faulty candidate: seconds from its first bad answer (first failed request, or its
first request for the slow one) to the moment the stable is back at 100 %, against the bound
``(failureLimit + 1) × interval + interval``. For all: requests that failed on the stable
variant (goal 0) and requests not answered at all.

    .venv/bin/python benchmarks/bench_rollout.py --interval 5 --failure-limit 2 --rps 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(name: str, steps: list[dict[str, Any]], gates: list[dict[str, Any]], a: argparse.Namespace) -> Any:
    from anneal.api import parse_manifest

    return parse_manifest({
        "apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": name},
        "spec": {
            "variants": [{"name": "stable", "model": {"uri": "/bench/stable"}, "weight": 100},
                         {"name": "canary", "model": {"uri": "/bench/canary"}, "weight": 0}],
            "rollout": {"stable": "stable", "candidate": "canary", "steps": steps,
                        "analysis": {"interval": f"{a.interval:g}s", "minRequests": a.min_requests,
                                     "failureLimit": a.failure_limit, "gates": gates}},
        },
    })


def _deploy(m: Any, engines: dict[str, dict[str, Any]], port: int, home: str) -> tuple[Any, str, Any]:
    import httpx

    from anneal.serve.app import args_from_spec, build_serve_config
    from anneal.serve.deploy import apply_weights, deploy_entries

    args = args_from_spec(m.name, m.spec, {}, cache_dir=f"{home}/cache", cpu_scale=0.25, route_prefix=f"/{m.name}")
    args = args.model_copy(update={"variants": [v.model_copy(update=engines[v.name]) for v in args.variants]})
    deploy_entries([build_serve_config(args)], wait_s=300)
    endpoint = f"http://127.0.0.1:{port}/{m.name}"
    for _ in range(600):
        try:
            if httpx.get(endpoint + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    return args, endpoint, apply_weights


def scenario(name: str, canary: dict[str, Any], gates: list[dict[str, Any]], steps: list[dict[str, Any]],
             a: argparse.Namespace, port: int, home: str) -> dict[str, Any]:
    from ray import serve

    from anneal.local.rollout import drive

    m = _manifest(name, steps, gates, a)
    stable = {"engine": "echo", "engine_options": {"delay_ms": a.stable_delay_ms}}
    args, endpoint, apply = _deploy(m, {"stable": stable, "canary": canary}, port, home)
    updates: list[Any] = []
    traffic_box: dict[str, Any] = {}

    def on_update(u: Any) -> None:
        updates.append(u)

    from anneal.local import rollout as embedded

    original = embedded.TrafficGenerator

    class Recording(original):  # keep a handle on the generator to read its failure log
        def __init__(self, *args: Any, **kw: Any):
            super().__init__(*args, **kw)
            traffic_box["gen"] = self

    embedded.TrafficGenerator = Recording
    try:
        status = drive(m, endpoint=endpoint, app_name=name, args=args, traffic_rps=a.rps, on_update=on_update,
                       tick_s=0.25, timeout_s=a.timeout, apply=apply, track=False,
                       traffic_options={"max_tokens": 8, "max_in_flight": 32})
        time.sleep(1.0)  # let in-flight requests finish before counting
    finally:
        embedded.TrafficGenerator = original
        serve.delete(name)
    gen = traffic_box["gen"]
    snap = gen.snapshot()
    out: dict[str, Any] = {
        "scenario": name, "outcome": status.phase,
        "stableRequests": snap["variants"].get("stable", {}).get("sent", 0),
        "stableFailed": snap["variants"].get("stable", {}).get("failed", 0),
        "candidateRequests": snap["variants"].get("canary", {}).get("sent", 0),
        "candidateFailed": snap["variants"].get("canary", {}).get("failed", 0),
        "unanswered": snap["unroutedFailures"],
        "unansweredDetail": [f"{v or '-'} {st}" for _, v, st in gen.failures if not v][:5],
    }
    end_reason = "RolledBack" if status.phase == "RolledBack" else "RolloutPromoted"
    end = next((u.time for u in updates if any(e.reason == end_reason for e in u.events)), None)
    first_weight = next((u.time for u in updates if u.status.weights.get("canary", 0) > 0), None)
    start = next((u.time for u in updates), None)
    if status.phase == "RolledBack" and end is not None:
        failures = [t for t, v, _ in gen.failures if v == "canary"]
        first_bad = min(failures) if failures else first_weight
        bound = (a.failure_limit + 1) * a.interval + a.interval
        out.update(firstBadToStable100_s=round(end - first_bad, 2), bound_s=bound,
                   withinBound=end - first_bad <= bound)
    elif end is not None and start is not None:
        out["rolloutDuration_s"] = round(end - start, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=5.0, help="analysis interval, seconds")
    p.add_argument("--failure-limit", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=10)
    p.add_argument("--rps", type=float, default=20.0, help="generated load, requests/s")
    p.add_argument("--stable-delay-ms", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=240.0, help="per scenario")
    p.add_argument("--only", nargs="*", default=["errors", "slow", "promote"])
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()

    import ray
    from ray import serve

    home = tempfile.mkdtemp(prefix="anneal-bench-rollout-")
    os.environ["ANNEAL_HOME"] = home
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    try:
        for name in a.only:
            if name == "errors":
                r = scenario("bench-errors", {"engine": "faulty", "engine_options": {"fail_rate": 0.2}},
                             [{"metric": "errorRate", "max": 0.02}],
                             [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}], a, port, home)
            elif name == "slow":
                r = scenario("bench-slow", {"engine": "echo", "engine_options": {"delay_ms": 5 * a.stable_delay_ms}},
                             [{"metric": "latencyP95Ms", "max": 3.5 * a.stable_delay_ms}],
                             [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}], a, port, home)
            elif name == "promote":
                r = scenario("bench-promote", {"engine": "echo", "engine_options": {"delay_ms": a.stable_delay_ms}},
                             [{"metric": "errorRate", "max": 0.02}],
                             [{"setWeight": 10}, {"analysis": {}}, {"setWeight": 25}, {"analysis": {}},
                              {"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}], a, port, home)
            else:
                raise SystemExit(f"unknown scenario {name}")
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        serve.shutdown()
        ray.shutdown()
    doc = {"args": vars(a), "cpus": os.cpu_count(), "load": os.getloadavg()[0], "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
