"""anneal.tracking.mlflow_store against a real MLflow SQLite store: the client cache, experiments, run lookup by tags."""

from __future__ import annotations

import pytest

from anneal.tracking import mlflow_store as store


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # one store (its schema takes seconds)


@pytest.fixture
def target(uri, request):
    return store.TrackingTarget(tracking_uri=uri, experiment=request.node.name)


def test_one_client_per_uri(target):
    assert store.client(target.tracking_uri) is store.client(target.tracking_uri)
    assert store.client("http://127.0.0.1:9") is not store.client(target.tracking_uri)  # no request is made


def test_a_deleted_experiment_is_restored_not_failed(target):
    first = store.create_run(target, "r1", {"anneal.uid": "u", "anneal.attempt": "1"})
    c = store.client(target.tracking_uri)
    exp_id = c.get_run(first).info.experiment_id
    assert store.ensure_experiment(target) == exp_id
    # MLflow keeps a deleted experiment's name reserved: without the restore no run could be created in it.
    c.delete_experiment(exp_id)
    second = store.create_run(target, "r2", {"anneal.uid": "u", "anneal.attempt": "2"})
    assert c.get_run(second).info.experiment_id == exp_id
    assert c.get_experiment(exp_id).lifecycle_stage == "active"


def test_find_run_by_tags(target):
    assert store.find_run(target, {"anneal.uid": "u"}) is None  # no experiment yet
    a1 = store.create_run(target, "job", {"anneal.uid": "u", "anneal.attempt": "1"})
    a2 = store.create_run(target, "job", {"anneal.uid": "u", "anneal.attempt": "2"})
    store.create_run(target, "job", {"anneal.uid": "other", "anneal.attempt": "1"})
    assert store.find_run(target, {"anneal.uid": "u", "anneal.attempt": "1"}) == a1
    assert store.find_run(target, {"anneal.uid": "u", "anneal.attempt": "2"}) == a2
    assert store.find_run(target, {"anneal.uid": "u", "anneal.attempt": "3"}) is None
    assert store.find_run(target, {"anneal.uid": "it's", "anneal.attempt": "1"}) is None  # quotes cannot break the filter
