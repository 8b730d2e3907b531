"""Pure plans of a job workload: the deterministic submission id, the entrypoint and the runtime env.

The operator (shared Ray cluster: Ray Jobs API; per-job cluster: KubeRay `RayJob`) and any
other submitter call these; they take everything as arguments and touch nothing.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from typing import Any, Mapping

from anneal.runtime.secrets import plain_env, redact_spec

#: The recipe module each job kind runs (`python -m <module> --job <json>`).
RECIPES = {
    "DistillationJob": "anneal.distill.recipe",
    "CompressionJob": "anneal.compress.recipe",
}

#: Environment every workload gets (tokenizers' own threads fight Ray's).
BASE_ENV = {"TOKENIZERS_PARALLELISM": "false"}

_MAX_ID = 63


@dataclass(frozen=True)
class JobPlan:
    """What one attempt of a job submits: the same for the Jobs API and a KubeRay RayJob."""

    kind: str
    namespace: str
    name: str
    attempt: int
    submission_id: str
    entrypoint: str
    #: The only place envVars values go (not in repr: a logged plan must not show them).
    runtime_env: dict[str, Any] = field(default_factory=dict, repr=False)
    metadata: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None

    def jobs_api_request(self) -> dict[str, Any]:
        """The body of `POST /api/jobs/` (Ray Jobs API)."""
        body: dict[str, Any] = {
            "entrypoint": self.entrypoint,
            "submission_id": self.submission_id,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
        }
        if self.entrypoint_num_cpus is not None:
            body["entrypoint_num_cpus"] = self.entrypoint_num_cpus
        return body


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c == "-" else "-" for c in text.lower())
    return out.strip("-") or "x"


def submission_id(namespace: str, name: str, uid: str, attempt: int) -> str:
    """A deterministic Ray submission id for one attempt of one resource.

    The same (resource uid, attempt) always gives the same id, so a restarted operator that
    re-submits finds the job already there instead of starting a second one. The uid part
    keeps a deleted-and-recreated resource of the same name from colliding with the old job.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    digest = hashlib.sha256(f"{namespace}/{name}/{uid}".encode()).hexdigest()[:10]
    suffix = f"-{digest}-a{attempt}"
    stem = _slug(f"anneal-{namespace}-{name}")[: _MAX_ID - len(suffix)].rstrip("-")
    return stem + suffix


def job_payload(spec: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """The `--job` document a recipe reads: `{"spec": ..., "context": ...}`."""
    return {"spec": dict(spec), "context": dict(context)}


def build_entrypoint(kind: str, payload: Mapping[str, Any], python: str = "python") -> str:
    """The shell command that runs the recipe of `kind` with the payload inline.

    Raises:
        ValueError: a kind without a recipe.
    """
    module = RECIPES.get(kind)
    if module is None:
        raise ValueError(f"no recipe for kind {kind!r} (expected one of {', '.join(RECIPES)})")
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{shlex.quote(python)} -m {module} --job {shlex.quote(text)}"


def build_runtime_env(runtime_env: Mapping[str, Any] | None, extra_env: Mapping[str, str] | None = None,
                      secret_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A Ray runtime env from a spec's `ray.runtimeEnv` (`pip`, `envVars`) plus operator defaults.

    A `secretKeyRef` variable is in it only with its value in `secret_env` (the submitter read
    it); without, it is left out (a RayJob's pods get it from the Secret in their `env`).
    """
    runtime_env = runtime_env or {}
    env = {**BASE_ENV, **dict(extra_env or {}), **plain_env(runtime_env), **dict(secret_env or {})}
    out: dict[str, Any] = {"env_vars": env}
    if runtime_env.get("pip"):
        out["pip"] = list(runtime_env["pip"])
    return out


@dataclass(frozen=True)
class JobInputs:
    """Everything `build_job_plan` needs (more than five things, so one object)."""

    kind: str
    namespace: str
    name: str
    uid: str
    attempt: int
    spec: Mapping[str, Any]
    context: Mapping[str, Any]
    python: str = "python"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    #: Values of the spec's `secretKeyRef` variables, when the submitter read them (Jobs API).
    secret_env: Mapping[str, str] = field(default_factory=dict, repr=False)


def build_job_plan(inputs: JobInputs) -> JobPlan:
    """The plan of one attempt of a DistillationJob or CompressionJob.

    The entrypoint carries the spec with its envVars values redacted (a command line is shown
    by `ray job list`, the dashboard and the RayJob); the values are in `runtime_env` only.
    """
    spec = inputs.spec
    payload = job_payload(redact_spec(spec), inputs.context)
    ray = spec.get("ray") or {}
    return JobPlan(
        kind=inputs.kind,
        namespace=inputs.namespace,
        name=inputs.name,
        attempt=inputs.attempt,
        submission_id=submission_id(inputs.namespace, inputs.name, inputs.uid, inputs.attempt),
        entrypoint=build_entrypoint(inputs.kind, payload, inputs.python),
        runtime_env=build_runtime_env(ray.get("runtimeEnv"), inputs.extra_env, inputs.secret_env),
        metadata={
            "anneal.dev/kind": inputs.kind,
            "anneal.dev/namespace": inputs.namespace,
            "anneal.dev/name": inputs.name,
            "anneal.dev/uid": inputs.uid,
            "anneal.dev/attempt": str(inputs.attempt),
        },
        entrypoint_num_cpus=inputs.entrypoint_num_cpus,
    )


def spec_hash(spec: Mapping[str, Any]) -> str:
    """A short, stable digest of a spec (to notice a change after submission)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
