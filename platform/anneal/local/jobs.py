"""Jobs under `anneal run`: a local Ray session, the job context, `fromResource` resolved from MLflow, progress."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from typing import Any, Callable, Iterator, Mapping

from anneal.api.distillation import JobPhase
from anneal.api.resources import Manifest
from anneal.control import jobs as control_jobs
from anneal.control import refs
from anneal.runtime import secrets
from anneal.runtime.plan import build_runtime_env
from anneal.settings import Settings
from anneal.tracking import mlflow_store as store

log = logging.getLogger(__name__)

START_ATTEMPTS = 3
ProgressFn = Callable[[dict[str, Any]], None]


class ResolutionError(RuntimeError):
    """A fromResource reference that names nothing usable."""


class MissingSecretEnv(ResolutionError):
    """A `secretKeyRef` env var of the spec that this process has no variable for."""


def job_env(spec: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The env vars of an embedded job's Ray: `spec.ray.runtimeEnv.envVars`, as a cluster's runtime env has them.

    `anneal run` has no Secrets to read: a `secretKeyRef` variable takes its value from this
    process's variable of the same name (`environ`, default `os.environ`).

    Raises:
        MissingSecretEnv: a `secretKeyRef` variable that is not set here, naming the field.
    """
    environ = os.environ if environ is None else environ
    runtime_env = spec.ray.runtime_env.to_dict()

    def lookup(ref: secrets.SecretRef) -> str:
        if ref.var not in environ:
            raise LookupError(f"comes from Secret {ref.name} key {ref.key}, which `anneal run` takes from its own "
                              f"environment: export {ref.var} and run again")
        return environ[ref.var]

    try:
        return build_runtime_env(runtime_env, secret_env=secrets.resolve(runtime_env, lookup))["env_vars"]
    except secrets.Unresolved as exc:
        raise MissingSecretEnv(str(exc)) from None


@contextlib.contextmanager
def ray_session(settings: Settings, extra_env: Mapping[str, str] | None = None) -> Iterator[None]:
    """A Ray for the duration of a command: `ANNEAL_RAY_ADDRESS`, else a local one started and stopped here.

    `extra_env` (a job's, `job_env(spec)`) goes into the session's runtime env, the only place its values go.
    """
    import ray

    env = {**dict(extra_env or {}), "TOKENIZERS_PARALLELISM": "false", "ANNEAL_HOME": str(settings.anneal.root)}
    if ray.is_initialized():
        unset = sorted(set(extra_env or {}) - {"TOKENIZERS_PARALLELISM", "ANNEAL_HOME"})
        if unset:  # a job-level runtime env is fixed when Ray starts
            log.warning("Ray was started before this job: spec.ray.runtimeEnv.envVars %s not applied", ", ".join(unset))
        yield
        return
    # Worker output (Ray Train's own chatter) stays in Ray's log files unless debugging: failures
    # come back as exceptions with their message, and progress is shown from MLflow.
    verbose = settings.anneal.log_level.upper() == "DEBUG"
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": verbose}
    if settings.ray.address:
        ray.init(address=settings.ray.address, **kwargs)
    else:
        # Ray gives a new node a fixed window to come up; on a busy laptop that is too short.
        os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                ray.init(
                    num_cpus=settings.ray.num_cpus or os.cpu_count(),
                    include_dashboard=settings.ray.include_dashboard,
                    configure_logging=True,
                    logging_level=logging.WARNING,
                    **kwargs,
                )
                break
            except Exception as exc:  # "The current node timed out during startup"
                ray.shutdown()
                if attempt == START_ATTEMPTS:
                    raise
                log.warning("local Ray did not start (%s); trying again (%d/%d)", exc, attempt + 1, START_ATTEMPTS)
    try:
        yield
    finally:
        ray.shutdown()


