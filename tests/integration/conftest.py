"""Shared integration fixtures: one local Ray per module, started the way `anneal run` starts it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray (with `ray_session`'s longer start window and retries); yields its GCS address."""
    import ray

    from anneal.local.jobs import ray_session
    from anneal.settings import Settings

    settings = Settings()
    settings.ray.num_cpus = 2
    settings.ray.address = None
    with ray_session(settings):
        yield ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A module's MLflow SQLite store and artifact root in a temp dir (what a recipe's JobContext points at)."""
    root = tmp_path_factory.mktemp("anneal")
    return {"root": root, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifacts": str(root / "artifacts")}
