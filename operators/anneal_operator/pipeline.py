"""ModelPipeline handlers: read each stage's resource, call the shared `anneal.control.pipeline.advance`,
create the child it names (owned by the pipeline), write status once."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import kopf

from anneal import API_GROUP, API_VERSION
from anneal.api.pipeline import PipelinePhase
from anneal.api.resources import KINDS, ManifestError, parse_spec
from anneal.control.pipeline import ENDED, advance, child_name
from anneal.runtime.kuberay import owner_reference
from anneal_operator.context import OperatorContext, event, invalid_spec_status, snapshot, with_condition

log = logging.getLogger("anneal_operator.pipeline")

KIND = "ModelPipeline"


def reconcile(op: OperatorContext, body: Any, meta: Mapping[str, Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    old = op.current_status(body)
    if old.get("phase") in ENDED:
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
    new, child, events = advance(spec, old, children, name, ns)
    new["observedGeneration"] = generation
    if child is not None:
        child["metadata"]["ownerReferences"] = [owner_reference(f"{API_GROUP}/{API_VERSION}", KIND, name, meta["uid"])]
        stage = child["metadata"]["labels"]["anneal.dev/stage"]
        try:
            op.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, ns, KINDS[child["kind"]].plural, child)
            events.append(("Normal", "StageCreated", f"stage {stage}: created {child['kind']}/{child['metadata']['name']}"))
        except ApiException as exc:
            if exc.status != 409:
                raise
    ready = new.get("phase") == PipelinePhase.SUCCEEDED
    with_condition(new, "Ready", "True" if ready else "False", new.get("phase") or PipelinePhase.PENDING.value,
                   new.get("message") or "")
    if op.write_status(KIND, body, old, new):
        if new.get("phase") != old.get("phase"):
            op.metrics.phases.labels(KIND, new.get("phase") or "").inc()
            events.append(("Normal" if new.get("phase") != PipelinePhase.FAILED else "Warning", new.get("phase") or "", new.get("message") or ""))
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
