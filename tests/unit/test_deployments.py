"""The deployed end of the lineage (`anneal.tracking.deployments`) on a real MLflow store (SQLite)."""

import json

from anneal.tracking.deployments import DeploymentRecorder, deployment_digest, record_deployment, service_run


def registry(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("team.student")
    for _ in range(2):
        client.create_model_version("team.student", str(tmp_path), run_id=None)
    client.set_registered_model_alias("team.student", "champion", "1")
    return uri, client


def test_a_deployment_is_recorded_on_the_service_run_and_the_versions_it_serves(tmp_path):
    uri, client = registry(tmp_path)
    first = record_deployment(uri, "serving", namespace="team", name="chat", service="team_chat",
                              models={"stable": "models:/team.student@champion", "candidate": "/models/x"},
                              weights={"stable": 100, "candidate": 0})
    run = client.get_run(first["runId"])
    assert first["runId"] == service_run(client, "serving", "team_chat")  # the router's decision-log run too
    assert run.data.tags["anneal.deployed.stable"] == "models:/team.student/1"  # the alias pinned to its version
    assert run.data.tags["anneal.deployed.candidate"] == "/models/x"
    assert run.data.metrics == {"deployed.weight.stable": 100.0, "deployed.weight.candidate": 0.0}
    local = client.download_artifacts(first["runId"], f"deployments/{first['time']}.json", str(tmp_path))
    doc = json.loads(open(local).read())
    assert doc["versions"] == {"stable": "models:/team.student/1"} and doc["weights"]["stable"] == 100
    assert client.get_model_version("team.student", "1").tags["anneal.serving.team.chat"] == "stable:100"

    # The candidate becomes version 2 at 10 %, then version 2 serves alone: version 1 loses its tag.
    record_deployment(uri, "serving", namespace="team", name="chat", service="team_chat",
                      models={"stable": "models:/team.student/1", "candidate": "models:/team.student/2"},
                      weights={"stable": 90, "candidate": 10}, previous_models=first["models"])
    assert client.get_model_version("team.student", "2").tags["anneal.serving.team.chat"] == "candidate:10"
    record_deployment(uri, "serving", namespace="team", name="chat", service="team_chat",
                      models={"stable": "models:/team.student/2"}, weights={"stable": 100},
                      previous_models={"stable": "models:/team.student/1", "candidate": "models:/team.student/2"})
    assert "anneal.serving.team.chat" not in client.get_model_version("team.student", "1").tags
    assert client.get_model_version("team.student", "2").tags["anneal.serving.team.chat"] == "stable:100"
    history = client.get_metric_history(first["runId"], "deployed.weight.stable")
    assert [h.value for h in sorted(history, key=lambda h: h.timestamp)] == [100.0, 90.0, 100.0]


def test_the_recorder_writes_on_change_only_and_survives_an_unreachable_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri, _ = registry(tmp_path)
    rec = DeploymentRecorder(uri, "serving", namespace="team", name="chat", service="team_chat")
    assert rec.update({"a": "/m"}, {"a": 100}) is not None
    assert rec.update({"a": "/m"}, {"a": 100}) is None  # nothing changed
    assert rec.digest == deployment_digest({"a": "/m"}, {"a": 100}) != deployment_digest({"a": "/m"}, {"a": 50})
    down = DeploymentRecorder("http://127.0.0.1:9", "serving", namespace="t", name="c", service="t_c")
    assert down.update({"a": "/m"}, {"a": 100}) is None and down.digest is None  # logged; retried next change


def test_the_recorded_digest_survives_a_rollout_tick():
    """The operator keeps `status.recordedDeployment` through rollout passes (a declared field)."""
    from anneal.api.resources import parse_spec
    from anneal.api.service import ModelServiceStatus
    from anneal.control.rollout import Observation, tick

    spec = parse_spec("ModelService", {
        "variants": [{"name": "stable", "model": {"uri": "/a"}, "weight": 100},
                     {"name": "canary", "model": {"uri": "/b"}, "weight": 0}],
        "rollout": {"stable": "stable", "candidate": "canary", "steps": [{"setWeight": 50}]}})
    old = ModelServiceStatus.model_validate({"phase": "Ready", "recordedDeployment": "abc"})
    t = tick(spec, old, Observation(None, "no stats yet", {}, None), 1000.0, desired_models={"stable": "/a", "canary": "/b"})
    assert t.status.to_dict()["recordedDeployment"] == "abc"
