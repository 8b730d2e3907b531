"""Where a job's model work runs: on a Ray worker with one training worker's resources.

A job's driver (the Ray Jobs entrypoint, on a KubeRay head pod that has no GPU, or `anneal
run`'s process) only plans and records. Loading a model to derive a student, score it or
compress it is one worker's work: `on_a_worker` runs it as a Ray task asking for what one
Ray Train worker of the job asks for (its CPUs, its GPUs, Ray's accelerator type), so it
lands on the same kind of node, on the GPU when the job has one. The files it reads and
writes are under the job's work and cache dirs (the shared volume on a cluster).

One exception, asked for by the caller (`inline_on_one_node`): a CPU-only job on a Ray of one
node (`anneal run` on a laptop, a head-only cluster). A task would land on the driver's own node
anyway, holding one worker's CPUs, so torch would compute on that many threads (one, by
default) where the driver's process has the node's cores; there it runs in the driver.
Without Ray (a unit test calling a recipe step) it runs inline.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, TypeVar

from anneal.api.common import Resources
from anneal.runtime import accelerators

T = TypeVar("T")

#: MLflow run tags saying where a job's model work ran ("<host>:<pid> (<device>)").
TAG_STUDENT_MADE_ON = "anneal.student_made_on"
TAG_EVALUATED_ON = "anneal.evaluated_on"


def task_options(resources: Resources, name: str | None = None) -> dict[str, Any]:
    """`ray.remote` options for one worker's share of `resources` (no retries: a failure is the job's)."""
    opts: dict[str, Any] = {"num_cpus": resources.cpus_per_worker, "num_gpus": resources.gpus_per_worker,
                            "max_retries": 0}
    if resources.gpus_per_worker > 0 and resources.accelerator_type:
        # Ray's name for the GPU ("H100"), whatever spelling the spec used ("H100-PCIe", a GFD product)
        opts["accelerator_type"] = accelerators.resolve(resources.accelerator_type).ray_type
    if name:
        opts["name"] = name
    return opts


def stays_in_driver(resources: Resources, alive_nodes: int) -> bool:
    """Whether `inline_on_one_node` work runs in the driver (pure): no GPUs asked, one node alive."""
    return resources.gpus_per_worker == 0 and alive_nodes <= 1


def on_a_worker(resources: Resources, fn: Callable[..., T], *args: Any, name: str | None = None,
                inline_on_one_node: bool = False) -> T:
    """`fn(*args)` as a Ray task with one worker's resources; inline when Ray is not initialized,
    and with `inline_on_one_node` when `stays_in_driver` (a CPU-only job on a one-node Ray).

    A failure in the task is raised here as Ray raises it: an instance of the task's own
    exception class as well (`anneal.runtime.errors.short_error` gives its one line).
    """
    import ray

    if not ray.is_initialized():
        return fn(*args)
    if inline_on_one_node and stays_in_driver(resources, sum(1 for n in ray.nodes() if n.get("Alive"))):
        return fn(*args)
    return ray.get(ray.remote(**task_options(resources, name or getattr(fn, "__name__", None)))(fn).remote(*args))


def device_of(resources: Resources) -> str:
    """The torch device a task placed by `on_a_worker` computes on."""
    return "cuda" if resources.gpus_per_worker > 0 else "cpu"


def here(device: str) -> str:
    """This process as a run tag names it: ``<host>:<pid> (<device>)`` (a worker pod's name on a cluster)."""
    return f"{socket.gethostname()}:{os.getpid()} ({device})"
