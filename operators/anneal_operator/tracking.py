"""What the job controllers read and write in MLflow, over REST for tracking servers.

A tracking server (`http(s)://`, the normal case in a cluster) is spoken to with the small
REST client (`anneal.tracking.rest`): the operator never imports `mlflow` for its jobs. Any
other URI (a local `sqlite:///` or `file:` store, in development) goes through
`anneal.tracking.mlflow_store`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Protocol

from anneal.tracking import mlflow_store as store
from anneal.tracking.rest import RunView, is_rest_uri, rest_client

log = logging.getLogger("anneal_operator.tracking")


class Tracker(Protocol):
    def find_run(self, target: store.TrackingTarget, tags: Mapping[str, str]) -> str | None: ...
    def get_run(self, run_id: str) -> RunView: ...
    def read_result(self, run: RunView) -> dict[str, Any] | None: ...
    def kill(self, run_id: str) -> None: ...


class RestTracker:
    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.rest = rest_client(tracking_uri)

    def find_run(self, target: store.TrackingTarget, tags: Mapping[str, str]) -> str | None:
        return self.rest.find_run(target.experiment, tags)

    def get_run(self, run_id: str) -> RunView:
        return self.rest.get_run(run_id)

    def read_result(self, run: RunView) -> dict[str, Any] | None:
        if store.TAG_PHASE not in run.tags:
            return None
        try:
            return self.rest.load_json(run.artifact_uri, store.RESULT_ARTIFACT)
        except ValueError:  # artifacts not proxied by the server (s3://, gs://, ...): MLflow's own client
            return store.read_result(self.uri, run.run_id)
        except Exception as exc:
            log.warning("MLflow %s: cannot read the result artifact of run %s (%s); using its tags",
                        self.uri, run.run_id, exc)
            return _result_from_tags(run)

    def kill(self, run_id: str) -> None:
        self.rest.set_terminated(run_id, "KILLED")


class StoreTracker:
    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri

    def find_run(self, target: store.TrackingTarget, tags: Mapping[str, str]) -> str | None:
        return store.find_run(target, tags)

    def get_run(self, run_id: str) -> RunView:
        run = store.client(self.uri).get_run(run_id)
        return RunView(run_id=run.info.run_id, status=run.info.status, artifact_uri=run.info.artifact_uri,
                       tags=dict(run.data.tags), metrics=dict(run.data.metrics))

    def read_result(self, run: RunView) -> dict[str, Any] | None:
        if store.TAG_PHASE not in run.tags:
            return None
        return store.read_result(self.uri, run.run_id)

    def kill(self, run_id: str) -> None:
        from mlflow.entities import RunStatus

        store.client(self.uri).set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def _result_from_tags(run: RunView) -> dict[str, Any]:
    return {"phase": run.tags.get(store.TAG_PHASE), "modelUri": run.tags.get(store.TAG_MODEL_URI),
            "message": run.tags.get(store.TAG_MESSAGE)}


def tracker(tracking_uri: str) -> Tracker:
    return RestTracker(tracking_uri) if is_rest_uri(tracking_uri) else StoreTracker(tracking_uri)
