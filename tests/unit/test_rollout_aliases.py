"""MLflow aliases and tags follow the rollout.

The tracker tests use a real local SQLite MLflow store (tens of seconds to create on a busy
machine), so they are marked `integration`; the URI parsing is pure.
"""

from __future__ import annotations

import pytest

from anneal.rollout.aliases import ROLLED_BACK_TAG, TAG_RUN, RolloutTracker, parse_registry_uri


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("models:/m/3", ("m", "3", None)),
        ("models:/m@champion", ("m", None, "champion")),
        ("models:/m", None),
        ("/abs/path", None),
        ("hf://org/name", None),
        (None, None),
    ],
)
def test_parse_registry_uri(uri, expected):
    assert parse_registry_uri(uri) == expected


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model("m")
    for _ in range(4):
        client.create_model_version("m", source=str(root))
    client.set_registered_model_alias("m", "champion", "1")
    return uri, client


def _aliases(client, version: str) -> list[str]:
    return list(client.get_model_version("m", version).aliases)


@pytest.mark.integration
def test_promotion_moves_champion_and_drops_challenger(store):
    uri, client = store
    t = RolloutTracker(uri, "rollouts", "svc")
    t.started("models:/m/2", "models:/m@champion")
    assert "challenger" in _aliases(client, "2")
    t.analysed({"errorRate": 0.0, "accuracy": None}, "pass", 1, 10)
    t.promoted("all steps completed")
    assert _aliases(client, "2") == ["champion"] and _aliases(client, "1") == []
    run = client.get_run(client.get_model_version("m", "2").tags[TAG_RUN])
    assert run.data.tags["anneal.rollout.outcome"] == "Promoted"
    assert run.data.tags["anneal.rollout.stable_version"] == "models:/m/1"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "analysis.verdict")] == [1.0]
    client.set_registered_model_alias("m", "champion", "1")


@pytest.mark.integration
def test_rollback_keeps_champion_and_tags_the_candidate(store):
    uri, client = store
    t = RolloutTracker(uri, "rollouts", "svc")
    t.started("models:/m/3", "models:/m@champion")
    t.rolled_back("errorRate failed 3 analyses in a row")
    v3 = client.get_model_version("m", "3")
    assert v3.tags[ROLLED_BACK_TAG] == "errorRate failed 3 analyses in a row"
    assert list(v3.aliases) == []
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"


@pytest.mark.integration
def test_same_version_on_both_sides_moves_nothing(store):
    uri, client = store
    t = RolloutTracker(uri, "rollouts", "svc")
    t.started("models:/m/1", "models:/m@champion")
    t.rolled_back("aborted")
    assert ROLLED_BACK_TAG not in client.get_model_version("m", "1").tags
    assert _aliases(client, "1") == ["champion"]


@pytest.mark.integration
def test_a_tracker_that_missed_the_start_still_moves_aliases(store):
    uri, client = store
    RolloutTracker(uri, "rollouts", "svc").rolled_back("aborted", "models:/m/4")
    assert client.get_model_version("m", "4").tags[ROLLED_BACK_TAG] == "aborted"


@pytest.mark.integration
def test_non_registry_models_are_left_alone(store):
    uri, client = store
    t = RolloutTracker(uri, "rollouts", "svc")
    t.started("/models/b", "/models/a")
    t.promoted()
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
