"""Many tenants on one shared Ray cluster, through `kubectl` and the operator: the session's Ray
head (2 CPUs, Serve through its REST API), a real API server, a real `mlflow server`.

* ten ModelServices applied at once all end up running (the REST API replaces the whole app
  list, so a lost read-modify-write would drop one), two of them the namespace-collision pair
  `<p>-x-y/z` and `<p>-x/y-z`, which get two apps;
* an app deleted from Serve by hand is redeployed (the operator is level-based);
* changing one variant's model redeploys that variant only: the router's and the other
  variant's replicas stay, requests to the other variant keep succeeding, and the change is
  recorded in MLflow (the deployed end of the lineage).

The operator here runs with `ROUTER_CPUS=0.05` and the variants ask for 0.05 CPU: ten
services' routers and variants then fit the head's 2 logical CPUs (what they reserve, not what
they burn). In the ten-service test the variants scale to zero (`minReplicas: 0`), so the test
starts ten router replicas, not twenty model processes on two cores: what is under test is the
Serve config, not model loading, which the third test does.
"""

from __future__ import annotations

import json
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from anneal.control.service import app_name
from tests.e2e.test_operator import Operator, _job, _status, _wait
from tests.e2e.test_service_shared import (  # noqa: F401 - module fixtures
    READY_TIMEOUT,
    _remove_app,
    _serve_apps,
    _serve_details,
    serve_port,
    tiny_models,
)
from tests.e2e.test_service_shared import _wait_or_explain as _wait_serve

pytestmark = pytest.mark.e2e

CPU = 0.05


@pytest.fixture(scope="module")
def operator(kube_cluster, mlflow_server):
    """This module's operator: routers reserve 0.05 CPU, so many services fit the 2-CPU head."""
    op = Operator(kube_cluster.kubeconfig, mlflow_server, Path(tempfile.mkdtemp(prefix="anneal-e2e-tenancy-")),
                  ANNEAL_OPERATOR_ROUTER_CPUS=str(CPU))
    op.start()
    yield op
    op.stop()


@pytest.fixture
def namespaces(kube_cluster):
    """Make namespaces on demand (`make(name)`); all deleted afterwards."""
    made: list[str] = []

    def make(name: str) -> str:
        kube_cluster.kubectl("create", "namespace", name)
        made.append(name)
        return name

    yield make
    for ns in made:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def _variant(name: str, uri: str, weight: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": {"uri": uri}, "weight": weight, "resources": {"cpusPerWorker": CPU},
            "generation": {"maxTokens": 2}, **extra}


