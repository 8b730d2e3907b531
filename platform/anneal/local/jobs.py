"""Jobs under `anneal run`: a local Ray session, the job context, `fromResource` resolved from MLflow, progress."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from typing import Any, Callable, Iterator

from anneal.api.resources import Manifest
from anneal.settings import Settings
from anneal.tracking import mlflow_store as store

log = logging.getLogger(__name__)

START_ATTEMPTS = 3
ProgressFn = Callable[[dict[str, Any]], None]


class ResolutionError(RuntimeError):
    """A fromResource reference that names nothing usable."""


@contextlib.contextmanager
def ray_session(settings: Settings) -> Iterator[None]:
    """A Ray for the duration of a command: `ANNEAL_RAY_ADDRESS`, else a local one started and stopped here."""
    import ray

    if ray.is_initialized():
        yield
        return
    env = {"TOKENIZERS_PARALLELISM": "false", "ANNEAL_HOME": str(settings.anneal.root)}
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


def resolve_from_resource(tracking_uri: str, namespace: str, kind: str, name: str) -> str:
    """The registered output (`models:/...`) of the newest successful run of another resource."""
    c = store.client(tracking_uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(
        exps,
        filter_string=(
            f"tags.`{store.TAG_KIND}` = '{kind}' and tags.`{store.TAG_NAME}` = '{name}' and "
            f"tags.`{store.TAG_NAMESPACE}` = '{namespace}' and tags.`{store.TAG_PHASE}` = 'Succeeded'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or not runs[0].data.tags.get(store.TAG_MODEL_URI):
        raise ResolutionError(
            f"fromResource {kind}/{name} (namespace {namespace}): no successful run with a registered model "
            f"in {tracking_uri}; run that resource first"
        )
    return runs[0].data.tags[store.TAG_MODEL_URI]


def job_context(manifest: Manifest, settings: Settings, resolved: dict[str, str], uid: str | None = None):
    """The JobContext of an embedded run (fresh uid per run; work under ANNEAL_HOME/work)."""
    from anneal.distill.recipe import JobContext

    mlflow = manifest.spec.mlflow
    uid = uid or f"embedded-{uuid.uuid4().hex[:12]}"
    work = settings.anneal.work_dir / manifest.namespace / manifest.kind.lower() / manifest.name / uid
    return JobContext(
        kind=manifest.kind,
        namespace=manifest.namespace,
        name=manifest.name,
        uid=uid,
        tracking_uri=mlflow.tracking_uri or settings.tracking_uri,
        artifact_root=None if mlflow.tracking_uri else settings.artifact_root,
        experiment=mlflow.experiment or settings.mlflow.experiment,
        registered_model_name=mlflow.registered_model_name or manifest.name,
        work_dir=str(work),
        cache_dir=str(settings.anneal.cache_dir),
        resolved_uris=resolved,
        extra_tags=dict(mlflow.tags),
    )


def resolve_refs(manifest: Manifest, tracking_uri: str) -> dict[str, str]:
    """A job's `fromResource` references → the model URIs they name (read from MLflow)."""
    out: dict[str, str] = {}
    spec = manifest.spec
    for key, ref in (("teacher", getattr(spec, "teacher", None)), ("student", getattr(spec, "student", None)),
                     ("model", getattr(spec, "model", None))):
        if ref is not None and getattr(ref, "from_resource", None) is not None:
            fr = ref.from_resource
            out[key] = resolve_from_resource(tracking_uri, manifest.namespace, fr.kind, fr.name)
    return out


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
            on_progress({"phase": "Running", "progress": {
                "step": int(m["train/step"]), "totalSteps": int(m.get("train/total_steps", 0)) or None,
                "loss": m.get("train/loss")}})


def run_job(manifest: Manifest, settings: Settings, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run a DistillationJob or CompressionJob to the end on this machine; returns its status.

    The job's MLflow run is created here (tagged with its lineage), its progress is read back
    from MLflow for `on_progress`, and the recipe runs on the session's Ray.
    """
    if manifest.kind == "CompressionJob":
        from anneal.compress.recipe import RECIPE, cleanup, run

        extra_tags = {store.TAG_RECIPE: RECIPE}
    else:
        from anneal.distill.recipe import run

        cleanup, extra_tags = None, {}
    tracking_uri = manifest.spec.mlflow.tracking_uri or settings.tracking_uri
    ctx = job_context(manifest, settings, resolve_refs(manifest, tracking_uri))
    ctx.run_id = store.create_run(ctx.target, ctx.run_name(), {**ctx.lineage_tags(), **extra_tags})
    if on_progress:
        on_progress({"phase": "Submitted", "mlflowRunId": ctx.run_id})
    stop = threading.Event()
    if on_progress:  # training steps (a recovery distillation's too) are logged as train/step: show them
        threading.Thread(target=_watch_progress, args=(ctx.tracking_uri, lambda: ctx.run_id, on_progress, stop),
                         daemon=True).start()
    try:
        with ray_session(settings):
            result = run(manifest.spec, ctx, on_progress=on_progress)
    finally:
        stop.set()
    if cleanup is not None:
        cleanup(ctx)
    status = result.to_status()
    status["attempts"] = 1
    status["observedGeneration"] = manifest.generation or 1
    return status
