"""The local control plane behaves like a real one for what Anneal relies on:
readiness, KubeRay CRD validation, namespace deletion, ownerReference garbage
collection and the built kubectl."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

RAY_IMAGE = "rayproject/ray:2.60.0"
ANNEAL_CRDS = Path(__file__).resolve().parents[2] / "charts" / "anneal" / "crds"


def _ray_job(name: str) -> dict:
    """A RayJob with a CPU head and a GPU worker group, as the operator would build it."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name},
        "spec": {
            "entrypoint": "python -m anneal.distill.kd --config /etc/anneal/job.json",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [{
                        "name": "ray-head",
                        "image": RAY_IMAGE,
                        "resources": {"limits": {"cpu": "2", "memory": "8Gi"}},
                    }]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu",
                    "replicas": 2,
                    "minReplicas": 2,
                    "maxReplicas": 2,
                    "rayStartParams": {},
                    "template": {"spec": {
                        "containers": [{
                            "name": "ray-worker",
                            "image": RAY_IMAGE + "-gpu",
                            "resources": {
                                "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
                                "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
                            },
                        }],
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    }},
                }],
            },
        },
    }


def _wait_gone(kube_control_plane, *get_args: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = kube_control_plane.kubectl("get", *get_args, check=False)
        if proc.returncode != 0 and "NotFound" in proc.stderr:
            return
        time.sleep(0.5)
    raise AssertionError(f"{' '.join(get_args)} still present after {timeout:.0f}s")


def test_api_server_is_ready(kube_control_plane):
    assert kube_control_plane.server.startswith("https://127.0.0.1:")
    assert kube_control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(kube_control_plane.kubectl("get", "--raw", "/version").stdout)
    assert version["major"] == "1" and version["minor"].startswith("34"), version


def test_python_client_reaches_the_cluster(kube_control_plane):
    from kubernetes import client

    with kube_control_plane.api_client() as api:
        namespaces = {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items}
    assert {"default", "kube-system"} <= namespaces


def test_kuberay_crds_are_established(kube_control_plane):
    for crd in ("rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io"):
        established = kube_control_plane.kubectl(
            "get", "crd", crd, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}").stdout
        assert established == "True", crd


def test_gpu_rayjob_is_accepted_and_read_back(kube_control_plane, namespace):
    manifest = _ray_job("distill-kd")
    kube_control_plane.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))

    stored = json.loads(kube_control_plane.kubectl("get", "rayjob", "distill-kd", "-n", namespace, "-o", "json").stdout)
    worker = stored["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert worker["groupName"] == "gpu"
    assert limits["nvidia.com/gpu"] == "1"
    assert stored["spec"]["entrypoint"] == manifest["spec"]["entrypoint"]


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="two"), "replicas"),
        (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
        (lambda s: s["rayClusterSpec"].pop("headGroupSpec"), "headGroupSpec"),
    ],
    ids=["replicas-not-int", "worker-group-without-name", "no-head-group"],
)
def test_malformed_rayjob_is_rejected(kube_control_plane, namespace, breakage, complaint):
    manifest = _ray_job("broken")
    breakage(manifest["spec"])
    proc = kube_control_plane.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert proc.returncode != 0
    assert "is invalid" in proc.stderr and complaint in proc.stderr, proc.stderr
    assert "NotFound" in kube_control_plane.kubectl("get", "rayjob", "broken", "-n", namespace, check=False).stderr


def test_deleting_a_namespace_removes_its_objects(kube_control_plane, namespace):
    kube_control_plane.kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=a=b")
    kube_control_plane.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(_ray_job("doomed")))

    kube_control_plane.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=90s", timeout=100)

    _wait_gone(kube_control_plane, "namespace", namespace)
    assert kube_control_plane.kubectl("get", "configmaps,rayjobs", "-n", namespace, "-o", "name").stdout.strip() == ""


