"""What a resource asks of a Ray cluster, against what the cluster has: a warning before deploying
something that cannot be scheduled (it would otherwise sit in `Deploying` or `Pending` in silence).

Only totals are compared (the sum over the cluster's alive nodes): what other tenants hold now
changes by the minute, and an autoscaling cluster may still grow, so a shortfall is a warning,
never a refusal.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Ray's resource names for what the specs ask.
CPU, GPU = "CPU", "GPU"


def _add(out: dict[str, float], key: str, value: float) -> None:
    if value:
        out[key] = round(out.get(key, 0.0) + value, 4)


def service_request(spec: Any, router_cpus: float, router_replicas: int = 1) -> dict[str, float]:
    """The Ray resources a ModelService reserves at its smallest scale (routers + each variant's replicas)."""
    out: dict[str, float] = {}
    _add(out, CPU, router_cpus * router_replicas)
    for v in spec.variants:
        n = v.autoscaling.min_replicas if v.autoscaling else (v.replicas if v.replicas is not None else 1)
        _add(out, CPU, v.resources.cpus_per_worker * n)
        _add(out, GPU, v.resources.gpus_per_worker * n)
    return out


def job_request(spec: Any) -> dict[str, float]:
    """The Ray resources a job's training workers reserve together (they are scheduled as a gang)."""
    r = spec.resources
    out: dict[str, float] = {}
    _add(out, CPU, r.cpus_per_worker * r.workers)
    _add(out, GPU, r.gpus_per_worker * r.workers)
    return out


def shortfall(request: Mapping[str, float], capacity: Mapping[str, float]) -> str | None:
    """Why `request` cannot fit a cluster of `capacity` (totals), or None when it fits."""
    short = {k: v for k, v in request.items() if v > capacity.get(k, 0.0) + 1e-9}
    if not short:
        return None
    asks = ", ".join(f"{k} {request[k]:g}" for k in sorted(short))
    has = ", ".join(f"{k} {capacity.get(k, 0.0):g}" for k in sorted(short))
    return f"asks for {asks} but the Ray cluster has {has} in total: it cannot be scheduled until the cluster grows"


__all__ = ["job_request", "service_request", "shortfall"]
