"""ModelPipeline: the pure stage plan (child names, fromStage resolution) and the embedded runner."""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Mapping

from anneal import API_GROUP, API_VERSION
from anneal.api.pipeline import ModelPipelineSpec, Stage
from anneal.api.resources import Manifest, ManifestError, parse_spec
from anneal.settings import Settings

log = logging.getLogger(__name__)

class PipelineError(RuntimeError):
    """A stage that cannot be built from the outputs of the stages before it."""


#: Stage phases that let the pipeline go on, and those that end it.
STAGE_DONE = {"Succeeded", "Ready", "Promoted"}


def child_name(pipeline: str, stage: str) -> str:
    """The deterministic name of a stage's resource (a DNS label of at most 63 characters)."""
    return f"{pipeline}-{stage}"[:63].rstrip("-")


def resolve_stage_refs(spec: Any, model_uris: Mapping[str, str]) -> Any:
    """A stage spec (camelCase dict) with every ``fromStage: name`` replaced by ``uri: <modelUri>``.

    Raises:
        KeyError: a referenced stage has no model URI (yet).
    """
    if isinstance(spec, list):
        return [resolve_stage_refs(x, model_uris) for x in spec]
    if not isinstance(spec, dict):
        return spec
    out = {}
    for key, value in spec.items():
        if key == "fromStage":
            if value not in model_uris:
                raise KeyError(value)
            out["uri"] = model_uris[value]
        else:
            out[key] = resolve_stage_refs(value, model_uris)
    return out


def stage_manifest(pipeline: Manifest, stage: Stage, model_uris: Mapping[str, str]) -> Manifest:
    """The resource one stage runs as, with its fromStage references resolved."""
    name = child_name(pipeline.name, stage.name)
    try:
        spec_dict = resolve_stage_refs(copy.deepcopy(stage.spec.to_dict()), model_uris)
    except KeyError as missing:
        raise PipelineError(f"stage {stage.name}: stage {missing} produced no model to refer to") from None
    raw = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": stage.kind,
        "metadata": {"name": name, "namespace": pipeline.namespace,
                     "labels": {"anneal.dev/pipeline": pipeline.name, "anneal.dev/stage": stage.name}},
        "spec": spec_dict,
    }
    return Manifest(stage.kind, name, pipeline.namespace, parse_spec(stage.kind, spec_dict), raw)


def run_pipeline(manifest: Manifest, settings: Settings, on_progress: Callable[[dict[str, Any]], None] | None = None,
                 **options: Any) -> dict[str, Any]:
    """Run the stages in order on this machine; stop at the first failed stage or gate."""
    from anneal.runtime.embedded import run_manifest

    spec: ModelPipelineSpec = manifest.spec
    status: dict[str, Any] = {"phase": "Running", "stages": {}, "observedGeneration": manifest.generation or 1}
    model_uris: dict[str, str] = {}

    def report(extra: dict[str, Any] | None = None) -> None:
        if on_progress:
            on_progress({**status, **(extra or {})})

    for stage in spec.stages:
        try:
            child = stage_manifest(manifest, stage, model_uris)
        except (PipelineError, ManifestError) as exc:
            status.update(phase="Failed", currentStage=stage.name, message=f"stage {stage.name}: {exc}")
            return status
        status["currentStage"] = stage.name
        status["stages"][stage.name] = {"phase": "Running", "resource": f"{child.kind}/{child.name}"}
        report({"message": f"stage {stage.name}: {child.kind}/{child.name}"})

        def stage_progress(s: dict[str, Any], _name: str = stage.name) -> None:
            msg = f"stage {_name}: {s.get('phase', '')}"
            if s.get("message"):
                msg += f" · {s['message']}"
            report({"progress": s.get("progress"), "message": msg})

        child_status = run_manifest(child, settings, on_progress=stage_progress, **options)
        record = status["stages"][stage.name]
        record.update(phase=child_status.get("phase"), modelUri=child_status.get("modelUri"),
                      metrics=child_status.get("metrics") or {})
        record = {k: v for k, v in record.items() if v not in (None, {})}
        status["stages"][stage.name] = record
        if child_status.get("phase") not in STAGE_DONE:
            status.update(phase="Failed", message=f"stage {stage.name} ended {child_status.get('phase')}: "
                                                  f"{child_status.get('message', '')}")
            return status
        if stage.gate is not None:
            passed, why = stage.gate.check(child_status.get("metrics") or {})
            record["gate"] = ("passed: " if passed else "failed: ") + why
            if not passed:
                status.update(phase="Failed", message=f"stage {stage.name} gate failed: {why}")
                return status
        if child_status.get("modelUri"):
            model_uris[stage.name] = child_status["modelUri"]
    last = spec.stages[-1].name
    status.update(phase="Succeeded", message=f"{len(spec.stages)} stages done",
                  currentStage=last)
    final = status["stages"][last]
    if final.get("modelUri"):
        status["modelUri"] = final["modelUri"]
    return status
