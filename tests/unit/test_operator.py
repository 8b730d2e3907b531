"""Pure parts of the operator: job transitions, retries, limits, pipeline progression, settings."""

from __future__ import annotations

from dataclasses import fields

import pytest

from anneal.api.resources import parse_spec
from anneal.control.pipeline import advance, resolve_stage_refs
from anneal_operator import jobs, service
from anneal_operator.settings import OperatorSettings

NOW = 1_800_000_000.0
RETRY = jobs.Retry(backoff_limit=2, base_delay=10, max_delay=300)


def _obs(ray, result=None, progress=None, message=""):
    return jobs.Observation(ray, message, result, progress)


@pytest.mark.parametrize(
    "before, obs, phase, event_reason",
    [
        ("Submitted", _obs("PENDING"), "Submitted", None),
        ("Submitted", _obs("RUNNING"), "Running", "Running"),
        ("Running", _obs("RUNNING", progress={"step": 3, "totalSteps": 10, "loss": 1.5}), "Running", None),
        ("Running", _obs("SUCCEEDED", {"phase": "Succeeded", "modelUri": "models:/m/1", "metrics": {"a": 1.0}}),
         "Succeeded", "Succeeded"),
        ("Running", _obs("RUNNING", {"phase": "Rejected", "message": "retention 0.5 < 0.9"}), "Rejected", "Rejected"),
        ("Running", _obs("STOPPED", message="stopped by user"), "Cancelled", "Cancelled"),
        ("Running", _obs("FAILED", message="OOM"), "Pending", "Retrying"),
        ("Running", _obs(None), "Pending", "Retrying"),
        ("Running", _obs("SUCCEEDED"), "Pending", "Retrying"),
        ("Running", _obs("FAILED", {"phase": "Failed", "message": "bad data"}), "Pending", "Retrying"),
    ],
)
def test_observe_transitions(before, obs, phase, event_reason):
    status = {"phase": before, "attempts": 1, "submissionId": "s-a1"}
    out = jobs.observe(status, obs, RETRY, NOW)
    assert out.status["phase"] == phase
    assert [e[1] for e in out.events] == ([event_reason] if event_reason else [])
    assert status["phase"] == before  # input untouched


