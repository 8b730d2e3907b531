"""Settings of each subsystem, from ANNEAL_* environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AnnealSettings(BaseSettings):
    """Local state and defaults shared by the CLI and the embedded runtime."""

    model_config = SettingsConfigDict(env_prefix="ANNEAL_", extra="ignore")

    home: Path = Field(default=Path("~/.anneal"), description="Local state: MLflow store, caches, work dirs.")
    namespace: str = Field(default="default", description="Namespace of resources run without one.")
    log_level: str = Field(default="INFO", description="Log level of the CLI, recipes and operator.")

    @property
    def root(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"


class MlflowSettings(BaseSettings):
    """Where runs, artifacts and registered models go."""

    model_config = SettingsConfigDict(env_prefix="ANNEAL_MLFLOW_", extra="ignore")

    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default a SQLite file under ANNEAL_HOME."
    )
    artifact_root: str | None = Field(
        default=None, description="Artifact root of new experiments; default ANNEAL_HOME/mlartifacts."
    )
    experiment: str = Field(default="anneal", description="Experiment used when a resource names none.")

    def resolved_tracking_uri(self, home: Path) -> str:
        return self.tracking_uri or f"sqlite:///{home / 'mlflow.db'}"

    def resolved_artifact_root(self, home: Path) -> str:
        return self.artifact_root or (home / "mlartifacts").as_uri()


class RaySettings(BaseSettings):
    """Which Ray the embedded runtime uses."""

    model_config = SettingsConfigDict(env_prefix="ANNEAL_RAY_", extra="ignore")

    address: str | None = Field(
        default=None, description="Ray address; empty starts a local Ray for the command."
    )
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of the local Ray (default: all).")
    include_dashboard: bool = Field(default=False, description="Start the dashboard with the local Ray.")
    vllm_python: str | None = Field(
        default=None, description="The Python a vllm variant's replicas run in (Ray runtime_env py_executable): "
        "the serving environment scripts/setup.sh builds; default the checkout's .venv-vllm/bin/python when it "
        "exists, else Ray's own Python (which then needs vllm).")


class Settings:
    """All settings, read once from the environment."""

    def __init__(self) -> None:
        self.anneal = AnnealSettings()
        self.mlflow = MlflowSettings()
        self.ray = RaySettings()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.resolved_tracking_uri(self.anneal.root)

    @property
    def artifact_root(self) -> str:
        return self.mlflow.resolved_artifact_root(self.anneal.root)

    def effective(self) -> dict[str, str]:
        """The effective values, by environment variable name."""
        return {
            "ANNEAL_HOME": str(self.anneal.root),
            "ANNEAL_NAMESPACE": self.anneal.namespace,
            "ANNEAL_LOG_LEVEL": self.anneal.log_level,
            "ANNEAL_MLFLOW_TRACKING_URI": self.tracking_uri,
            "ANNEAL_MLFLOW_ARTIFACT_ROOT": self.artifact_root,
            "ANNEAL_MLFLOW_EXPERIMENT": self.mlflow.experiment,
            "ANNEAL_RAY_ADDRESS": self.ray.address or "(start a local Ray)",
            "ANNEAL_RAY_NUM_CPUS": str(self.ray.num_cpus or "(all)"),
        }
