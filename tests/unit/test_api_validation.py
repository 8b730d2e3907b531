"""Every validation rule of the typed API: good manifests pass, bad ones name the field, value and rule."""

from __future__ import annotations

import copy

import pytest

from anneal.api import ManifestError, parse_duration, parse_manifest, parse_quantity
from anneal.api.resources import parse_spec

STUDENT = {"config": {"hiddenSize": 64, "layers": 2, "heads": 4, "kvHeads": 2}}
SFT = {"method": "sft", "student": STUDENT}
KD = {"method": "kd", "teacher": {"uri": "models:/teacher/1"}, "student": STUDENT}
CPT = {"method": "cpt", "student": {"uri": "models:/pruned/1"},
       "dataset": {"uri": "/data/corpus.jsonl", "format": "text", "maxSeqLength": 512}}
CJ = {"model": {"uri": "models:/teacher@champion"}, "quantization": {"scheme": "W4A16", "groupSize": 32}}
SVC = {
    "variants": [
        {"name": "stable", "model": {"uri": "models:/m/1"}, "weight": 90},
        {"name": "canary", "model": {"uri": "models:/m/2"}, "weight": 10},
    ]
}
PIPE = {
    "stages": [
        {"name": "teacher", "distillation": SFT},
        {"name": "student", "distillation": {**KD, "teacher": {"fromStage": "teacher"}}, "gate": {"metric": "retention", "min": 0.8}},
        {"name": "quant", "compression": {"model": {"fromStage": "student"}, "quantization": {"scheme": "W8A16"}}},
        {
            "name": "serve",
            "service": {"variants": [{"name": "main", "model": {"fromStage": "quant"}}]},
        },
    ]
}


def with_(base: dict, path: str, value) -> dict:
    """A deep copy of `base` with the dotted `path` set (``None`` deletes; ``[i]`` indexes lists)."""
    out = copy.deepcopy(base)
    node = out
    parts = path.replace("[", ".[").split(".")
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
    last = parts[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return out


GOOD = [
    ("DistillationJob", SFT),
    ("DistillationJob", KD),
    ("DistillationJob", {**KD, "method": "lora-kd", "lora": {"rank": 8, "merge": False}}),
    ("DistillationJob", {**KD, "method": "kd-rl", "rl": {"reward": "python:my.mod:score", "groupSize": 4}}),
    ("DistillationJob", {**KD, "student": {"fromTeacher": {"depth": {"keepLayers": 2}, "width": {"ffnRatio": 0.5}}}}),
    ("DistillationJob", {**KD, "student": {"fromTeacher": {"depth": {"keepLayers": [0, 3]}}}}),
    ("DistillationJob", {**KD, "teacher": {"fromResource": {"kind": "DistillationJob", "name": "t"}}}),
    ("DistillationJob", {**SFT, "training": {"epochs": 2}, "resources": {"memory": "16Gi", "gpusPerWorker": 1}}),
    ("DistillationJob", {**KD, "training": {"strategy": "fsdp", "precision": "bf16", "gradientCheckpointing": True},
                         "resources": {"workers": 8, "gpusPerWorker": 1}}),
    ("DistillationJob", CPT),
    # an import: sft for zero steps from an existing model evaluates and registers it as it is
    ("DistillationJob", {**SFT, "student": {"uri": "deploy/quickstart/math-teacher"}, "training": {"steps": 0}}),
    ("DistillationJob", {**CPT, "teacher": {"uri": "models:/teacher/1"}, "kd": {"alpha": 0.3}}),
    ("DistillationJob", {**CPT, "evalDataset": {"uri": "/data/heldout.jsonl", "format": "text"},
                         "evaluation": {"dataset": {"uri": "builtin://reasoning", "split": "eval"}},
                         "training": {"strategy": "fsdp", "epochs": 1}, "resources": {"workers": 2}}),
    ("CompressionJob", CJ),
    ("CompressionJob", {"model": {"uri": "/abs/model"}, "pruning": {"depth": {"ratio": 0.5}, "recovery": {"steps": 10}}}),
    ("CompressionJob", {"model": {"uri": "hf://org/name@main"}, "quantization": {"scheme": "FP8", "algorithm": "rtn"}}),
    ("ModelService", SVC),
    ("ModelService", {"variants": [{"name": "only", "model": {"uri": "./m"}}]}),
    ("ModelService", {**SVC, "rollout": {"stable": "stable", "candidate": "canary", "steps": [{"setWeight": 20}, {"pause": "30s"}, {"pause": {}}, {"analysis": {}}]}}),
    ("ModelService", {**SVC, "routing": {"policy": "dynamic", "dynamic": {"small": "canary", "large": "stable", "threshold": 0.4}}}),
    ("ModelService", {**SVC, "routing": {"shadow": {"variant": "canary", "percent": 5}, "sticky": {"header": "x-user"}}}),
    ("ModelPipeline", PIPE),
]


@pytest.mark.parametrize("kind,spec", GOOD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(GOOD)])
def test_good_specs_parse(kind, spec):
    parsed = parse_spec(kind, spec)
    assert type(parsed).__name__ == f"{kind}Spec"


