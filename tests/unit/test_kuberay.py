"""Pure builders of job plans and KubeRay manifests."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from anneal.api.common import Resources
from anneal.runtime import kuberay
from anneal.runtime.plan import JobInputs, build_entrypoint, build_job_plan, build_runtime_env, submission_id


def _plan(attempt: int = 1, **spec_extra):
    spec = {"method": "sft", "ray": {"runtimeEnv": {"envVars": {"A": "1"}, "pip": ["x==1"]}}, **spec_extra}
    return build_job_plan(JobInputs("DistillationJob", "team-a", "tiny", "1234-uid", attempt, spec,
                                    {"kind": "DistillationJob", "run_id": "r1"}, python="/venv/bin/python"))


@pytest.mark.parametrize(
    "args, same",
    [
        (("ns", "job", "uid-1", 1), True),
        (("ns", "job", "uid-1", 2), False),
        (("ns", "job", "uid-2", 1), False),
        (("ns2", "job", "uid-1", 1), False),
    ],
)
def test_submission_id_is_deterministic_per_resource_and_attempt(args, same):
    assert (submission_id(*args) == submission_id("ns", "job", "uid-1", 1)) is same
    assert submission_id(*args) == submission_id(*args)


def test_submission_id_is_short_and_safe_for_long_names():
    sid = submission_id("a-very-long-namespace-name-" * 3, "Job_Name.with.dots" * 4, "u", 12)
    assert len(sid) <= 63 and sid.endswith("-a12")
    assert all(c.isalnum() or c == "-" for c in sid)


def test_submission_id_rejects_attempt_zero():
    with pytest.raises(ValueError):
        submission_id("ns", "n", "u", 0)


def test_entrypoint_runs_the_recipe_with_the_payload_inline():
    payload = {"spec": {"method": "sft", "note": "it's \"quoted\""}, "context": {"name": "x"}}
    cmd = build_entrypoint("DistillationJob", payload, python="/opt/py 3/bin/python")
    argv = shlex.split(cmd)
    assert argv[:3] == ["/opt/py 3/bin/python", "-m", "anneal.distill.recipe"]
    assert argv[3] == "--job" and json.loads(argv[4]) == payload
    assert "anneal.compress.recipe" in build_entrypoint("CompressionJob", payload)
    with pytest.raises(ValueError):
        build_entrypoint("ModelService", payload)


def test_runtime_env_merges_operator_and_spec_env():
    env = build_runtime_env({"envVars": {"X": "spec"}, "pip": ["p"]}, {"X": "operator", "Y": "1"})
    assert env["env_vars"]["X"] == "spec" and env["env_vars"]["Y"] == "1"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false" and env["pip"] == ["p"]
    assert "pip" not in build_runtime_env(None)


def test_plan_carries_ids_and_jobs_api_body():
    plan = _plan(attempt=2)
    body = plan.jobs_api_request()
    assert body["submission_id"] == plan.submission_id == submission_id("team-a", "tiny", "1234-uid", 2)
    assert body["metadata"]["anneal.dev/attempt"] == "2"
    assert body["runtime_env"]["env_vars"]["A"] == "1"


GPU = Resources.model_validate({
    "workers": 4, "gpusPerWorker": 2, "cpusPerWorker": 8, "memory": "64Gi", "acceleratorType": "H100",
    "nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "training-high", "queue": "team-a-queue",
})


def _rayjob(resources=GPU, scheduler="kueue", deadline=3600):
    opts = kuberay.ClusterOptions(image="img:1", ray_version="2.60.0", resources=resources, gang_scheduler=scheduler)
    owner = kuberay.owner_reference("anneal.dev/v1alpha1", "DistillationJob", "tiny", "uid-1")
    return kuberay.build_rayjob("tiny-a1", "team-a", _plan(), opts, owner,
                                kuberay.RayJobOptions(ttl_seconds_after_finished=60, active_deadline_seconds=deadline))


def test_rayjob_worker_group_carries_gpu_settings():
    rj = _rayjob()
    workers = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    pod = workers["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    # The short name becomes GPU Feature Discovery's product values (what real nodes carry).
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": [
            "NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"]}]}]}
    # Ray's accelerator name (for ScalingConfig) and the GPU count, both in the group's resources:
    # KubeRay >= 1.4 rejects a group with resource fields in rayStartParams as well (ValidationFailed)
    assert workers["resources"] == {"GPU": "2", "accelerator_type:H100": "1"}
    assert not {"num-gpus", "num-cpus", "memory", "resources"} & workers["rayStartParams"].keys()
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "training-high"
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_rayjob_lifecycle_owner_and_queue():
    rj = _rayjob()
    spec = rj["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 60
    assert spec["activeDeadlineSeconds"] == 3600 and spec["backoffLimit"] == 0
    assert spec["jobId"] == _plan().submission_id
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["A"] == "1"
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    owner = rj["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "DistillationJob" and owner["uid"] == "uid-1" and owner["controller"] is True
    assert "activeDeadlineSeconds" not in _rayjob(deadline=None)["spec"]


def test_volcano_queue_labels():
    rj = _rayjob(scheduler="volcano")
    labels = rj["metadata"]["labels"]
    assert labels["ray.io/scheduler-name"] == "volcano" and labels["volcano.sh/queue-name"] == "team-a-queue"
    assert "kueue.x-k8s.io/queue-name" not in labels
    assert "suspend" not in rj["spec"]  # Volcano gangs pods; it does not resume suspended jobs


def test_a_queued_cluster_is_created_suspended_for_kueue_to_admit():
    """Kueue's contract: a job it manages is created suspended and unsuspended on admission."""
    assert _rayjob()["spec"]["suspend"] is True
    unqueued = Resources.model_validate({"workers": 1, "gpusPerWorker": 1})
    assert "suspend" not in _rayjob(resources=unqueued)["spec"]
    opts = kuberay.ClusterOptions(image="img:1", ray_version="2.60.0", resources=GPU)
    rs = kuberay.build_rayservice("svc-serve", "ns", [], opts)
    assert rs["spec"]["rayClusterConfig"]["suspend"] is True
    assert rs["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    plain = kuberay.ClusterOptions(image="img:1", ray_version="2.60.0", resources=unqueued)
    assert "suspend" not in kuberay.build_rayservice("svc-serve", "ns", [], plain)["spec"]["rayClusterConfig"]


def test_cpu_only_workers_have_no_gpu_and_fractional_cpu_in_millicores():
    r = Resources.model_validate({"workers": 1, "cpusPerWorker": 0.5})
    pod = _rayjob(resources=r)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "500m"}
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_rayservice_carries_serve_config():
    entry = {"name": "ns-svc", "route_prefix": "/ns/svc", "import_path": "anneal.serve.app:app_builder",
             "args": {"service": "ns-svc"}, "deployments": [{"name": "Router", "user_config": {"weights": {"a": 100}}}]}
    opts = kuberay.ClusterOptions(image="img:1", ray_version="2.60.0", resources=GPU)
    rs = kuberay.build_rayservice("svc-serve", "ns", [entry], opts)
    assert rs["kind"] == "RayService"
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == {"applications": [entry]}
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] == "2"


