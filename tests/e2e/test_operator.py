"""The operator against a real API server, a real local Ray head and a real MLflow server.

The operator runs as a subprocess (`python -m anneal_operator`), one per test, watching only
that test's namespace, so a test can SIGKILL it mid-job and start another.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import yaml

from anneal.serve.app import entry_models

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
PY = sys.executable
NS_PREFIX = "e2e-op-"

TINY_SFT = {
    "method": "sft",
    "student": {"config": {"hiddenSize": 32, "layers": 1, "heads": 2, "intermediateSize": 64}},
    "dataset": {"uri": "builtin://reasoning?difficulty=1&seed=3", "samples": 64, "maxSeqLength": 64},
    "training": {"steps": 4, "batchSize": 4, "learningRate": 0.003},
    "evaluation": {"samples": 4, "reasoningModes": ["on"], "metrics": ["accuracy"], "maxNewTokens": 8},
    "resources": {"workers": 1, "cpusPerWorker": 1},
    "backoffLimit": 0,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, probe: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except Exception as exc:  # the thing may not be up yet
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process we started in its own session, and everything it started."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- services


@pytest.fixture(scope="module", autouse=True)
def _boot_services_early(e2e_services):
    """Ray and MLflow start booting now; the API-server-only tests run while they do."""
    yield


class Operator:
    """`python -m anneal_operator`, cluster-wide, shared by this module's tests (each in its own namespace)."""

    def __init__(self, kubeconfig: Path, tracking_uri: str, log_dir: Path, **env: str):
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            "ANNEAL_OPERATOR_KUBECONFIG": str(kubeconfig),
            # Cluster-wide: one watch per kind from the start. (A namespace glob makes kopf
            # discover namespaces as they come, which under load missed a test's namespace.)
            "ANNEAL_OPERATOR_NAMESPACES": "",
            "ANNEAL_OPERATOR_TRACKING_URI": tracking_uri,
            # The tests' resources name the session's Ray head (any loopback port) in spec.ray.address.
            "ANNEAL_OPERATOR_ALLOWED_RAY_ADDRESSES": "http://127.0.0.1:",
            "ANNEAL_OPERATOR_JOB_PYTHON": PY,
            "ANNEAL_OPERATOR_POLL_INTERVAL": "1",
            "ANNEAL_OPERATOR_LEADER_ELECTION": "false",
            "ANNEAL_OPERATOR_METRICS_PORT": str(_free_port()),
            "ANNEAL_OPERATOR_HEALTH_PORT": str(_free_port()),
            "ANNEAL_OPERATOR_BIND_ADDRESS": "127.0.0.1",
            "ANNEAL_OPERATOR_WORK_DIR": str(log_dir / "work"),
            "ANNEAL_OPERATOR_CACHE_DIR": str(log_dir / "cache"),
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "Operator":
        self.starts += 1
        with open(self.log_dir / f"operator-{self.starts}.log", "w") as log:
            self.proc = subprocess.Popen([PY, "-m", "anneal_operator"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        port = self.env["ANNEAL_OPERATOR_HEALTH_PORT"]
        _wait("operator readiness", lambda: self.alive() and httpx.get(f"http://127.0.0.1:{port}/readyz",
                                                                     timeout=2).status_code == 200, 120)
        return self

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"operator exited: {self.log()[-3000:]}")
        return True

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizers, like a node going away."""
        assert self.proc is not None
        _stop_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM, 10)

    def log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.log_dir.glob("operator-*.log")))


@pytest.fixture(scope="module")
def operator(kube_cluster, mlflow_server):
    """The module's one operator process (a test may kill and restart it)."""
    # Outside pytest's basetemp: concurrent pytest sessions prune each other's numbered directories.
    op = Operator(kube_cluster.kubeconfig, mlflow_server, Path(tempfile.mkdtemp(prefix="anneal-e2e-operator-")))
    op.start()
    yield op
    op.stop()


@pytest.fixture
def op_namespace(kube_cluster, operator, request) -> str:
    """A fresh namespace for a test that needs the running operator; deleted afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = f"{NS_PREFIX}{stem}-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


# ------------------------------------------------------------------------------ helpers


def _apply(kube, namespace: str, doc: dict[str, Any], check: bool = True):
    return kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=check)


def _get(kube, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    p = kube.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(p.stdout) if p.returncode == 0 else None


def _status(kube, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return (_get(kube, namespace, kind, name) or {}).get("status") or {}


def _job(name: str, spec: dict[str, Any], kind: str = "DistillationJob") -> dict[str, Any]:
    return {"apiVersion": "anneal.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def _events(kube, namespace: str, name: str) -> list[dict[str, Any]]:
    p = kube.kubectl("get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}", "-o", "json")
    return json.loads(p.stdout)["items"]


def _ray_jobs_of(ray: str, uid: str) -> list[dict[str, Any]]:
    jobs = httpx.get(ray + "/api/jobs/", timeout=10).json()
    return [j for j in jobs if (j.get("metadata") or {}).get("anneal.dev/uid") == uid]


# -------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_manifests_are_accepted_by_the_api_server(kube_cluster, namespace, path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    out = kube_cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    assert out.stdout.count("created") == len(docs)
    for d in docs:
        assert _get(kube_cluster, namespace, d["kind"], d["metadata"]["name"]) is not None


@pytest.mark.parametrize(
    "spec, named",
    [
        ({**TINY_SFT, "method": "distill"}, "spec.method"),
        ({k: v for k, v in TINY_SFT.items() if k != "student"}, "spec.student"),
        ({**TINY_SFT, "training": {"steps": 0}}, "spec.training.steps"),
        ({**TINY_SFT, "method": "kd"}, "teacher is required"),  # CEL
        ({**TINY_SFT, "student": {"uri": "file:///m", "config": {"hiddenSize": 8, "layers": 1, "heads": 1}}},
         "exactly one of uri"),  # CEL
        ({**TINY_SFT, "method": "lora-kd", "teacher": {"uri": "file:///t"}, "training": {"strategy": "fsdp"}},
         "strategy fsdp is supported for methods sft, cpt and kd"),  # CEL
        ({**TINY_SFT, "method": "cpt"}, "method cpt trains on raw text"),  # CEL: the default format is chat
    ],
    ids=["enum", "required", "minimum", "cel-teacher", "cel-one-of", "cel-fsdp-method", "cel-cpt-text"],
)
def test_malformed_manifests_are_rejected_at_apply_naming_the_field(kube_cluster, namespace, spec, named):
    p = _apply(kube_cluster, namespace, _job("bad", spec), check=False)
    assert p.returncode != 0 and named in p.stderr, p.stderr


@pytest.mark.parametrize("variant", [
    {"name": "ext", "engine": "openai"},                                   # no backend
    {"name": "a"},                                                         # no model
    {"name": "a", "model": {"uri": "file:///m"}, "backend": {"url": "http://vllm:8000/v1", "model": "m"}},
], ids=["openai-without-backend", "transformers-without-model", "backend-without-openai"])
def test_variant_engine_rules_are_checked_at_apply(kube_cluster, namespace, variant):
    p = _apply(kube_cluster, namespace, _job("bad-svc", {"variants": [variant]}, kind="ModelService"), check=False)
    assert p.returncode != 0 and "an openai variant needs backend" in p.stderr, p.stderr


def test_per_job_path_creates_owned_rayjob_and_rayservice_with_gpu_settings(kube_cluster, op_namespace, operator):
    gpu = {"workers": 2, "gpusPerWorker": 1, "cpusPerWorker": 4, "memory": "32Gi", "acceleratorType": "H100",
           "nodeSelector": {"pool": "gpu"}, "priorityClassName": "system-cluster-critical", "queue": "team-a",
           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    _apply(kube_cluster, op_namespace, _job("gpu-job", {**TINY_SFT, "resources": gpu, "activeDeadlineSeconds": 3600}))
    svc = {"variants": [{"name": "stable", "model": {"uri": "file:///models/a"}, "weight": 100, "resources": gpu}]}
    _apply(kube_cluster, op_namespace, _job("svc", svc, kind="ModelService"))

    st = _wait("RayJob submission", lambda: (s := _status(kube_cluster, op_namespace, "dj", "gpu-job")).get("phase") == "Submitted" and s, 90)
    rj = _get(kube_cluster, op_namespace, "rayjob", st["rayCluster"])
    assert rj is not None, "the RayJob was not created"
    assert rj["metadata"]["ownerReferences"][0]["uid"] == _get(kube_cluster, op_namespace, "dj", "gpu-job")["metadata"]["uid"]
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert rj["spec"]["jobId"] == st["submissionId"] and rj["spec"]["activeDeadlineSeconds"] == 3600
    assert rj["spec"]["shutdownAfterJobFinishes"] is True and "ttlSecondsAfterFinished" in rj["spec"]
    worker = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    pod = worker["template"]["spec"]
    assert worker["replicas"] == 2
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]["pool"] == "gpu" and pod["priorityClassName"] == "system-cluster-critical"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"

    rs_name = _wait("RayService", lambda: _status(kube_cluster, op_namespace, "msvc", "svc").get("rayService"), 90)
    rs = _get(kube_cluster, op_namespace, "rayservice", rs_name)
    apps = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    # "_" never occurs in a Kubernetes name, so <namespace>_<name> cannot collide.
    assert apps[0]["name"] == f"{op_namespace}_svc" and entry_models(apps[0]) == {"stable": "file:///models/a"}
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["nvidia.com/gpu"] == "1"

    # Jobs are immutable once submitted: an edit is refused with an event, nothing resubmitted.
    kube_cluster.kubectl("patch", "dj", "gpu-job", "-n", op_namespace, "--type=merge", "-p",
                         json.dumps({"spec": {"training": {"steps": 8}}}))
    _wait("SpecChangeRefused event", lambda: any(e["reason"] == "SpecChangeRefused"
                                                 for e in _events(kube_cluster, op_namespace, "gpu-job")), 30)
    assert _status(kube_cluster, op_namespace, "dj", "gpu-job")["submissionId"] == st["submissionId"]

    # Deleting the job takes its RayJob with it (finalizer, then garbage collection).
    kube_cluster.kubectl("delete", "dj", "gpu-job", "-n", op_namespace, "--timeout=60s")
    _wait("RayJob deletion", lambda: _get(kube_cluster, op_namespace, "rayjob", st["rayCluster"]) is None, 60)


def test_cross_field_error_gives_invalid_spec_and_a_warning_event(kube_cluster, op_namespace, operator):
    bad = {**TINY_SFT, "student": {"config": {"hiddenSize": 30, "layers": 1, "heads": 4}}}
    _apply(kube_cluster, op_namespace, _job("uneven", bad))
    st = _wait("InvalidSpec", lambda: (s := _status(kube_cluster, op_namespace, "dj", "uneven")).get("conditions") and s, 60)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.student.config.hiddenSize" in ready["message"] and "submissionId" not in st
    events = _wait("Warning event", lambda: [e for e in _events(kube_cluster, op_namespace, "uneven")
                                            if e["reason"] == "InvalidSpec"], 30)
    assert events[0]["type"] == "Warning" and "spec.student.config.hiddenSize" in events[0]["message"]


def test_pipeline_creates_stages_in_order_and_fails_naming_the_stage(kube_cluster, op_namespace, operator):
    pipe = {"stages": [
        {"name": "teacher", "distillation": TINY_SFT, "gate": {"metric": "studentAccuracy", "min": 0.0}},
        {"name": "small", "compression": {"model": {"fromStage": "teacher"}, "quantization": {"scheme": "W8A16", "algorithm": "rtn"}}},
    ]}
    _apply(kube_cluster, op_namespace, _job("pipe", pipe, kind="ModelPipeline"))
    _wait("stage 1", lambda: _get(kube_cluster, op_namespace, "dj", "pipe-teacher"), 60)
    assert _get(kube_cluster, op_namespace, "compressionjobs.anneal.dev", "pipe-small") is None  # not before stage 1 is done
    # Play the Ray side of stage 1: it succeeded and registered a model.
    kube_cluster.kubectl("patch", "dj", "pipe-teacher", "-n", op_namespace, "--subresource=status", "--type=merge", "-p",
                         json.dumps({"status": {"phase": "Succeeded", "modelUri": "models:/teacher/1",
                                                "metrics": {"studentAccuracy": 0.25}}}))
    try:
        cj = _wait("stage 2", lambda: _get(kube_cluster, op_namespace, "compressionjobs.anneal.dev", "pipe-small"), 60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\npipeline: {_status(kube_cluster, op_namespace, 'mpipe', 'pipe')}\n"
                             f"stage 1: {_status(kube_cluster, op_namespace, 'dj', 'pipe-teacher')}") from None
    assert cj["spec"]["model"] == {"uri": "models:/teacher/1"}
    assert cj["metadata"]["ownerReferences"][0]["kind"] == "ModelPipeline"
    kube_cluster.kubectl("patch", "compressionjobs.anneal.dev", "pipe-small", "-n", op_namespace, "--subresource=status", "--type=merge", "-p",
                         json.dumps({"status": {"phase": "Failed", "message": "out of memory"}}))
    st = _wait("pipeline failure", lambda: (s := _status(kube_cluster, op_namespace, "mpipe", "pipe")).get("phase") == "Failed" and s, 60)
    assert "stage small" in st["message"] and "out of memory" in st["message"]
    assert st["stages"]["teacher"]["gate"].startswith("passed")


def test_lease_lets_one_replica_lead(kube_cluster, namespace):
    from anneal_operator.lease import LeaderElector

    with kube_cluster.api_client() as api:
        a = LeaderElector(api, "anneal-operator", namespace, "replica-a", duration=30)
        b = LeaderElector(api, "anneal-operator", namespace, "replica-b", duration=30)
        assert a.try_acquire() and a.try_acquire()  # renewing its own Lease
        assert not b.try_acquire()
        a.is_leader.set()
        a.release()
        assert b.try_acquire() and not a.try_acquire()


def test_shared_cluster_sft_job_survives_an_operator_kill(kube_cluster, op_namespace, operator, ray_head, mlflow_server):
    op = operator
    spec = {**TINY_SFT, "ray": {"address": ray_head},
            "mlflow": {"experiment": f"e2e-{op_namespace}", "registeredModelName": f"tiny-{op_namespace}"}}
    _apply(kube_cluster, op_namespace, _job("tiny", spec))
    uid = _wait("resource", lambda: _get(kube_cluster, op_namespace, "dj", "tiny"), 30)["metadata"]["uid"]
    st = _wait("submission", lambda: (s := _status(kube_cluster, op_namespace, "dj", "tiny")).get("phase") in ("Submitted", "Running") and s, 120)
    sid = st["submissionId"]

    op.kill()  # mid-job: no chance to clean up
    op.start()
    st = _wait("Succeeded", lambda: (s := _status(kube_cluster, op_namespace, "dj", "tiny")).get("phase") in
               ("Succeeded", "Failed") and s, 420, 2)
    assert st["phase"] == "Succeeded", st.get("message")
    assert st["submissionId"] == sid and st["attempts"] == 1
    assert [j["submission_id"] for j in _ray_jobs_of(ray_head, uid)] == [sid]  # one submission, not two
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 4
    assert st["observedGeneration"] == 1

    from mlflow import MlflowClient

    # The job created its run, tagged with its submission id: one run for the resource, the one in
    # status, and the registered version comes from it.
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(f"e2e-{op_namespace}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`anneal.uid` = '{uid}'")
    assert [r.info.run_id for r in runs] == [st["mlflowRunId"]]
    assert runs[0].data.tags["anneal.submission_id"] == sid and runs[0].data.tags["anneal.attempt"] == "1"
    name, version = st["modelUri"][len("models:/"):].split("/")
    assert client.get_model_version(name, version).run_id == st["mlflowRunId"]
    # `kubectl anneal lineage` reads the same from the registry.
    out = kube_cluster.kubectl_plugin("anneal", "lineage", "tiny", "--kind", "dj", "-n", op_namespace,
                                      "--tracking-uri", mlflow_server).stdout
    assert out.startswith(f"output of DistillationJob/tiny: {st['modelUri']}  DistillationJob (sft)"), out
    assert f"run {st['mlflowRunId']}" in out, out
    reasons = [e["reason"] for e in _events(kube_cluster, op_namespace, "tiny")]
    assert "Submitted" in reasons and "Succeeded" in reasons


def test_deleting_a_running_job_stops_its_ray_job(kube_cluster, op_namespace, operator, ray_head):
    spec = {**TINY_SFT, "ray": {"address": ray_head}, "training": {"steps": 100000, "batchSize": 4}}
    _apply(kube_cluster, op_namespace, _job("long", spec))
    uid = _wait("resource", lambda: _get(kube_cluster, op_namespace, "dj", "long"), 30)["metadata"]["uid"]
    _wait("Ray job running", lambda: any(j["status"] == "RUNNING" for j in _ray_jobs_of(ray_head, uid)), 180, 2)
    kube_cluster.kubectl("delete", "dj", "long", "-n", op_namespace, "--timeout=90s")
    assert _get(kube_cluster, op_namespace, "dj", "long") is None
    jobs = _wait("Ray job stopped", lambda: (j := _ray_jobs_of(ray_head, uid)) and all(
        x["status"] in ("STOPPED", "FAILED") for x in j) and j, 60)
    assert [j["status"] for j in jobs] == ["STOPPED"]


def test_a_job_edited_mid_run_is_observed_to_its_result_where_it_was_submitted(kube_cluster, op_namespace, operator,
                                                                               ray_head, mlflow_server):
    """An edit pointing ray.address and mlflow elsewhere (the MLflow URI one the operator's allowlist refuses)
    changes nothing for the running attempt: its result is read from the run it created, at the server it used."""
    experiment = f"e2e-edit-{op_namespace}"
    spec = {**TINY_SFT, "ray": {"address": ray_head}, "mlflow": {"trackingUri": mlflow_server, "experiment": experiment}}
    _apply(kube_cluster, op_namespace, _job("edited-short", spec))
    _wait("submission", lambda: _status(kube_cluster, op_namespace, "dj", "edited-short").get("phase")
          in ("Submitted", "Running"), 120)
    patch = [{"op": "replace", "path": "/spec/ray/address", "value": "http://127.0.0.1:9"},
             {"op": "replace", "path": "/spec/mlflow/trackingUri", "value": "http://127.0.0.1:9"},
             {"op": "replace", "path": "/spec/mlflow/experiment", "value": "somewhere-else"}]
    kube_cluster.kubectl("patch", "dj", "edited-short", "-n", op_namespace, "--type=json", "-p", json.dumps(patch))
    st = _wait("the edit refused", lambda: (s := _status(kube_cluster, op_namespace, "dj", "edited-short")).get(
        "refusedGeneration") and s, 60)
    assert st["phase"] in ("Submitted", "Running"), st  # refused while the attempt runs, not after it ended
    st = _wait("Succeeded", lambda: (s := _status(kube_cluster, op_namespace, "dj", "edited-short")).get("phase") in
               ("Succeeded", "Failed") and s, 420, 2)
    assert st["phase"] == "Succeeded", st.get("message")
    assert st["refusedGeneration"] == 2 and st["attempts"] == 1, st
    assert (st["rayAddress"], st["trackingUri"], st["experiment"]) == (ray_head, mlflow_server, experiment), st
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=mlflow_server).get_run(st["mlflowRunId"]).info.status == "FINISHED"
    assert st["modelUri"].startswith("models:/"), st
    reasons = [e["reason"] for e in _events(kube_cluster, op_namespace, "edited-short")]
    assert "SpecChangeRefused" in reasons and "InvalidSpec" not in reasons, reasons


def test_a_spec_edited_mid_job_does_not_orphan_its_ray_job(kube_cluster, op_namespace, operator, ray_head):
    """The job keeps being observed and stopped where it was submitted, whatever `ray.address` says now."""
    spec = {**TINY_SFT, "ray": {"address": ray_head}, "training": {"steps": 100000, "batchSize": 4}}
    _apply(kube_cluster, op_namespace, _job("edited", spec))
    uid = _wait("resource", lambda: _get(kube_cluster, op_namespace, "dj", "edited"), 30)["metadata"]["uid"]
    _wait("Ray job running", lambda: any(j["status"] == "RUNNING" for j in _ray_jobs_of(ray_head, uid)), 180, 2)
    patch = [{"op": "replace", "path": "/spec/ray/address", "value": "http://127.0.0.1:9"}]
    kube_cluster.kubectl("patch", "dj", "edited", "-n", op_namespace, "--type=json", "-p", json.dumps(patch))
    st = _wait("the edit refused", lambda: (s := _status(kube_cluster, op_namespace, "dj", "edited")).get(
        "refusedGeneration") and s, 60)
    assert st["rayAddress"] == ray_head and st["phase"] in ("Submitted", "Running"), st
    time.sleep(3)  # a few passes against the edited spec: still observed at the real head
    assert _status(kube_cluster, op_namespace, "dj", "edited")["phase"] in ("Submitted", "Running")
    kube_cluster.kubectl("delete", "dj", "edited", "-n", op_namespace, "--timeout=90s")
    assert _get(kube_cluster, op_namespace, "dj", "edited") is None
    jobs = _wait("Ray job stopped", lambda: (j := _ray_jobs_of(ray_head, uid)) and all(
        x["status"] in ("STOPPED", "FAILED") for x in j) and j, 60)
    assert [j["status"] for j in jobs] == ["STOPPED"]
