"""The deployed end of the lineage: which model version serves which variant of a ModelService,
at which weight, since when — with or without a rollout.

Both drivers call `record_deployment` whenever what a service serves changes (a model or a
weight; `deployment_digest` tells when). It writes, in the service's MLflow run
(`serve-<app>`, the run the router's decision log also goes to):

* tags ``anneal.deployed.<variant>`` = the model URI (the pinned version for a registry URI),
* metrics ``deployed.weight.<variant>`` (one point per change, so the run's charts show the
  traffic split over time),
* an artifact ``deployments/<ms>.json`` with the whole record;

and on every registered model version it serves, a tag ``anneal.serving.<namespace>.<name>``
= ``<variant>:<weight>`` (removed from a version the service no longer serves), so a model
version's page says where it is live.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Mapping

log = logging.getLogger(__name__)

RUN_TAG_SERVICE = "anneal.service"
TAG_DEPLOYED = "anneal.deployed."
TAG_SERVING = "anneal.serving."
METRIC_WEIGHT = "deployed.weight."


def service_run(client: Any, experiment: str, service: str) -> str:
    """The id of the service's MLflow run (`serve-<service>`), created on first use."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    name = f"serve-{service}"
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.runName = '{name}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    return client.create_run(exp_id, run_name=name, tags={RUN_TAG_SERVICE: service}).info.run_id


def deployment_digest(models: Mapping[str, str], weights: Mapping[str, int]) -> str:
    """A short digest of what a service serves: record again when it changes."""
    text = json.dumps({"models": dict(models), "weights": dict(weights)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_deployment(
    tracking_uri: str,
    experiment: str,
    *,
    namespace: str,
    name: str,
    service: str,
    models: Mapping[str, str],
    weights: Mapping[str, int],
    previous_models: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Record in MLflow that `service` now serves `models` at `weights` (see the module doc).

    Args:
        service: the Serve app name (`anneal.control.service.app_name`).
        models: variant → model URI as deployed (`models:/Name@alias` is pinned to its version).
        previous_models: what was served before; versions no longer served lose their tag.

    Returns:
        The record written (``runId``, ``time``, ``models``, ``versions``, ``weights``).

    Raises:
        Exception: MLflow could not be written; the caller logs it and tries again later.
    """
    from mlflow.entities import Metric

    from anneal.rollout.aliases import resolve_version
    from anneal.tracking import mlflow_store as store

    client = store.client(tracking_uri)
    run_id = service_run(client, experiment, service)
    now = int(time.time() * 1000)
    versions = {v: resolve_version(client, uri) for v, uri in models.items()}
    record = {
        "runId": run_id, "time": now, "namespace": namespace, "name": name, "service": service,
        "models": dict(models), "weights": {v: int(weights.get(v, 0)) for v in models},
        "versions": {v: ref.uri for v, ref in versions.items() if ref is not None},
    }
    tags = {f"{TAG_DEPLOYED}{v}": (versions[v].uri if versions[v] else uri) for v, uri in models.items()}
    tags.update({RUN_TAG_SERVICE: service, store.TAG_KIND: "ModelService", store.TAG_NAMESPACE: namespace,
                 store.TAG_NAME: name})
    client.log_batch(run_id, metrics=[Metric(f"{METRIC_WEIGHT}{v}", float(w), now, 0)
                                      for v, w in record["weights"].items()])
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.log_text(run_id, json.dumps(record, indent=2, sort_keys=True), f"deployments/{now}.json")
    key = f"{TAG_SERVING}{namespace}.{name}"
    serving: dict[tuple[str, str], list[str]] = {}
    for v, ref in versions.items():
        if ref is not None:
            serving.setdefault((ref.name, ref.version), []).append(f"{v}:{record['weights'][v]}")
    for (model, version), parts in serving.items():
        client.set_model_version_tag(model, version, key, ",".join(parts))
    for uri in (previous_models or {}).values():
        try:
            old = resolve_version(client, uri)
        except Exception:  # noqa: BLE001 - an alias that no longer resolves: nothing to untag
            continue
        if old is not None and (old.name, old.version) not in serving:
            try:
                client.delete_model_version_tag(old.name, old.version, key)
            except Exception:  # noqa: BLE001 - the tag was never there
                pass
    return record


class DeploymentRecorder:
    """`record_deployment` for a long-lived driver (`anneal run`): records on change, never raises.

    A failed write is logged and tried again at the next `update`.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, namespace: str, name: str, service: str):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.namespace, self.name, self.service = namespace, name, service
        self.digest: str | None = None
        self.models: dict[str, str] = {}
        self.last: dict[str, Any] | None = None

    def update(self, models: Mapping[str, str], weights: Mapping[str, int]) -> dict[str, Any] | None:
        digest = deployment_digest(models, weights)
        if digest == self.digest:
            return None
        try:
            self.last = record_deployment(self.tracking_uri, self.experiment, namespace=self.namespace,
                                          name=self.name, service=self.service, models=models, weights=weights,
                                          previous_models=self.models)
        except Exception as exc:  # noqa: BLE001 - MLflow down: serving goes on
            log.warning("%s: cannot record the deployment in MLflow %s: %s", self.service, self.tracking_uri, exc)
            return None
        self.digest, self.models = digest, dict(models)
        return self.last


__all__ = ["DeploymentRecorder", "deployment_digest", "record_deployment", "service_run"]