@pytest.mark.parametrize("name, ray_type, products", [
    ("H100", "H100", ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"]),
    ("h100-pcie", "H100", ["NVIDIA-H100-PCIe"]),
    ("A100-80G", "A100", ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"]),
    ("T4", "T4", ["Tesla-T4"]),
    ("H200", "H200", ["NVIDIA-H200", "NVIDIA-H200-NVL"]),
    # a GFD product value as it is; a known one keeps Ray's type
    ("NVIDIA-L4", "L4", ["NVIDIA-L4"]),
    ("NVIDIA-H100-80GB-HBM3", "H100", ["NVIDIA-H100-80GB-HBM3"]),
    # a product the table does not know: Ray's rule (the model token after the vendor)
    ("NVIDIA-X900-96GB", "X900", ["NVIDIA-X900-96GB"]),
    # anything else: verbatim
    ("MI300X", "MI300X", ["MI300X"]),
])
def test_accelerator_names_map_to_gfd_products_and_ray_types(name, ray_type, products):
    from anneal.runtime import accelerators

    a = accelerators.resolve(name)
    assert (a.ray_type, list(a.products)) == (ray_type, products)
    assert a.ray_resource == f"accelerator_type:{ray_type}"


def test_a_gfd_label_in_the_users_node_selector_wins():
    r = GPU.model_copy(update={"node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}})
    pod = _rayjob(resources=r)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"} and "affinity" not in pod


def _pods(rj):
    spec = rj["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"], spec["workerGroupSpecs"][0]["template"]["spec"]]


def test_every_ray_pod_meets_restricted_pod_security_and_has_a_memory_backed_dev_shm():
    for pod in _pods(_rayjob()):
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000 and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        c = pod["containers"][0]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                        "runAsNonRoot": True}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        # half the worker memory (64Gi) unless set: NCCL's buffers, not the runtime's 64 MiB default
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]


@pytest.mark.parametrize("memory, shm, expected", [("64Gi", "", "32Gi"), ("1Gi", "", "512Mi"), ("3G", "", "1.5G"),
                                                   (None, "", None), ("64Gi", "8Gi", "8Gi")])
def test_dev_shm_size(memory, shm, expected):
    r = Resources.model_validate({"workers": 1, "cpusPerWorker": 1, **({"memory": memory} if memory else {})})
    opts = kuberay.ClusterOptions(image="img:1", ray_version="2.60.0", resources=r, shm_size=shm)
    worker = kuberay.worker_group(opts)["template"]["spec"]
    assert worker["volumes"][0]["emptyDir"].get("sizeLimit") == expected


def test_a_shared_volume_claim_is_mounted_on_every_ray_pod():
    opts = kuberay.ClusterOptions(image="img:1", ray_version="2.60.0", resources=GPU, shared_volume_claim="anneal-rwx",
                                  shared_volume_path="/mnt/anneal")
    rj = kuberay.build_rayjob("tiny-a1", "team-a", _plan(), opts)
    for pod in _pods(rj):
        assert {"name": "anneal-shared", "persistentVolumeClaim": {"claimName": "anneal-rwx"}} in pod["volumes"]
        assert {"name": "anneal-shared", "mountPath": "/mnt/anneal"} in pod["containers"][0]["volumeMounts"]
    assert all(v["name"] != "anneal-shared" for v in _pods(_rayjob())[1]["volumes"])  # none unless named