def test_success_copies_result_and_sets_ready():
    result = {"phase": "Succeeded", "modelUri": "models:/m/3", "metrics": {"studentAccuracy": 0.5},
              "progress": {"step": 10, "totalSteps": 10}, "message": "registered models:/m/3"}
    out = jobs.observe({"phase": "Running", "attempts": 1}, _obs("SUCCEEDED", result), RETRY, NOW)
    st = out.status
    assert st["modelUri"] == "models:/m/3" and st["metrics"] == {"studentAccuracy": 0.5}
    assert st["progress"]["step"] == 10 and st["completionTime"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Succeeded"


def test_progress_merges_into_status():
    out = jobs.observe({"phase": "Running", "attempts": 1, "progress": {"step": 1, "totalSteps": 10}},
                       _obs("RUNNING", progress={"step": 4, "totalSteps": None, "loss": 2.0}), RETRY, NOW)
    assert out.status["progress"] == {"step": 4, "totalSteps": 10, "loss": 2.0}


@pytest.mark.parametrize("attempts, phase, delay", [(1, "Pending", 10), (2, "Pending", 20), (3, "Failed", None)])
def test_backoff_limit_and_delays(attempts, phase, delay):
    out = jobs.observe({"phase": "Running", "attempts": attempts}, _obs("FAILED"), RETRY, NOW)
    assert out.status["phase"] == phase
    if delay is None:
        assert "backoffLimit 2 reached" in out.status["message"] and "retryAt" not in out.status
    else:
        assert not jobs.retry_due(out.status, NOW + delay - 2)
        assert jobs.retry_due(out.status, NOW + delay + 1)


def test_retry_delay_is_capped():
    assert jobs.Retry(10, 10, 60).delay(8) == 60


def test_backoff_limit_zero_fails_at_once():
    out = jobs.observe({"phase": "Running", "attempts": 1}, _obs("FAILED"), jobs.Retry(0), NOW)
    assert out.status["phase"] == "Failed"


SFT = {"method": "sft", "student": {"config": {"hiddenSize": 64, "layers": 2, "heads": 4}}}


@pytest.mark.parametrize(
    "extra, address, path",
    [
        ({"resources": {"workers": 65}}, None, "spec.resources.workers"),
        ({"resources": {"gpusPerWorker": 9}}, None, "spec.resources.gpusPerWorker"),
        ({}, "ray://head:10001", "spec.ray.address"),
        ({}, "http://head:8265", None),
    ],
)
def test_operator_limits_name_the_field(extra, address, path):
    spec = parse_spec("DistillationJob", {**SFT, **extra})
    errors = jobs.check_limits(spec, 64, 8, True, address)
    assert [e.path for e in errors] == ([path] if path else [])


@pytest.mark.parametrize(
    "rayjob, state",
    [
        (None, None),
        ({"status": {}}, "PENDING"),
        ({"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}, "RUNNING"),
        ({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}, "SUCCEEDED"),
        ({"status": {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}}, "FAILED"),
        ({"status": {"jobDeploymentStatus": "Suspended"}}, "PENDING"),
    ],
)
def test_rayjob_state(rayjob, state):
    assert jobs.ray_job_state(rayjob)[0] == state


def test_a_rayjob_held_by_kueue_says_which_queue_it_waits_in():
    rayjob = {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "team-a"}},
              "spec": {"suspend": True}, "status": {"jobDeploymentStatus": "Suspended"}}
    state, message = jobs.ray_job_state(rayjob)
    assert state == "PENDING" and message == "queued in Kueue LocalQueue team-a: waiting for admission (quota)"
    # Before KubeRay's first pass (no status yet) it is the same wait.
    assert jobs.ray_job_state({**rayjob, "status": {}})[1] == message
    # The resource's status says so while it waits, then that Kueue admitted it.
    submitted = {"phase": "Submitted", "attempts": 1, "message": "attempt 1: submitted to RayJob x"}
    waiting = jobs.observe(submitted, _obs("PENDING", message=message), RETRY, 0.0).status
    assert waiting["phase"] == "Submitted" and waiting["message"] == message
    admitted = jobs.observe(waiting, _obs("PENDING", message="Initializing"), RETRY, 1.0).status
    assert admitted["phase"] == "Submitted" and admitted["message"] == "admitted by Kueue: Initializing"
    assert jobs.observe(submitted, _obs("PENDING", message="Initializing"), RETRY, 0.0).status["message"] == \
        submitted["message"]  # any other wait leaves the submission's message


def test_the_operator_context_is_the_recipe_job_context_with_attempt_tags():
    from anneal.distill.recipe import JobContext

    spec = parse_spec("DistillationJob", SFT)

    class Op:
        settings = OperatorSettings(tracking_uri="http://mlflow:5000")

    rec = jobs.JobReconciler.__new__(jobs.JobReconciler)
    rec.op, rec.kind = Op(), "DistillationJob"
    ctx = rec.context(spec, {"namespace": "ns", "name": "j", "uid": "u"}, "run1", {"teacher": "models:/t/1"})
    assert set(ctx) == {f.name for f in fields(JobContext)}
    jc = JobContext(**ctx)
    assert jc.run_id == "run1" and jc.tracking_uri == "http://mlflow:5000" and jc.registered_model_name == "ns.j"
    # An attempt's context tags the run the recipe creates, so the operator can find it by submission id.
    tagged = JobContext(**rec.context(spec, {"namespace": "ns", "name": "j", "uid": "u"}, None, {}, attempt=2))
    assert tagged.lineage_tags()["anneal.attempt"] == "2"
    assert tagged.lineage_tags()["anneal.submission_id"] == jobs.submission_id("ns", "j", "u", 2)


# ----------------------------------------------------------------------------- pipeline

PIPE = {
    "stages": [
        {"name": "teacher", "distillation": SFT},
        {"name": "student", "distillation": {"method": "kd", "teacher": {"fromStage": "teacher"},
                                              "student": {"config": {"hiddenSize": 32, "layers": 1, "heads": 2}}},
         "gate": {"metric": "retention", "min": 0.8}},
        {"name": "small", "compression": {"model": {"fromStage": "student"}, "quantization": {"scheme": "W8A16"}}},
    ]
}


def _child(phase, **status):
    return {"metadata": {"name": "x"}, "status": {"phase": phase, **status}}


def _advance(spec, status, children):
    return advance(spec, status, children, "p", "ns")


def test_pipeline_creates_first_stage_then_waits():
    spec = parse_spec("ModelPipeline", PIPE)
    st, create, _ = _advance(spec, {}, {})
    assert create["metadata"]["name"] == "p-teacher" and st["phase"] == "Running" and st["currentStage"] == "teacher"
    st, create, _ = _advance(spec, st, {"teacher": _child("Running")})
    assert create is None and st["stages"]["teacher"]["phase"] == "Running"


def test_pipeline_moves_on_and_resolves_from_stage():
    spec = parse_spec("ModelPipeline", PIPE)
    st, child, _ = _advance(spec, {}, {"teacher": _child("Succeeded", modelUri="models:/t/1")})
    assert child["metadata"]["name"] == "p-student" and child["kind"] == "DistillationJob"
    assert child["spec"]["teacher"] == {"uri": "models:/t/1"}
    assert child["metadata"]["labels"] == {"anneal.dev/pipeline": "p", "anneal.dev/stage": "student"}
    parse_spec("DistillationJob", child["spec"])  # the child is a valid job on its own


def test_pipeline_gate_failure_names_the_stage():
    spec = parse_spec("ModelPipeline", PIPE)
    children = {"teacher": _child("Succeeded", modelUri="models:/t/1"),
                "student": _child("Succeeded", modelUri="models:/s/1", metrics={"retention": 0.5})}
    st, create, events = _advance(spec, {}, children)
    assert create is None and st["phase"] == "Failed"
    assert "stage student gate failed" in st["message"] and "retention=0.5 < min 0.8" in st["message"]
    assert st["stages"]["student"]["gate"].startswith("failed: ")
    assert events[-1][1] == "GateFailed"


def test_pipeline_gate_without_its_figure_fails():
    spec = parse_spec("ModelPipeline", PIPE)
    children = {"teacher": _child("Succeeded", modelUri="models:/t/1"),
                "student": _child("Succeeded", modelUri="models:/s/1", metrics={"accuracy": 0.4})}
    st, create, _ = _advance(spec, {}, children)
    assert create is None and st["phase"] == "Failed" and "cannot be evaluated" in st["message"]


@pytest.mark.parametrize("phase", ["Failed", "Rejected", "Cancelled", "RolledBack"])
def test_pipeline_failed_stage_fails_the_pipeline(phase):
    spec = parse_spec("ModelPipeline", PIPE)
    st, _, _ = _advance(spec, {}, {"teacher": _child(phase, message="OOM")})
    assert st["phase"] == "Failed" and st["message"].startswith(f"stage teacher (DistillationJob/x) ended {phase}: OOM")
    assert _advance(spec, st, {})[0] == st  # ended: nothing more happens, even with the child gone


def test_pipeline_succeeds_when_every_stage_is_done():
    spec = parse_spec("ModelPipeline", PIPE)
    children = {"teacher": _child("Succeeded", modelUri="models:/t/1"),
                "student": _child("Succeeded", modelUri="models:/s/1", metrics={"retention": 0.9}),
                "small": _child("Succeeded", modelUri="models:/c/1")}
    st, create, _ = _advance(spec, {}, children)
    assert create is None and st["phase"] == "Succeeded" and st["stages"]["student"]["gate"].startswith("passed")
    assert st["modelUri"] == "models:/c/1" and "currentStage" not in st


def test_pipeline_deleted_finished_child_is_not_recreated():
    spec = parse_spec("ModelPipeline", PIPE)
    st, _, _ = _advance(spec, {}, {"teacher": _child("Succeeded", modelUri="models:/t/1")})
    st, create, _ = _advance(spec, st, {})  # the teacher's resource was deleted since
    assert create["metadata"]["name"] == "p-student" and create["spec"]["teacher"] == {"uri": "models:/t/1"}


def test_pipeline_stage_without_the_model_it_refers_to_fails():
    spec = parse_spec("ModelPipeline", PIPE)
    st, create, _ = _advance(spec, {}, {"teacher": _child("Succeeded")})  # no modelUri
    assert create is None and st["phase"] == "Failed" and "stage 'teacher' produced no model" in st["message"]


def test_resolve_stage_refs_needs_the_earlier_output():
    with pytest.raises(KeyError):
        resolve_stage_refs({"model": {"fromStage": "a"}}, {})


# ------------------------------------------------------------------------------ service


def test_service_names_and_endpoints():
    assert service.app_name("ns", "svc") == "ns_svc"
    assert service.app_name("a-b", "c") != service.app_name("a", "b-c")
    assert service.shared_endpoint("http://10.0.0.5:8265", "ns", "svc") == "http://10.0.0.5:8000/ns/svc"
    assert service.rayservice_endpoint("svc-serve", "ns", "svc").startswith("http://svc-serve-serve-svc.ns.svc:8000")
    variant = {"name": "variant-a", "user_config": {"model_uri": "models:/m/1"}}
    e1 = {"name": "a", "args": {"x": 1}, "deployments": [{"name": "router", "user_config": {"weights": {"a": 100}}},
                                                         variant]}
    e2 = {**e1, "deployments": [{"name": "router", "user_config": {"weights": {"a": 50}}}, variant]}
    assert service.args_hash(e1) == service.args_hash(e2)  # weights change in place
    assert service.args_hash(e1) != service.args_hash({**e1, "args": {"x": 2}})
    # A variant's model change must redeploy (it is in that variant's user_config, not in args).
    moved = {**e1, "deployments": [e1["deployments"][0], {**variant, "user_config": {"model_uri": "models:/m/2"}}]}
    assert service.args_hash(e1) != service.args_hash(moved)


@pytest.mark.parametrize("state, phase", [("RUNNING", "Ready"), ("DEPLOYING", "Deploying"), (None, "Deploying"),
                                          ("DEPLOY_FAILED", "Failed"), ("Running", "Ready")])
def test_serve_phase(state, phase):
    assert service.serve_phase(state) == phase


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("ANNEAL_OPERATOR_NAMESPACES", "a, b,")
    monkeypatch.setenv("ANNEAL_OPERATOR_RAY_ADDRESS", "http://ray:8265")
    monkeypatch.setenv("ANNEAL_OPERATOR_MAX_WORKERS", "8")
    s = OperatorSettings()
    assert s.namespaces == ["a", "b"] and s.ray_address == "http://ray:8265" and s.max_workers == 8
    monkeypatch.setenv("ANNEAL_OPERATOR_GANG_SCHEDULER", "slurm")
    with pytest.raises(ValueError):
        OperatorSettings()


def test_a_shared_volume_must_hold_the_work_and_cache_dirs():
    ok = OperatorSettings(shared_volume_claim="rwx", shared_volume_path="/mnt/anneal/",
                          work_dir="/mnt/anneal/work", cache_dir="/mnt/anneal/cache")
    assert ok.shared_volume_claim == "rwx"
    with pytest.raises(ValueError, match=r"mounted at /mnt/anneal/, but work_dir=/tmp/anneal/work and "
                                         r"cache_dir=/tmp/anneal/cache are not under it"):
        OperatorSettings(shared_volume_claim="rwx")
    with pytest.raises(ValueError, match="not under it"):  # a sibling path is not inside
        OperatorSettings(shared_volume_claim="rwx", work_dir="/mnt/anneal-old/w", cache_dir="/mnt/anneal/c")
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        OperatorSettings(shm_size="lots")
    assert OperatorSettings(shm_size="16Gi").shm_size == "16Gi"


def test_operator_context_has_the_io_the_handlers_use():
    from anneal_operator.context import OperatorContext

    for name in ("get", "jobs_client", "write_status", "current_status", "lock", "forget"):
        assert callable(getattr(OperatorContext, name)), name


def _context(factory=None):
    from anneal_operator.context import OperatorContext
    from anneal_operator.settings import OperatorSettings
    from kubernetes import client

    return OperatorContext(settings=OperatorSettings(), api_client=client.ApiClient(), jobs_client_factory=factory)


def test_due_paces_reads_per_key_and_forget_resets():
    op = _context()
    assert op.due("progress/u1", 30, now=100.0)
    assert not op.due("progress/u1", 30, now=129.9)
    assert op.due("progress/u2", 30, now=110.0)  # keys are independent
    assert op.due("progress/u1", 30, now=130.0)
    op.forget("u1")
    assert op.due("progress/u1", 30, now=131.0)  # a forgotten object starts over
    assert not op.due("progress/u2", 30, now=131.0)


def test_jobs_clients_are_shared_per_address_and_closed_once():
    made, closed = [], []

    class Client:
        def __init__(self, address):
            self.address = address
            made.append(address)

        def close(self):
            closed.append(self.address)

    op = _context(Client)
    a1, a2, b = op.jobs_client("http://a:8265"), op.jobs_client("http://a:8265"), op.jobs_client("http://b:8265")
    assert a1 is a2 and a1 is not b and made == ["http://a:8265", "http://b:8265"]
    op.close()
    assert sorted(closed) == ["http://a:8265", "http://b:8265"]
    assert op.jobs_client("http://a:8265") is not a1  # a closed client is not handed out again


@pytest.mark.parametrize(
    "old, new, patch",
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2, "b": 3}, {"a": 2, "b": 3}),
        ({"a": 1, "gone": 2}, {"a": 1}, {"gone": None}),
        # A key removed inside a nested object is nulled at its own depth (a top-level replace
        # would be merged into the stored object by the API server and keep the key).
        ({"rollout": {"step": 1, "holding": "no stats"}}, {"rollout": {"step": 1}}, {"rollout": {"holding": None}}),
        ({"rollout": {"h": {"x": 1, "y": 2}}}, {"rollout": {"h": {"x": 1}}}, {"rollout": {"h": {"y": None}}}),
        ({"weights": {"a": 50, "b": 50}}, {"weights": {"a": 100}}, {"weights": {"a": 100, "b": None}}),
        ({"history": [1, 2]}, {"history": [1, 2, 3]}, {"history": [1, 2, 3]}),
        ({"rollout": None}, {"rollout": {"step": 0}}, {"rollout": {"step": 0}}),
    ],
)
def test_merge_patch_removes_keys_at_every_depth(old, new, patch):
    from anneal_operator.context import merge_patch

    assert merge_patch(old, new) == patch
    assert _apply_merge_patch(old, patch) == new