def _owned_configmap(name: str, owner: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "ownerReferences": [{
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "data": {"k": "v"},
    }


@pytest.mark.parametrize("owner_kind", ["ConfigMap", "RayJob"])
def test_owned_configmap_is_garbage_collected(kube_control_plane, namespace, owner_kind):
    owner_manifest = (_ray_job("owner") if owner_kind == "RayJob"
                      else {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    owner = json.loads(kube_control_plane.kubectl(
        "create", "-n", namespace, "-o", "json", "-f", "-", input=yaml.safe_dump(owner_manifest)).stdout)
    kube_control_plane.kubectl("create", "-n", namespace, "-f", "-",
                         input=yaml.safe_dump(_owned_configmap("dependent", owner)))
    kube_control_plane.kubectl("create", "configmap", "bystander", "-n", namespace)

    kube_control_plane.kubectl("delete", owner_kind.lower(), "owner", "-n", namespace, "--cascade=background")

    _wait_gone(kube_control_plane, "configmap", "dependent", "-n", namespace)
    kube_control_plane.kubectl("get", "configmap", "bystander", "-n", namespace)  # unowned: untouched


def test_built_kubectl_gets_resources(kube_control_plane, namespace):
    kube_control_plane.kubectl("create", "configmap", "hello", "-n", namespace, "--from-literal=greeting=hi")
    out = kube_control_plane.kubectl("get", "configmaps", "-n", namespace, "-o", "name").stdout.split()
    assert "configmap/hello" in out
    table = kube_control_plane.kubectl("get", "namespaces").stdout
    assert namespace in table and "Active" in table
    client_version = json.loads(kube_control_plane.kubectl("version", "--client", "-o", "json").stdout)
    assert client_version["clientVersion"]["gitVersion"].startswith("v1.34.")


def test_anneal_crds_are_established(kube_cluster):
    """What the Helm chart installs is accepted by a real API server (structural schema,
    CEL rules that compile) and served."""
    manifests = sorted(p for p in ANNEAL_CRDS.glob("*.y*ml"))
    if not manifests:
        pytest.skip(f"no CRDs generated under {ANNEAL_CRDS} yet")
    for path in manifests:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        established = kube_cluster.kubectl(
            "get", "crd", name, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}").stdout
        assert established == "True", name


def _anneal_rayjob() -> dict:
    """A RayJob exactly as the operator builds one for a 2-worker H100 job (anneal.runtime.kuberay)."""
    from anneal.api.common import Resources
    from anneal.runtime import kuberay
    from anneal.runtime.plan import JobInputs, build_job_plan

    plan = build_job_plan(JobInputs("DistillationJob", "ns", "kd", "uid-1", 1, {"method": "kd"},
                                    {"kind": "DistillationJob"}, python="python"))
    resources = Resources.model_validate({"workers": 2, "gpusPerWorker": 1, "cpusPerWorker": 8, "memory": "64Gi",
                                          "acceleratorType": "H100", "priorityClassName": "training"})
    opts = kuberay.ClusterOptions(image=RAY_IMAGE, ray_version="2.60.0", resources=resources,
                                  shared_volume_claim="anneal-rwx")
    return kuberay.build_rayjob("kd-dj-a1", "ns", plan, opts)


def test_anneal_rayjob_is_accepted_strictly_and_its_pods_pass_restricted_pod_security(kube_control_plane, namespace):
    kube = kube_control_plane
    rj = _anneal_rayjob()
    rj["metadata"]["namespace"] = namespace
    # Every field is one KubeRay's CRD declares (an unknown one is an error, not dropped).
    kube.kubectl("create", "--validate=strict", "-n", namespace, "-f", "-", input=yaml.safe_dump(rj))
    stored = json.loads(kube.kubectl("get", "rayjob", "kd-dj-a1", "-n", namespace, "-o", "json").stdout)
    worker = stored["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    # The GPU count lives in the group's resources only: KubeRay >= 1.4 rejects a group that
    # sets it both there and in rayStartParams (ValidationFailed).
    assert worker["resources"] == {"GPU": "1", "accelerator_type:H100": "1"}
    assert not {"num-gpus", "resources"} & set(worker["rayStartParams"])
    terms = worker["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0] == "NVIDIA-H100-80GB-HBM3"

    # The pods KubeRay would make from these templates, through the API server's own Pod
    # Security admission in a namespace that enforces "restricted" (no kubelet needed: dry run).
    kube.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    spec = rj["spec"]["rayClusterSpec"]
    templates = {"head": spec["headGroupSpec"]["template"], "worker": worker["template"]}
    for role, template in templates.items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ray-{role}"}, "spec": template["spec"]}
        pod["spec"].pop("priorityClassName", None)  # no PriorityClass objects on this control plane
        proc = kube.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(pod),
                            check=False)
        assert proc.returncode == 0, (role, proc.stderr)
    # The admission is live: the same pod without its securityContext is refused, with the rules it breaks.
    bare = json.loads(json.dumps(templates["worker"]["spec"]))
    bare.pop("securityContext")
    bare["containers"][0].pop("securityContext")
    proc = kube.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", check=False, input=json.dumps(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"}, "spec": bare}))
    assert proc.returncode != 0 and 'violates PodSecurity "restricted' in proc.stderr, proc.stderr
    assert "allowPrivilegeEscalation" in proc.stderr and "runAsNonRoot" in proc.stderr, proc.stderr
