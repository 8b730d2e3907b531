"""`anneal run` of a ModelPipeline: each stage run to the end on this machine, in the order `control.pipeline.advance` says."""

from __future__ import annotations

import logging
from typing import Any, Callable

from anneal.api.pipeline import ModelPipelineSpec
from anneal.api.resources import Manifest, ManifestError, parse_manifest
from anneal.control.pipeline import ENDED, FAILED, advance
from anneal.settings import Settings

log = logging.getLogger(__name__)


def run_pipeline(manifest: Manifest, settings: Settings, run_stage: Callable[..., dict[str, Any]],
                 on_progress: Callable[[dict[str, Any]], None] | None = None, **options: Any) -> dict[str, Any]:
    """Run the stages in order on this machine; stop at the first failed stage or gate.

    The same decisions as the operator's (`anneal.control.pipeline.advance`): the same end
    states, stage records and gate verdicts; only "create the child" is "run it to the end here"
    (`run_stage(manifest, settings, on_progress=..., **options)`: `anneal.local.runner.run_manifest`).
    """
    spec: ModelPipelineSpec = manifest.spec
    status: dict[str, Any] = {"observedGeneration": manifest.generation or 1}
    children: dict[str, dict[str, Any]] = {}

    def report(extra: dict[str, Any] | None = None) -> None:
        if on_progress:
            on_progress({**status, **(extra or {})})

    while True:
        status, child, events = advance(spec, status, children, manifest.name, manifest.namespace)
        for type_, reason, message in events:
            log.log(logging.WARNING if type_ == "Warning" else logging.INFO, "%s: %s: %s", manifest.name, reason, message)
        if child is None:
            if status.get("phase") not in ENDED:  # a stage said it is still running, yet it ran to the end
                status.update(phase=FAILED, message=f"{status.get('message')}: the stage did not finish")
            report()
            return status
        stage = child["metadata"]["labels"]["anneal.dev/stage"]
        try:
            child_manifest = parse_manifest(child)
        except ManifestError as exc:
            status.update(phase=FAILED, currentStage=stage, message=f"stage {stage}: {exc}")
            report()
            return status
        report({"message": f"stage {stage}: {child_manifest.kind}/{child_manifest.name}"})

        def stage_progress(s: dict[str, Any], _name: str = stage) -> None:
            msg = f"stage {_name}: {s.get('phase', '')}"
            if s.get("message"):
                msg += f" · {s['message']}"
            report({"progress": s.get("progress"), "message": msg})

        child_status = run_stage(child_manifest, settings, on_progress=stage_progress, **options)
        children[stage] = {"metadata": child["metadata"], "status": child_status}
