"""The operator's MLflow REST client against a real `mlflow server`, checked against MLflow's own client."""

from __future__ import annotations

import uuid

import pytest

from anneal.tracking import mlflow_store as store
from anneal.tracking.rest import MlflowRest, MlflowRestError
from anneal_operator.tracking import RestTracker

pytestmark = pytest.mark.e2e


@pytest.fixture
def rest(mlflow_server):
    c = MlflowRest(mlflow_server)
    yield c
    c.close()


def test_runs_round_trip_with_mlflows_own_client(rest, mlflow_server):
    from mlflow import MlflowClient

    official = MlflowClient(tracking_uri=mlflow_server)
    exp = f"rest-{uuid.uuid4().hex[:8]}"
    run_id = store.create_run(store.TrackingTarget(mlflow_server, exp), "job", {"anneal.uid": "u1", "anneal.attempt": "1"})
    assert rest.experiment(exp)["experiment_id"] == official.get_experiment_by_name(exp).experiment_id

    official.log_metric(run_id, "train/step", 7)
    official.set_tag(run_id, "extra", "x")
    view = rest.get_run(run_id)
    assert view.run_id == run_id and view.status == "RUNNING"
    assert view.tags["anneal.uid"] == "u1" and view.tags["extra"] == "x"
    assert view.metrics["train/step"] == 7.0
    assert view.artifact_uri == official.get_run(run_id).info.artifact_uri

    assert rest.find_run(exp, {"anneal.uid": "u1", "anneal.attempt": "1"}) == run_id
    assert rest.find_run(exp, {"anneal.uid": "u1", "anneal.attempt": "2"}) is None
    assert rest.find_run(f"{exp}-missing", {"anneal.uid": "u1"}) is None

    rest.set_terminated(run_id, "KILLED")
    assert official.get_run(run_id).info.status == "KILLED"


def test_result_artifact_is_read_through_the_artifact_proxy(mlflow_server):
    """What a recipe writes with `write_result`, the operator reads back without importing mlflow."""
    target = store.TrackingTarget(tracking_uri=mlflow_server, experiment=f"rest-{uuid.uuid4().hex[:8]}")
    t = RestTracker(mlflow_server)
    run_id = store.create_run(target, "job", {"anneal.uid": "u2"})
    assert t.read_result(t.get_run(run_id)) is None  # no result yet
    result = {"phase": "Succeeded", "modelUri": "models:/m/3", "metrics": {"accuracy": 0.5}, "message": "ok"}
    store.write_result(mlflow_server, run_id, result)
    assert t.read_result(t.get_run(run_id)) == result


def test_errors_name_the_call_and_fail_fast():
    dead = MlflowRest("http://127.0.0.1:9", timeout=1, retries=1)
    with pytest.raises(MlflowRestError, match="unreachable"):
        dead.get_run("x")

    # An overloaded server (a real HTTP server on loopback that answers 503 to everything).
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    calls = []

    class Busy(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            calls.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"overloaded")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        busy = MlflowRest(f"http://127.0.0.1:{server.server_address[1]}", retries=2)
        with pytest.raises(MlflowRestError, match="503") as info:
            busy.get_run("x")
        assert info.value.status == 503 and len(calls) == 3  # two quick retries, then the caller decides
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="http"):
        MlflowRest("sqlite:///x.db")
