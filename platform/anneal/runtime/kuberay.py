"""Pure builders of KubeRay manifests (`ray.io/v1` RayJob and RayService) for per-resource clusters.

Everything comes in as arguments (a `ClusterOptions`, the job plan or the Serve config entry,
the owner); nothing is read from the environment, so the operator and the tests build the
same manifests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from anneal.api.common import Resources, format_quantity, parse_quantity
from anneal.runtime import accelerators
from anneal.runtime.plan import JobPlan
from anneal.runtime.secrets import SecretRef

KUBERAY_API_VERSION = "ray.io/v1"
GPU_RESOURCE = "nvidia.com/gpu"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_QUEUE_LABEL = "volcano.sh/queue-name"
RAY_SCHEDULER_LABEL = "ray.io/scheduler-name"
ACCELERATOR_NODE_LABEL = accelerators.GFD_PRODUCT_LABEL
#: The official Ray images (rayproject/ray) run as user `ray`: uid 1000, group `users` (100).
RAY_UID, RAY_GID = 1000, 100
SHM_VOLUME, SHARED_VOLUME = "dshm", "anneal-shared"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


@dataclass(frozen=True)
class ClusterOptions:
    """How a per-resource Ray cluster is shaped.

    Attributes:
        image: Ray image with Anneal installed (head, workers and the job submitter).
        ray_version: the Ray version in that image.
        resources: the spec's `resources` (worker count, GPUs, CPUs, memory, placement, queue).
        head_cpus: CPUs of the head pod.
        head_memory: memory of the head pod (quantity).
        gang_scheduler: `kueue` (label `kueue.x-k8s.io/queue-name`) or `volcano`.
        service_account: service account of the Ray pods (None: the namespace default).
        labels: extra labels on the KubeRay object (e.g. the owning resource).
        env: environment variables of every Ray container.
        secret_env: variables of every Ray container that the kubelet reads from a Secret
            (`valueFrom.secretKeyRef`): their values never pass through the operator.
        shm_size: size of the memory-backed `/dev/shm` of every Ray pod (NCCL and PyTorch's
            data loaders use it; a container runtime's default is 64 MiB). Empty: half of
            the worker memory when `resources.memory` is set, else unbounded (the pod's memory
            limit still bounds it).
        shared_volume_claim: a `ReadWriteMany` PersistentVolumeClaim mounted on every Ray pod
            at `shared_volume_path`, for work and cache dirs that all pods see.
    """

    image: str
    ray_version: str
    resources: Resources = field(default_factory=Resources)
    head_cpus: float = 2
    head_memory: str = "8Gi"
    gang_scheduler: str = "kueue"
    service_account: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: tuple[SecretRef, ...] = ()
    shm_size: str = ""
    shared_volume_claim: str = ""
    shared_volume_path: str = "/mnt/anneal"


def owner_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """An ownerReference that makes the child go (garbage collection) when the owner goes."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _cpu(value: float) -> str:
    """A CPU quantity: whole CPUs as integers, fractions in millicores."""
    if float(value).is_integer():
        return str(int(value))
    return f"{int(math.ceil(value * 1000))}m"


def _env(opts: ClusterOptions) -> list[dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {k: {"name": k, "value": str(v)} for k, v in opts.env.items()}
    entries.update((ref.var, ref.env_entry()) for ref in opts.secret_env)
    return [entries[k] for k in sorted(entries)]


def _security_context() -> dict[str, Any]:
    """A container that meets Pod Security "restricted" (a writable root stays: Ray writes under /tmp/ray)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def _mounts(opts: ClusterOptions) -> list[dict[str, Any]]:
    mounts = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    if opts.shared_volume_claim:
        mounts.append({"name": SHARED_VOLUME, "mountPath": opts.shared_volume_path})
    return mounts


def _shm_limit(opts: ClusterOptions) -> str | None:
    if opts.shm_size:
        return opts.shm_size
    memory = opts.resources.memory
    return format_quantity(parse_quantity(memory) / 2) if memory else None


def _volumes(opts: ClusterOptions) -> list[dict[str, Any]]:
    shm: dict[str, Any] = {"medium": "Memory"}
    if limit := _shm_limit(opts):
        shm["sizeLimit"] = limit
    volumes: list[dict[str, Any]] = [{"name": SHM_VOLUME, "emptyDir": shm}]
    if opts.shared_volume_claim:
        volumes.append({"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": opts.shared_volume_claim}})
    return volumes


def worker_container(opts: ClusterOptions) -> dict[str, Any]:
    """The Ray worker container: CPU, memory and `nvidia.com/gpu` as limits (and equal requests)."""
    r = opts.resources
    limits: dict[str, str] = {"cpu": _cpu(r.cpus_per_worker)}
    if r.memory:
        limits["memory"] = r.memory
    if r.gpus_per_worker > 0:
        # Kubernetes schedules whole GPUs; a fractional share in Ray still needs a whole device.
        limits[GPU_RESOURCE] = str(int(math.ceil(r.gpus_per_worker)))
    container: dict[str, Any] = {
        "name": "ray-worker",
        "image": opts.image,
        "resources": {"limits": dict(limits), "requests": dict(limits)},
        "volumeMounts": _mounts(opts),
        "securityContext": _security_context(),
    }
    if opts.env or opts.secret_env:
        container["env"] = _env(opts)
    return container


def _pod_spec(opts: ClusterOptions, container: dict[str, Any], *, workers: bool) -> dict[str, Any]:
    r = opts.resources
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": _volumes(opts),
        "securityContext": {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    if workers:
        if r.node_selector:
            spec["nodeSelector"] = dict(r.node_selector)
        if r.accelerator_type and r.gpus_per_worker > 0 and ACCELERATOR_NODE_LABEL not in r.node_selector:
            # GFD's product values, not the short name: nvidia.com/gpu.product is "NVIDIA-H100-80GB-HBM3".
            spec["affinity"] = {"nodeAffinity": accelerators.node_affinity(r.accelerator_type)}
        if r.tolerations:
            spec["tolerations"] = [t.to_dict() for t in r.tolerations]
        elif r.gpus_per_worker > 0:
            spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    if r.priority_class_name:
        spec["priorityClassName"] = r.priority_class_name
    return spec


def head_group(opts: ClusterOptions) -> dict[str, Any]:
    """The head group: no GPU, no training work (`num-cpus: 0`), dashboard for job submission."""
    container: dict[str, Any] = {
        "name": "ray-head",
        "image": opts.image,
        "resources": {
            "limits": {"cpu": _cpu(opts.head_cpus), "memory": opts.head_memory},
            "requests": {"cpu": _cpu(opts.head_cpus), "memory": opts.head_memory},
        },
        "ports": [
            {"containerPort": 6379, "name": "gcs"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": 8000, "name": "serve"},
        ],
        "volumeMounts": _mounts(opts),
        "securityContext": _security_context(),
    }
    if opts.env or opts.secret_env:
        container["env"] = _env(opts)
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": {"spec": _pod_spec(opts, container, workers=False)},
    }


def worker_group(opts: ClusterOptions, name: str = "workers") -> dict[str, Any]:
    """One worker group of exactly `resources.workers` pods (training wants a fixed gang)."""
    r = opts.resources
    params: dict[str, str] = {}
    if r.gpus_per_worker > 0:
        params["num-gpus"] = str(int(math.ceil(r.gpus_per_worker)))
    group: dict[str, Any] = {
        "groupName": name,
        "replicas": r.workers,
        "minReplicas": r.workers,
        "maxReplicas": r.workers,
        "rayStartParams": params,
        "template": {"spec": _pod_spec(opts, worker_container(opts), workers=True)},
    }
    if r.accelerator_type and r.gpus_per_worker > 0:
        # What Ray Train's ScalingConfig(accelerator_type=...) asks for. Ray detects it on real
        # GPU nodes too; declared (KubeRay's group `resources`, >= 1.4) so both agree on the name.
        # KubeRay refuses a group with resources in both places (ValidationFailed: "resource
        # fields should not be set in both rayStartParams and Resources"): the GPU count moves
        # here with it, and KubeRay writes it back as `--num-gpus`.
        group["resources"] = {"GPU": params.pop("num-gpus"),
                              accelerators.resolve(r.accelerator_type).ray_resource: "1"}
    return group


def ray_cluster_spec(opts: ClusterOptions) -> dict[str, Any]:
    """A KubeRay `RayClusterSpec`: one head and one worker group from `resources`."""
    return {
        "rayVersion": opts.ray_version,
        "headGroupSpec": head_group(opts),
        "workerGroupSpecs": [worker_group(opts)],
    }


def queued_in_kueue(opts: ClusterOptions) -> bool:
    """Whether Kueue admits this cluster: it is then created suspended, and Kueue unsuspends it
    once a ClusterQueue has quota for all of its pods (Kueue's contract for the jobs it manages;
    its webhook would suspend it too, but a cluster must not depend on a webhook being installed)."""
    return bool(opts.resources.queue) and opts.gang_scheduler != "volcano"


def _labels(opts: ClusterOptions) -> dict[str, str]:
    labels = {MANAGED_BY_LABEL: "anneal", **dict(opts.labels)}
    queue = opts.resources.queue
    if queue:
        if opts.gang_scheduler == "volcano":
            labels[RAY_SCHEDULER_LABEL] = "volcano"
            labels[VOLCANO_QUEUE_LABEL] = queue
        else:
            labels[KUEUE_QUEUE_LABEL] = queue
    return labels


@dataclass(frozen=True)
class RayJobOptions:
    """Lifecycle of a per-job cluster."""

    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = 600
    active_deadline_seconds: int | None = None


def build_rayjob(
    name: str,
    namespace: str,
    plan: JobPlan,
    cluster: ClusterOptions,
    owner: Mapping[str, Any] | None = None,
    lifecycle: RayJobOptions = RayJobOptions(),
) -> dict[str, Any]:
    """A KubeRay `RayJob` that runs one attempt of a job on its own Ray cluster.

    Args:
        name: the RayJob's name (deterministic: derived from the resource and attempt).
        namespace: the resource's namespace.
        plan: the attempt's plan; its submission id becomes the Ray job id.
        cluster: head, worker group and scheduling options.
        owner: an ownerReference (the RayJob goes when the resource goes).
        lifecycle: shutdown / TTL / deadline.
    """
    spec: dict[str, Any] = {
        "entrypoint": plan.entrypoint,
        "jobId": plan.submission_id,
        "metadata": dict(plan.metadata),
        "runtimeEnvYAML": yaml.safe_dump(plan.runtime_env, sort_keys=True),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": lifecycle.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": lifecycle.ttl_seconds_after_finished,
        # Retries are the operator's (spec.backoffLimit, new attempt = new RayJob).
        "backoffLimit": 0,
        "rayClusterSpec": ray_cluster_spec(cluster),
    }
    if lifecycle.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = lifecycle.active_deadline_seconds
    if queued_in_kueue(cluster):
        spec["suspend"] = True
    if plan.entrypoint_num_cpus is not None:
        spec["entrypointNumCpus"] = plan.entrypoint_num_cpus
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": _labels(cluster)}
    if owner:
        meta["ownerReferences"] = [dict(owner)]
    return {"apiVersion": KUBERAY_API_VERSION, "kind": "RayJob", "metadata": meta, "spec": spec}


def build_rayservice(
    name: str,
    namespace: str,
    serve_applications: list[Mapping[str, Any]],
    cluster: ClusterOptions,
    owner: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A KubeRay `RayService` serving the given Serve config entries (`build_serve_config`)."""
    serve_config = {"applications": [dict(a) for a in serve_applications]}
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": _labels(cluster)}
    if owner:
        meta["ownerReferences"] = [dict(owner)]
    cluster_spec = ray_cluster_spec(cluster)
    if queued_in_kueue(cluster):
        cluster_spec["suspend"] = True  # what Kueue's RayService integration suspends and resumes
    return {
        "apiVersion": KUBERAY_API_VERSION,
        "kind": "RayService",
        "metadata": meta,
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": cluster_spec,
        },
    }


def kuberay_name(name: str, suffix: str = "") -> str:
    """A RayJob / RayService name: KubeRay derives pod and service names from it, so keep it short."""
    base = name[: 40 - len(suffix)].rstrip("-")
    return f"{base}{suffix}"