def mlflow_lookup(tracking_uri: str) -> Callable[[str, str, str], dict[str, Any] | None]:
    """How `anneal run` observes another resource (`anneal.control.refs.Lookup`): its runs in MLflow.

    The newest successful run that registered a model, else the newest run of any phase,
    else None (the resource never ran against this MLflow).
    """
    def lookup(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        c = store.client(tracking_uri)
        exps = [e.experiment_id for e in c.search_experiments()]
        base = (f"tags.`{store.TAG_KIND}` = '{kind}' and tags.`{store.TAG_NAME}` = '{name}' and "
                f"tags.`{store.TAG_NAMESPACE}` = '{namespace}'")
        for extra in (f" and tags.`{store.TAG_PHASE}` = 'Succeeded'", ""):
            runs = c.search_runs(exps, filter_string=base + extra, order_by=["attributes.start_time DESC"],
                                 max_results=1)
            if runs:
                tags = runs[0].data.tags
                return {"phase": tags.get(store.TAG_PHASE), "modelUri": tags.get(store.TAG_MODEL_URI)}
        return None

    return lookup


def resolve_refs(spec: Any, namespace: str, tracking_uri: str) -> dict[str, str]:
    """A spec's `fromResource` references → the model URIs they name, read from MLflow.

    Raises:
        ResolutionError: naming the field, the resource and what is missing.
    """
    try:
        return refs.resolve(spec, namespace, mlflow_lookup(tracking_uri))
    except refs.Unresolved as exc:
        raise ResolutionError(f"{exc} (MLflow at {tracking_uri}); run that resource first") from None


def job_context(manifest: Manifest, settings: Settings, resolved: dict[str, str], uid: str | None = None):
    """The JobContext of an embedded run (`anneal.control.jobs.job_context`; a fresh uid per run)."""
    from anneal.distill.recipe import JobContext

    mlflow = manifest.spec.mlflow
    return JobContext(**control_jobs.job_context(
        manifest.kind, manifest.spec, namespace=manifest.namespace, name=manifest.name,
        uid=uid or f"embedded-{uuid.uuid4().hex[:12]}", tracking_uri=mlflow.tracking_uri or settings.tracking_uri,
        default_experiment=settings.mlflow.experiment, work_root=str(settings.anneal.work_dir),
        cache_dir=str(settings.anneal.cache_dir), resolved=resolved,
        artifact_root=None if mlflow.tracking_uri else settings.artifact_root))


def _watch_progress(tracking_uri: str, run_id_of: Callable[[], str | None], on_progress: ProgressFn, stop: threading.Event) -> None:
    """Level-based progress: read the run's latest metrics from MLflow every two seconds."""
    while not stop.wait(2.0):
        run_id = run_id_of()
        if not run_id:
            continue
        try:
            m = store.latest_metrics(tracking_uri, run_id)
        except Exception:
            continue
        if "train/step" in m:
            on_progress({"phase": JobPhase.RUNNING.value, "progress": {
                "step": int(m["train/step"]), "totalSteps": int(m.get("train/total_steps", 0)) or None,
                "loss": m.get("train/loss")}})


def run_job(manifest: Manifest, settings: Settings, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run a DistillationJob or CompressionJob to the end on this machine; returns its status.

    The job's MLflow run is created here (tagged with its lineage), its progress is read back
    from MLflow for `on_progress`, and the recipe runs on the session's Ray.

    Raises:
        MissingSecretEnv: before anything starts, a `secretKeyRef` env var that is not exported.
    """
    env = job_env(manifest.spec)
    # The recipe gets what it gets on a cluster: the spec without envVars values (it logs the spec to MLflow).
    spec = type(manifest.spec).model_validate(secrets.redact_spec(manifest.spec.to_dict()))
    if manifest.kind == "CompressionJob":
        from anneal.compress.recipe import RECIPE, cleanup, run

        extra_tags = {store.TAG_RECIPE: RECIPE}
    else:
        from anneal.distill.recipe import run

        cleanup, extra_tags = None, {}
    tracking_uri = manifest.spec.mlflow.tracking_uri or settings.tracking_uri
    ctx = job_context(manifest, settings, resolve_refs(manifest.spec, manifest.namespace, tracking_uri))
    ctx.run_id = store.create_run(ctx.target, ctx.run_name(), {**ctx.lineage_tags(), **extra_tags})
    if on_progress:
        on_progress({"phase": JobPhase.SUBMITTED.value, "mlflowRunId": ctx.run_id})
    stop = threading.Event()
    if on_progress:  # training steps (a recovery distillation's too) are logged as train/step: show them
        threading.Thread(target=_watch_progress, args=(ctx.tracking_uri, lambda: ctx.run_id, on_progress, stop),
                         daemon=True).start()
    try:
        with ray_session(settings, env):
            result = run(spec, ctx, on_progress=on_progress)
    finally:
        stop.set()
    if cleanup is not None:
        cleanup(ctx)
    status = result.to_status()
    status["attempts"] = 1
    status["observedGeneration"] = manifest.generation or 1
    return status
