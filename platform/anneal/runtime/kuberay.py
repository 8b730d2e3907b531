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

from anneal.api.common import Resources
from anneal.runtime.plan import JobPlan
from anneal.runtime.secrets import SecretRef

KUBERAY_API_VERSION = "ray.io/v1"
GPU_RESOURCE = "nvidia.com/gpu"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
VOLCANO_QUEUE_LABEL = "volcano.sh/queue-name"
RAY_SCHEDULER_LABEL = "ray.io/scheduler-name"
ACCELERATOR_NODE_LABEL = "nvidia.com/gpu.product"
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
    }
    if opts.env or opts.secret_env:
        container["env"] = _env(opts)
    return container


def _pod_spec(opts: ClusterOptions, container: dict[str, Any], *, workers: bool) -> dict[str, Any]:
    r = opts.resources
    spec: dict[str, Any] = {"containers": [container]}
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    if workers:
        selector = dict(r.node_selector)
        if r.accelerator_type and r.gpus_per_worker > 0:
            selector.setdefault(ACCELERATOR_NODE_LABEL, r.accelerator_type)
        if selector:
            spec["nodeSelector"] = selector
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
    return {
        "groupName": name,
        "replicas": r.workers,
        "minReplicas": r.workers,
        "maxReplicas": r.workers,
        "rayStartParams": params,
        "template": {"spec": _pod_spec(opts, worker_container(opts), workers=True)},
    }


def ray_cluster_spec(opts: ClusterOptions) -> dict[str, Any]:
    """A KubeRay `RayClusterSpec`: one head and one worker group from `resources`."""
    return {
        "rayVersion": opts.ray_version,
        "headGroupSpec": head_group(opts),
        "workerGroupSpecs": [worker_group(opts)],
    }


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
    return {
        "apiVersion": KUBERAY_API_VERSION,
        "kind": "RayService",
        "metadata": meta,
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(cluster),
        },
    }


def kuberay_name(name: str, suffix: str = "") -> str:
    """A RayJob / RayService name: KubeRay derives pod and service names from it, so keep it short."""
    base = name[: 40 - len(suffix)].rstrip("-")
    return f"{base}{suffix}"
