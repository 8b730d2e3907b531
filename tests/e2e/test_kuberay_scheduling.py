"""Anneal's per-job KubeRay path acted on by real controllers: the KubeRay operator, kube-scheduler,
Kueue and kwok, all built from their Go modules by deploy/local/cluster.py, on a control plane of
this module's own (kube-controller-manager with the job controller: KubeRay's submitter is a Job).

The nodes are kwok's: Node objects with the capacity, labels and taint a GPU node pool has
(`nvidia.com/gpu: 8`, GPU Feature Discovery's `nvidia.com/gpu.product`, the `nvidia.com/gpu`
NoSchedule taint), one CPU node, two 8×H100 SXM and one 8×A100 80GB. kube-scheduler places the
pods KubeRay creates exactly as on a real cluster (resources, node affinity, taints and
tolerations, priority); kwok then marks each bound pod Running and Ready. No container runs:
what this proves is placement and admission, not that Ray starts in the image (docs/local-cluster.md, "What this proves").
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import ANNEAL_CRDS, KubeCluster, cluster
from tests.e2e.test_operator import TINY_SFT, Operator, _job, _wait

pytestmark = pytest.mark.e2e

H100 = "NVIDIA-H100-80GB-HBM3"
A100 = "NVIDIA-A100-SXM4-80GB"
PRIORITY_CLASS = "anneal-training"
#: 2 workers × 4 GPUs: one H100 node holds both, or each lands on its own; never the A100 node.
GPU_JOB = {"workers": 2, "gpusPerWorker": 4, "cpusPerWorker": 16, "memory": "128Gi", "acceleratorType": "H100",
           "priorityClassName": PRIORITY_CLASS}
SCHEDULED_TIMEOUT = 120


@pytest.fixture(scope="module")
def gpu_cluster(mlflow_server) -> KubeCluster:
    """A control plane with the scheduling controllers and fake GPU nodes, Anneal's CRDs created."""
    try:
        cluster.build()
    except cluster.ClusterError as exc:
        pytest.fail(f"could not build the local control plane:\n{exc}", pytrace=False)
    state_dir = Path(tempfile.mkdtemp(prefix="anneal-e2e-sched-"))
    error = None
    try:
        info = cluster.up(state_dir, crd_dirs=[ANNEAL_CRDS], kuberay=True, scheduling=True)
    except cluster.ClusterError as exc:
        error = f"could not start the control plane with its schedulers (logs in {state_dir / 'logs'}):\n{exc}"
    if error:
        cluster.down(state_dir)  # its logs stay for the failure's message to point at
        pytest.fail(error, pytrace=False)
    kube = KubeCluster(kubeconfig=Path(info["kubeconfig"]), server=info["server"], state_dir=Path(info["state_dir"]),
                       bin_dir=Path(info["bin_dir"]))
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": PRIORITY_CLASS},
        "value": 1000, "description": "Anneal training jobs"}))
    try:
        yield kube
    finally:
        cluster.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sched_operator(gpu_cluster, mlflow_server):
    """Anneal's operator on that cluster, in per-job mode (no Ray address: every job gets a RayJob)."""
    work = Path(tempfile.mkdtemp(prefix="anneal-e2e-sched-op-"))
    op = Operator(gpu_cluster.kubeconfig, mlflow_server, work)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def ns(gpu_cluster, sched_operator, request) -> str:
    name = f"sched-{request.node.name[5:25].strip('_').replace('_', '-').lower()}-{uuid.uuid4().hex[:5]}"
    gpu_cluster.kubectl("create", "namespace", name)
    yield name
    gpu_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def _get(kube: KubeCluster, ns: str | None, kind: str, name: str) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
    p = kube.kubectl(*args, check=False)
    return json.loads(p.stdout) if p.returncode == 0 else None


def _list(kube: KubeCluster, ns: str, kind: str, selector: str | None = None) -> list[dict[str, Any]]:
    args = ["get", kind, "-n", ns, "-o", "json"] + (["-l", selector] if selector else [])
    return json.loads(kube.kubectl(*args).stdout)["items"]


def _apply(kube: KubeCluster, ns: str, doc: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))


def _status(kube: KubeCluster, ns: str, kind: str, name: str) -> dict[str, Any]:
    return (_get(kube, ns, kind, name) or {}).get("status") or {}


def _ray_pods(kube: KubeCluster, ns: str, raycluster: str) -> list[dict[str, Any]]:
    return _list(kube, ns, "pods", f"ray.io/cluster={raycluster}")


