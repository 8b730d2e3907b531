"""A small client of the Ray Jobs API (the dashboard's `/api/jobs/`), idempotent by submission id."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from anneal.runtime.plan import JobPlan

log = logging.getLogger(__name__)

#: Ray job states (`ray.job_submission.JobStatus`).
PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"
TERMINAL = {STOPPED, SUCCEEDED, FAILED}


class JobsApiError(RuntimeError):
    """The Jobs API answered with an error (or could not be reached); `transient` says whether to retry."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class RayJobInfo:
    """What the Jobs API says about one submission."""

    submission_id: str
    status: str
    message: str = ""
    start_time: int | None = None
    end_time: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def ray_auth_headers() -> dict[str, str]:
    """The `Authorization` header for a Ray cluster with token authentication (Ray >= 2.52).

    The token comes from where Ray itself looks: `RAY_AUTH_TOKEN`, else the file named by
    `RAY_AUTH_TOKEN_PATH` (a missing or empty file is an error, as in Ray), else
    `~/.ray/auth_token` when it exists. No token: no header (a cluster without authentication).

    Raises:
        JobsApiError: `RAY_AUTH_TOKEN_PATH` names a file that cannot be read or is empty.
    """
    import os
    from pathlib import Path

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise JobsApiError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token: {exc}", transient=False) from None
        if not token:
            raise JobsApiError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty", transient=False)
    if not token:
        default = Path.home() / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_url(address: str) -> str:
    """The dashboard base URL of a `spec.ray.address` (`http(s)://host:port`).

    Raises:
        JobsApiError: an address the Jobs API cannot use (`ray://`, `auto`, `local`).
    """
    if not address.startswith(("http://", "https://")):
        raise JobsApiError(
            f"{address!r} is not a Ray dashboard URL: the operator submits through the Ray Jobs API, "
            "use e.g. http://ray-head:8265",
            transient=False,
        )
    return address.rstrip("/")


def cluster_resources(address: str, timeout: float = 10.0) -> dict[str, float]:
    """The total logical resources (`CPU`, `GPU`, ...) of a Ray cluster's alive nodes (state API).

    Raises:
        JobsApiError: the dashboard could not be read.
    """
    try:
        r = httpx.get(dashboard_url(address) + "/api/v0/nodes", params={"detail": "1", "limit": "10000"},
                      timeout=timeout, headers=ray_auth_headers())
        r.raise_for_status()
        body = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise JobsApiError(f"Ray state API at {address}: cannot list nodes: {exc}") from exc
    data = body.get("data") or {}
    nodes = (data.get("result") or {}).get("result") if isinstance(data.get("result"), dict) else data.get("result")
    total: dict[str, float] = {}
    for node in nodes or []:
        if str(node.get("state", "ALIVE")).upper() != "ALIVE":
            continue
        for k, v in (node.get("resources_total") or {}).items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0.0) + float(v)
    return total


_capacity_cache: dict[str, tuple[float, dict[str, float] | None]] = {}
_capacity_lock = threading.Lock()


def cluster_resources_cached(address: str, ttl_s: float = 30.0) -> dict[str, float] | None:
    """`cluster_resources`, read at most once per `ttl_s` per address (None: it could not be read).

    A controller checks every submission against it; hundreds of jobs at once must not mean
    hundreds of node listings.
    """
    now = time.monotonic()
    with _capacity_lock:
        hit = _capacity_cache.get(address)
        if hit is not None and now - hit[0] < ttl_s:
            return hit[1]
    try:
        value: dict[str, float] | None = cluster_resources(address)
    except JobsApiError as exc:
        log.info("%s", exc)
        value = None
    with _capacity_lock:
        _capacity_cache[address] = (now, value)
    return value


class JobsApiClient:
    """Submit, read and stop Ray jobs by deterministic submission id.

    `submit` is safe to repeat: a submission id that already exists is reported as
    `"exists"`, never as a second job.
    """

    def __init__(self, address: str, timeout: float = 15.0, transport: httpx.BaseTransport | None = None):
        self.base = dashboard_url(address)
        self._http = httpx.Client(base_url=self.base, timeout=timeout, transport=transport, headers=ray_auth_headers())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "JobsApiClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise JobsApiError(f"Ray Jobs API at {self.base} unreachable: {exc}") from exc

    def get(self, submission_id: str) -> RayJobInfo | None:
        """The job's state, or None when the cluster has no job with that id."""
        r = self._request("GET", f"/api/jobs/{submission_id}")
        if r.status_code == 404:
            return None
        if r.status_code >= 400:
            raise JobsApiError(f"Ray Jobs API GET {submission_id}: {r.status_code} {r.text[:300]}")
        d = r.json()
        return RayJobInfo(
            submission_id=d.get("submission_id") or submission_id,
            status=str(d.get("status") or PENDING),
            message=d.get("message") or "",
            start_time=d.get("start_time"),
            end_time=d.get("end_time"),
        )

    def submit(self, plan: JobPlan) -> str:
        """Submit the plan's job; returns `"submitted"` or `"exists"` (same id already there)."""
        if self.get(plan.submission_id) is not None:
            return "exists"
        r = self._request("POST", "/api/jobs/", json=plan.jobs_api_request())
        if r.status_code < 400:
            return "submitted"
        if r.status_code == 409 or "already exists" in r.text:
            return "exists"
        transient = r.status_code >= 500 and "already exists" not in r.text
        raise JobsApiError(f"Ray Jobs API submit {plan.submission_id}: {r.status_code} {r.text[-500:]}", transient)

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job; False when it is unknown or already finished."""
        r = self._request("POST", f"/api/jobs/{submission_id}/stop")
        if r.status_code == 404:
            return False
        if r.status_code >= 400:
            raise JobsApiError(f"Ray Jobs API stop {submission_id}: {r.status_code} {r.text[:300]}")
        try:
            return bool(r.json().get("stopped"))
        except ValueError:
            return True

    def list(self) -> list[dict[str, Any]]:
        r = self._request("GET", "/api/jobs/")
        if r.status_code >= 400:
            raise JobsApiError(f"Ray Jobs API list: {r.status_code} {r.text[:300]}")
        return list(r.json())
