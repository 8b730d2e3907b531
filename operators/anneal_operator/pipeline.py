"""ModelPipeline handlers: create each stage's resource in order as an owned child, gate, move on."""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

import kopf

from anneal import API_GROUP, API_VERSION
from anneal.api.pipeline import ModelPipelineSpec
from anneal.api.resources import KINDS, ManifestError, parse_spec
from anneal.runtime.kuberay import owner_reference
from anneal.runtime.pipeline import STAGE_DONE, child_name, resolve_stage_refs
from anneal_operator.context import OperatorContext, event, invalid_spec_status, snapshot, with_condition

log = logging.getLogger("anneal_operator.pipeline")

KIND = "ModelPipeline"
#: Child phases that end the pipeline (those that let it go on: `STAGE_DONE`).
STAGE_FAILED = {"Failed", "Cancelled", "Rejected", "RolledBack"}


# ------------------------------------------------------------------------- pure parts


def build_child(pipeline_meta: Mapping[str, Any], stage: Any, model_uris: Mapping[str, str]) -> dict[str, Any]:
    """The manifest of one stage's resource, owned by the pipeline."""
    name = child_name(pipeline_meta["name"], stage.name)
    spec = resolve_stage_refs(copy.deepcopy(stage.spec.to_dict()), model_uris)
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": stage.kind,
        "metadata": {
            "name": name,
            "namespace": pipeline_meta["namespace"],
            "labels": {"anneal.dev/pipeline": pipeline_meta["name"], "anneal.dev/stage": stage.name},
            "ownerReferences": [owner_reference(f"{API_GROUP}/{API_VERSION}", KIND, pipeline_meta["name"], pipeline_meta["uid"])],
        },
        "spec": spec,
    }


def advance(spec: ModelPipelineSpec, status: Mapping[str, Any], children: Mapping[str, Mapping[str, Any] | None]
            ) -> tuple[dict[str, Any], str | None, list[tuple[str, str, str]]]:
    """The pipeline's next status, the stage whose resource to create now (or None), and events (pure).

    Args:
        spec: the parsed pipeline spec.
        status: the current status.
        children: stage name → its resource's body (None: not created yet).
    """
    new = copy.deepcopy(dict(status))
    stages: dict[str, Any] = new.setdefault("stages", {})
    events: list[tuple[str, str, str]] = []
    uris = {n: s["modelUri"] for n, s in stages.items() if s.get("modelUri")}
    for stage in spec.stages:
        st = stages.setdefault(stage.name, {})
        body = children.get(stage.name)
        if body is None:
            if st.get("phase") in STAGE_DONE:
                continue  # done before; its resource was deleted since
            new.update(phase="Running", currentStage=stage.name, message=f"stage {stage.name}: creating {stage.kind}")
            st.update(phase="Pending", resource=f"{stage.kind}/{stage.name}")
            return new, stage.name, events
        cst = body.get("status") or {}
        phase = cst.get("phase") or "Pending"
        st["resource"] = f"{stage.kind}/{body['metadata']['name']}"
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
            new.update(phase="Failed", currentStage=stage.name, message=msg)
            events.append(("Warning", "StageFailed", msg))
            return new, None, events
        if phase not in STAGE_DONE:
            new.update(phase="Running", currentStage=stage.name, message=f"stage {stage.name}: {phase}")
            return new, None, events
        if stage.gate is not None:
            passed, why = stage.gate.check(dict(cst.get("metrics") or {}))
            st["gate"] = f"{'passed' if passed else 'failed'}: {why}"
            if not passed:
                msg = f"stage {stage.name} gate failed: {why}"
                new.update(phase="Failed", currentStage=stage.name, message=msg)
                events.append(("Warning", "GateFailed", msg))
                return new, None, events
    new.update(phase="Succeeded", currentStage=None, message=f"all {len(spec.stages)} stages done")
    return new, None, events


# ------------------------------------------------------------------------ handlers


def reconcile(op: OperatorContext, body: Any, meta: Mapping[str, Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    old = op.current_status(body)
    if old.get("phase") in ("Succeeded", "Failed"):
        return
    try:
        spec = parse_spec(KIND, dict(body.get("spec") or {}))
    except ManifestError as exc:
        new = invalid_spec_status(old, exc, generation)
        if op.write_status(KIND, body, old, new):
            event(body, "Warning", "InvalidSpec", str(exc))
        return
    children = {}
    for stage in spec.stages:
        children[stage.name] = op.get(stage.kind, ns, child_name(name, stage.name))
    new, create, events = advance(spec, old, children)
    new["observedGeneration"] = generation
    if create is not None:
        stage = next(s for s in spec.stages if s.name == create)
        uris = {n: s["modelUri"] for n, s in new["stages"].items() if s.get("modelUri")}
        child = build_child(meta, stage, uris)
        try:
            op.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, ns, KINDS[stage.kind].plural, child)
            events.append(("Normal", "StageCreated", f"stage {stage.name}: created {stage.kind}/{child['metadata']['name']}"))
        except ApiException as exc:
            if exc.status != 409:
                raise
        new["stages"][stage.name]["resource"] = f"{stage.kind}/{child['metadata']['name']}"
    ready = new.get("phase") == "Succeeded"
    with_condition(new, "Ready", "True" if ready else "False", new.get("phase") or "Pending", new.get("message") or "")
    if op.write_status(KIND, body, old, new):
        if new.get("phase") != old.get("phase"):
            op.metrics.phases.labels(KIND, new.get("phase") or "").inc()
            events.append(("Normal" if new.get("phase") != "Failed" else "Warning", new.get("phase") or "", new.get("message") or ""))
        for type_, reason, message in events:
            event(body, type_, reason, message)


def register(registry: kopf.OperatorRegistry, op: OperatorContext) -> None:
    plural = KINDS[KIND].plural

    @kopf.timer(API_GROUP, API_VERSION, plural, interval=op.settings.poll_interval, registry=registry, id="reconcile")
    @op.metrics.timed(KIND, "reconcile")
    def pipeline_timer(body: kopf.Body, meta: kopf.Meta, **_: Any) -> None:
        with op.lock(meta["uid"]):
            snap = snapshot(body)
            reconcile(op, snap, snap["metadata"])
