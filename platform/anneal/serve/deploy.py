"""Deploying a ModelService app declaratively, and live reweighting (contract 2).

Every path uses the same Serve config entry (`build_serve_config`): the in-process Serve
controller (embedded mode), the Serve REST API of a shared cluster, or a KubeRay RayService's
`serveConfigV2`. Serve keys an application's code version on its import path and `args`; the
live weights live in the router's `user_config` override, so changing only them is a
lightweight update: Serve calls `Router.reconfigure` on the running replicas, restarts
nothing, and drops no request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from anneal.serve.app import AppArgs, build_serve_config
from anneal.serve.routing import normalise_weights


def deploy_entries(entries: list[dict[str, Any]], *, dashboard_url: str | None = None, wait_s: float = 300.0) -> None:
    """Deploy Serve config entries, keeping every other declaratively deployed app as it is.

    Args:
        entries: `applications[]` entries (`build_serve_config`).
        dashboard_url: a Ray dashboard URL (`http://ray-head:8265`) to use the Serve REST API;
            None uses the Serve controller of the Ray this process is connected to.
        wait_s: how long to wait for the apps to be RUNNING (0: do not wait).

    Raises:
        RuntimeError: an app failed to deploy (the message carries Serve's reason).
        TimeoutError: the apps were not RUNNING within `wait_s`.
    """
    if dashboard_url:
        _rest_deploy(dashboard_url, entries, wait_s)
        return
    import ray
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    # The public API deploys from Python objects only (a random code version per call, so every
    # call restarts replicas); the declarative path below is what `serve deploy` and the REST
    # API use, and keeps `reconfigure`-only updates lightweight.
    client = serve_start()
    current = ray.get(client._controller.get_app_configs.remote())
    apps = {name: cfg.model_dump(exclude_unset=True) for name, cfg in current.items()}
    for e in entries:
        apps[e["name"]] = e
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))
    if wait_s > 0:
        wait_running([e["name"] for e in entries], wait_s)


def _why(app: Any) -> str:
    """The failed deployments' own reasons: the last line of each message (the exception a replica's
    constructor or `reconfigure` raised, e.g. an engine that cannot load the model)."""
    reasons = []
    for name, d in (getattr(app, "deployments", None) or {}).items():
        if d.status in ("UNHEALTHY", "DEPLOY_FAILED") and d.message:
            lines = [ln.strip() for ln in str(d.message).strip().splitlines() if ln.strip()]
            reasons.append(f"{name}: {lines[-1][:600]}")
    return (" (" + "; ".join(reasons) + ")") if reasons else ""


def wait_running(names: list[str], timeout_s: float) -> None:
    """Wait until the named Serve apps are RUNNING with no update in progress."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications
        states = {n: status.get(n) for n in names}
        failed = {n: s for n, s in states.items() if s is not None and s.status in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError("; ".join(f"Serve app {n}: {s.status}: {s.message}{_why(s)}" for n, s in failed.items()))
        if all(s is not None and s.status == "RUNNING" and all(
                d.status == "HEALTHY" for d in s.deployments.values()) for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve apps {names} not RUNNING after {timeout_s:g}s: "
                               + ", ".join(f"{n}={s.status if s else 'absent'}" for n, s in states.items()))
        time.sleep(0.2)


def apply_weights(app_name: str, args: AppArgs, weights: Mapping[str, int], *,
                  routing: Mapping[str, Any] | None = None, dashboard_url: str | None = None,
                  wait_s: float = 60.0) -> dict[str, int]:
    """Contract 2: set the live weights of a running ModelService app.

    Redeploys the same Serve config entry with only the router's `user_config` changed
    (`{"weights": {...}, "routing": {...}}`), so Serve calls `Router.reconfigure` in place.

    Args:
        app_name: the Serve application name (`AppArgs.service`).
        args: the args the app was deployed with (unchanged, or Serve rebuilds the app).
        weights: variant → integer weight; the weights sum to 100 (a variant left out gets 0).
        routing: optional routing overrides (`shadow`, `dynamic`, `reasoning`).
        dashboard_url: the cluster's Ray dashboard URL for the Serve REST API; None: in-process.
        wait_s: wait for the update to finish.

    Returns:
        The weights applied.

    Raises:
        ValueError: unknown variant, non-integer weight, or weights not summing to 100.
    """
    valid = normalise_weights(weights, [v.name for v in args.variants])
    if app_name != args.service:
        args = args.model_copy(update={"service": app_name})
    deploy_entries([build_serve_config(args, valid, routing)], dashboard_url=dashboard_url, wait_s=wait_s)
    if dashboard_url is None and wait_s > 0:
        _wait_weights(app_name, valid, wait_s)
    return valid


def _wait_weights(app_name: str, weights: dict[str, int], timeout_s: float) -> None:
    """Wait until every router replica has taken the new weights (reconfigure ran)."""
    from ray import serve

    from anneal.serve.app import ROUTER_DEPLOYMENT

    handle = serve.get_deployment_handle(ROUTER_DEPLOYMENT, app_name)
    deadline = time.monotonic() + timeout_s
    while True:
        seen = handle.broadcast("current_weights").results()
        if seen and all(w == weights for w in seen):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"router of {app_name} still has weights {seen}, not {weights}")
        time.sleep(0.1)


