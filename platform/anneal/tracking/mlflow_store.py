"""MLflow: experiments, runs, batched metric logging, model registration and lineage tags."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from anneal.runtime.secrets import redact_spec

log = logging.getLogger(__name__)

# Lineage tag keys on runs and model versions.
TAG_KIND = "anneal.kind"
TAG_NAMESPACE = "anneal.namespace"
TAG_NAME = "anneal.name"
TAG_UID = "anneal.uid"
TAG_METHOD = "anneal.method"
TAG_TEACHER = "anneal.teacher"
TAG_TEACHER_VERSION = "anneal.teacher_version"
TAG_SOURCE = "anneal.source"
TAG_SOURCE_VERSION = "anneal.source_version"
TAG_DATASET = "anneal.dataset"
TAG_RECIPE = "anneal.recipe"
TAG_PHASE = "anneal.phase"
TAG_MODEL_URI = "anneal.model_uri"
TAG_MESSAGE = "anneal.message"
TAG_ATTEMPT = "anneal.attempt"
TAG_SUBMISSION = "anneal.submission_id"
RESULT_ARTIFACT = "anneal-result.json"


@dataclass(frozen=True)
class TrackingTarget:
    """Where a workload records itself."""

    tracking_uri: str
    experiment: str
    artifact_root: str | None = None
    registered_model_name: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def client(tracking_uri: str):
    """The MlflowClient of a tracking URI, one per process and URI (clients are thread-safe).

    Building a client resolves the store and imports its modules; a long-lived process should
    not pay that, nor the import lock, on every call.
    """
    c = _clients.get(tracking_uri)
    if c is None:
        from mlflow import MlflowClient

        with _clients_lock:
            c = _clients.setdefault(tracking_uri, MlflowClient(tracking_uri=tracking_uri))
    return c


def ensure_experiment(target: TrackingTarget) -> str:
    """The experiment id, creating the experiment (with its artifact location) if needed.

    A deleted experiment of that name is restored: MLflow keeps its name reserved, so it could
    be neither used nor created again.
    """
    c = client(target.tracking_uri)
    exp = c.get_experiment_by_name(target.experiment)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if target.artifact_root:
        location = f"{target.artifact_root.rstrip('/')}/{target.experiment}"
    try:
        return c.create_experiment(target.experiment, artifact_location=location)
    except Exception:  # another process created it meanwhile
        exp = c.get_experiment_by_name(target.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def create_run(target: TrackingTarget, run_name: str, tags: Mapping[str, str]) -> str:
    """Create a run up front (so its id can be stored in status before any work starts)."""
    c = client(target.tracking_uri)
    run = c.create_run(ensure_experiment(target), run_name=run_name, tags={**target.tags, **tags})
    return run.info.run_id


def tag_filter(tags: Mapping[str, str]) -> str:
    """An MLflow search filter matching runs that carry every one of `tags` (quotes in values dropped)."""
    return " and ".join(f"tags.`{k}` = '{str(v).replace(chr(39), '')}'" for k, v in tags.items())


def find_run(target: TrackingTarget, tags: Mapping[str, str]) -> str | None:
    """The id of the newest run of the experiment carrying all of `tags`, or None."""
    c = client(target.tracking_uri)
    exp = c.get_experiment_by_name(target.experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=tag_filter(tags), max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def flatten(prefix: str, obj: Any) -> dict[str, str]:
    """Nested spec → flat MLflow params (``training.learningRate`` → ``0.001``)."""
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
    elif isinstance(obj, list) and obj and all(isinstance(x, Mapping) for x in obj):
        for i, v in enumerate(obj):
            out.update(flatten(f"{prefix}[{i}]", v))
    else:
        text = json.dumps(obj) if isinstance(obj, (list, dict)) else str(obj)
        out[prefix] = text[:6000]
    return out


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    c = client(tracking_uri)
    existing = c.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(todo), 100):
        c.log_batch(run_id, params=todo[i : i + 100])


class MetricsLogger:
    """Buffers step metrics and writes them in batches from a background thread.

    Logging each step synchronously costs a database round trip per metric; a batch every
    `flush_every` seconds keeps logging well under 2% of step time.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every: float = 2.0):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_every = flush_every
        self._buffer: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="anneal-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_every):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch:
            return
        try:
            c = client(self.tracking_uri)
            for i in range(0, len(batch), 900):
                c.log_batch(self.run_id, metrics=batch[i : i + 900])
        except Exception as exc:  # tracking trouble must not kill training
            log.warning("could not log %d metrics to MLflow: %s", len(batch), exc)

    def close(self, timeout: float = 300.0) -> None:
        """Write what is buffered, after the background thread's write in flight (if any) is done.

        The thread is a daemon: a worker that exits while it writes loses that batch, so close
        waits for it. The first write of a process can be slow (a SQLite store checks its schema
        when a client first opens it; seconds on a busy machine).
        """
        self._stop.set()
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            log.warning("MLflow metrics writer still busy after %.0f s; the batch in flight may be lost", timeout)
        self.flush()


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
    if items:
        client(tracking_uri).log_batch(run_id, metrics=items)


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
    if items:
        client(tracking_uri).log_batch(run_id, tags=items)


