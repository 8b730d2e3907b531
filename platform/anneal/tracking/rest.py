"""A small MLflow REST client for long-lived control-plane processes (the operator).

The operator needs four MLflow calls per job: find the experiment, find the job's run by its
tags, read it, end it; and one artifact (the recipe's result JSON). The job creates its run. `mlflow`'s own
client brings pandas, numpy and the GenAI modules with it (about 165 MB resident, 3 s to
import), and its HTTP layer retries a failing server for minutes with exponential backoff
inside the calling thread. This client speaks the documented REST API
(`/api/2.0/mlflow/...`, `/api/2.0/mlflow-artifacts/...`) with httpx, in a few MB, and fails
fast: the operator's reconcile passes are level-based and simply try again on the next pass.

Authentication follows MLflow's own environment variables: `MLFLOW_TRACKING_TOKEN` (bearer),
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` (basic), `MLFLOW_TRACKING_INSECURE_TLS`,
`MLFLOW_TRACKING_SERVER_CERT_PATH`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import quote

import httpx

from anneal.tracking.mlflow_store import tag_filter

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
#: Transient answers worth one quick retry inside a call (more waiting is the caller's business).
RETRY_STATUS = {429, 502, 503, 504}


class MlflowRestError(RuntimeError):
    """An MLflow request failed; `status` is the HTTP status (None: no answer), `code` MLflow's error code."""

    def __init__(self, message: str, status: int | None = None, code: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class RunView:
    """What the operator reads of a run."""

    run_id: str
    status: str
    artifact_uri: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def is_rest_uri(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


class MlflowRest:
    """One tracking server; thread-safe (one httpx connection pool)."""

    def __init__(self, tracking_uri: str, timeout: float = 10.0, retries: int = 2,
                 transport: httpx.BaseTransport | None = None):
        if not is_rest_uri(tracking_uri):
            raise ValueError(f"{tracking_uri!r}: the REST client needs an http(s):// tracking URI")
        self.base = tracking_uri.rstrip("/")
        self.retries = retries
        auth: Any = None
        headers = {}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        verify: Any = True
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
            verify = False
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        self._http = httpx.Client(base_url=self.base, timeout=timeout, auth=auth, headers=headers,
                                  verify=verify, transport=transport)

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ transport

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.2 * 2 ** (attempt - 1))
            try:
                r = self._http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                last = MlflowRestError(f"MLflow at {self.base} unreachable: {exc}")
                continue
            if r.status_code in RETRY_STATUS:
                last = MlflowRestError(f"MLflow {method} {path}: {r.status_code} {r.text[:200]}", r.status_code)
                continue
            return r
        assert last is not None
        raise last

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        r = self._call(method, API + path, **kwargs)
        if r.status_code >= 400:
            try:
                err = r.json()
            except ValueError:
                err = {}
            raise MlflowRestError(f"MLflow {method} {path}: {r.status_code} "
                                  f"{err.get('error_code', '')} {err.get('message') or r.text[:300]}".strip(),
                                  r.status_code, err.get("error_code", ""))
        return r.json() if r.content else {}

    # ---------------------------------------------------------------- experiments

    def experiment(self, name: str) -> dict[str, Any] | None:
        try:
            return self._json("GET", "/experiments/get-by-name", params={"experiment_name": name})["experiment"]
        except MlflowRestError as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST" or exc.status == 404:
                return None
            raise

    def get_run(self, run_id: str) -> RunView:
        run = self._json("GET", "/runs/get", params={"run_id": run_id})["run"]
        return _view(run)

    def find_run(self, experiment: str, tags: Mapping[str, str]) -> str | None:
        """The newest run of `experiment` carrying every tag in `tags`, or None."""
        exp = self.experiment(experiment)
        if exp is None:
            return None
        runs = self._json("POST", "/runs/search", json={
            "experiment_ids": [exp["experiment_id"]], "filter": tag_filter(tags), "max_results": 1,
            "order_by": ["attributes.start_time DESC"],
        }).get("runs") or []
        return runs[0]["info"]["run_id"] if runs else None

    def set_terminated(self, run_id: str, status: str = "KILLED") -> None:
        self._json("POST", "/runs/update", json={"run_id": run_id, "status": status,
                                                   "end_time": int(time.time() * 1000)})

    # ------------------------------------------------------------------ artifacts

    def load_json(self, artifact_uri: str, path: str) -> Any:
        """An artifact of a run stored behind the server's artifact proxy (`mlflow-artifacts:` URIs).

        Raises:
            ValueError: the run's artifacts are not proxied by the server (e.g. `s3://`).
        """
        root = artifact_uri
        if root.startswith("mlflow-artifacts:"):
            root = root[len("mlflow-artifacts:"):]
            if root.startswith("//"):  # mlflow-artifacts://host:port/path
                root = "/" + root[2:].split("/", 1)[1] if "/" in root[2:] else "/"
        elif root.startswith(self.base + ARTIFACTS):
            root = root[len(self.base + ARTIFACTS):]
        else:
            raise ValueError(f"{artifact_uri}: not served by the tracking server's artifact proxy")
        r = self._call("GET", f"{ARTIFACTS}/{quote(root.strip('/'))}/{quote(path)}")
        if r.status_code >= 400:
            raise MlflowRestError(f"MLflow artifact {path} of {artifact_uri}: {r.status_code} {r.text[:200]}",
                                  r.status_code)
        return r.json()


def _view(run: Mapping[str, Any]) -> RunView:
    info, data = run.get("info") or {}, run.get("data") or {}
    return RunView(
        run_id=info.get("run_id") or info.get("run_uuid") or "",
        status=info.get("status") or "",
        artifact_uri=info.get("artifact_uri") or "",
        tags={t["key"]: t.get("value", "") for t in data.get("tags") or []},
        metrics={m["key"]: float(m["value"]) for m in data.get("metrics") or []},
    )


_clients: dict[str, MlflowRest] = {}
_clients_lock = threading.Lock()


def rest_client(tracking_uri: str) -> MlflowRest:
    """The process's REST client of `tracking_uri`."""
    with _clients_lock:
        c = _clients.get(tracking_uri)
        if c is None:
            c = _clients[tracking_uri] = MlflowRest(tracking_uri)
        return c
