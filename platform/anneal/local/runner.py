"""`anneal run`: run one manifest on this machine (a local Ray and the local MLflow store), by kind."""

from __future__ import annotations

from typing import Any

from anneal.api.resources import Manifest
from anneal.local import jobs, pipeline, service
from anneal.local.jobs import ProgressFn, ResolutionError
from anneal.settings import Settings

__all__ = ["NotSupportedError", "ResolutionError", "run_manifest"]


class NotSupportedError(RuntimeError):
    """A kind (or option) the embedded runtime cannot run."""


def run_manifest(manifest: Manifest, settings: Settings, on_progress: ProgressFn | None = None,
                 **options: Any) -> dict[str, Any]:
    """Run one resource on this machine; returns its final status (a dict in the CRD's shape)."""
    if manifest.kind in ("DistillationJob", "CompressionJob"):
        return jobs.run_job(manifest, settings, on_progress)
    if manifest.kind == "ModelService":
        return service.run_service_manifest(manifest, settings, on_progress, **options)
    if manifest.kind == "ModelPipeline":
        return pipeline.run_pipeline(manifest, settings, run_manifest, on_progress, **options)
    raise NotSupportedError(f"kind {manifest.kind!r} cannot be run")
