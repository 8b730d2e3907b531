"""A ModelPipeline's control logic, once: which stage's resource to create next, the stage records, gates, the end.

`advance` is level-based and pure: given the pipeline spec, its status and what exists of
each stage's resource (its name and status), it returns the new status, the manifest of the
one stage resource to create now (or None), and events. The operator calls it every pass
with the children it reads from the API server and creates what it names; `anneal run`
calls it, runs the named stage to the end on this machine, feeds the result back and calls
it again, until it returns no child.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from anneal import API_GROUP, API_VERSION
from anneal.api.distillation import JobPhase
from anneal.api.pipeline import ModelPipelineSpec, PipelinePhase, Stage
from anneal.api.service import ServicePhase

#: Stage phases (a job's or a service's) that let the pipeline go on, and those that end it.
STAGE_DONE = frozenset(p.value for p in (JobPhase.SUCCEEDED, ServicePhase.READY, ServicePhase.PROMOTED))
STAGE_FAILED = frozenset(p.value for p in (JobPhase.FAILED, JobPhase.CANCELLED, JobPhase.REJECTED,
                                           ServicePhase.ROLLED_BACK, ServicePhase.FAILED))
#: The pipeline's own end phases.
ENDED = (PipelinePhase.SUCCEEDED.value, PipelinePhase.FAILED.value)
SUCCEEDED, FAILED = ENDED
RUNNING = PipelinePhase.RUNNING.value

Event = tuple[str, str, str]  # (type, reason, message)


class PipelineError(RuntimeError):
    """A stage that cannot be built from the outputs of the stages before it."""


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


def child_manifest(pipeline: str, namespace: str, stage: Stage, model_uris: Mapping[str, str]) -> dict[str, Any]:
    """The manifest of one stage's resource, its ``fromStage`` references resolved (no owner: the driver's business).

    Raises:
        PipelineError: a referenced stage produced no model.
    """
    try:
        spec = resolve_stage_refs(copy.deepcopy(stage.spec.to_dict()), model_uris)
    except KeyError as missing:
        raise PipelineError(f"stage {stage.name}: stage {missing} produced no model to refer to") from None
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": stage.kind,
        "metadata": {
            "name": child_name(pipeline, stage.name),
            "namespace": namespace,
            "labels": {"anneal.dev/pipeline": pipeline, "anneal.dev/stage": stage.name},
        },
        "spec": spec,
    }


def advance(spec: ModelPipelineSpec, status: Mapping[str, Any], children: Mapping[str, Mapping[str, Any] | None],
            pipeline: str, namespace: str) -> tuple[dict[str, Any], dict[str, Any] | None, list[Event]]:
    """The pipeline's next status, the stage resource to create now (or None), and events.

    Args:
        spec: the parsed pipeline spec.
        status: the current status.
        children: stage name → its resource (``metadata.name`` and ``status``), None: not created yet.
        pipeline, namespace: the pipeline's name and namespace (the children's names derive from them).

    Returns:
        (status, manifest of the child to create or None, events). The status's phase is
        ``Running`` while a stage is under way, ``Succeeded`` once every stage is done (with
        the last stage's ``modelUri``), ``Failed`` at the first stage that failed, failed its
        gate, or could not be built.
    """
    new = copy.deepcopy(dict(status))
    if new.get("phase") in ENDED:
        return new, None, []
    stages: dict[str, Any] = new.setdefault("stages", {})
    events: list[Event] = []
    uris = {n: s["modelUri"] for n, s in stages.items() if s.get("modelUri")}
    for stage in spec.stages:
        st = stages.setdefault(stage.name, {})
        body = children.get(stage.name)
        if body is None:
            if st.get("phase") in STAGE_DONE:
                continue  # done before; its resource was deleted since
            try:
                child = child_manifest(pipeline, namespace, stage, uris)
            except PipelineError as exc:
                new.update(phase=FAILED, currentStage=stage.name, message=str(exc))
                events.append(("Warning", "StageFailed", str(exc)))
                return new, None, events
            new.update(phase=RUNNING, currentStage=stage.name, message=f"stage {stage.name}: creating {stage.kind}")
            st.update(phase=JobPhase.PENDING.value, resource=f"{stage.kind}/{child['metadata']['name']}")
            return new, child, events
        cst = body.get("status") or {}
        phase = cst.get("phase") or JobPhase.PENDING.value
        st["resource"] = f"{stage.kind}/{body['metadata']['name']}"
        st["kind"] = stage.kind
        for key in ("startTime", "completionTime", "endpoint"):  # for the stage table (`anneal.report`)
            if cst.get(key):
                st[key] = cst[key]
        if st.get("phase") != phase:
            events.append(("Normal", "StagePhase", f"stage {stage.name} ({st['resource']}): {phase}"))
        st["phase"] = phase
        if cst.get("modelUri"):
            st["modelUri"] = cst["modelUri"]
            uris[stage.name] = cst["modelUri"]
        if cst.get("metrics"):
            st["metrics"] = dict(cst["metrics"])
        if phase in STAGE_FAILED:
            msg = f"stage {stage.name} ({st['resource']}) ended {phase}: {cst.get('message') or ''}".rstrip(": ")
            new.update(phase=FAILED, currentStage=stage.name, message=msg)
            events.append(("Warning", "StageFailed", msg))
            return new, None, events
        if phase not in STAGE_DONE:
            new.update(phase=RUNNING, currentStage=stage.name, message=f"stage {stage.name}: {phase}")
            return new, None, events
        if stage.gate is not None:
            passed, why = stage.gate.check(dict(cst.get("metrics") or {}))
            st["gate"] = f"{'passed' if passed else 'failed'}: {why}"
            if not passed:
                msg = f"stage {stage.name} gate failed: {why}"
                new.update(phase=FAILED, currentStage=stage.name, message=msg)
                events.append(("Warning", "GateFailed", msg))
                return new, None, events
    last = spec.stages[-1].name
    new.update(phase=SUCCEEDED, message=f"all {len(spec.stages)} stages done")
    new.pop("currentStage", None)
    if stages.get(last, {}).get("modelUri"):
        new["modelUri"] = stages[last]["modelUri"]
    return new, None, events
