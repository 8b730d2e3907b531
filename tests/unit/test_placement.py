"""Where a job's model work runs (`anneal.runtime.placement`): one training worker's resources."""

from __future__ import annotations

import os

import pytest

from anneal.api.common import Resources
from anneal.runtime import placement


def test_a_gpu_job_asks_for_one_workers_gpus_on_rays_accelerator_type_whatever_its_spelling():
    for spelling in ("H100", "NVIDIA-H100-80GB-HBM3", "h100"):
        r = Resources.model_validate({"workers": 4, "gpusPerWorker": 2, "cpusPerWorker": 8, "acceleratorType": spelling})
        assert placement.task_options(r, "anneal-evaluate") == {
            "num_cpus": 8, "num_gpus": 2, "max_retries": 0, "accelerator_type": "H100", "name": "anneal-evaluate"}
        assert placement.device_of(r) == "cuda"


def test_a_cpu_job_asks_for_one_workers_cpus_and_no_accelerator():
    r = Resources.model_validate({"workers": 2, "cpusPerWorker": 1, "acceleratorType": "H100"})
    assert placement.task_options(r) == {"num_cpus": 1, "num_gpus": 0, "max_retries": 0}
    assert placement.device_of(r) == "cpu"


def test_without_ray_the_work_runs_inline_and_its_error_is_its_own():
    import ray

    assert not ray.is_initialized()
    r = Resources()
    assert placement.on_a_worker(r, lambda a, b: (a + b, os.getpid()), 1, 2) == (3, os.getpid())
    with pytest.raises(ValueError, match="bad checkpoint"):
        placement.on_a_worker(r, _fail, "bad checkpoint")
    assert placement.here("cpu").endswith(f":{os.getpid()} (cpu)")


def _fail(message: str) -> None:
    raise ValueError(message)


@pytest.mark.parametrize("gpus,nodes,inline", [(0, 1, True), (0, 3, False), (1, 1, False), (0.5, 1, False)])
def test_only_a_cpu_job_on_a_one_node_ray_may_stay_in_the_driver(gpus, nodes, inline):
    # one node: a task would land on the driver's node anyway, with one worker's CPUs as torch threads
    assert placement.stays_in_driver(Resources.model_validate({"gpusPerWorker": gpus}), nodes) is inline