def _all_running(pods: list[dict[str, Any]], count: int) -> list[dict[str, Any]] | None:
    ok = len(pods) == count and all(p["spec"].get("nodeName") and (p.get("status") or {}).get("phase") == "Running"
                                    for p in pods)
    return pods if ok else None


def _node_labels(kube: KubeCluster, node: str) -> dict[str, str]:
    return (_get(kube, None, "node", node) or {})["metadata"]["labels"]


def _assert_placed(kube: KubeCluster, pods: list[dict[str, Any]], gpu_product: str, gpus_per_worker: int) -> None:
    """Workers on nodes GFD labels with the asked-for GPU, the head on the CPU node (it has no GPU
    toleration: the GPU taint keeps it off GPU nodes), every pod's priority resolved."""
    head = [p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "head"]
    workers = [p for p in pods if p["metadata"]["labels"].get("ray.io/node-type") == "worker"]
    assert len(head) == 1 and workers
    assert head[0]["spec"]["nodeName"] == "cpu-0"
    for w in workers:
        labels = _node_labels(kube, w["spec"]["nodeName"])
        assert labels["nvidia.com/gpu.product"] == gpu_product, (w["metadata"]["name"], w["spec"]["nodeName"])
        assert w["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(gpus_per_worker)
        assert any(c["type"] == "PodScheduled" and c["status"] == "True" for c in w["status"]["conditions"])


def _wait_gone(kube: KubeCluster, ns: str, what: list[tuple[str, str | None]], timeout: float = 90) -> None:
    def gone() -> bool:
        for kind, name in what:
            if name is None:
                if _list(kube, ns, kind):
                    return False
            elif _get(kube, ns, kind, name) is not None:
                return False
        return True

    _wait(f"{', '.join(k for k, _ in what)} deleted", gone, timeout)


# ------------------------------------------------------------------------------------ tests


def test_a_per_job_distillation_gets_its_pods_scheduled_onto_matching_gpu_nodes(gpu_cluster, ns):
    kube = gpu_cluster
    _apply(kube, ns, _job("h100-job", {**TINY_SFT, "resources": GPU_JOB}))
    st = _wait("RayJob created", lambda: (s := _status(kube, ns, "dj", "h100-job")).get("rayCluster") and s, 90)
    rayjob_name = st["rayCluster"]
    rc_name = _wait("KubeRay's RayCluster", lambda: (_status(kube, ns, "rayjob", rayjob_name)).get("rayClusterName"),
                    60)
    pods = _wait("head and 2 GPU workers scheduled and Running",
                 lambda: _all_running(_ray_pods(kube, ns, rc_name), 3), SCHEDULED_TIMEOUT)
    _assert_placed(kube, pods, H100, 4)
    for p in pods:  # the PriorityClass was resolved at admission, as on a real cluster
        assert p["spec"]["priorityClassName"] == PRIORITY_CLASS and p["spec"]["priority"] == 1000
    workers = [p for p in pods if p["metadata"]["labels"]["ray.io/node-type"] == "worker"]
    assert all(t["key"] == "nvidia.com/gpu" for w in workers for t in w["spec"]["tolerations"]
               if t.get("effect") == "NoSchedule")
    # The owner chain a user follows with kubectl: DistillationJob → RayJob → RayCluster → Pods.
    rc = _get(kube, ns, "raycluster", rc_name)
    assert rc["metadata"]["ownerReferences"][0]["kind"] == "RayJob"
    assert _get(kube, ns, "rayjob", rayjob_name)["metadata"]["ownerReferences"][0]["kind"] == "DistillationJob"

    kube.kubectl("delete", "dj", "h100-job", "-n", ns, "--timeout=60s")
    _wait_gone(kube, ns, [("rayjob", rayjob_name), ("raycluster", rc_name), ("pods", None)])


def test_kueue_holds_a_queued_job_until_its_cluster_queue_has_gpu_quota(gpu_cluster, ns):
    kube = gpu_cluster
    cq = f"gpus-{ns[-5:]}"
    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}}

    def cluster_queue(gpus: int) -> dict[str, Any]:
        return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cq},
                "spec": {"namespaceSelector": {}, "resourceGroups": [{
                    "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                    "flavors": [{"name": "default-flavor", "resources": [
                        {"name": "cpu", "nominalQuota": "1000"}, {"name": "memory", "nominalQuota": "10Ti"},
                        {"name": "nvidia.com/gpu", "nominalQuota": str(gpus)}]}]}]}}

    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([flavor, cluster_queue(0)]))
    _apply(kube, ns, {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "team-a"},
                      "spec": {"clusterQueue": cq}})
    try:
        _apply(kube, ns, _job("queued", {**TINY_SFT, "resources": {**GPU_JOB, "queue": "team-a"}}))
        st = _wait("RayJob created", lambda: (s := _status(kube, ns, "dj", "queued")).get("rayCluster") and s, 90)
        rayjob_name = st["rayCluster"]
        rayjob = _get(kube, ns, "rayjob", rayjob_name)
        assert rayjob["spec"]["suspend"] is True
        assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        # Kueue made a Workload for it: 8 GPUs asked, 0 in quota, so it is not admitted.
        workload = _wait("Kueue's Workload", lambda: _list(kube, ns, "workloads.kueue.x-k8s.io") or None, 60)[0]
        assert workload["metadata"]["ownerReferences"][0]["name"] == rayjob_name
        _wait("the Workload found pending for lack of quota", lambda: any(
            c["type"] == "QuotaReserved" and c["status"] == "False" and "nvidia.com/gpu" in c.get("message", "")
            for c in (_list(kube, ns, "workloads.kueue.x-k8s.io")[0].get("status") or {}).get("conditions", [])), 60)
        assert _get(kube, ns, "rayjob", rayjob_name)["spec"]["suspend"] is True
        assert not _list(kube, ns, "rayclusters") and not _list(kube, ns, "pods")
        _wait("the job's status names the queue", lambda: "queued in Kueue LocalQueue team-a" in
              _status(kube, ns, "dj", "queued").get("message", ""), 60)

        # Quota arrives: Kueue admits the Workload and unsuspends the RayJob; KubeRay creates the
        # cluster; the scheduler places its pods.
        kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(cluster_queue(8)))
        rc_name = _wait("admission, then KubeRay's RayCluster",
                        lambda: _status(kube, ns, "rayjob", rayjob_name).get("rayClusterName"), 90)
        assert not _get(kube, ns, "rayjob", rayjob_name)["spec"].get("suspend")  # Kueue unsets it
        admitted = _list(kube, ns, "workloads.kueue.x-k8s.io")[0]
        assert any(c["type"] == "Admitted" and c["status"] == "True" for c in admitted["status"]["conditions"])
        assert admitted["status"]["admission"]["clusterQueue"] == cq
        pods = _wait("the admitted job's pods scheduled and Running",
                     lambda: _all_running(_ray_pods(kube, ns, rc_name), 3), SCHEDULED_TIMEOUT)
        _assert_placed(kube, pods, H100, 4)
        _wait("the job's status says it was admitted", lambda: _status(kube, ns, "dj", "queued").get(
            "message", "").startswith("admitted by Kueue"), 60)

        kube.kubectl("delete", "dj", "queued", "-n", ns, "--timeout=60s")
        _wait_gone(kube, ns, [("rayjob", rayjob_name), ("raycluster", rc_name), ("pods", None),
                              ("workloads.kueue.x-k8s.io", None)])
    finally:
        kube.kubectl("delete", "clusterqueue", cq, "--wait=false", "--ignore-not-found", check=False)