#: One lock per Serve REST API: its PUT replaces the whole set of apps, so two concurrent
#: read-modify-writes (ten ModelServices applied at once) would drop each other's apps.
_REST_LOCKS: dict[str, threading.Lock] = {}
_REST_LOCKS_GUARD = threading.Lock()


def update_serve_apps(http: Any, dashboard_url: str, put: list[dict[str, Any]] = (),
                      remove: tuple[str, ...] = ()) -> bool:
    """Add or replace apps (`put`) and drop apps (`remove`) on a shared cluster, keeping every other app.

    The REST API has no per-app write: this reads the deployed configs, edits them and puts
    them back, under a per-cluster lock, keeping Serve's HTTP options as they are (removing
    the last app leaves Serve up for the other tenants).

    Returns:
        Whether anything was written (removing an absent app writes nothing).
    """
    base = dashboard_url.rstrip("/") + "/api/serve/applications/"
    with _REST_LOCKS_GUARD:
        lock = _REST_LOCKS.setdefault(base, threading.Lock())
    with lock:
        r = http.get(base)
        r.raise_for_status()
        details = r.json()
        apps = {name: a["deployed_app_config"] for name, a in (details.get("applications") or {}).items()
                if a.get("deployed_app_config")}
        if not put and not any(n in apps for n in remove):
            return False
        for name in remove:
            apps.pop(name, None)
        for e in put:
            apps[e["name"]] = e
        body: dict[str, Any] = {"applications": list(apps.values())}
        if details.get("http_options"):
            body["http_options"] = details["http_options"]
        r = http.put(base, json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"Serve REST API {dashboard_url}: {r.status_code} {r.text[:500]}")
        return True


def _rest_deploy(dashboard_url: str, entries: list[dict[str, Any]], wait_s: float) -> None:
    import httpx

    from anneal.runtime.jobs_api import ray_auth_headers

    base = dashboard_url.rstrip("/") + "/api/serve/applications/"
    with httpx.Client(timeout=30.0, headers=ray_auth_headers()) as http:
        update_serve_apps(http, dashboard_url, put=entries)
        deadline = time.monotonic() + wait_s
        names = [e["name"] for e in entries]
        while wait_s > 0:
            apps_now = http.get(base).json().get("applications") or {}
            states = {n: (apps_now.get(n) or {}).get("status") for n in names}
            if all(s == "RUNNING" for s in states.values()):
                return
            bad = {n: s for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
            if bad:
                raise RuntimeError(f"Serve apps failed: {bad}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve apps not RUNNING after {wait_s:g}s: {states}")
            time.sleep(1.0)
