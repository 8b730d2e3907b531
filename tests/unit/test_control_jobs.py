"""The job and reference decisions both drivers share (`anneal.control.jobs`, `anneal.control.refs`)."""

import pytest

from anneal.api.resources import parse_spec
from anneal.control import jobs, refs

KD = {
    "method": "kd",
    "teacher": {"fromResource": {"kind": "DistillationJob", "name": "teacher"}},
    "student": {"config": {"hiddenSize": 32, "layers": 1, "heads": 2, "intermediateSize": 64}},
    "dataset": {"uri": "builtin://reasoning", "samples": 8},
}


def test_registered_model_names_default_per_namespace():
    spec = parse_spec("DistillationJob", KD)
    assert jobs.registered_model_name(spec.mlflow, "team-a", "student") == "team-a.student"
    assert jobs.registered_model_name(spec.mlflow, "team-b", "student") == "team-b.student"
    named = parse_spec("DistillationJob", {**KD, "mlflow": {"registeredModelName": "shared"}})
    assert jobs.registered_model_name(named.mlflow, "team-a", "student") == "shared"


def test_one_context_for_both_drivers_with_driver_tags_over_the_specs():
    from dataclasses import fields

    from anneal.distill.recipe import JobContext

    spec = parse_spec("DistillationJob", {**KD, "mlflow": {"experiment": "e", "tags": {"team": "a", "x": "spec"}}})
    ctx = jobs.job_context("DistillationJob", spec, namespace="ns", name="j", uid="u", tracking_uri="http://m",
                           default_experiment="anneal", work_root="/work/", cache_dir="/cache",
                           resolved={"teacher": "models:/ns.teacher/1"}, tags={"x": "driver"})
    assert set(ctx) == {f.name for f in fields(JobContext)}
    jc = JobContext(**ctx)
    assert jc.experiment == "e" and jc.work_dir == "/work/ns/distillationjob/j/u"
    assert jc.extra_tags == {"team": "a", "x": "driver"} and jc.resolved_uris == {"teacher": "models:/ns.teacher/1"}


def test_rayjob_names_differ_per_kind_and_stay_unique_when_cut():
    assert jobs.rayjob_name("DistillationJob", "x", 1) == "x-dj-a1"
    assert jobs.rayjob_name("CompressionJob", "x", 1) == "x-cj-a1"
    long_a, long_b = "a" * 50 + "-one", "a" * 50 + "-two"
    na, nb = jobs.rayjob_name("CompressionJob", long_a, 3), jobs.rayjob_name("CompressionJob", long_b, 3)
    assert na != nb and len(na) <= jobs.MAX_RAYJOB_NAME and na.endswith("-cj-a3")


@pytest.mark.parametrize("seen, reason", [
    (None, "does not exist in namespace ns"),
    ({"phase": "Running"}, "has not succeeded (phase Running)"),
    ({"phase": "Succeeded"}, "succeeded without registering a model"),
])
def test_a_reference_that_cannot_resolve_says_which_field_and_why(seen, reason):
    spec = parse_spec("DistillationJob", KD)
    with pytest.raises(refs.Unresolved) as e:
        refs.resolve(spec, "ns", lambda kind, ns, name: seen)
    assert str(e.value) == f"spec.teacher.fromResource: DistillationJob/teacher {reason}"


def test_references_of_jobs_and_services_resolve_through_one_lookup():
    asked = []

    def lookup(kind, ns, name):
        asked.append((kind, ns, name))
        return {"phase": "Succeeded", "modelUri": f"models:/{ns}.{name}/1"}

    assert refs.resolve(parse_spec("DistillationJob", KD), "ns", lookup) == {"teacher": "models:/ns.teacher/1"}
    svc = parse_spec("ModelService", {"variants": [
        {"name": "a", "model": {"uri": "models:/m/1"}, "weight": 50},
        {"name": "b", "model": {"fromResource": {"kind": "CompressionJob", "name": "small"}}, "weight": 50}]})
    assert [r.field for r in refs.references(svc)] == ["spec.variants[1].model.fromResource"]
    assert refs.resolve(svc, "ns", lookup) == {"b": "models:/ns.small/1"}
    assert asked == [("DistillationJob", "ns", "teacher"), ("CompressionJob", "ns", "small")]


def test_a_request_larger_than_the_cluster_is_named_with_both_figures():
    from anneal.control.capacity import job_request, service_request, shortfall

    svc = parse_spec("ModelService", {"variants": [
        {"name": "a", "model": {"uri": "/m"}, "weight": 50, "replicas": 2, "resources": {"cpusPerWorker": 1}},
        {"name": "b", "model": {"uri": "/m"}, "weight": 50, "resources": {"cpusPerWorker": 2, "gpusPerWorker": 1},
         "autoscaling": {"minReplicas": 0, "maxReplicas": 4}}]})
    assert service_request(svc, 0.5) == {"CPU": 2.5}  # b scales from zero: nothing reserved up front
    assert shortfall(service_request(svc, 0.5), {"CPU": 2.0}) == (
        "asks for CPU 2.5 but the Ray cluster has CPU 2 in total: it cannot be scheduled until the cluster grows")
    assert shortfall(service_request(svc, 0.5), {"CPU": 8.0}) is None
    job = parse_spec("DistillationJob", {**KD, "resources": {"workers": 4, "cpusPerWorker": 2, "gpusPerWorker": 1}})
    assert job_request(job) == {"CPU": 8.0, "GPU": 4.0}
    assert "GPU 4" in shortfall(job_request(job), {"CPU": 64.0}) and "GPU 0" in shortfall(job_request(job), {"CPU": 64})


def test_a_job_too_big_for_the_shared_cluster_is_warned_about_once_and_still_submitted(monkeypatch):
    import base64

    from anneal.runtime import jobs_api
    from anneal_operator import jobs as op_jobs
    from tests.unit.test_runtime_secrets import SECRET, _pass, _reconciler

    posted = []
    monkeypatch.setattr(op_jobs, "event", lambda body, type_, reason, message: posted.append((type_, reason, message)))
    monkeypatch.setattr(jobs_api, "cluster_resources_cached", lambda address, ttl_s=30.0: {"CPU": 0.5, "memory": 1e9})
    secret = {"hf-token": {"token": base64.b64encode(SECRET.encode()).decode()}}
    rec, body, ray_jobs = _reconciler(lambda ns, name: secret.get(name), ray_address="http://ray-head:8265")
    _pass(rec, body)
    assert body["status"]["phase"] == "Submitted" and len(ray_jobs.plans) == 1  # a warning, not a refusal
    warned = [m for t, r, m in posted if r == "InsufficientResources"]
    assert warned == ["DistillationJob/tiny asks for CPU 1 but the Ray cluster has CPU 0.5 in total: "
                      "it cannot be scheduled until the cluster grows"]
    ray_jobs.get = lambda sid: jobs_api.RayJobInfo(submission_id=sid, status=jobs_api.RUNNING, message="")
    _pass(rec, body)  # the next pass observes the running job: no second warning
    assert len([r for _, r, _ in posted if r == "InsufficientResources"]) == 1