def test_a_per_service_model_service_gets_its_pods_scheduled_onto_a100_nodes(gpu_cluster, ns):
    kube = gpu_cluster
    a100 = {"workers": 1, "gpusPerWorker": 1, "cpusPerWorker": 4, "memory": "32Gi", "acceleratorType": "A100-80G"}
    svc = {"variants": [{"name": "stable", "model": {"uri": "file:///models/a"}, "weight": 100, "resources": a100}]}
    _apply(kube, ns, _job("svc", svc, kind="ModelService"))
    rs_name = _wait("RayService created", lambda: _status(kube, ns, "msvc", "svc").get("rayService"), 90)
    rc_name = _wait("KubeRay's RayCluster for the service", lambda: (
        (_status(kube, ns, "rayservice", rs_name).get("pendingServiceStatus") or {}).get("rayClusterName")
        or (_status(kube, ns, "rayservice", rs_name).get("activeServiceStatus") or {}).get("rayClusterName")), 90)
    pods = _wait("head and A100 worker scheduled and Running",
                 lambda: _all_running(_ray_pods(kube, ns, rc_name), 2), SCHEDULED_TIMEOUT)
    _assert_placed(kube, pods, A100, 1)

    kube.kubectl("delete", "msvc", "svc", "-n", ns, "--timeout=60s")
    _wait_gone(kube, ns, [("rayservice", rs_name), ("raycluster", rc_name), ("pods", None)])
