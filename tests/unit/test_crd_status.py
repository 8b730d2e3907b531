"""Statuses the controllers write survive the API server's structural pruning (checked against the generated CRDs)."""

from __future__ import annotations

from typing import Any

import yaml

from anneal.api.crd import render_crds
from anneal.api.service import ModelServiceSpec, ModelServiceStatus
from anneal.rollout.analysis import StatsWindow, VariantWindow
from anneal.rollout.machine import Command, step


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """What kube-apiserver keeps of `value` under a structural schema (unknown fields dropped)."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema \
                and "additionalProperties" not in schema:
            return value
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            if props is not None and key in props:
                out[key] = prune(item, props[key])
            elif isinstance(extra, dict):
                out[key] = prune(item, extra)
            elif schema.get("x-kubernetes-preserve-unknown-fields"):
                out[key] = item
        return out
    if isinstance(value, list):
        return [prune(v, schema.get("items") or {}) for v in value]
    return value


def status_schema(kind_plural: str) -> dict[str, Any]:
    crds = {yaml.safe_load(text)["spec"]["names"]["plural"]: yaml.safe_load(text) for text in render_crds().values()}
    return crds[kind_plural]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def a_rollout_status() -> dict[str, Any]:
    spec = ModelServiceSpec.model_validate({
        "variants": [{"name": "stable", "model": {"uri": "models:/m/1"}, "weight": 100},
                     {"name": "canary", "model": {"uri": "models:/m/2"}, "weight": 0}],
        "rollout": {"stable": "stable", "candidate": "canary",
                    "steps": [{"setWeight": 50}, {"analysis": {}}, {"pause": {}}, {"setWeight": 100}],
                    "analysis": {"interval": "1s", "minRequests": 1}},
    })
    win = StatsWindow(0.0, 0.0, {"canary": VariantWindow(10, 0, 5.0, 9.0, 9.0), "stable": VariantWindow(10)})
    st, now = ModelServiceStatus(), 1000.0
    for i in range(6):
        cmd = Command("promote", source=("anneal.dev/promote", "1")) if i == 5 else None
        st = step(spec, st, win, now + 2 * i, cmd).status
    assert st.rollout.last_analysis is not None and st.rollout.handled_commands
    st.rollout.mlflow_run_id = "abc"
    return st.to_dict()


def test_a_rollout_status_round_trips_through_the_crd_schema():
    written = a_rollout_status()
    kept = prune(written, status_schema("modelservices"))
    assert kept == written
    for key in ("candidate", "stable", "stepsHash", "handledCommands", "attempt", "lastAnalysisAt", "mlflowRunId"):
        assert key in kept["rollout"], key
    assert "candidateWeight" in kept["rollout"]["lastAnalysis"]


def test_the_pruning_check_can_fail():
    written = a_rollout_status()
    written["rollout"]["notDeclared"] = 1
    assert "notDeclared" not in prune(written, status_schema("modelservices"))["rollout"]
