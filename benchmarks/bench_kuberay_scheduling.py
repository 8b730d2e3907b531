"""The per-job KubeRay path under real controllers: time from `kubectl apply` to pods scheduled,
and 100 queued jobs through Kueue with GPU quota for 10.

What is real: etcd + kube-apiserver + kube-controller-manager (job controller on), kube-scheduler,
the KubeRay operator, Kueue and kwok, all built by deploy/local/cluster.py from their Go modules;
Anneal's operator process (`python -m anneal_operator`, per-job mode: no Ray address) and an
`mlflow server`. The nodes are kwok's (docs/local-cluster.md): `cpu-0..3` for Ray heads, two
8×H100 and one 8×A100 node with GPU Feature Discovery's labels and the GPU taint. No container
runs: kwok marks a bound pod Running, so "Running" here means scheduled and bound, not that Ray
started in the image.

* ``apply_to_scheduled`` — `--runs` times: one DistillationJob, 2 workers × 4 H100 GPUs, applied
  with kubectl; seconds until Anneal's RayJob exists, KubeRay's RayCluster exists, the 3 pods
  exist, all 3 are bound to a node (kube-scheduler) and Running (kwok). Goal: ≤ 10 s to all
  scheduled. Each run's job is deleted (and waited gone) before the next.
* ``queue`` — a ClusterQueue with `nvidia.com/gpu` quota 10 and a LocalQueue; 100 DistillationJobs
  of 1 worker × 1 GPU applied in one kubectl call (creation order = index). Kueue admits 10;
  when their pods are scheduled the admitted jobs are deleted (standing in for finishing: no
  container runs, so none ever finishes), which frees quota for the next 10, until all 100 were
  admitted. Measured: seconds to the first wave admitted and scheduled, each wave's seconds
  from freeing quota to the next wave scheduled, the total, the most jobs ever admitted at once
  (must be ≤ 10) and whether admission followed creation order (inversions counted).

    .venv/bin/python benchmarks/bench_kuberay_scheduling.py --runs 5 --jobs 100 --quota 10 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_SFT = {
    "method": "sft",
    "student": {"config": {"hiddenSize": 32, "layers": 1, "heads": 2, "intermediateSize": 64}},
    "dataset": {"uri": "builtin://reasoning?difficulty=1&seed=3", "samples": 64, "maxSeqLength": 64},
    "training": {"steps": 4, "batchSize": 4, "learningRate": 0.003},
}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def _wait(what: str, probe, timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def _job(name: str, resources: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "anneal.dev/v1alpha1", "kind": "DistillationJob", "metadata": {"name": name},
            "spec": {**TINY_SFT, "resources": resources}}


class Api:
    """Listing through the Python client (a kubectl per poll would cost more than what is measured)."""

    def __init__(self, kube: Any):
        from kubernetes import client

        self.raw = kube.api_client()
        self.core = client.CoreV1Api(self.raw)
        self.custom = client.CustomObjectsApi(self.raw)

    def items(self, ns: str, group: str, plural: str) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(group, "v1" if group == "ray.io" else
                                                         "v1beta2" if group == "kueue.x-k8s.io" else "v1alpha1",
                                                         ns, plural)["items"]

    def pods(self, ns: str) -> list[Any]:
        return self.core.list_namespaced_pod(ns).items


def _placed(pods: list[Any]) -> bool:
    return bool(pods) and all(p.spec.node_name for p in pods)


def _running(pods: list[Any]) -> bool:
    return bool(pods) and all(p.spec.node_name and p.status.phase == "Running" for p in pods)


def _ray_pods(pods: list[Any]) -> list[Any]:
    """Head and worker pods (KubeRay's submitter Job's pod is not part of the Ray cluster)."""
    return [p for p in pods if (p.metadata.labels or {}).get("ray.io/node-type") in ("head", "worker")]


def apply_to_scheduled(kube: Any, api: Api, ns: str, run: int) -> dict[str, Any]:
    name = f"lat-{run}"
    job = _job(name, {"workers": 2, "gpusPerWorker": 4, "cpusPerWorker": 16, "memory": "128Gi",
                      "acceleratorType": "H100"})
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(job))
    marks["applied"] = time.monotonic() - t0
    deadline = t0 + 120
    while time.monotonic() < deadline and "running" not in marks:
        # Each mark is the time its list call returned: late by at most one poll, never early.
        if "rayjob" not in marks and api.items(ns, "ray.io", "rayjobs"):
            marks["rayjob"] = time.monotonic() - t0
        if "raycluster" not in marks and api.items(ns, "ray.io", "rayclusters"):
            marks["raycluster"] = time.monotonic() - t0
        pods = _ray_pods(api.pods(ns))
        now = time.monotonic() - t0
        if len(pods) == 3:
            marks.setdefault("pods_created", now)
            if _placed(pods):
                marks.setdefault("scheduled", now)
            if _running(pods):
                marks["running"] = now
        time.sleep(0.05)
    nodes = sorted(p.spec.node_name for p in _ray_pods(api.pods(ns)))
    kube.kubectl("delete", "dj", name, "-n", ns, "--wait=true", "--timeout=120s")
    _wait("the job's pods and RayCluster gone", lambda: not api.pods(ns) and not api.items(ns, "ray.io", "rayclusters"),
          120, every=0.5)
    return {"run": run, **{k: round(v, 2) for k, v in marks.items()}, "nodes": nodes}


def queue(kube: Any, api: Api, ns: str, jobs: int, quota: int) -> dict[str, Any]:
    cq = f"bench-{ns[-5:]}"
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cq},
         "spec": {"namespaceSelector": {}, "queueingStrategy": "StrictFIFO", "resourceGroups": [{
             "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
             "flavors": [{"name": "default-flavor", "resources": [
                 {"name": "cpu", "nominalQuota": "10000"}, {"name": "memory", "nominalQuota": "100Ti"},
                 {"name": "nvidia.com/gpu", "nominalQuota": str(quota)}]}]}]}}]))
    kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "bench"},
         "spec": {"clusterQueue": cq}}))
    names = [f"q-{i:03d}" for i in range(jobs)]
    resources = {"workers": 1, "gpusPerWorker": 1, "cpusPerWorker": 4, "memory": "16Gi", "acceleratorType": "H100",
                 "queue": "bench"}
    docs = {"apiVersion": "v1", "kind": "List", "items": [_job(n, resources) for n in names]}
    t0 = time.monotonic()
    kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(docs), timeout=300)
    applied = time.monotonic() - t0

    def job_of(rayjob: dict[str, Any]) -> str:
        return rayjob["metadata"]["ownerReferences"][0]["name"]

    admitted_at: dict[str, float] = {}   # DistillationJob → seconds when its RayJob was unsuspended
    max_admitted, waves, deleted = 0, [], set()
    freed_at = 0.0
    deadline = t0 + 60 * 60
    while len(deleted) < jobs and time.monotonic() < deadline:
        now = time.monotonic() - t0
        rayjobs = api.items(ns, "ray.io", "rayjobs")
        running = [r for r in rayjobs if not r["spec"].get("suspend") and job_of(r) not in deleted]  # Kueue unsets it
        max_admitted = max(max_admitted, len(running))
        for r in running:
            admitted_at.setdefault(job_of(r), now)
        pods = _ray_pods(api.pods(ns))
        wave = [job_of(r) for r in running]
        want = min(quota, jobs - len(deleted))
        # A wave is done when `want` jobs are admitted and each has its head and worker Running.
        if len(wave) >= want and len(pods) >= 2 * want and _running(pods):
            waves.append({"jobs": sorted(wave), "admitted_s": round(max(admitted_at[j] for j in wave) - freed_at, 2),
                          "scheduled_s": round(now - freed_at, 2)})
            print(json.dumps({"wave": len(waves), **waves[-1], "jobs": f"{wave[0]}..."}), flush=True)
            freed_at = time.monotonic() - t0
            kube.kubectl("delete", "dj", *wave, "-n", ns, "--wait=false")
            deleted.update(wave)
            _wait("the wave's RayJobs gone", lambda: not ({job_of(r) for r in api.items(ns, "ray.io", "rayjobs")}
                                                          & set(wave)), 300, every=0.25)
            continue
        time.sleep(0.1)
    total = time.monotonic() - t0
    order = sorted(admitted_at, key=lambda j: (admitted_at[j], j))
    created = {n: i for i, n in enumerate(names)}
    inversions = sum(1 for i, a in enumerate(order) for b in order[i + 1:] if created[a] > created[b]
                     and admitted_at[a] < admitted_at[b])
    kube.kubectl("delete", "clusterqueue", cq, "--wait=false")
    return {"jobs": jobs, "quota_gpus": quota, "apply_s": round(applied, 2), "admitted": len(admitted_at),
            "max_admitted_at_once": max_admitted, "waves": len(waves),
            "first_wave_scheduled_s": waves[0]["scheduled_s"] if waves else None,
            "wave_scheduled_s_median": statistics.median(w["scheduled_s"] for w in waves[1:]) if len(waves) > 1 else None,
            "wave_scheduled_s_max": max(w["scheduled_s"] for w in waves) if waves else None,
            "order_inversions": inversions, "total_s": round(total, 1),
            "waves_detail": [{k: v for k, v in w.items() if k != "jobs"} | {"first": w["jobs"][0], "last": w["jobs"][-1]}
                             for w in waves]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--quota", type=int, default=10)
    parser.add_argument("--parts", default="apply_to_scheduled,queue")
    parser.add_argument("--json", help="write the figures here too")
    a = parser.parse_args()

    from benchmarks.local_operator import local_operator
    from tests.e2e.conftest import cluster

    nodes = [cluster.fake_node(f"cpu-{i}") for i in range(1, 4)]
    with local_operator("bench-kuberay-sched-", kuberay=True, scheduling=True, nodes=nodes) as env:
        out: dict[str, Any] = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}
        env.start_operator()
        kube = env.kube
        api = Api(kube)
        ns = f"bench-{uuid.uuid4().hex[:5]}"
        kube.kubectl("create", "namespace", ns)
        parts = a.parts.split(",")
        if "apply_to_scheduled" in parts:
            rows = []
            for run in range(a.runs):
                rows.append(apply_to_scheduled(kube, api, ns, run))
                print(json.dumps(rows[-1]), flush=True)
            sched = [r["scheduled"] for r in rows if "scheduled" in r]
            out["apply_to_scheduled"] = {
                "runs": a.runs, "scheduled_s_median": statistics.median(sched) if sched else None,
                "scheduled_s_max": max(sched) if sched else None,
                "running_s_median": statistics.median(r["running"] for r in rows if "running" in r),
                "within_10s": sum(s <= 10 for s in sched), "rows": rows}
        if "queue" in parts:
            out["queue"] = queue(kube, api, ns, a.jobs, a.quota)
        out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(out, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
