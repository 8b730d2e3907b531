"""Embedded mode for CompressionJob: run the compression recipe on this machine's Ray and MLflow."""

from __future__ import annotations

import threading
from typing import Any

from anneal.api.resources import Manifest
from anneal.runtime.embedded import ProgressFn, _resolve_refs, _watch_progress, job_context, ray_session
from anneal.settings import Settings
from anneal.tracking import mlflow_store as store


def run_compression(manifest: Manifest, settings: Settings, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run a CompressionJob to the end; returns its status (phase Succeeded, Rejected or Failed)."""
    from anneal.compress.recipe import RECIPE, cleanup, run

    tracking_uri = manifest.spec.mlflow.tracking_uri or settings.tracking_uri
    ctx = job_context(manifest, settings, _resolve_refs(manifest, tracking_uri))
    ctx.run_id = store.create_run(ctx.target, ctx.run_name(), {**ctx.lineage_tags(), store.TAG_RECIPE: RECIPE})
    if on_progress:
        on_progress({"phase": "Submitted", "mlflowRunId": ctx.run_id})
    stop = threading.Event()
    if on_progress:  # recovery distillation logs train/step: show it as progress
        threading.Thread(target=_watch_progress, args=(ctx.tracking_uri, lambda: ctx.run_id, on_progress, stop),
                         daemon=True).start()
    try:
        with ray_session(settings):
            result = run(manifest.spec, ctx, on_progress=on_progress)
    finally:
        stop.set()
    cleanup(ctx)
    status = result.to_status()
    status["attempts"] = 1
    status["observedGeneration"] = manifest.generation or 1
    return status
