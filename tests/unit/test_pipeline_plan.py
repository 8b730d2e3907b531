"""The pure pipeline plan: child names, fromStage resolution, stage gates."""

from __future__ import annotations

import pytest

from anneal.api.pipeline import StageGate
from anneal.api.resources import parse_manifest
from anneal.control.pipeline import PipelineError, child_manifest, child_name, resolve_stage_refs

PIPE = {
    "apiVersion": "anneal.dev/v1alpha1",
    "kind": "ModelPipeline",
    "metadata": {"name": "math", "namespace": "ml"},
    "spec": {
        "stages": [
            {"name": "teacher", "distillation": {"method": "sft", "student": {"config": {"hiddenSize": 64, "layers": 2, "heads": 4}}}},
            {"name": "student", "distillation": {"method": "kd", "teacher": {"fromStage": "teacher"},
                                                  "student": {"fromTeacher": {"depth": {"keepLayers": 1}}}}},
            {"name": "quant", "compression": {"model": {"fromStage": "student"}, "quantization": {"scheme": "W8A16"}}},
            {"name": "serve", "service": {"variants": [{"name": "main", "model": {"fromStage": "quant"}}]}},
        ]
    },
}


def test_child_name_is_a_dns_label():
    assert child_name("math", "teacher") == "math-teacher"
    long = child_name("p" * 40, "s" * 40)
    assert len(long) <= 63 and not long.endswith("-")


def test_resolve_replaces_every_from_stage():
    spec = {"teacher": {"fromStage": "a"}, "variants": [{"model": {"fromStage": "b"}}, {"model": {"uri": "x"}}]}
    out = resolve_stage_refs(spec, {"a": "models:/a/1", "b": "models:/b/2"})
    assert out == {"teacher": {"uri": "models:/a/1"}, "variants": [{"model": {"uri": "models:/b/2"}}, {"model": {"uri": "x"}}]}
    assert spec["teacher"] == {"fromStage": "a"}  # input untouched


def test_resolve_missing_stage_raises():
    with pytest.raises(KeyError):
        resolve_stage_refs({"model": {"fromStage": "nope"}}, {})


def test_stage_manifest_resolves_and_validates():
    pipe = parse_manifest(PIPE)
    quant = parse_manifest(child_manifest("math", "ml", pipe.spec.stages[2],
                                          {"teacher": "models:/t/1", "student": "models:/s/4"}))
    assert (quant.kind, quant.name, quant.namespace) == ("CompressionJob", "math-quant", "ml")
    assert quant.spec.model.uri == "models:/s/4"
    assert quant.raw["metadata"]["labels"] == {"anneal.dev/pipeline": "math", "anneal.dev/stage": "quant"}
    with pytest.raises(PipelineError, match="stage quant: stage 'student' produced no model"):
        child_manifest("math", "ml", pipe.spec.stages[2], {"teacher": "models:/t/1"})


@pytest.mark.parametrize(
    "gate,metrics,passed,why",
    [
        ({"metric": "retention", "min": 0.9}, {"retention": 0.95}, True, "retention=0.95 >= 0.9"),
        ({"metric": "retention", "min": 0.9}, {"retention": 0.5}, False, "retention=0.5 < min 0.9"),
        ({"metric": "sizeRatio", "max": 0.5}, {"sizeRatio": 0.7}, False, "sizeRatio=0.7 > max 0.5"),
        ({"metric": "retention", "min": 0.9}, {"accuracy": 1.0}, False, "retention is missing"),
        # A figure that is not a finite number never passes (NaN compares false both ways).
        ({"metric": "retention", "min": 0.9}, {"retention": float("nan")}, False, "cannot be evaluated"),
        ({"metric": "sizeRatio", "max": 0.5}, {"sizeRatio": float("nan")}, False, "cannot be evaluated"),
        ({"metric": "retention", "min": 0.9}, {"retention": float("inf")}, False, "not a finite number"),
        ({"metric": "retention", "min": 0.9}, {"retention": "0.95"}, False, "not a finite number"),
    ],
)
def test_stage_gate(gate, metrics, passed, why):
    ok, text = StageGate.model_validate(gate).check(metrics)
    assert ok is passed and why in text
