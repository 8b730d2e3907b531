"""A job's (DistillationJob, CompressionJob) decisions shared by both drivers: the context its
recipe runs with, the registered model's name, the name of its per-job RayJob.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

#: Short kind codes in generated names, so DistillationJob/x and CompressionJob/x never share one.
KIND_CODES = {"DistillationJob": "dj", "CompressionJob": "cj"}
#: KubeRay derives pod and service names from a RayJob's name: keep it well under 63 characters.
MAX_RAYJOB_NAME = 40


def registered_model_name(mlflow: Any, namespace: str, name: str) -> str:
    """`spec.mlflow.registeredModelName`, else `<namespace>.<name>`.

    The registry is shared by every namespace that writes to the same MLflow: `team-a/student`
    and `team-b/student` must not append versions to one model. A namespace (a DNS label) has
    no `.`, so the name splits back at its first one.
    """
    return getattr(mlflow, "registered_model_name", None) or f"{namespace}.{name}"


def work_dir(root: str, kind: str, namespace: str, name: str, uid: str) -> str:
    """Where one run of a job writes its checkpoints (unique per resource uid)."""
    return f"{str(root).rstrip('/')}/{namespace}/{kind.lower()}/{name}/{uid}"


def job_context(
    kind: str,
    spec: Any,
    *,
    namespace: str,
    name: str,
    uid: str,
    tracking_uri: str,
    default_experiment: str,
    work_root: str,
    cache_dir: str,
    resolved: Mapping[str, str],
    artifact_root: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The recipe's `JobContext` (as JSON) of one job, whichever driver runs it.

    Args:
        spec: the parsed job spec (`spec.mlflow` names the experiment, model and tags).
        tracking_uri: the MLflow the job writes to (the spec's, else the driver's).
        resolved: model references already resolved to URIs (`anneal.control.refs.resolve`).
        artifact_root: where a local store keeps artifacts (embedded); None: the server decides.
        tags: tags the driver adds (the operator's attempt and submission id) over the spec's.
    """
    mlflow = spec.mlflow
    return {
        "kind": kind,
        "namespace": namespace,
        "name": name,
        "uid": uid,
        "tracking_uri": tracking_uri,
        "experiment": mlflow.experiment or default_experiment,
        "registered_model_name": registered_model_name(mlflow, namespace, name),
        "work_dir": work_dir(work_root, kind, namespace, name, uid),
        "cache_dir": str(cache_dir),
        "artifact_root": artifact_root,
        "run_id": run_id,
        "resolved_uris": dict(resolved),
        "extra_tags": {**dict(mlflow.tags), **dict(tags or {})},
    }


def rayjob_name(kind: str, name: str, attempt: int) -> str:
    """The per-job RayJob of one attempt: `<name>-<kind code>-a<attempt>`, unique per kind.

    A name too long to keep whole is cut and given a digest of the whole, so two long names
    with one prefix still get two RayJobs.
    """
    suffix = f"-{KIND_CODES.get(kind, kind.lower()[:4])}-a{attempt}"
    if len(name) + len(suffix) <= MAX_RAYJOB_NAME:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[: MAX_RAYJOB_NAME - len(suffix) - 7].rstrip('-')}-{digest}{suffix}"


__all__ = ["KIND_CODES", "job_context", "rayjob_name", "registered_model_name", "work_dir"]
