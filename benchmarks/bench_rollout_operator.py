"""Rollouts under the operator: how fast a failing candidate is rolled back, and what the stable
variant loses, through the Kubernetes API — the figures `bench_rollout.py` gives for `anneal run`.

What is real: etcd + kube-apiserver with the CRDs (deploy/local/cluster.py), the operator
process (`python -m anneal_operator`, poll 1 s), a Ray head (2 CPUs, dashboard, Serve through its
REST API), an `mlflow server`, two tiny Llama checkpoints built here (a good one and one whose
weights are NaN, so every request to it fails), and built-in-task traffic from
`anneal.local.rollout.TrafficGenerator`. The same machinery as the e2e tier (tests/e2e): the
services are started with its helpers.

Scenarios, each run `--runs` times on a fresh ModelService:

* ``rollback`` — the NaN candidate at 50 %, then analysis, no gates declared (the default
  `errorRate ≤ 0.05` gate). Measured: seconds from the candidate's first request to
  `status.phase == RolledBack`, and to the router serving stable 100 % again, against the goal
  ``(failureLimit + 2) × interval``; failed stable requests (goal 0).
* ``promote`` — a good candidate 50 % → analysis → 100 %. Measured: seconds from the first
  candidate request to `Promoted`; failed stable and candidate requests (goal 0).

    .venv/bin/python benchmarks/bench_rollout_operator.py --runs 3 --interval 3 --failure-limit 1 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _models(root: Path) -> dict[str, str]:
    import torch

    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_corpus, train_tokenizer

    tokenizer = train_tokenizer(builtin_corpus(20), vocab_size=300)
    shape = LlamaShape(hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64)
    good = build_llama(shape, tokenizer, seed=0)
    broken = build_llama(shape, tokenizer, seed=1)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    return {"good": str(save_pretrained(good, tokenizer, root / "good")),
            "broken": str(save_pretrained(broken, tokenizer, root / "broken"))}


def _spec(stable: str, candidate: str, ray: str, a: argparse.Namespace) -> dict[str, Any]:
    def variant(name: str, uri: str, weight: int) -> dict[str, Any]:
        return {"name": name, "model": {"uri": uri}, "weight": weight, "resources": {"cpusPerWorker": 0.25},
                "generation": {"maxTokens": 4, "temperature": 1.0}}

    return {"variants": [variant("stable", stable, 100), variant("canary", candidate, 0)], "ray": {"address": ray},
            "rollout": {"stable": "stable", "candidate": "canary",
                        "steps": [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}],
                        "analysis": {"interval": f"{a.interval}s", "minRequests": 3, "failureLimit": a.failure_limit},
                        "progressDeadline": "10m"}}


def _wait(what: str, probe, timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = probe()
            if got:
                return got
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def one(kube, ns: str, scenario: str, models: dict[str, str], ray: str, a: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from anneal.local.rollout import TrafficGenerator
    from tests.e2e.test_operator import _job, _status

    name = f"{scenario}-{uuid.uuid4().hex[:5]}"
    candidate = models["broken" if scenario == "rollback" else "good"]
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job(name, _spec(models["good"], candidate, ray, a),
                                                                       kind="ModelService")))
    try:
        st = _wait("Ready", lambda: (s := _status(kube, ns, "msvc", name)).get("endpoint") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", [])) and s, 900, every=1)
        gen = TrafficGenerator(st["endpoint"], a.rps, max_tokens=4, max_in_flight=8, timeout_s=60).start()
        try:
            _wait("the candidate's first request", lambda: gen.snapshot()["variants"].get("canary", {}).get("sent"),
                  300)
            first = time.monotonic()
            end = "RolledBack" if scenario == "rollback" else "Promoted"
            phase = _wait(end, lambda: (p := _status(kube, ns, "msvc", name).get("phase")) in (
                "RolledBack", "Promoted", "Failed") and p, 300)
            ended = time.monotonic() - first
            back = None
            if scenario == "rollback":
                _wait("router at stable 100", lambda: httpx.get(st["endpoint"] + "/healthz", timeout=5).json()[
                    "weights"] == {"stable": 100, "canary": 0}, 60)
                back = time.monotonic() - first
            time.sleep(1)  # requests in flight at the end are counted, not cut off
        finally:
            gen.stop(wait=True)
        snap = gen.snapshot()["variants"]
        return {"scenario": scenario, "phase": phase, "seconds_to_end": round(ended, 2),
                "seconds_to_stable_100": None if back is None else round(back, 2),
                "stable_sent": snap.get("stable", {}).get("sent", 0), "stable_failed": snap.get("stable", {}).get("failed", 0),
                "candidate_sent": snap.get("canary", {}).get("sent", 0),
                "candidate_failed": snap.get("canary", {}).get("failed", 0)}
    finally:
        kube.kubectl("delete", "msvc", name, "-n", ns, "--wait=true", "--timeout=120s", check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval", type=int, default=3, help="analysis interval, seconds")
    parser.add_argument("--failure-limit", type=int, default=1)
    parser.add_argument("--rps", type=float, default=4.0)
    parser.add_argument("--json", help="write the figures here too")
    a = parser.parse_args()

    from benchmarks.local_operator import local_operator

    rows: list[dict[str, Any]] = []
    with local_operator("bench-rollout-operator-", ray=True) as env:
        import httpx

        from tests.e2e.test_operator import _free_port

        tmp, kube, ray = env.tmp, env.kube, env.urls["ray"]
        port = _free_port()  # Serve on a free port, started the way `serve deploy` starts it
        httpx.put(ray + "/api/serve/applications/", timeout=300,
                  json={"applications": [], "http_options": {"host": "127.0.0.1", "port": port}}).raise_for_status()
        _wait("Serve's HTTP port", lambda: (httpx.get(ray + "/api/serve/applications/", timeout=10).json().get(
            "http_options") or {}).get("port") == port, 300, every=1)
        models = _models(tmp / "models")
        env.start_operator()
        ns = f"bench-{uuid.uuid4().hex[:5]}"
        kube.kubectl("create", "namespace", ns)
        load = os.getloadavg()
        for i in range(a.runs):
            for scenario in ("rollback", "promote"):
                row = one(kube, ns, scenario, models, ray, a)
                rows.append(row)
                print(json.dumps(row), flush=True)
        bound = (a.failure_limit + 2) * a.interval
        rb = [r["seconds_to_end"] for r in rows if r["scenario"] == "rollback"]
        out = {"interval_s": a.interval, "failure_limit": a.failure_limit, "rps": a.rps, "runs": a.runs,
               "bound_s": bound, "rollback_s_median": statistics.median(rb), "rollback_s_max": max(rb),
               "rollbacks_within_bound": sum(t <= bound for t in rb),
               "stable_failed_total": sum(r["stable_failed"] for r in rows),
               "promote_candidate_failed_total": sum(r["candidate_failed"] for r in rows if r["scenario"] == "promote"),
               "phases": sorted({(r["scenario"], r["phase"]) for r in rows}),
               "load_average_start": [round(x, 2) for x in load], "load_average_end": [round(x, 2) for x in os.getloadavg()],
               "rows": rows}
        print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