def _apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _apply_merge_patch(out.get(k), v)
    return out


def test_bounded_cleanup_retries_then_gives_up_with_a_warning(monkeypatch):
    import datetime

    import kopf

    from anneal_operator import context

    posted = []
    monkeypatch.setattr(context, "event", lambda body, type_, reason, msg: posted.append((type_, reason, msg)))

    def unreachable():
        raise kopf.TemporaryError("Serve REST API http://ray:8265: connection refused", delay=10)

    with pytest.raises(kopf.TemporaryError):  # within the limit: kopf retries
        context.bounded_cleanup({}, datetime.timedelta(seconds=10), 300, "remove Serve app a", unreachable)
    assert posted == []
    context.bounded_cleanup({}, datetime.timedelta(seconds=301), 300, "remove Serve app a", unreachable)
    assert posted[0][:2] == ("Warning", "CleanupAbandoned") and "within 300s" in posted[0][2]

    def refused():
        raise context.CleanupRefused("Serve REST API http://ray:8265 answered 403")

    context.bounded_cleanup({}, datetime.timedelta(seconds=1), 300, "remove Serve app a", refused)
    assert "403" in posted[1][2]


@pytest.mark.parametrize(
    "address, tracking, allowed_ray, allowed_tracking, bad",
    [
        (None, None, "", "", []),  # the operator's defaults
        ("http://ray-head:8265", None, "", "", []),  # = RAY_ADDRESS
        ("http://ray-head:8265/", None, "", "", []),
        ("http://evil.example:8265", None, "", "", ["spec.ray.address"]),
        ("http://evil.example:8265", "http://mine:5000", "*", "", ["spec.mlflow.trackingUri"]),
        ("http://127.0.0.1:40123", None, "http://127.0.0.1:", "", []),
        ("http://ray-b:8265", None, "http://ray-a:8265,http://ray-b", "", []),  # host prefix: any port
        ("http://ray-b.evil.example:8265", None, "http://ray-b", "", ["spec.ray.address"]),  # not a boundary
        (None, "http://mlflow.team-a:5000", "", "http://mlflow.team-a", []),
        (None, "http://mlflow.anneal.svc:5000", "", "", []),  # = TRACKING_URI
    ],
)
def test_tenant_endpoints_must_be_allowlisted(monkeypatch, address, tracking, allowed_ray, allowed_tracking, bad):
    from anneal.api.service import ModelServiceSpec
    from anneal_operator.settings import OperatorSettings, endpoint_problems

    monkeypatch.setenv("ANNEAL_OPERATOR_RAY_ADDRESS", "http://ray-head:8265")
    monkeypatch.setenv("ANNEAL_OPERATOR_TRACKING_URI", "http://mlflow.anneal.svc:5000")
    monkeypatch.setenv("ANNEAL_OPERATOR_ALLOWED_RAY_ADDRESSES", allowed_ray)
    monkeypatch.setenv("ANNEAL_OPERATOR_ALLOWED_TRACKING_URIS", allowed_tracking)
    spec = ModelServiceSpec.model_validate({
        "variants": [{"name": "a", "model": {"uri": "/m"}}],
        "ray": {"address": address} if address else {},
        "mlflow": {"trackingUri": tracking} if tracking else {},
    })
    problems = endpoint_problems(spec, OperatorSettings())
    assert [p.path for p in problems] == bad
    for p in problems:
        assert "ANNEAL_OPERATOR_ALLOWED_" in p.rule
