"""Reconciling the two job kinds (DistillationJob, CompressionJob): plan, submit once, observe, retry.

A job runs either on a shared Ray cluster (`spec.ray.address`: Ray Jobs API) or on a KubeRay
`RayJob` owned by the resource. Each reconcile pass is level-based: it reads the resource, Ray
and MLflow and acts on the gap. Submission ids are a function of the resource's uid and the
attempt number, so a restarted operator re-submits the same id and Ray (or the API server)
answers "already there"; ids and outcome go to status in one write after the submission. The
job creates its own MLflow run, tagged with its submission id, which is how the operator finds
it (DESIGN.md had the operator create the run first; that put MLflow on every job's path to
submission, see docs/BENCHMARKS.md#operator).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

import kopf

from anneal import API_GROUP, API_VERSION
from anneal.api.common import now_iso
from anneal.api.distillation import TERMINAL_JOB_PHASES, JobPhase
from anneal.api.resources import KINDS, FieldError, ManifestError, parse_spec
from anneal.control import jobs as control_jobs
from anneal.control import refs
from anneal.runtime import jobs_api, kuberay, secrets
from anneal.runtime.plan import JobInputs, JobPlan, build_job_plan, spec_hash, submission_id
from anneal.tracking import mlflow_store as store
from anneal_operator.context import (
    CleanupRefused,
    OperatorContext,
    bounded_cleanup,
    event,
    snapshot,
    invalid_spec_status,
    with_condition,
)
from anneal_operator.settings import endpoint_problems
from anneal_operator.tracking import tracker

log = logging.getLogger("anneal_operator.jobs")

PENDING, SUBMITTED, RUNNING = JobPhase.PENDING.value, JobPhase.SUBMITTED.value, JobPhase.RUNNING.value
SUCCEEDED, FAILED = JobPhase.SUCCEEDED.value, JobPhase.FAILED.value
CANCELLED, REJECTED = JobPhase.CANCELLED.value, JobPhase.REJECTED.value
TERMINAL = TERMINAL_JOB_PHASES
#: Phases a recipe may report as its result.
RESULT_PHASES = {SUCCEEDED, FAILED, REJECTED}


# ------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Observation:
    """What one pass read about the current attempt.

    Attributes:
        ray_status: the Ray job state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), or None
            when Ray does not know the submission.
        ray_message: Ray's message for it.
        result: the recipe's result from its MLflow run (None while it has none).
        progress: `{step, totalSteps, loss}` from the run's metrics (None: unknown).
    """

    ray_status: str | None
    ray_message: str = ""
    result: Mapping[str, Any] | None = None
    progress: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Retry:
    backoff_limit: int
    base_delay: float = 10.0
    max_delay: float = 300.0

    def delay(self, attempts: int) -> float:
        """Seconds before attempt `attempts + 1`: base, doubling, capped."""
        return min(self.max_delay, self.base_delay * (2 ** max(0, attempts - 1)))


@dataclass
class Outcome:
    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


#: How a RayJob's wait for Kueue's admission begins (its status message while it lasts).
KUEUE_WAIT = "queued in Kueue LocalQueue"


def observe(status: Mapping[str, Any], obs: Observation, retry: Retry, now: float) -> Outcome:
    """The next status of a submitted job, given what Ray and MLflow say (pure).

    The recipe's result wins (it carries the model URI and metrics). A Ray job that ends
    without a result, fails, or vanishes is a failed attempt: retried after a backoff while
    `attempts <= backoffLimit`, else the job fails. A stopped Ray job is Cancelled.
    """
    new = dict(status)
    out = Outcome(new)
    phase = new.get("phase")
    if obs.progress:
        new["progress"] = {**(new.get("progress") or {}), **{k: v for k, v in obs.progress.items() if v is not None}}
    result = obs.result
    if result and result.get("phase") in RESULT_PHASES:
        final = result["phase"]
        new["phase"] = final
        seen = set(status.get("warnings") or [])
        for warning in result.get("warnings") or []:
            if warning not in seen:  # pre-flight findings become Warning events, once each
                out.events.append(("Warning", "Preflight", warning))
        for key in ("modelUri", "metrics", "warnings"):
            if result.get(key):
                new[key] = result[key]
        if result.get("progress"):
            new["progress"] = {**(new.get("progress") or {}), **result["progress"]}
        new["message"] = result.get("message") or final.lower()
        new["completionTime"] = result.get("completionTime") or _iso(now)
        if final == FAILED:
            return _attempt_failed(out, new["message"], retry, now)
        ok = final == SUCCEEDED
        with_condition(new, "Ready", "True" if ok else "False", final, new["message"])
        out.events.append(("Normal" if ok else "Warning", final, new["message"]))
        return out
    rs = obs.ray_status
    if rs is None:
        return _attempt_failed(out, f"Ray has no job {new.get('submissionId')} (the cluster lost it)", retry, now)
    if rs == jobs_api.PENDING:
        new["phase"] = SUBMITTED if phase in (PENDING, SUBMITTED, None) else phase
        # A wait for Kueue's admission is said in the status; so is its end.
        if obs.ray_message.startswith(KUEUE_WAIT):
            new["message"] = obs.ray_message
        elif str(new.get("message") or "").startswith(KUEUE_WAIT):
            new["message"] = f"admitted by Kueue: {obs.ray_message or 'starting'}"
    elif rs == jobs_api.RUNNING:
        new["phase"] = RUNNING
        new["message"] = "running"
    elif rs == jobs_api.STOPPED:
        new["phase"] = CANCELLED
        new["message"] = f"Ray job stopped: {obs.ray_message}".strip(": ")
        new["completionTime"] = _iso(now)
        with_condition(new, "Ready", "False", CANCELLED, new["message"])
        out.events.append(("Warning", CANCELLED, new["message"]))
        return out
    elif rs in (jobs_api.SUCCEEDED, jobs_api.FAILED):
        why = obs.ray_message or rs.lower()
        return _attempt_failed(out, f"Ray job {rs.lower()} without a result in MLflow: {why}", retry, now)
    if new.get("phase") != phase and new["phase"] in (SUBMITTED, RUNNING):
        with_condition(new, "Ready", "False", new["phase"], new.get("message") or "")
        out.events.append(("Normal", new["phase"], f"attempt {new.get('attempts', 1)}: {new['phase'].lower()}"))
    return out


def _attempt_failed(out: Outcome, message: str, retry: Retry, now: float) -> Outcome:
    new = out.status
    attempts = int(new.get("attempts") or 1)
    if attempts <= retry.backoff_limit:
        delay = retry.delay(attempts)
        new["phase"] = PENDING
        new["retryAt"] = _iso(now + delay)
        new["message"] = f"attempt {attempts} failed: {message}; retrying in {delay:g}s"
        new.pop("completionTime", None)
        with_condition(new, "Ready", "False", "Retrying", new["message"])
        out.events.append(("Warning", "Retrying", new["message"]))
        return out
    new["phase"] = FAILED
    new["message"] = f"attempt {attempts} failed (backoffLimit {retry.backoff_limit} reached): {message}"
    new["completionTime"] = _iso(now)
    new.pop("retryAt", None)
    with_condition(new, "Ready", "False", FAILED, new["message"])
    out.events.append(("Warning", FAILED, new["message"]))
    return out


def retry_due(status: Mapping[str, Any], now: float) -> bool:
    at = status.get("retryAt")
    if not at:
        return False
    return datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp() <= now


def check_limits(spec: Any, max_workers: int, max_gpus: float, use_jobs_api: bool, address: str | None) -> list[FieldError]:
    """Operator-level rules on a parsed job spec (limits set by the cluster admin)."""
    errors = []
    r = spec.resources
    if r.workers > max_workers:
        errors.append(FieldError("spec.resources.workers", r.workers, f"must be <= {max_workers} (operator limit)"))
    if r.gpus_per_worker > max_gpus:
        errors.append(FieldError("spec.resources.gpusPerWorker", r.gpus_per_worker, f"must be <= {max_gpus:g} (operator limit)"))
    if use_jobs_api and address and not address.startswith(("http://", "https://")):
        errors.append(FieldError("spec.ray.address", address,
                                 "the operator submits through the Ray Jobs API: use the dashboard URL, e.g. http://ray-head:8265"))
    return errors


def ray_job_state(rayjob: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """(Ray job state, message) of a KubeRay RayJob object; (None, ...) when it is gone."""
    if rayjob is None:
        return None, "RayJob not found"
    st = rayjob.get("status") or {}
    deployment = st.get("jobDeploymentStatus") or ""
    job = st.get("jobStatus") or ""
    message = st.get("message") or st.get("reason") or ""
    queue = ((rayjob.get("metadata") or {}).get("labels") or {}).get(kuberay.KUEUE_QUEUE_LABEL)
    if queue and (rayjob.get("spec") or {}).get("suspend") and deployment in ("", "New", "Suspended"):
        return jobs_api.PENDING, f"{KUEUE_WAIT} {queue}: waiting for admission (quota)"
    if deployment == "Failed" and job not in (jobs_api.SUCCEEDED, jobs_api.STOPPED):
        return jobs_api.FAILED, message or "RayJob failed"
    if job in (jobs_api.PENDING, jobs_api.RUNNING, jobs_api.SUCCEEDED, jobs_api.FAILED, jobs_api.STOPPED):
        return job, message
    return jobs_api.PENDING, message or (deployment or "waiting for KubeRay")


# --------------------------------------------------------------------- the reconciler


class Waiting(Exception):
    """An input is not ready yet (e.g. a fromResource job still running)."""


class TrackingUnavailable(Exception):
    """MLflow could not be read (unreachable, erroring)."""


class _Again(Exception):
    """The pass cannot finish now (transient): its status is written, then kopf retries after `delay`."""

    def __init__(self, message: str, delay: float):
        super().__init__(message)
        self.delay = delay


class JobReconciler:
    """One kind's reconcile pass and delete hook; the kopf handlers in the kind modules call these."""

    def __init__(self, op: OperatorContext, kind: str):
        self.op = op
        self.kind = kind
        self.plural = KINDS[kind].plural

    # ------------------------------------------------------------------ helpers

    def address(self, spec: Any) -> str | None:
        """Where a new attempt goes: the spec's Ray address, else the operator's default."""
        return spec.ray.address or self.op.settings.ray_address

    def submitted_to(self, spec: Any, status: Mapping[str, Any]) -> str | None:
        """Where the current attempt went (None: a RayJob), whatever the spec says now.

        A spec edited mid-job (another `ray.address`) must not orphan the running Ray job:
        it is observed and stopped where it was submitted.
        """
        if status.get("submissionId") and "rayAddress" in status:
            return status["rayAddress"] or None
        return self.address(spec) if spec is not None else self.op.settings.ray_address

    def tracking_uri(self, spec: Any, status: Mapping[str, Any] | None = None) -> str:
        """The MLflow server of the current attempt (status), else of a new one (spec, operator default)."""
        if status and status.get("submissionId") and status.get("trackingUri"):
            return status["trackingUri"]
        return (spec.mlflow.tracking_uri if spec is not None else None) or self.op.settings.tracking_uri

    def capacity_problem(self, address: str, spec: Any) -> str | None:
        """Why the job's workers cannot fit the shared cluster (`anneal.control.capacity`); None if they fit or it is unknown."""
        from anneal.control.capacity import job_request, shortfall

        capacity = jobs_api.cluster_resources_cached(address)
        return shortfall(job_request(spec), capacity) if capacity else None

    def observe(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        """A referenced resource as `anneal.control.refs` reads it: its status, or None."""
        other = self.op.get(kind, namespace, name)
        return None if other is None else (other.get("status") or {})

    def resolve_refs(self, spec: Any, namespace: str) -> dict[str, str]:
        """fromResource refs → the referenced job's `status.modelUri` (it must have Succeeded)."""
        try:
            return refs.resolve(spec, namespace, self.observe)
        except refs.Unresolved as exc:
            raise Waiting(f"waiting for {exc}") from None

    def context(self, spec: Any, meta: Mapping[str, Any], run_id: str | None, resolved: dict[str, str],
                attempt: int | None = None) -> dict[str, Any]:
        """The recipe's JobContext (as JSON) for this resource (`anneal.control.jobs.job_context`).

        With `attempt`, the run the recipe creates (and the model version it registers) carry
        the attempt and its Ray submission id as tags: that is how the operator finds the run.
        """
        s = self.op.settings
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        tags = {}
        if attempt is not None:
            tags[store.TAG_ATTEMPT] = str(attempt)
            tags[store.TAG_SUBMISSION] = submission_id(ns, name, uid, attempt)
        return control_jobs.job_context(
            self.kind, spec, namespace=ns, name=name, uid=uid, tracking_uri=self.tracking_uri(spec),
            default_experiment=s.experiment, work_root=s.work_dir, cache_dir=s.cache_dir, resolved=resolved,
            run_id=run_id, tags=tags)

    def secret_env(self, spec: Any, namespace: str) -> dict[str, str]:
        """The values of the spec's `secretKeyRef` env vars, read from Secrets of the resource's namespace.

        Raises:
            Waiting: a Secret or key is not there (or the operator may not read it).
        """
        def lookup(ref: secrets.SecretRef) -> str:
            try:
                data = self.op.read_secret(namespace, ref.name)
            except PermissionError as exc:
                raise LookupError(str(exc)) from None
            if data is None:
                raise LookupError(f"Secret {ref.name} does not exist in namespace {namespace}")
            if ref.key not in data:
                raise LookupError(f"Secret {namespace}/{ref.name} has no key {ref.key}")
            try:
                return base64.b64decode(data[ref.key], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise LookupError(f"key {ref.key} of Secret {namespace}/{ref.name} is not UTF-8 text") from None

        try:
            return secrets.resolve(spec.ray.runtime_env.to_dict(), lookup)
        except secrets.Unresolved as exc:
            raise Waiting(f"waiting for {exc}") from None

    def plan(self, spec: Any, meta: Mapping[str, Any], attempt: int, run_id: str | None, resolved: dict[str, str],
             secret_env: Mapping[str, str] | None = None) -> JobPlan:
        return build_job_plan(JobInputs(
            kind=self.kind,
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            attempt=attempt,
            spec=spec.to_dict(),
            context=self.context(spec, meta, run_id, resolved, attempt),
            python=self.op.settings.job_python,
            secret_env=dict(secret_env or {}),
        ))

    def target(self, spec: Any, meta: Mapping[str, Any], status: Mapping[str, Any] | None = None) -> store.TrackingTarget:
        """Where a new attempt records; with `status`, where the current attempt does (both kept at allocation)."""
        if status and status.get("submissionId") and status.get("trackingUri") and status.get("experiment"):
            return store.TrackingTarget(tracking_uri=status["trackingUri"], experiment=status["experiment"])
        ctx = self.context(spec, meta, None, {})
        return store.TrackingTarget(tracking_uri=ctx["tracking_uri"], experiment=ctx["experiment"],
                                    registered_model_name=ctx["registered_model_name"])

    def find_run(self, spec: Any, meta: Mapping[str, Any], status: Mapping[str, Any]) -> str | None:
        """The attempt's MLflow run: the one the recipe created, tagged with the submission id.

        Ray refuses a second job with the same submission id, so there is at most one.
        """
        if status.get("mlflowRunId"):
            return status["mlflowRunId"]
        if not status.get("submissionId"):
            return None
        target = self.target(spec, meta, status)
        try:
            return tracker(target.tracking_uri).find_run(target, {store.TAG_SUBMISSION: status["submissionId"]})
        except Exception as exc:
            raise TrackingUnavailable(f"MLflow {target.tracking_uri}: cannot search runs: {exc}") from exc

    def rayjob_name(self, meta: Mapping[str, Any], attempt: int) -> str:
        return control_jobs.rayjob_name(self.kind, meta["name"], attempt)

    def build_rayjob(self, spec: Any, meta: Mapping[str, Any], plan: JobPlan) -> dict[str, Any]:
        s = self.op.settings
        cluster = kuberay.ClusterOptions(
            image=spec.ray.image or s.image,
            ray_version=spec.ray.ray_version or s.ray_version,
            resources=spec.resources,
            head_cpus=spec.ray.head_resources.cpus,
            head_memory=spec.ray.head_resources.memory,
            gang_scheduler=s.gang_scheduler,
            labels={"anneal.dev/kind": self.kind, "anneal.dev/name": meta["name"]},
            # The pods' kubelet reads these from the Secret: the values never pass through the operator.
            secret_env=tuple(secrets.secret_refs(spec.ray.runtime_env.to_dict())),
            shm_size=s.shm_size, shared_volume_claim=s.shared_volume_claim, shared_volume_path=s.shared_volume_path,
        )
        owner = kuberay.owner_reference(f"{API_GROUP}/{API_VERSION}", self.kind, meta["name"], meta["uid"])
        lifecycle = kuberay.RayJobOptions(
            ttl_seconds_after_finished=s.ttl_seconds_after_finished,
            active_deadline_seconds=spec.active_deadline_seconds,
        )
        return kuberay.build_rayjob(self.rayjob_name(meta, plan.attempt), meta["namespace"], plan, cluster, owner, lifecycle)

    # --------------------------------------------------------------------- submit

    def submit(self, spec: Any, meta: Mapping[str, Any], status: Mapping[str, Any], resolved: dict[str, str]) -> str:
        """Submit the current attempt (idempotent); returns "submitted" or "exists".

        Raises:
            Waiting: a Secret the runtime env names is not there (Jobs API: the operator reads it).
        """
        attempt = int(status["attempts"])
        address = self.submitted_to(spec, status)
        # Only a Jobs API submission carries Secret values (in its runtime env); a RayJob's pods read them.
        secret_env = self.secret_env(spec, meta["namespace"]) if address else {}
        plan = self.plan(spec, meta, attempt, status.get("mlflowRunId"), resolved, secret_env)
        if plan.submission_id != status["submissionId"]:
            raise kopf.PermanentError(f"submission id drifted: {plan.submission_id} != {status['submissionId']}")
        if address:
            outcome = self.op.jobs_client(address).submit(plan)
            self.op.metrics.submissions.labels(self.kind, "jobs-api", outcome).inc()
            return outcome
        from kubernetes.client.exceptions import ApiException

        body = self.build_rayjob(spec, meta, plan)
        try:
            self.op.custom.create_namespaced_custom_object(
                "ray.io", "v1", meta["namespace"], "rayjobs", body, field_validation="Strict"
            )
            outcome = "submitted"
        except ApiException as exc:
            if exc.status != 409:
                raise
            outcome = "exists"
        self.op.metrics.submissions.labels(self.kind, "rayjob", outcome).inc()
        return outcome

    # -------------------------------------------------------------------- observe

    def read_ray(self, spec: Any, meta: Mapping[str, Any], status: Mapping[str, Any]) -> tuple[str | None, str]:
        address = self.submitted_to(spec, status)
        if address:
            info = self.op.jobs_client(address).get(status["submissionId"])
            return (None, "") if info is None else (info.status, info.message)
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self.op.custom.get_namespaced_custom_object(
                "ray.io", "v1", meta["namespace"], "rayjobs", status.get("rayCluster") or self.rayjob_name(meta, int(status["attempts"]))
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            obj = None
        return ray_job_state(obj)

    def read_tracking(self, spec: Any, run_id: str | None,
                      status: Mapping[str, Any] | None = None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(result, progress) from the attempt's MLflow run; (None, None) while it has no run.

        Raises:
            TrackingUnavailable: MLflow could not be read.
        """
        if not run_id:
            return None, None
        uri = self.tracking_uri(spec, status)
        t = tracker(uri)
        try:
            run = t.get_run(run_id)
            result = t.read_result(run)
        except Exception as exc:
            raise TrackingUnavailable(f"MLflow {uri}: cannot read run {run_id}: {exc}") from exc
        m = run.metrics
        progress = None
        if "train/step" in m:
            progress = {"step": int(m["train/step"]), "totalSteps": int(m.get("train/total_steps", 0)) or None,
                        "loss": round(float(m["train/loss"]), 6) if "train/loss" in m else None}
        return result, progress

    # ---------------------------------------------------------------------- pass

    def reconcile(self, body: Any, meta: Mapping[str, Any]) -> None:
        """One level-based pass over one job: a switch on its phase, then one status write.

        Each branch only changes `status` and collects events; the write (a merge patch
        against what the pass read) and the events happen once, at the end, also when the
        pass asks kopf to come back sooner (a transient Ray or MLflow failure).
        """
        old = self.op.current_status(body)
        status = dict(old)
        events: list[tuple[str, str, str]] = []
        try:
            self._step(body, meta, status, events, time.time())
        except _Again as again:
            self._finish(body, old, status, events)
            raise kopf.TemporaryError(str(again), delay=again.delay) from None
        self._finish(body, old, status, events)

    def _step(self, body: Any, meta: Mapping[str, Any], status: dict[str, Any],
              events: list[tuple[str, str, str]], now: float) -> None:
        generation = meta.get("generation")
        raw_spec = dict(body.get("spec") or {})
        phase = status.get("phase")
        if phase in TERMINAL:
            self._refuse_change(body, status, generation, raw_spec)
            return
        spec: Any = None
        try:
            spec = parse_spec(self.kind, raw_spec)
        except ManifestError as exc:
            if not status.get("submissionId") or (phase == PENDING and not status.get("retryAt")):
                self._invalid(status, exc, generation, events)  # nothing of it runs yet
                return
            # Submitted with a valid spec and edited into an invalid one since: the edit is
            # refused below and the attempt still observed from what status keeps.
        if status.get("specHash") and status["specHash"] != spec_hash(raw_spec):
            self._refuse_change(body, status, generation, raw_spec)
            if phase == PENDING and retry_due(status, now):
                status.update(phase=FAILED, message="the spec changed after submission; jobs are immutable "
                              "once submitted: create a new resource to run again", completionTime=now_iso())
                status.pop("retryAt", None)
                with_condition(status, "Ready", "False", "SpecChanged", status["message"])
                events.append(("Warning", FAILED, status["message"]))
                return

        match phase:
            case None | JobPhase.PENDING.value:
                resolved = None
                if not status.get("submissionId") or retry_due(status, now):
                    resolved = self._allocate(spec, raw_spec, meta, status, events)
                    if resolved is None:
                        return
                elif status.get("retryAt"):
                    return  # backing off before the next attempt
                self._submit(spec, meta, status, events, now, resolved)
            case JobPhase.SUBMITTED.value | JobPhase.RUNNING.value:
                self._observe(spec, meta, status, events, now)
            case _:
                log.warning("%s %s/%s: phase %r is not one the operator acts on; left as it is", self.kind,
                            meta["namespace"], meta["name"], phase)

    def _invalid(self, status: dict[str, Any], exc: ManifestError, generation: int | None,
                 events: list[tuple[str, str, str]]) -> None:
        status.update(invalid_spec_status(status, exc, generation))
        events.append(("Warning", "InvalidSpec", str(exc)))

    def _allocate(self, spec: Any, raw_spec: Mapping[str, Any], meta: Mapping[str, Any], status: dict[str, Any],
                  events: list[tuple[str, str, str]]) -> dict[str, str] | None:
        """Pending → a new attempt with its ids in status; the resolved refs, or None when it cannot start.

        The submission id is deterministic (resource uid + attempt), so an operator that stops
        anywhere before writing it computes the same id again and Ray answers "exists"; the
        job creates its own MLflow run, tagged with that id. Where it went (Ray address,
        MLflow URI and experiment) is kept in status, so an edit of the spec mid-job cannot
        make the operator look for it elsewhere. The operator's limits and allowlists are
        checked here, for every attempt: they guard what is submitted, never what runs.
        """
        ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
        address = self.address(spec)
        problems = check_limits(spec, self.op.settings.max_workers, self.op.settings.max_gpus_per_worker,
                                bool(address), address)
        problems += endpoint_problems(spec, self.op.settings)
        if problems:
            self._invalid(status, ManifestError(problems), generation, events)
            status.pop("retryAt", None)
            return None
        try:
            resolved = self.resolve_refs(spec, ns)
        except Waiting as w:
            status.update(phase=PENDING, message=str(w), observedGeneration=generation)
            with_condition(status, "Ready", "False", "WaitingForInput", str(w))
            return None
        attempt = int(status.get("attempts") or 0) + 1
        sid = submission_id(ns, name, meta["uid"], attempt)
        target = self.target(spec, meta)
        status.update(
            phase=PENDING, attempts=attempt, submissionId=sid,
            specHash=status.get("specHash") or spec_hash(raw_spec), observedGeneration=generation,
            rayCluster=address or self.rayjob_name(meta, attempt), rayAddress=address or "",
            trackingUri=target.tracking_uri, experiment=target.experiment,
            message=f"attempt {attempt}: submitting {sid}",
        )
        status.setdefault("startTime", now_iso())
        status.pop("retryAt", None)
        status.pop("mlflowRunId", None)
        with_condition(status, "Ready", "False", PENDING, status["message"])
        return resolved

    def _submit(self, spec: Any, meta: Mapping[str, Any], status: dict[str, Any],
                events: list[tuple[str, str, str]], now: float, resolved: dict[str, str] | None) -> None:
        """Pending with ids → Submitted; a transient failure is written too, so status always says why."""
        name = meta["name"]
        if resolved is None:  # an attempt allocated by an earlier pass, not submitted yet
            try:
                resolved = self.resolve_refs(spec, meta["namespace"])
            except Waiting as w:
                raise _Again(str(w), delay=10) from None
        address = self.submitted_to(spec, status)
        if address and status.get("capacityCheckedFor") != status.get("submissionId"):
            # Warned once per attempt: a gang the shared cluster cannot hold would sit PENDING in silence.
            status["capacityCheckedFor"] = status.get("submissionId")
            short = self.capacity_problem(address, spec)
            if short:
                events.append(("Warning", "InsufficientResources", f"{self.kind}/{name} {short}"))
        try:
            outcome = self.submit(spec, meta, status, resolved)
        except Waiting as w:  # a Secret of the runtime env: not submitted; the next pass tries again
            status["message"] = f"attempt {status['attempts']}: not submitted yet, {w}"
            with_condition(status, "Ready", "False", "WaitingForSecret", str(w))
            events.append(("Warning", "SecretMissing", str(w)))
            return
        except jobs_api.JobsApiError as exc:
            if exc.transient:
                status["message"] = f"attempt {status['attempts']}: not submitted yet, retrying: {exc}"
                with_condition(status, "Ready", "False", PENDING, status["message"])
                raise _Again(str(exc), delay=10) from None
            status.update(phase=FAILED, message=str(exc), completionTime=now_iso())
            with_condition(status, "Ready", "False", "SubmissionRejected", str(exc))
            events.append(("Warning", "SubmissionRejected", str(exc)))
            return
        self.op.due(f"progress/{meta['uid']}", 0, now)  # first progress read one interval from now
        where = address or f"RayJob {status.get('rayCluster')}"
        status.update(phase=SUBMITTED, message=f"attempt {status['attempts']}: submitted to {where}")
        with_condition(status, "Ready", "False", SUBMITTED, status["message"])
        verb = "submitted" if outcome == "submitted" else "found already submitted"
        events.append(("Normal", SUBMITTED, f"{status['submissionId']} {verb} ({where})"))

    def _observe(self, spec: Any, meta: Mapping[str, Any], status: dict[str, Any],
                 events: list[tuple[str, str, str]], now: float) -> None:
        """Submitted/Running → what Ray and MLflow say (the pure `observe`).

        `spec` is None when the spec was edited into an invalid one after submission: the
        attempt is observed from status alone (`rayAddress`, `trackingUri`, `experiment`).
        """
        ray_status, ray_message = self.read_ray(spec, meta, status)
        result = progress = None
        # The result is in MLflow once the Ray job has ended; progress is read at its own,
        # slower pace while it runs (one MLflow request per job per pass does not scale).
        ended = ray_status not in (jobs_api.PENDING, jobs_api.RUNNING)
        if ended or self.op.due(f"progress/{meta['uid']}", self.op.settings.progress_interval, now):
            try:
                run_id = self.find_run(spec, meta, status)
                if run_id:
                    status["mlflowRunId"] = run_id
                result, progress = self.read_tracking(spec, run_id, status)
            except TrackingUnavailable as exc:
                if ended:  # never fail an attempt because MLflow could not be read
                    raise _Again(str(exc), delay=10) from None
                log.warning("%s", exc)
        # Without a valid spec (an edit refused mid-attempt) there is no next attempt to retry with.
        backoff_limit = spec.backoff_limit if spec is not None else 0
        outcome = observe(status, Observation(ray_status, ray_message, result, progress),
                          Retry(backoff_limit, self.op.settings.retry_backoff, self.op.settings.retry_backoff_max),
                          now)
        status.clear()
        status.update(outcome.status)
        events.extend(outcome.events)

    def _finish(self, body: Any, old: Mapping[str, Any], new: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
        meta = body["metadata"]
        if self.op.write_status(self.kind, body, old, new):
            if new.get("phase") != old.get("phase") and new.get("phase"):
                self._phase_metric(new["phase"])
            for type_, reason, message in events:
                event(body, type_, reason, message)

    def _phase_metric(self, phase: str) -> None:
        self.op.metrics.phases.labels(self.kind, phase).inc()

    def _refuse_change(self, body: Any, status: dict[str, Any], generation: int | None, raw_spec: Mapping[str, Any]) -> None:
        """A spec edit after submission: say once per generation that it is not applied."""
        if generation is None or status.get("refusedGeneration") == generation:
            return
        if status.get("specHash") and status["specHash"] == spec_hash(raw_spec):
            return
        if not status.get("specHash") and status.get("observedGeneration") in (None, generation):
            return
        status["refusedGeneration"] = generation
        message = (f"spec change (generation {generation}) refused: jobs are immutable once submitted; "
                   "create a resource with a new name to run again")
        event(body, "Warning", "SpecChangeRefused", message)

    # ---------------------------------------------------------------------- delete

    def on_delete(self, body: Any, meta: Mapping[str, Any]) -> None:
        """Stop the Ray job of a running attempt before the resource goes."""
        status = self.op.current_status(body)
        if status.get("phase") in TERMINAL:
            return
        spec: Any = None
        try:
            spec = parse_spec(self.kind, dict(body.get("spec") or {}))
        except ManifestError:
            if not status.get("submissionId"):
                return
            # Edited into an invalid spec after submission: the job still runs where status says.
        address = self.submitted_to(spec, status)
        guessed = not status.get("submissionId")
        if guessed:
            if not address:
                return  # a RayJob, if one was created, is owned by the resource: garbage-collected with it
            # An operator stopped between submitting and writing status leaves no id behind: stop
            # the id it would have used (Ray answers "not found" if it never got there). Best
            # effort: a job that most likely never reached Ray does not hold its deletion on Ray.
            status = {**status, "submissionId": submission_id(meta["namespace"], meta["name"], meta["uid"],
                                                              int(status.get("attempts") or 0) + 1)}
        if address:
            try:
                stopped = self.op.jobs_client(address).stop(status["submissionId"])
            except jobs_api.JobsApiError as exc:
                if exc.transient and not guessed:
                    raise kopf.TemporaryError(str(exc), delay=5)
                if not guessed:  # e.g. 401/403: retrying cannot help; say so and release the finalizer
                    raise CleanupRefused(str(exc)) from None
                log.warning("%s %s/%s deleted: could not stop Ray job %s: %s", self.kind, meta["namespace"],
                            meta["name"], status["submissionId"], exc)
                stopped = False
            if guessed and not stopped:
                return
            log.info("%s %s/%s deleted: Ray job %s %s", self.kind, meta["namespace"], meta["name"],
                     status["submissionId"], "stopped" if stopped else "was not running")
        else:
            from kubernetes.client.exceptions import ApiException

            try:
                self.op.custom.delete_namespaced_custom_object(
                    "ray.io", "v1", meta["namespace"], "rayjobs", status.get("rayCluster") or "",
                    propagation_policy="Foreground",
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
        try:
            run_id = self.find_run(spec, meta, status)
            if run_id:
                tracker(self.tracking_uri(spec, status)).kill(run_id)
        except Exception as exc:
            log.warning("could not mark the MLflow run of %s killed: %s", status["submissionId"], exc)


def register_job_handlers(registry: kopf.OperatorRegistry, op: OperatorContext, kind: str) -> JobReconciler:
    """The kopf handlers of one job kind: a timer that reconciles, and a delete hook (finalizer)."""
    rec = JobReconciler(op, kind)
    plural = KINDS[kind].plural

    @kopf.timer(API_GROUP, API_VERSION, plural, interval=op.settings.poll_interval, registry=registry,
                id="reconcile")
    @op.metrics.timed(kind, "reconcile")
    def reconcile(body: kopf.Body, meta: kopf.Meta, **_: Any) -> None:
        with op.lock(meta["uid"]):
            snap = snapshot(body)
            rec.reconcile(snap, snap["metadata"])

    @kopf.on.delete(API_GROUP, API_VERSION, plural, registry=registry, id="stop-ray-job")
    @op.metrics.timed(kind, "delete")
    def delete(body: kopf.Body, meta: kopf.Meta, runtime: Any = None, **_: Any) -> None:
        with op.lock(meta["uid"]):
            bounded_cleanup(body, runtime, op.settings.cleanup_timeout, f"stop the Ray job of {kind} {meta['name']}",
                            lambda: rec.on_delete(body, meta))
        op.forget(meta["uid"])

    return rec
