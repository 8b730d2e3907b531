"""`spec.ray.runtimeEnv.envVars`: values are plain or `secretKeyRef`, reach the Ray runtime env only, never a command line or MLflow."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from anneal.api.crd import build_crd
from anneal.api.distillation import DistillationJobSpec
from anneal.api.resources import KINDS, ManifestError, parse_spec
from anneal.runtime import kuberay
from anneal.runtime.plan import JobInputs, build_job_plan
from anneal.runtime.secrets import REDACTED, SecretRef, redact_spec
from anneal.tracking import mlflow_store as store
from anneal_operator import jobs
from anneal_operator.settings import OperatorSettings
from tests.unit.test_operator import _apply_merge_patch

ROOT = Path(__file__).resolve().parents[2]
PLAIN = "plain-S3CRET-value"
SECRET = "hf_SECRET_from_the_secret"
HF_REF = {"secretKeyRef": {"name": "hf-token", "key": "token"}}
SFT = {"method": "sft", "student": {"config": {"hiddenSize": 64, "layers": 2, "heads": 4}}}
ENV = {"WANDB_API_KEY": PLAIN, "HF_TOKEN": HF_REF}


def _spec(env_vars: dict[str, Any], kind: str = "DistillationJob") -> Any:
    base = SFT if kind == "DistillationJob" else {"model": {"uri": "models:/m/1"}, "quantization": {"scheme": "W8A16"}}
    return parse_spec(kind, {**base, "ray": {"runtimeEnv": {"envVars": env_vars}}})


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kind", ["DistillationJob", "CompressionJob"])
def test_env_vars_take_a_plain_value_or_a_secret_key_ref(kind):
    spec = _spec({**ENV, "DOTTED": {"secretKeyRef": {"name": "team.tokens-1", "key": "HF_token.v2"}}}, kind)
    env = spec.to_dict()["ray"]["runtimeEnv"]["envVars"]
    assert env["WANDB_API_KEY"] == PLAIN
    assert env["HF_TOKEN"] == HF_REF  # the Kubernetes shape comes back as written
    assert env["DOTTED"] == {"secretKeyRef": {"name": "team.tokens-1", "key": "HF_token.v2"}}


@pytest.mark.parametrize(
    "value, path, rule",
    [
        ({"secretKeyRef": {"name": "HF_Token", "key": "token"}}, "HF_TOKEN.secretKeyRef.name", "Kubernetes object name"),
        ({"secretKeyRef": {"name": "hf-token", "key": "a/b"}}, "HF_TOKEN.secretKeyRef.key", "Secret key"),
        ({"secretKeyRef": {"name": "hf-token"}}, "HF_TOKEN.secretKeyRef.key", "required"),
        ({"secretKeyRef": {"name": "hf-token", "key": "t", "optional": True}}, "HF_TOKEN.secretKeyRef.optional",
         "unknown field"),
        ({"valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "t"}}}, "HF_TOKEN.valueFrom", "unknown field"),
        (12345, "HF_TOKEN", "must be a string"),
    ],
)
def test_a_bad_env_var_names_its_path(value, path, rule):
    with pytest.raises(ManifestError) as err:
        _spec({"HF_TOKEN": value})
    found = {e.path: e.rule for e in err.value.errors}
    assert f"spec.ray.runtimeEnv.envVars.{path}" in found, found
    assert rule in found[f"spec.ray.runtimeEnv.envVars.{path}"]


@pytest.mark.parametrize("kind", ["DistillationJob", "CompressionJob", "ModelPipeline"])
def test_the_crd_keeps_both_forms_of_an_env_var(kind):
    def env_vars_nodes(node: Any) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        found = [node["properties"]["envVars"]] if "envVars" in node.get("properties", {}) else []
        for child in list(node.get("properties", {}).values()) + [node.get("items"), node.get("additionalProperties")]:
            found += env_vars_nodes(child)
        return found

    schema = build_crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = env_vars_nodes(schema)
    assert nodes
    for node in nodes:  # a value is a string or an object: the API server keeps either, the operator validates it
        assert node["type"] == "object"
        assert node["additionalProperties"].get("x-kubernetes-preserve-unknown-fields") is True
        assert "type" not in node["additionalProperties"]


# --------------------------------------------------------------------------- never leak


def _plan(spec: Any, secret_env: dict[str, str] | None = None):
    return build_job_plan(JobInputs("DistillationJob", "team-a", "tiny", "uid-1", 1, spec.to_dict(),
                                    {"kind": "DistillationJob"}, secret_env=secret_env or {}))


def test_the_entrypoint_carries_the_keys_and_no_value():
    plan = _plan(_spec(ENV), {"HF_TOKEN": SECRET})
    assert PLAIN not in plan.entrypoint and SECRET not in plan.entrypoint
    argv = shlex.split(plan.entrypoint)
    payload = json.loads(argv[argv.index("--job") + 1])
    assert payload["spec"]["ray"]["runtimeEnv"]["envVars"] == {"WANDB_API_KEY": REDACTED, "HF_TOKEN": REDACTED}
    DistillationJobSpec.model_validate(payload["spec"])  # the recipe on the cluster still reads it
    # The runtime env is where the values go, and a logged plan does not show them.
    assert plan.jobs_api_request()["runtime_env"]["env_vars"].items() >= {"WANDB_API_KEY": PLAIN, "HF_TOKEN": SECRET}.items()
    assert PLAIN not in repr(plan) and SECRET not in repr(plan)


def test_mlflow_params_of_a_spec_carry_no_env_value():
    for spec in (_spec(ENV), DistillationJobSpec.model_validate(redact_spec(_spec(ENV).to_dict()))):
        params = dict(store.iter_params(spec.to_dict()))
        assert params["ray.runtimeEnv.envVars.WANDB_API_KEY"] == REDACTED
        assert params["ray.runtimeEnv.envVars.HF_TOKEN"] == REDACTED
        assert not any(PLAIN in v or "hf-token" in v for v in params.values())


def test_redact_spec_leaves_its_input_and_other_fields_alone():
    raw = _spec(ENV).to_dict()
    before = json.dumps(raw, sort_keys=True)
    out = redact_spec(raw)
    assert json.dumps(raw, sort_keys=True) == before
    assert {k: v for k, v in out.items() if k != "ray"} == {k: v for k, v in raw.items() if k != "ray"}
    assert out["ray"]["runtimeEnv"]["pip"] == raw["ray"]["runtimeEnv"]["pip"]
    assert redact_spec({"method": "sft"}) == {"method": "sft"}


def test_a_rayjob_reads_secret_vars_from_the_secret_in_both_pod_templates():
    spec = _spec(ENV)
    plan = _plan(spec)  # the KubeRay path reads no Secret: no values for the secretKeyRef vars
    opts = kuberay.ClusterOptions(image="img:1", ray_version="2.60.0",
                                  secret_env=(SecretRef("HF_TOKEN", "hf-token", "token"),))
    rj = kuberay.build_rayjob("tiny-dj-a1", "team-a", plan, opts)
    cluster = rj["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        env = template["spec"]["containers"][0]["env"]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in env
    assert "HF_TOKEN" not in yaml.safe_load(rj["spec"]["runtimeEnvYAML"])["env_vars"]


# ---------------------------------------------------------------------- operator passes


class ApiServer:
    """The custom-objects calls a job pass makes, answered like the API server (status merge-patched, RayJobs kept)."""

    def __init__(self, body: dict[str, Any]):
        self.body = body
        self.rayjobs: list[dict[str, Any]] = []

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, doc):
        self.body["status"] = _apply_merge_patch(self.body.get("status") or {}, doc["status"])
        self.body["metadata"]["resourceVersion"] = str(int(self.body["metadata"]["resourceVersion"]) + 1)
        return json.loads(json.dumps(self.body))

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **_):
        self.rayjobs.append(body)
        return body


class Jobs:
    """A Ray Jobs API that records what it was sent."""

    def __init__(self):
        self.plans = []

    def __call__(self, address):
        return self

    def submit(self, plan):
        self.plans.append(plan)
        return "submitted"


def _reconciler(secret_reader, ray_address=None):
    from kubernetes import client

    from anneal_operator.context import OperatorContext

    body = {"metadata": {"namespace": "team-a", "name": "tiny", "uid": "uid-1", "generation": 1,
                         "resourceVersion": "1"},
            "spec": {**SFT, "ray": {"runtimeEnv": {"envVars": ENV}}}, "status": {}}
    ray_jobs = Jobs()
    op = OperatorContext(settings=OperatorSettings(ray_address=ray_address), api_client=client.ApiClient(),
                         jobs_client_factory=ray_jobs, secret_reader=secret_reader)
    op.custom = ApiServer(body)
    return jobs.JobReconciler(op, "DistillationJob"), body, ray_jobs


def _pass(rec, body):
    snap = json.loads(json.dumps(body))
    rec.reconcile(snap, snap["metadata"])


@pytest.mark.parametrize(
    "secrets_there, why",
    [({}, "Secret hf-token does not exist in namespace team-a"),
     ({"hf-token": {"other": "eA=="}}, "Secret team-a/hf-token has no key token")],
)
def test_a_missing_secret_holds_the_submission_and_says_which(monkeypatch, secrets_there, why):
    posted = []
    monkeypatch.setattr(jobs, "event", lambda body, type_, reason, message: posted.append((type_, reason, message)))
    store_ = dict(secrets_there)
    rec, body, ray_jobs = _reconciler(lambda ns, name: store_.get(name) if ns == "team-a" else None,
                                      ray_address="http://ray-head:8265")
    _pass(rec, body)
    status = body["status"]
    assert ray_jobs.plans == []  # not submitted
    assert status["phase"] == "Pending"
    assert "spec.ray.runtimeEnv.envVars.HF_TOKEN" in status["message"] and why in status["message"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "WaitingForSecret"
    assert [(t, r) for t, r, _ in posted] == [("Warning", "SecretMissing")] and why in posted[0][2]

    _pass(rec, body)  # still missing: no second event
    assert ray_jobs.plans == [] and len(posted) == 1

    store_["hf-token"] = {"token": base64.b64encode(SECRET.encode()).decode()}
    _pass(rec, body)  # the Secret is there now: submitted, the value in the runtime env only
    assert body["status"]["phase"] == "Submitted"
    (plan,) = ray_jobs.plans
    assert plan.jobs_api_request()["runtime_env"]["env_vars"]["HF_TOKEN"] == SECRET
    assert plan.jobs_api_request()["runtime_env"]["env_vars"]["WANDB_API_KEY"] == PLAIN
    assert SECRET not in plan.entrypoint and PLAIN not in plan.entrypoint
    assert SECRET not in json.dumps(body)


def test_a_rayjob_submission_reads_no_secret_and_carries_no_value(monkeypatch):
    monkeypatch.setattr(jobs, "event", lambda *a: None)

    def no_reading(namespace, name):
        raise AssertionError("the operator read a Secret for a RayJob")

    rec, body, _ = _reconciler(no_reading)
    _pass(rec, body)
    (rayjob,) = rec.op.custom.rayjobs
    text = json.dumps(rayjob)
    assert PLAIN not in rayjob["spec"]["entrypoint"] and "hf-token" not in rayjob["spec"]["entrypoint"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert template["spec"]["containers"][0]["env"] == [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}]
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert "HF_TOKEN" not in runtime_env["env_vars"] and runtime_env["env_vars"]["WANDB_API_KEY"] == PLAIN
    assert text.count(PLAIN) == 1  # only in the runtime env
    assert body["status"]["phase"] == "Submitted"


# ------------------------------------------------------------------------------ embedded


def test_anneal_run_takes_a_secret_var_from_its_own_environment():
    from anneal.local.jobs import MissingSecretEnv, job_env

    spec = _spec(ENV)
    env = job_env(spec, environ={"HF_TOKEN": SECRET})
    assert env["HF_TOKEN"] == SECRET and env["WANDB_API_KEY"] == PLAIN
    with pytest.raises(MissingSecretEnv) as err:
        job_env(spec, environ={})
    message = str(err.value)
    assert message.startswith("spec.ray.runtimeEnv.envVars.HF_TOKEN: ") and "export HF_TOKEN" in message


def test_anneal_run_fails_before_starting_without_the_variable(tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "anneal.dev/v1alpha1", "kind": "DistillationJob", "metadata": {"name": "tiny"},
        "spec": {**SFT, "ray": {"runtimeEnv": {"envVars": ENV}}}}))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANNEAL_") and k != "HF_TOKEN"}
    res = subprocess.run([sys.executable, "-m", "anneal.cli", "run", str(manifest)], capture_output=True, text=True,
                         cwd=ROOT, env={**env, "ANNEAL_HOME": str(home)}, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "spec.ray.runtimeEnv.envVars.HF_TOKEN" in res.stderr and "export HF_TOKEN" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (home / "work").exists() and not any(home.glob("mlflow*"))  # nothing started