def _ready(status: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def _replicas(ray: str, app: str) -> dict[str, list[str]]:
    deps = (_serve_apps(ray).get(app) or {}).get("deployments") or {}
    return {name: sorted(r["replica_id"] for r in d.get("replicas") or [] if r.get("state") == "RUNNING")
            for name, d in deps.items()}


def _take_apps_off(ray: str, apps: list[str]) -> None:
    """Remove this test's apps from the shared head in one write (the namespaces' deletion does it too)."""
    details = _serve_details(ray)
    keep = [a["deployed_app_config"] for n, a in (details.get("applications") or {}).items()
            if n not in apps and a.get("deployed_app_config")]
    httpx.put(ray + "/api/serve/applications/", timeout=120,
              json={"applications": keep, "http_options": details.get("http_options") or {}})


def test_ten_services_applied_at_once_all_run_and_a_deleted_app_comes_back(
        kube_cluster, namespaces, operator, ray_head, serve_port, tiny_models):  # noqa: F811
    from anneal.runtime.jobs_api import cluster_resources

    kube, op = kube_cluster, operator
    # What the capacity warning compares with, read from the real head (started with --num-cpus=2).
    assert cluster_resources(ray_head)["CPU"] == 2.0
    p = f"e2e-ten-{uuid.uuid4().hex[:5]}"
    # Eight plain tenants and the collision pair: "-" joined, both would be "<p>-x-y-z".
    pairs = [(f"{p}-{i}", "svc") for i in range(8)] + [(f"{p}-x-y", "z"), (f"{p}-x", "y-z")]
    docs = []
    for ns, name in pairs:
        namespaces(ns)
        spec = {"variants": [_variant("only", tiny_models["small"], 100,
                                      autoscaling={"minReplicas": 0, "maxReplicas": 1})],
                "ray": {"address": ray_head}}
        docs.append({**_job(name, spec, kind="ModelService"), "metadata": {"name": name, "namespace": ns}})
    apps = [app_name(ns, name) for ns, name in pairs]
    assert len(set(apps)) == 10
    try:
        # One kubectl apply of all ten: the operator reconciles them concurrently.
        kube.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
        _wait_serve("ten services Ready", lambda: all(_ready(_status(kube, ns, "msvc", name)) for ns, name in pairs),
                    READY_TIMEOUT, op, ray_head, apps[0], every=3)
        running = {n: a.get("status") for n, a in _serve_apps(ray_head).items() if n in apps}
        assert running == {a: "RUNNING" for a in apps}, running
        routes = {_status(kube, ns, "msvc", name)["endpoint"] for ns, name in pairs}
        assert len(routes) == 10, routes  # the collision pair has two routes too

        # An app removed from Serve behind the operator's back is redeployed.
        gone = apps[-1]
        deployed_at = _serve_apps(ray_head)[gone]["last_deployed_time_s"]
        _remove_app(ray_head, gone)  # Serve deletes it asynchronously; the operator may be back first
        _wait_serve("the removed app redeployed", lambda: (a := _serve_apps(ray_head).get(gone) or {}).get("status")
                    == "RUNNING" and a["last_deployed_time_s"] > deployed_at, READY_TIMEOUT, op, ray_head, gone,
                    every=2)
        ns, name = pairs[-1]
        _wait("its service Ready again", lambda: _ready(_status(kube, ns, "msvc", name)), 120)
        assert all(a in _serve_apps(ray_head) for a in apps)  # redeploying it dropped no other tenant
    finally:
        _take_apps_off(ray_head, apps)


def test_a_model_change_redeploys_that_variant_only_and_is_recorded_in_mlflow(
        kube_cluster, namespaces, operator, ray_head, serve_port, tiny_models, mlflow_server):  # noqa: F811
    from mlflow import MlflowClient

    kube, op = kube_cluster, operator
    ns = namespaces(f"e2e-onevariant-{uuid.uuid4().hex[:5]}")
    name, app = "two", app_name(ns, "two")
    spec = {"variants": [_variant("stable", tiny_models["small"], 100), _variant("canary", tiny_models["small"], 0)],
            "ray": {"address": ray_head}}
    try:
        kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job(name, spec, kind="ModelService")))
        st = _wait_serve("the service Ready", lambda: (s := _status(kube, ns, "msvc", name)) and _ready(s) and s,
                         READY_TIMEOUT, op, ray_head, app, every=2)
        before = _replicas(ray_head, app)
        assert before["router"] and before["variant-stable"] and before["variant-canary"], before

        client = MlflowClient(tracking_uri=mlflow_server)
        run = _wait("the deployment recorded in MLflow", lambda: client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.mlflow.runName = 'serve-{app}'"), 60)[0]
        assert run.data.tags["anneal.deployed.canary"] == tiny_models["small"]
        assert run.data.metrics["deployed.weight.stable"] == 100.0

        stop, codes = threading.Event(), []

        def load() -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    r = c.post(st["endpoint"] + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                               headers={"x-anneal-variant": "stable"})
                    codes.append(r.status_code)

        t = threading.Thread(target=load)
        t.start()
        try:
            kube.kubectl("patch", "msvc", name, "-n", ns, "--type=json", "-p", json.dumps(
                [{"op": "replace", "path": "/spec/variants/1/model/uri", "value": tiny_models["large"]}]))
            _wait_serve("the canary serving the large model", lambda: _status(kube, ns, "msvc", name).get(
                "models", {}).get("canary") == tiny_models["large"] and (_serve_apps(ray_head).get(app) or {}).get(
                "status") == "RUNNING" and _canary_model(ray_head, app) == tiny_models["large"],
                READY_TIMEOUT, op, ray_head, app, every=2)
        finally:
            stop.set()
            t.join()
        after = _replicas(ray_head, app)
        assert after["router"] == before["router"] and after["variant-stable"] == before["variant-stable"], \
            (before, after)
        assert codes and set(codes) == {200}, sorted(set(codes))
        run = client.get_run(run.info.run_id)
        assert run.data.tags["anneal.deployed.canary"] == tiny_models["large"]
    finally:
        _take_apps_off(ray_head, [app])


def _canary_model(ray: str, app: str) -> str | None:
    config = (_serve_apps(ray).get(app) or {}).get("deployed_app_config") or {}
    for d in config.get("deployments") or []:
        if d.get("name") == "variant-canary":
            return (d.get("user_config") or {}).get("model_uri")
    return None
