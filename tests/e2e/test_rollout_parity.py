"""One rollout manifest, two drivers: `anneal run` and the operator end the same way.

Both roll out the same `ModelService` (stable `models:/<m>@champion`, candidate version 2 of
the same registered model, steps 50 % → analysis → 100 %, default gates) under live traffic,
on the session's Ray head (`anneal run` connects to it as a Ray driver with
`ANNEAL_RAY_ADDRESS`; the operator goes through its REST API) and the session's
`mlflow server`. Each gets its own registered model, so the two runs cannot see each other's
aliases. Both must end `Promoted` with the same aliases: `@champion` on version 2, no
`@challenger` left, no `rolled-back` tag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_operator import _job, _status
from tests.e2e.test_operator import operator  # noqa: F401 - the module-scoped operator fixture
from tests.e2e.test_service_shared import READY_TIMEOUT, _remove_app, serve_port, tiny_models  # noqa: F401
from tests.e2e.test_service_shared import _wait_or_explain as _wait_serve

pytestmark = pytest.mark.e2e

NAME = "parity"
REPO = Path(__file__).resolve().parents[2]


def _register(tracking_uri: str, model: str, path: str) -> None:
    """Versions 1 and 2 of `model` (the same tiny checkpoint, two runs), `@champion` on 1."""
    from anneal.tracking import mlflow_store as store

    target = store.TrackingTarget(tracking_uri=tracking_uri, experiment="e2e-parity")
    for i in (1, 2):
        run_id = store.create_run(target, f"{model}-v{i}", {})
        source = store.log_model_dir(tracking_uri, run_id, Path(path))
        assert store.register_model(tracking_uri, model, source, run_id, {}) == f"models:/{model}/{i}"
    store.client(tracking_uri).set_registered_model_alias(model, "champion", "1")


def _spec(model: str) -> dict[str, Any]:
    def variant(name: str, uri: str, weight: int) -> dict[str, Any]:
        return {"name": name, "model": {"uri": uri}, "weight": weight, "resources": {"cpusPerWorker": 0.25},
                "generation": {"maxTokens": 4}}

    return {
        "variants": [variant("stable", f"models:/{model}@champion", 100), variant("canary", f"models:/{model}/2", 0)],
        "rollout": {"stable": "stable", "candidate": "canary",
                    "steps": [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}],
                    "analysis": {"interval": "3s", "minRequests": 3, "failureLimit": 1}, "progressDeadline": "10m"},
        "mlflow": {"experiment": "e2e-parity"},
    }


def _by_anneal_run(model: str, ray_driver_address: str, mlflow: str, port: int, ray_head: str) -> str:
    home = Path(tempfile.mkdtemp(prefix="anneal-e2e-parity-"))
    manifest = home / "parity.yaml"
    manifest.write_text(yaml.safe_dump(_job(NAME, _spec(model), kind="ModelService")))
    env = {**os.environ, "ANNEAL_HOME": str(home), "ANNEAL_RAY_ADDRESS": ray_driver_address,
           "ANNEAL_MLFLOW_TRACKING_URI": mlflow, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    anneal = str(Path(sys.executable).parent / "anneal")
    try:
        # No --duration: `anneal run` returns when the rollout has ended.
        p = subprocess.run([anneal, "run", str(manifest), "--traffic", "4", "--port", str(port), "-o", "json"],
                           env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    finally:
        _remove_app(ray_head, f"default_{NAME}")  # it stops its app itself; this is for a crash
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout)["status"]["phase"]


def _by_operator(model: str, kube, ns: str, op, ray_head: str) -> str:
    from anneal.control.service import app_name
    from anneal.local.rollout import TrafficGenerator

    spec = {**_spec(model), "ray": {"address": ray_head}}
    app = app_name(ns, NAME)
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job(NAME, spec, kind="ModelService")))
    try:
        st = _wait_serve("the service serving", lambda: (s := _status(kube, ns, "msvc", NAME)).get("endpoint")
                         and any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", []))
                         and s, READY_TIMEOUT, op, ray_head, app, every=2)
        gen = TrafficGenerator(st["endpoint"], 4, max_tokens=4, max_in_flight=8, timeout_s=60).start()
        try:
            _wait_serve("the rollout ended", lambda: _status(kube, ns, "msvc", NAME).get("phase")
                        in ("Promoted", "RolledBack", "Failed"), 600, op, ray_head, app, every=2)
        finally:
            gen.stop(wait=False)
        return _status(kube, ns, "msvc", NAME)["phase"]
    finally:
        _remove_app(ray_head, app)


@pytest.mark.parametrize("driver", ["anneal run", "operator"])
def test_the_same_rollout_ends_the_same_under_both_drivers(
        driver, kube_cluster, namespace, operator, ray_head, ray_driver_address, serve_port,  # noqa: F811
        tiny_models, mlflow_server):  # noqa: F811
    from mlflow import MlflowClient

    from anneal.rollout.aliases import ROLLED_BACK_TAG

    model = f"{namespace}.{driver.replace(' ', '-')}-{uuid.uuid4().hex[:4]}"
    _register(mlflow_server, model, tiny_models["small"])
    if driver == "anneal run":
        phase = _by_anneal_run(model, ray_driver_address, mlflow_server, serve_port, ray_head)
    else:
        phase = _by_operator(model, kube_cluster, namespace, operator, ray_head)
    client = MlflowClient(tracking_uri=mlflow_server)
    aliases = {a: str(client.get_model_version_by_alias(model, a).version)
               for a in client.get_registered_model(model).aliases}
    tags = {v: client.get_model_version(model, v).tags for v in ("1", "2")}
    assert (phase, aliases) == ("Promoted", {"champion": "2"}), (driver, phase, aliases)
    assert not any(ROLLED_BACK_TAG in t for t in tags.values()), tags
