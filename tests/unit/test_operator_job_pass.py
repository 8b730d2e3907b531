"""The operator's job pass (`anneal_operator.jobs.JobReconciler.reconcile`): a switch on the phase, one status write.

The API server, the Ray Jobs API and MLflow are stand-ins here (this tier has none of them;
tests/e2e runs the same passes against real ones): they answer like the real services, and
record what the pass asked of them.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from anneal.runtime import jobs_api
from anneal_operator import jobs
from anneal_operator.settings import OperatorSettings
from tests.unit.test_runtime_secrets import ApiServer

SFT = {"method": "sft", "student": {"config": {"hiddenSize": 64, "layers": 2, "heads": 4}},
       "ray": {"address": "http://ray-head:8265"}, "mlflow": {"trackingUri": "http://mlflow:5000",
                                                               "experiment": "team-exp"}}


class CountingApiServer(ApiServer):
    def __init__(self, body: dict[str, Any]):
        super().__init__(body)
        self.writes = 0

    def patch_namespaced_custom_object_status(self, *args, **kwargs):
        self.writes += 1
        return super().patch_namespaced_custom_object_status(*args, **kwargs)


class RayJobs:
    """Ray Jobs APIs by address: what was submitted, the state they report, and which address was asked."""

    def __init__(self):
        self.asked: list[str] = []
        self.submitted: list[str] = []
        self.state = jobs_api.PENDING

    def __call__(self, address: str) -> Any:
        return SimpleNamespace(submit=lambda plan: self.submit(address, plan), get=lambda sid: self.get(address, sid))

    def submit(self, address: str, plan: Any) -> str:
        self.asked.append(address)
        self.submitted.append(plan.submission_id)
        return "submitted"

    def get(self, address: str, submission_id: str) -> Any:
        self.asked.append(address)
        if submission_id not in self.submitted:
            return None
        return jobs_api.RayJobInfo(submission_id=submission_id, status=self.state, message="")


class Tracker:
    """MLflow as the operator reads it: the runs searched for, by which server and experiment."""

    def __init__(self):
        self.searched: list[tuple[str, str]] = []

    def __call__(self, uri: str) -> "Tracker":
        self.uri = uri
        return self

    def find_run(self, target: Any, tags: Any) -> None:
        self.searched.append((target.tracking_uri, target.experiment))
        return None


@pytest.fixture
def world(monkeypatch):
    from kubernetes import client

    from anneal_operator.context import OperatorContext

    posted: list[tuple[str, str, str]] = []
    monkeypatch.setattr(jobs, "event", lambda body, type_, reason, message: posted.append((type_, reason, message)))
    tracker = Tracker()
    monkeypatch.setattr(jobs, "tracker", tracker)
    body = {"metadata": {"namespace": "team-a", "name": "tiny", "uid": "uid-1", "generation": 1,
                         "resourceVersion": "1"}, "spec": json.loads(json.dumps(SFT)), "status": {}}
    ray = RayJobs()
    settings = OperatorSettings(allowed_ray_addresses=["http://ray-head:"], allowed_tracking_uris=["http://mlflow:"],
                                retry_backoff=0)
    op = OperatorContext(settings=settings, api_client=client.ApiClient(), jobs_client_factory=ray)
    op.custom = CountingApiServer(body)
    rec = jobs.JobReconciler(op, "DistillationJob")

    def run_pass() -> dict[str, Any]:
        snap = json.loads(json.dumps(body))
        rec.reconcile(snap, snap["metadata"])
        return body["status"]

    return SimpleNamespace(body=body, ray=ray, api=op.custom, tracker=tracker, events=posted, run_pass=run_pass,
                           settings=settings)


def _edit(world, spec: dict[str, Any]) -> None:
    world.body["spec"] = spec
    world.body["metadata"]["generation"] += 1


def test_a_new_job_is_allocated_and_submitted_in_one_pass_with_one_status_write(world):
    status = world.run_pass()
    assert world.api.writes == 1
    assert status["phase"] == "Submitted" and status["attempts"] == 1
    assert world.ray.submitted == [status["submissionId"]]
    # Where the attempt went is kept: later passes observe it there whatever the spec says.
    assert (status["rayAddress"], status["trackingUri"], status["experiment"]) == (
        "http://ray-head:8265", "http://mlflow:5000", "team-exp")
    assert [r for _, r, _ in world.events] == ["Submitted"]
    world.run_pass()  # nothing changed: no write
    assert world.api.writes == 1


def test_an_edit_elsewhere_mid_run_is_refused_and_the_attempt_observed_where_it_went(world):
    sid = world.run_pass()["submissionId"]
    _edit(world, {**SFT, "ray": {"address": "http://evil:8265"},
                  "mlflow": {"trackingUri": "http://evil:5000", "experiment": "other"}})
    world.ray.state = jobs_api.RUNNING
    status = world.run_pass()
    assert status["phase"] == "Running" and status["refusedGeneration"] == 2
    assert "InvalidSpec" not in [r for _, r, _ in world.events]  # the allowlist guards submissions only
    world.ray.state = jobs_api.FAILED
    status = world.run_pass()
    assert set(world.ray.asked) == {"http://ray-head:8265"}
    assert world.tracker.searched[-1] == ("http://mlflow:5000", "team-exp")
    assert status["phase"] == "Pending" and status.get("retryAt"), status
    # The retry would run the edited spec: when it is due, the job fails instead.
    status = world.run_pass()
    assert status["phase"] == "Failed" and "spec changed after submission" in status["message"], status
    assert world.ray.submitted == [sid]


def test_an_edit_into_an_invalid_spec_mid_run_still_observes_the_attempt(world):
    world.run_pass()
    bad = json.loads(json.dumps(SFT))
    bad["student"]["config"]["hiddenSize"] = 66  # not divisible by heads: a rule the CRD schema cannot express
    _edit(world, bad)
    world.ray.state = jobs_api.RUNNING
    status = world.run_pass()
    assert status["phase"] == "Running" and status["refusedGeneration"] == 2
    world.ray.state = jobs_api.FAILED
    status = world.run_pass()
    assert status["phase"] == "Failed" and "backoffLimit 0" in status["message"], status
    assert world.tracker.searched[-1] == ("http://mlflow:5000", "team-exp")


def test_an_invalid_spec_before_submission_fails_naming_the_field_in_one_write(world):
    bad = json.loads(json.dumps(SFT))
    bad["student"]["config"]["hiddenSize"] = 66
    world.body["spec"] = bad
    status = world.run_pass()
    assert world.api.writes == 1 and world.ray.submitted == []
    assert status["phase"] == "Failed" and "spec.student.config" in status["message"], status
    assert [r for _, r, _ in world.events] == ["InvalidSpec"]


def test_the_operator_allowlist_is_checked_for_every_attempt(world):
    world.body["spec"]["backoffLimit"] = 2
    world.run_pass()
    world.ray.state = jobs_api.FAILED
    status = world.run_pass()
    assert status["phase"] == "Pending" and status.get("retryAt"), status
    # The cluster admin narrowed the allowlist before the retry: the next attempt is refused, naming the field.
    world.settings.allowed_ray_addresses = []
    status = world.run_pass()
    assert status["phase"] == "Failed" and "spec.ray.address" in status["message"], status
    assert len(world.ray.submitted) == 1 and "retryAt" not in status