def log_model_dir(tracking_uri: str, run_id: str, local_dir: Path, artifact_path: str = "model") -> str:
    """Upload an HF-format model directory as run artifacts; returns its artifact URI."""
    c = client(tracking_uri)
    c.log_artifacts(run_id, str(local_dir), artifact_path)
    return f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def register_model(
    tracking_uri: str,
    name: str,
    source: str,
    run_id: str,
    tags: Mapping[str, str],
    description: str = "",
) -> str:
    """Register `source` as a new version of model `name`; returns ``models:/name/N``."""
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except Exception:
        try:
            c.create_registered_model(name, tags={"anneal.managed": "true"})
        except Exception:
            c.get_registered_model(name)  # created concurrently
    # Idempotent: a retried job that already registered this run's model reuses that version.
    for v in c.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if v.source == source:
            return f"models:/{name}/{v.version}"
    version = c.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, description=description
    )
    return f"models:/{name}/{version.version}"


def model_version_of(tracking_uri: str, uri: str) -> tuple[str, str] | None:
    """(name, version) of a ``models:/Name/N`` or ``models:/Name@alias`` URI, else None."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/") :]
    c = client(tracking_uri)
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, str(c.get_model_version_by_alias(name, alias).version)
    name, _, version = rest.partition("/")
    return name, version


def write_result(tracking_uri: str, run_id: str, result: Mapping[str, Any]) -> None:
    """Store the workload's final result on its run (tags for lookup, a JSON artifact in full)."""
    c = client(tracking_uri)
    c.log_dict(run_id, dict(result), RESULT_ARTIFACT)
    set_tags(
        tracking_uri,
        run_id,
        {
            TAG_PHASE: result.get("phase", ""),
            TAG_MODEL_URI: result.get("modelUri", "") or "",
            TAG_MESSAGE: (result.get("message") or "")[:4000],
        },
    )


def read_result(tracking_uri: str, run_id: str) -> dict[str, Any] | None:
    """The result a workload stored with `write_result`, or None while it has none."""
    import mlflow

    c = client(tracking_uri)
    run = c.get_run(run_id)
    if TAG_PHASE not in run.data.tags:
        return None
    try:
        return mlflow.artifacts.load_dict(f"{run.info.artifact_uri.rstrip('/')}/{RESULT_ARTIFACT}")
    except Exception:
        return {"phase": run.data.tags.get(TAG_PHASE), "modelUri": run.data.tags.get(TAG_MODEL_URI)}


def latest_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run (progress while it trains)."""
    return dict(client(tracking_uri).get_run(run_id).data.metrics)


def iter_params(spec_dict: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """A spec as flat MLflow params, with `ray.runtimeEnv.envVars` values redacted (they may be tokens)."""
    return flatten("", redact_spec(spec_dict)).items()
