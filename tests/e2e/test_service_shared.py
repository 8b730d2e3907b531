"""A ModelService on a shared Ray cluster, through the operator: a real API server, the
session's Ray head (Serve through its REST API) and two tiny Llama variants built here.

Serve is started on a free port before the operator sees the resource, as a cluster admin
would with `serve start --http-port N`, so the published endpoint must carry the port Serve
really listens on, not Serve's default 8000. The Serve app is removed on the way out whatever
happens, so that other tests sharing the Ray head find none of ours.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import httpx
import pytest

from tests.e2e.test_operator import Operator, _free_port, _get, _job, _status, _wait
from tests.e2e.test_operator import operator  # noqa: F401 - the module-scoped operator fixture, one per module

pytestmark = pytest.mark.e2e

NAME = "chat"
FINALIZER = "anneal.dev/finalizer"
READY_TIMEOUT = 600  # two replicas import torch and load a model on two loaded cores


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, str]:
    """Two tiny Llama checkpoints (different sizes) on local disk, readable by the Ray workers."""
    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_corpus, train_tokenizer

    # Outside pytest's basetemp: concurrent pytest sessions prune each other's numbered directories.
    root = Path(tempfile.mkdtemp(prefix="anneal-e2e-models-"))
    tokenizer = train_tokenizer(builtin_corpus(20), vocab_size=300)
    paths = {}
    for seed, (name, hidden) in enumerate([("small", 32), ("large", 64)]):
        shape = LlamaShape(hidden_size=hidden, layers=1, heads=4, kv_heads=2, intermediate_size=2 * hidden)
        paths[name] = str(save_pretrained(build_llama(shape, tokenizer, seed=seed), tokenizer, root / name))
    yield paths
    shutil.rmtree(root, ignore_errors=True)


def _serve_details(ray: str) -> dict[str, Any]:
    r = httpx.get(ray + "/api/serve/applications/", timeout=30)
    r.raise_for_status()
    return r.json()


def _serve_apps(ray: str) -> dict[str, Any]:
    return _serve_details(ray).get("applications") or {}


@pytest.fixture(scope="module")
def serve_port(ray_head) -> int:
    """The HTTP port of Serve on the shared head; Serve is started on a free port if it is not running.

    Started the way `serve deploy` does it: a `PUT` of no apps with `http_options`. Shut down
    again at the end if we started it and no app is left.
    """
    details = _serve_details(ray_head)
    started = not details.get("controller_info")
    if started:
        port = _free_port()
        r = httpx.put(ray_head + "/api/serve/applications/", timeout=120,
                      json={"applications": [], "http_options": {"host": "127.0.0.1", "port": port}})
        assert r.status_code == 200, f"could not start Serve on port {port}: {r.status_code} {r.text[:500]}"
        _wait(f"Serve's HTTP options to show port {port}",
              lambda: (_serve_details(ray_head).get("http_options") or {}).get("port") == port, 120)
    else:
        port = (details.get("http_options") or {}).get("port")
        assert port, f"Serve already runs on the Ray head but reports no HTTP port: {details.get('http_options')}"
    yield port
    if started and not _serve_apps(ray_head):
        httpx.delete(ray_head + "/api/serve/applications/", timeout=120)


def _remove_app(ray: str, app: str) -> None:
    """Take one Serve app off the shared head, keeping the others (and Serve itself)."""
    details = _serve_details(ray)
    apps = details.get("applications") or {}
    if app in apps:
        keep = [a["deployed_app_config"] for n, a in apps.items() if n != app and a.get("deployed_app_config")]
        httpx.put(ray + "/api/serve/applications/", timeout=120,
                  json={"applications": keep, "http_options": details.get("http_options") or {}})


@pytest.fixture
def service_app(request, namespace, ray_head):
    """The Serve app name of the test module's ModelService (its `NAME`); removed from the Ray head afterwards."""
    from anneal.control.service import app_name

    app = app_name(namespace, request.module.NAME)
    yield app
    try:
        _remove_app(ray_head, app)
    except httpx.HTTPError:
        pass


# ------------------------------------------------------------------------------ helpers


def _variant(name: str, uri: str, weight: int) -> dict[str, Any]:
    return {"name": name, "model": {"uri": uri}, "weight": weight,
            "resources": {"cpusPerWorker": 0.25}, "generation": {"maxTokens": 4}}


