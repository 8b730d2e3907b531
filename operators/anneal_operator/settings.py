"""Settings of the operator, from ANNEAL_OPERATOR_* environment variables (Helm values map onto them 1:1)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing import Annotated

from anneal.api.common import parse_quantity


class OperatorSettings(BaseSettings):
    """What the operator watches, where work goes by default, and how it runs."""

    model_config = SettingsConfigDict(env_prefix="ANNEAL_OPERATOR_", extra="ignore")

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch, comma-separated; empty: the whole cluster.",
    )
    allowed_ray_addresses: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URL prefixes a resource's spec.ray.address may name, comma-separated (the operator sends "
        "its Ray token there); empty: only RAY_ADDRESS; '*': any (trusted tenants only).",
    )
    allowed_tracking_uris: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URI prefixes a resource's spec.mlflow.trackingUri may name, comma-separated; empty: only "
        "TRACKING_URI; '*': any.",
    )
    ray_address: str | None = Field(
        default=None,
        description="Default Ray dashboard URL (shared cluster) for resources without spec.ray.address; "
        "empty: such resources get a per-resource KubeRay cluster.",
    )
    tracking_uri: str = Field(
        default="http://mlflow.anneal.svc:5000",
        description="Default MLflow tracking URI for resources without spec.mlflow.trackingUri.",
    )
    experiment: str = Field(default="anneal", description="Default MLflow experiment.")
    image: str = Field(
        default="ghcr.io/anneal-dev/anneal-ray:0.1.0",
        description="Ray image (with Anneal installed) of per-resource KubeRay clusters.",
    )
    ray_version: str = Field(default="2.60.0", description="Ray version of that image.")
    job_python: str = Field(
        default="python", description="Python interpreter of job entrypoints on the Ray cluster."
    )
    work_dir: str = Field(
        default="/tmp/anneal/work", description="Work directory of jobs on the Ray nodes (checkpoints)."
    )
    cache_dir: str = Field(default="/tmp/anneal/cache", description="Model / data cache on the Ray nodes.")
    shared_volume_claim: str = Field(
        default="", description="A ReadWriteMany PVC mounted on every per-resource Ray pod at shared_volume_path "
        "(work and cache dirs all pods see); empty: none, each pod has its own.")
    shared_volume_path: str = Field(default="/mnt/anneal", description="Where that PVC is mounted.")
    shm_size: str = Field(
        default="", description="Size of the memory-backed /dev/shm of per-resource Ray pods (NCCL); empty: half "
        "of resources.memory when set.")
    router_cpus: float = Field(default=0.5, gt=0, le=64,
                               description="CPUs each ModelService's router replica reserves on the Ray cluster.")
    max_workers: int = Field(default=64, ge=1, description="Largest resources.workers a job may ask for.")
    max_gpus_per_worker: float = Field(default=8, ge=0, description="Largest resources.gpusPerWorker.")
    gang_scheduler: str = Field(default="kueue", description="Queue label flavour: kueue or volcano.")
    ttl_seconds_after_finished: int = Field(default=600, ge=0, description="TTL of finished RayJobs.")
    poll_interval: float = Field(default=5.0, gt=0, description="Seconds between observations of a job.")
    progress_interval: float = Field(
        default=30.0, gt=0, description="Seconds between reads of a running job's progress from MLflow "
        "(its result is read as soon as the Ray job ends)."
    )
    cleanup_timeout: float = Field(
        default=300.0, gt=0, description="Seconds a deletion keeps retrying to stop its Ray job or remove its "
        "Serve app (Ray unreachable); then the finalizer is released with a Warning event.")
    retry_backoff: float = Field(default=10.0, ge=0, description="Seconds before the first retry (doubles).")
    retry_backoff_max: float = Field(default=300.0, ge=0, description="Cap on the retry delay.")
    handler_workers: int = Field(default=16, ge=1, description="Threads running reconcile passes.")
    metrics_port: int = Field(default=8080, ge=0, description="Prometheus /metrics port (0: off).")
    health_port: int = Field(default=8081, ge=0, description="Liveness/readiness /healthz port (0: off).")
    bind_address: str = Field(default="0.0.0.0", description="Address of the metrics and health servers.")
    leader_election: bool = Field(default=True, description="Only the Lease holder acts (safe with replicas).")
    lease_name: str = Field(default="anneal-operator", description="Name of the leader-election Lease.")
    lease_namespace: str = Field(default="default", description="Namespace of the Lease.")
    lease_duration: float = Field(default=15.0, gt=0, description="Seconds a Lease holds without renewal.")
    identity: str | None = Field(default=None, description="This replica's id (default: hostname-pid).")
    kubeconfig: str | None = Field(default=None, description="Kubeconfig file; empty: in-cluster, then $KUBECONFIG.")
    log_level: str = Field(default="INFO", description="Log level.")

    @field_validator("namespaces", "allowed_ray_addresses", "allowed_tracking_uris", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value

    @model_validator(mode="after")
    def _dirs_on_the_shared_volume(self) -> "OperatorSettings":
        if self.shared_volume_claim:
            root = self.shared_volume_path.rstrip("/") + "/"
            outside = [f"{n}={v}" for n, v in (("work_dir", self.work_dir), ("cache_dir", self.cache_dir))
                       if not (v.rstrip("/") + "/").startswith(root)]
            if outside:
                raise ValueError(f"shared_volume_claim {self.shared_volume_claim!r} is mounted at {root}, but "
                                 f"{' and '.join(outside)} are not under it: the pods would not share them")
        return self

    @field_validator("shm_size")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if value:
            parse_quantity(value)  # raises "... is not a Kubernetes quantity (use e.g. 16Gi, ...)"
        return value

    @field_validator("gang_scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        if value not in ("kueue", "volcano"):
            raise ValueError("must be kueue or volcano")
        return value


def endpoint_problems(spec: object, settings: OperatorSettings) -> list:
    """spec.ray.address and spec.mlflow.trackingUri outside the operator's allowlists, as field errors.

    A tenant must not point the operator (and the Ray token and MLflow credentials it sends)
    at a server of their own: only the operator's defaults and the allowlisted prefixes pass.
    """
    from anneal.api.resources import FieldError

    errors = []
    checks = [
        ("spec.ray.address", getattr(getattr(spec, "ray", None), "address", None), settings.ray_address,
         settings.allowed_ray_addresses, "ANNEAL_OPERATOR_ALLOWED_RAY_ADDRESSES"),
        ("spec.mlflow.trackingUri", getattr(getattr(spec, "mlflow", None), "tracking_uri", None),
         settings.tracking_uri, settings.allowed_tracking_uris, "ANNEAL_OPERATOR_ALLOWED_TRACKING_URIS"),
    ]
    for path, value, default, allowed, variable in checks:
        if not value or "*" in allowed or _allows(default, value) or any(_allows(a, value) for a in allowed):
            continue
        errors.append(FieldError(path, value, f"not allowed by the operator: use its default ({default or 'none set'}) "
                                              f"or ask the cluster admin to add it to {variable}"))
    return errors


def _allows(entry: str | None, value: str) -> bool:
    """`entry` names `value`: the same URL, or a prefix ending at a ``/`` or ``:`` boundary.

    ``http://ray`` allows ``http://ray:8265`` (any port of that host) but not
    ``http://ray.evil.example``; ``http://127.0.0.1:`` allows every loopback port.
    """
    if not entry:
        return False
    if value.rstrip("/") == entry.rstrip("/"):
        return True
    if not value.startswith(entry):
        return False
    return entry.endswith(("/", ":")) or value[len(entry)] in "/:"