BAD = [
    # (kind, spec, field path in the message, a fragment of the rule)
    ("DistillationJob", with_(SFT, "method", "distil"), "spec.method", "'sft', 'cpt', 'kd', 'lora-kd' or 'kd-rl'"),
    ("DistillationJob", with_(KD, "teacher", None), "spec.teacher", "teacher is required"),
    # cpt trains on raw text: a chat data set (the default format) is the user's mistake, named
    ("DistillationJob", with_(CPT, "dataset.format", None), "spec.dataset.format", "set format: text"),
    ("DistillationJob", with_(CPT, "dataset.format", "chat"), "spec.dataset.format", "method cpt trains on raw text"),
    ("DistillationJob", with_(CPT, "dataset", None), "spec.dataset.format", "set format: text"),
    ("DistillationJob", with_(CPT, "evalDataset", {"uri": "builtin://reasoning"}), "spec.evalDataset.format",
     "held-out raw text"),
    ("DistillationJob", with_(CPT, "evaluation.dataset", {"uri": "/d.jsonl", "format": "text"}),
     "spec.evaluation.dataset.format", "checkable answers"),
    ("DistillationJob", with_(CPT, "student", {"fromTeacher": {"depth": {"keepLayers": 1}}}),
     "spec.student.fromTeacher", "needs spec.teacher"),
    ("DistillationJob", with_(SFT, "student", {}), "spec.student", "exactly one of uri"),
    ("DistillationJob", with_(SFT, "student.uri", "models:/x/1"), "spec.student", "exactly one of"),
    ("DistillationJob", with_(SFT, "student.config.heads", 5), "spec.student.config.hiddenSize", "divisible by heads"),
    ("DistillationJob", with_(SFT, "student.config.kvHeads", 3), "spec.student.config.kvHeads", "must divide heads"),
    ("DistillationJob", with_(KD, "kd", {"temperature": 0}), "spec.kd.temperature", "greater than 0"),
    ("DistillationJob", with_(KD, "kd", {"alpha": 1.5}), "spec.kd.alpha", "less than or equal to 1"),
    ("DistillationJob", with_(KD, "kd", {"loss": "mse"}), "spec.kd.loss", "forward-kl"),
    ("DistillationJob", with_(KD, "lora", {"rank": 0}), "spec.lora.rank", "greater than or equal to 1"),
    ("DistillationJob", with_(KD, "rl", {"groupSize": 1}), "spec.rl.groupSize", "greater than or equal to 2"),
    ("DistillationJob", with_(KD, "rl", {"reward": "python:nofunction"}), "spec.rl.reward", "pattern"),
    ("DistillationJob", with_(SFT, "training", {"steps": 10, "epochs": 1}), "spec.training.epochs", "not both"),
    ("DistillationJob", with_(SFT, "training", {"precision": "int8"}), "spec.training.precision", "fp32"),
    ("DistillationJob", with_(SFT, "training", {"steps": 0}), "spec.training.steps", "a student that exists"),
    ("DistillationJob", with_(KD, "training", {"steps": 0}), "spec.training.steps", "needs method sft"),
    ("DistillationJob", with_(SFT, "training", {"steps": -1}), "spec.training.steps", "greater than or equal to 0"),
    ("DistillationJob", with_(SFT, "training", {"strategy": "zero3"}), "spec.training.strategy", "'ddp' or 'fsdp'"),
    ("DistillationJob", with_({**KD, "method": "lora-kd"}, "training", {"strategy": "fsdp"}), "spec.training.strategy",
     "supported for methods sft, cpt and kd"),
    ("DistillationJob", with_({**KD, "method": "kd-rl"}, "training", {"strategy": "fsdp"}), "spec.training.strategy",
     "use ddp for lora-kd and kd-rl"),
    ("DistillationJob", with_(SFT, "resources", {"workers": 0}), "spec.resources.workers", "greater than or equal to 1"),
    ("DistillationJob", with_(SFT, "resources", {"gpusPerWorker": -1}), "spec.resources.gpusPerWorker", "greater than or equal to 0"),
    ("DistillationJob", with_(SFT, "resources", {"cpusPerWorker": 0}), "spec.resources.cpusPerWorker", "greater than 0"),
    ("DistillationJob", with_(SFT, "resources", {"memory": "lots"}), "spec.resources.memory", "pattern"),
    ("DistillationJob", with_(SFT, "dataset", {"uri": "ftp://x"}), "spec.dataset.uri", "pattern"),
    ("DistillationJob", with_(SFT, "dataset", {"reasoning": "maybe"}), "spec.dataset.reasoning", "'on', 'off' or 'both'"),
    ("DistillationJob", with_(SFT, "dataset", {"format": "csv"}), "spec.dataset.format", "chat"),
    ("DistillationJob", with_(SFT, "ray", {"address": "ray-head:8265"}), "spec.ray.address", "pattern"),
    ("DistillationJob", with_(SFT, "bogus", 1), "spec.bogus", "unknown field"),
    ("DistillationJob", with_(SFT, "teacher", {"uri": "models:/x"}), "spec.teacher.uri", "models:/Name/N"),
    ("DistillationJob", with_(SFT, "teacher", {"fromStage": "a"}), "spec.teacher.fromStage", "only allowed inside a ModelPipeline"),
    ("DistillationJob", with_(SFT, "student", {"fromTeacher": {"depth": {"keepLayers": 2}}}), "spec.student.fromTeacher", "needs spec.teacher"),
    ("DistillationJob", with_(KD, "student", {"fromTeacher": {"depth": {"keepLayers": 2, "ratio": 0.5}}}), "spec.student.fromTeacher.depth", "exactly one of keepLayers"),
    ("DistillationJob", with_(KD, "student", {"fromTeacher": {"depth": {"keepLayers": 0}}}), "spec.student.fromTeacher.depth.keepLayers", ">= 1"),
    ("DistillationJob", with_(KD, "student", {"fromTeacher": {"depth": {"keepLayers": [1, "a"]}}}), "spec.student.fromTeacher.depth.keepLayers[1]", "valid integer"),
    ("DistillationJob", with_(KD, "student", {"fromTeacher": {"width": {"ffnRatio": 0}}}), "spec.student.fromTeacher.width.ffnRatio", "greater than 0"),
    ("DistillationJob", with_(KD, "student", {"fromTeacher": {}}), "spec.student.fromTeacher", "set depth and/or width"),
    ("CompressionJob", with_(CJ, "quantization", None), "spec", "at least one of pruning and quantization"),
    ("CompressionJob", with_(CJ, "quantization.scheme", "W2A2"), "spec.quantization.scheme", "W8A16"),
    ("CompressionJob", with_(CJ, "quantization.algorithm", "awq") | {"quantization": {"scheme": "W8A8", "algorithm": "awq"}}, "spec.quantization.algorithm", "weight-only"),
    ("CompressionJob", {"model": {"uri": "x"}, "quantization": {"scheme": "FP8", "algorithm": "gptq"}}, "spec.quantization.algorithm", "use algorithm rtn"),
    ("CompressionJob", with_(CJ, "quantization.groupSize", 0), "spec.quantization.groupSize", "greater than or equal to 1"),
    ("CompressionJob", with_(CJ, "evaluation", {"minRetention": 1.2}), "spec.evaluation.minRetention", "less than or equal to 1"),
    ("CompressionJob", with_(CJ, "pruning", {"depth": {"ratio": 0}}), "spec.pruning.depth.ratio", "greater than 0"),
    ("CompressionJob", with_(CJ, "pruning", {}), "spec.pruning", "set depth, width and/or attention"),
    ("CompressionJob", with_(CJ, "pruning", {"attention": {"fuseFfn": True}}), "spec.pruning.attention", "exactly one of dropLayers or ratio"),
    ("CompressionJob", with_(CJ, "pruning", {"attention": {"dropLayers": [1, 1]}}), "spec.pruning.attention.dropLayers", "unique"),
    ("CompressionJob", with_(CJ, "pruning", {"attention": {"ratio": 1.5}}), "spec.pruning.attention.ratio", "less than or equal to 1"),
    ("CompressionJob", with_(CJ, "model", {}), "spec.model", "exactly one of uri, fromResource or fromStage"),
    ("CompressionJob", with_(CJ, "model", {"fromResource": {"kind": "ModelService", "name": "x"}}), "spec.model.fromResource.kind", "DistillationJob"),
    ("ModelService", with_(SVC, "variants[1].weight", 20), "spec.variants[1].weight", "sum to 100"),
    ("ModelService", with_(SVC, "variants[1].weight", 101), "spec.variants[1].weight", "less than or equal to 100"),
    ("ModelService", with_(SVC, "variants[1].name", "stable"), "spec.variants[1].name", "unique"),
    ("ModelService", with_(SVC, "variants[0].name", "Bad_Name"), "spec.variants[0].name", "DNS label"),
    ("ModelService", {"variants": []}, "spec.variants", "at least 1 item"),
    ("ModelService", {"variants": [{"name": f"v{i}", "model": {"uri": "m"}, "weight": 10} for i in range(10)]}, "spec.variants", "at most 8 items"),
    ("ModelService", with_(SVC, "variants[0].engine", "tgi"), "spec.variants[0].engine", "transformers"),
    ("ModelService", with_(SVC, "variants[0].replicas", 2) | {}, None, None),  # valid: replicas alone
    ("ModelService", with_(with_(SVC, "variants[0].replicas", 2), "variants[0].autoscaling", {"maxReplicas": 3}), "spec.variants[0].autoscaling", "not both"),
    ("ModelService", with_(SVC, "variants[0].autoscaling", {"minReplicas": 3, "maxReplicas": 2}), "spec.variants[0].autoscaling.maxReplicas", ">= minReplicas"),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "ghost"}), "spec.rollout.candidate", "must name a variant"),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "stable"}), "spec.rollout.candidate", "differ from stable"),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "canary", "steps": [{"setWeight": 10, "pause": "1m"}]}), "spec.rollout.steps[0]", "exactly one of setWeight"),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "canary", "steps": [{"pause": "soon"}]}), "spec.rollout.steps[0].pause", "duration"),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"interval": "10x"}}), "spec.rollout.analysis.interval", "duration"),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"gates": [{"metric": "errorRate"}]}}), "spec.rollout.analysis.gates[0]", "exactly one of max or min"),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"gates": [{"metric": "cpu", "max": 1}]}}), "spec.rollout.analysis.gates[0].metric", "errorRate"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "ghost"}}), "spec.routing.shadow.variant", "must name a variant"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "percent": 150}}), "spec.routing.shadow.percent", "less than or equal to 100"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "compare": "answer", "answerPattern": "(unclosed"}}), "spec.routing.shadow.answerPattern", "not a regular expression"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "answerPattern": "(\\d+)"}}), "spec.routing.shadow.answerPattern", "only with compare: answer"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "compare": "semantic"}}), "spec.routing.shadow.compare", "exact"),
    # A shadow gate needs the candidate mirrored: no shadow, or a shadow on another variant.
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"gates": [{"metric": "shadowAgreement", "min": 0.9}]}}), "spec.rollout.analysis.gates[0].metric", "set routing.shadow.variant to the candidate"),
    ("ModelService", with_(with_(SVC, "routing", {"shadow": {"variant": "stable"}}), "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"gates": [{"metric": "errorRate", "max": 0.1}, {"metric": "shadowLatencyRatio", "max": 1.5}]}}), "spec.rollout.analysis.gates[1].metric", "'canary'"),
    ("ModelService", with_(with_(SVC, "routing", {"shadow": {"variant": "canary"}}), "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"gates": [{"metric": "shadowAgreement", "min": 0.9}]}}), None, None),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"confidence": 0.3}}), "spec.rollout.analysis.confidence", "greater than or equal to 0.5"),
    ("ModelService", with_(with_(SVC, "routing", {"shadow": {"variant": "canary"}}), "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"gates": [{"metric": "judgeWinRate", "min": 0.5}]}}), "spec.rollout.analysis.gates[0].metric", "set routing.shadow.judge"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "judge": {"variant": "ghost"}}}), "spec.routing.shadow.judge.variant", "must name a variant"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "judge": {"variant": "canary"}}}), "spec.routing.shadow.judge.variant", "cannot be the mirrored variant"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "judge": {"variant": "stable"}}}), "spec.routing.shadow.judge.variant", "weight 0"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "judge": {"variant": "stable", "template": "Is {answer} ok?"}}}), "spec.routing.shadow.judge.template", "placeholders are"),
    ("ModelService", with_(SVC, "routing", {"shadow": {"variant": "canary", "judge": {"variant": "stable", "share": 0}}}), "spec.routing.shadow.judge.share", "greater than 0"),
    ("ModelService", with_(SVC, "rollout", {"stable": "stable", "candidate": "canary", "analysis": {"confidence": 1}}), "spec.rollout.analysis.confidence", "less than or equal to 0.999"),
    ("ModelService", with_(SVC, "routing", {"policy": "dynamic"}), "spec.routing.dynamic", "needs routing.dynamic"),
    ("ModelService", with_(SVC, "routing", {"policy": "dynamic", "dynamic": {"small": "canary", "large": "huge"}}), "spec.routing.dynamic.large", "must name a variant"),
    ("ModelService", with_(SVC, "routing", {"dynamic": {"small": "a", "large": "b", "largeShare": 2}}), "spec.routing.dynamic.largeShare", "less than or equal to 1"),
    ("ModelService", with_(SVC, "routing", {"reasoning": {"default": "maybe"}}), "spec.routing.reasoning.default", "'on' or 'off'"),
    ("ModelService", with_(SVC, "variants[0].model", {"fromStage": "x"}), "spec.variants[0].model.fromStage", "only allowed inside a ModelPipeline"),
    ("ModelPipeline", {"stages": []}, "spec.stages", "at least 1 item"),
    ("ModelPipeline", with_(PIPE, "stages[1].name", "teacher"), "spec.stages[1].name", "unique"),
    ("ModelPipeline", with_(PIPE, "stages[2].compression.model", {"fromStage": "serve"}), "spec.stages[2].compression.model.fromStage", "earlier stage"),
    ("ModelPipeline", with_(PIPE, "stages[2].compression.model", {"fromStage": "nowhere"}), "spec.stages[2].compression.model.fromStage", "names no stage"),
    ("ModelPipeline", with_(PIPE, "stages[1].distillation.teacher", {"fromStage": "student"}), "spec.stages[1].distillation.teacher.fromStage", "earlier stage"),
    ("ModelPipeline", with_(PIPE, "stages[0]", {"name": "empty"}), "spec.stages[0]", "exactly one of distillation, compression or service"),
    ("ModelPipeline", with_(PIPE, "stages[1].gate", {"metric": "retention"}), "spec.stages[1].gate", "exactly one of max or min"),
    ("ModelPipeline", with_(PIPE, "stages[1].distillation.method", "x"), "spec.stages[1].distillation.method", "'sft'"),
]


@pytest.mark.parametrize("kind,spec,path,rule", BAD, ids=[f"{k}-{p}" for k, _, p, _ in BAD])
def test_bad_specs_name_the_field(kind, spec, path, rule):
    if path is None:
        parse_spec(kind, spec)
        return
    with pytest.raises(ManifestError) as info:
        parse_spec(kind, spec)
    paths = [e.path for e in info.value.errors]
    assert path in paths, f"expected an error at {path}, got {[str(e) for e in info.value.errors]}"
    err = next(e for e in info.value.errors if e.path == path)
    assert rule in err.rule, str(err)
    # One line per error: path, value and rule.
    assert str(err).startswith(f"{path}: ")


def test_error_line_carries_value():
    with pytest.raises(ManifestError) as info:
        parse_spec("ModelService", with_(SVC, "variants[1].weight", 30))
    assert str(info.value.errors[0]) == (
        "spec.variants[1].weight: 30: the weights of all variants must sum to 100 (they sum to 120)"
    )


@pytest.mark.parametrize(
    "doc,path,rule",
    [
        ({"apiVersion": "anneal.dev/v1", "kind": "DistillationJob", "metadata": {"name": "a"}, "spec": SFT}, "apiVersion", "anneal.dev/v1alpha1"),
        ({"apiVersion": "anneal.dev/v1alpha1", "kind": "TrainJob", "metadata": {"name": "a"}, "spec": SFT}, "kind", "unknown kind"),
        ({"apiVersion": "anneal.dev/v1alpha1", "kind": "DistillationJob", "spec": SFT}, "metadata.name", "required"),
        ({"apiVersion": "anneal.dev/v1alpha1", "kind": "DistillationJob", "metadata": {"name": "a"}}, "spec", "mapping"),
        (["not", "a", "mapping"], "(document)", "mapping"),
    ],
)
def test_manifest_envelope(doc, path, rule):
    with pytest.raises(ManifestError) as info:
        parse_manifest(doc)
    assert any(e.path == path and rule in e.rule for e in info.value.errors), info.value


def test_manifest_roundtrip_defaults():
    m = parse_manifest({"apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": "svc", "namespace": "ml"}, "spec": {"variants": [{"name": "a", "model": {"uri": "m"}}]}})
    assert (m.kind, m.name, m.namespace) == ("ModelService", "svc", "ml")
    assert m.spec.weights() == {"a": 100}
    assert m.spec.routing.override_header == "x-anneal-variant"
    assert m.spec.mlflow.champion_alias == "champion"


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "5 m", "1d", "-1s"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text,value", [("16Gi", 16 * 2**30), ("512Mi", 512 * 2**20), ("2", 2), ("1.5G", 1.5e9), ("500m", 0.5), ("1e3", 1000)])
def test_quantities(text, value):
    assert parse_quantity(text) == pytest.approx(value)


def test_bad_quantity():
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity("16 GB")