def _wait_or_explain(what: str, probe: Callable[[], Any], timeout: float, op: Operator, ray: str, app: str,
                     every: float = 1.0) -> Any:
    """`_wait`, failing with what the operator and Serve said (a bare timeout explains nothing)."""
    try:
        return _wait(what, probe, timeout, every)
    except AssertionError as exc:
        try:
            serve = json.dumps({k: {f: v.get(f) for f in ("status", "message")}
                                for k, v in _serve_apps(ray).items() if k == app})
        except Exception as e:  # the Ray head itself may be the problem
            serve = f"unavailable: {e!r}"
        raise AssertionError(f"{exc}\nServe app {app}: {serve}\noperator log tail:\n{op.log()[-4000:]}") from None


def _completion(endpoint: str) -> httpx.Response | None:
    r = httpx.post(endpoint + "/v1/completions", json={"prompt": "2 + 2 =", "max_tokens": 4}, timeout=60)
    return r if r.status_code == 200 else None


def _router_weights(endpoint: str) -> dict[str, int]:
    return httpx.get(endpoint + "/healthz", timeout=10).json()["weights"]


# -------------------------------------------------------------------------------- tests


def test_model_service_on_a_shared_ray_cluster(kube_cluster, namespace, operator, ray_head, serve_port, tiny_models,
                                               service_app):
    ns, op, app = namespace, operator, service_app
    assert serve_port != 8000, "the test needs Serve on another port than its default to mean anything"
    spec = {"variants": [_variant("small", tiny_models["small"], 70), _variant("large", tiny_models["large"], 30)],
            "ray": {"address": ray_head}}
    kube_cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job(NAME, spec, kind="ModelService")))

    st = _wait_or_explain("phase Ready", lambda: (s := _status(kube_cluster, ns, "msvc", NAME)).get("phase") == "Ready"
                          and s, READY_TIMEOUT, op, ray_head, app, every=2)
    endpoint = st["endpoint"]
    assert endpoint == f"http://127.0.0.1:{serve_port}/{ns}/{NAME}", endpoint
    assert urlparse(endpoint).port == serve_port
    assert st["weights"] == {"small": 70, "large": 30}
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert FINALIZER in _get(kube_cluster, ns, "msvc", NAME)["metadata"]["finalizers"]

    # Real HTTP through Serve's proxy on the published endpoint (the proxy may need a moment
    # after RUNNING to learn the route).
    r = _wait_or_explain("a 200 from POST <endpoint>/v1/completions", lambda: _completion(endpoint), 120, op,
                         ray_head, app, every=2)
    body = r.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str), body
    assert body["choices"][0]["finish_reason"] in ("stop", "length"), body
    assert r.headers["x-anneal-variant"] in ("small", "large")
    assert _router_weights(endpoint) == {"small": 70, "large": 30}

    # A weight edit through the Kubernetes API is applied live: status and the router follow.
    patch = [{"op": "replace", "path": "/spec/variants/0/weight", "value": 50},
             {"op": "replace", "path": "/spec/variants/1/weight", "value": 50}]
    kube_cluster.kubectl("patch", "msvc", NAME, "-n", ns, "--type=json", "-p", json.dumps(patch))
    st = _wait_or_explain("status.weights 50/50", lambda: (s := _status(kube_cluster, ns, "msvc", NAME)).get(
        "weights") == {"small": 50, "large": 50} and s, 60, op, ray_head, app)
    assert st["endpoint"] == endpoint
    _wait_or_explain("the router's weights 50/50", lambda: _router_weights(endpoint) == {"small": 50, "large": 50},
                     120, op, ray_head, app)
    assert _completion(endpoint) is not None, "the service stopped answering after a weight change"
    # Serve reports the in-place update as DEPLOYING for a moment; the service settles Ready.
    _wait_or_explain("phase Ready after the weight change", lambda: _status(kube_cluster, ns, "msvc", NAME).get(
        "phase") == "Ready", 120, op, ray_head, app)

    # Deleting the resource removes the Serve app (and only it); then the finalizer goes.
    log_mark = len(op.log())
    kube_cluster.kubectl("delete", "msvc", NAME, "-n", ns, "--wait=false")
    _wait_or_explain("the resource (finalizer released)", lambda: _get(kube_cluster, ns, "msvc", NAME) is None, 120,
                     op, ray_head, app)
    _wait_or_explain(f"Serve app {app} removed", lambda: app not in _serve_apps(ray_head), 120, op, ray_head, app)
    details = _serve_details(ray_head)
    assert details.get("controller_info") and (details.get("http_options") or {}).get("port") == serve_port, \
        "removing the last app must leave Serve up on its port for the other tenants"
    # kopf posts no event for an object on its way out, and its log lines do not name the
    # object: count this deletion's lines in the operator's log.
    handled = [line for line in op.log()[log_mark:].splitlines() if "Handler 'remove-serve-app'" in line]
    assert len(handled) == 1 and handled[0].endswith("succeeded."), \
        f"the delete handler should run once and succeed: {handled}\n{op.log()[-4000:]}"
