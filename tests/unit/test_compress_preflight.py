"""Pre-flight rules of CompressionJob: hardware, pruning that leaves nothing, group sizes, ignore names, memory."""

from __future__ import annotations

import pytest

from anneal.api.compression import CompressionJobSpec
from anneal.compress import preflight as pf

LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "hidden_size": 128,
    "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}


def spec(**kw) -> CompressionJobSpec:
    return CompressionJobSpec.model_validate({"model": {"uri": "/models/src"}, **kw})


@pytest.mark.parametrize(
    ("accel", "expected"),
    [("H100", 9.0), ("nvidia-h100-80gb", 9.0), ("NVIDIA-L4", 8.9), ("L40S", 8.9), ("A100-80GB", 8.0),
     ("a10g", 8.6), ("Tesla-T4", 7.5), ("TPU-v5", None), (None, None)],
)
def test_compute_capability(accel, expected):
    assert pf.compute_capability(accel) == expected


@pytest.mark.parametrize(
    ("scheme", "gpus", "accel", "needle"),
    [
        ("FP8", 0, None, "CPU-only job: the model is produced and evaluated"),
        ("FP8", 1, "A100", "'A100' has 8.0 (vLLM falls back to FP8 weight-only"),
        ("FP8", 1, "T4", "'T4' has 7.5"),
        ("FP8", 1, None, "set spec.resources.acceleratorType"),
        ("W4A16", 1, "V100", "needs compute capability >= 8.0"),
    ],
)
def test_hardware_warnings_fire(scheme, gpus, accel, needle):
    warnings = pf.hardware_warnings(scheme, gpus, accel)
    assert len(warnings) == 1 and needle in warnings[0]
    assert warnings[0].startswith("spec.quantization.scheme")


@pytest.mark.parametrize(("scheme", "gpus", "accel"), [("FP8", 1, "H100"), ("FP8", 1, "L4"), ("W4A16", 0, None),
                                                       ("W8A8", 1, "T4"), ("W4A16", 1, "A100")])
def test_hardware_warnings_quiet(scheme, gpus, accel):
    assert pf.hardware_warnings(scheme, gpus, accel) == []


def test_static_advice():
    s = spec(quantization={"scheme": "FP8", "algorithm": "rtn", "groupSize": 64, "calibration": {"samples": 8}},
             pruning={"depth": {"ratio": 0.5}}, evaluation={"minRetention": 0.9})
    text = "\n".join(pf.static_advice(s))
    assert "CPU-only" in text
    assert "spec.quantization.groupSize: set, but FP8" in text
    assert "spec.quantization.calibration: set, but algorithm 'rtn'" in text
    assert "spec.pruning.recovery: not set" in text
    assert "minRetention" not in text
    quiet = spec(quantization={"scheme": "W4A16", "algorithm": "gptq", "groupSize": 64}, evaluation={"minRetention": 0.9})
    assert pf.static_advice(quiet) == []
    assert any("minRetention: not set" in w for w in pf.static_advice(spec(quantization={"scheme": "W8A16"})))


def test_advice_hook_uses_static_advice():
    from anneal.api.advice import advice

    assert any("CPU-only" in w for w in advice("CompressionJob", spec(quantization={"scheme": "FP8", "algorithm": "rtn"})))


SHAPE = pf.ModelShape.from_config(LLAMA)


@pytest.mark.parametrize(
    ("pruning", "expected"),
    [
        ({"depth": {"ratio": 0.5}}, {"layers": 2}),
        ({"depth": {"dropLayers": [0, 3]}}, {"layers": 2}),
        ({"depth": {"keepLayers": 3}}, {"layers": 3}),
        ({"width": {"ffnRatio": 0.5}}, {"intermediate_size": 192}),
        ({"width": {"headsRatio": 0.5, "hiddenRatio": 0.5}}, {"heads": 2, "kv_heads": 1, "hidden_size": 64}),
    ],
)
def test_pruned_shape(pruning, expected):
    out = pf.pruned_shape(SHAPE, pruning)
    for k, v in expected.items():
        assert getattr(out, k) == v


@pytest.mark.parametrize(
    ("pruning", "field"),
    [
        ({"depth": {"ratio": 0.1}}, "spec.pruning.depth.ratio"),
        ({"depth": {"dropLayers": 4}}, "spec.pruning.depth.dropLayers"),
        ({"depth": {"keepLayers": [7]}}, "spec.pruning.depth.keepLayers"),
        ({"width": {"ffnRatio": 0.001}}, "spec.pruning.width.ffnRatio"),
        ({"width": {"headsRatio": 0.1}}, "spec.pruning.width.headsRatio"),
    ],
)
def test_pruning_that_leaves_nothing_is_an_error_naming_the_field(pruning, field):
    found = pf.check_model(spec(pruning=pruning), LLAMA)
    assert len(found.errors) == 1
    assert found.errors[0].startswith(field)
    assert "4 layers" in found.errors[0]


@pytest.mark.parametrize(
    ("scheme", "group", "pruning", "bad"),
    [
        ("W4A16", 128, None, False),
        ("W4A16", 256, None, True),  # 128-wide q/k/v/gate/up inputs
        ("W4A16", 96, None, True),
        ("W8A16", 48, None, True),
        ("W8A8", 96, None, False),  # per channel: groupSize does not apply
        ("W4A16", 128, {"width": {"hiddenRatio": 0.5, "headsRatio": 0.5}}, True),  # hidden 64 after pruning
        ("W4A16", 64, {"width": {"hiddenRatio": 0.5, "headsRatio": 0.5}}, False),
    ],
)
def test_group_size_must_divide_input_widths(scheme, group, pruning, bad):
    q = {"scheme": scheme, "algorithm": "rtn", "groupSize": group}
    found = pf.check_model(spec(quantization=q, **({"pruning": pruning} if pruning else {})), LLAMA)
    errors = [e for e in found.errors if e.startswith("spec.quantization.groupSize")]
    assert bool(errors) == bad
    if bad:
        assert f"{group} does not divide" in errors[0] and "choose one that divides" in errors[0]


def test_group_size_error_spares_ignored_layers():
    q = {"scheme": "W4A16", "algorithm": "rtn", "groupSize": 128, "ignore": ["lm_head", "re:.*down_proj"]}
    assert pf.group_size_errors(pf.ModelShape.from_config({**LLAMA, "intermediate_size": 320}), "W4A16", 128, q["ignore"]) == []


def test_unknown_ignore_names_warn_with_a_suggestion():
    q = {"scheme": "W8A16", "algorithm": "rtn",
         "ignore": ["lm_head", "lm_haed", "re:.*mlp.down_proj", "re:.*nothing_here", "LlamaDecoderLayer",
                    "model.layers.3.mlp.down_proj"]}
    found = pf.check_model(spec(quantization=q, evaluation={"minRetention": 0.5}), LLAMA)
    assert not found.errors
    text = "\n".join(found.warnings)
    assert "ignore[1]: 'lm_haed' matches no module of the model; did you mean 'lm_head'?" in text
    assert "ignore[3]" in text
    assert "ignore[0]" not in text and "ignore[2]" not in text and "ignore[4]" not in text
    assert "ignore[5]" not in text
    # after pruning to two layers, layer 3 no longer exists
    pruned = pf.check_model(spec(quantization=q, pruning={"depth": {"keepLayers": 2}}), LLAMA)
    assert any("ignore[5]" in w for w in pruned.warnings)


def test_memory_estimate_against_resources():
    big = {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
    shape = pf.ModelShape.from_config(big)
    assert 7.9e9 < shape.params() < 8.1e9  # Llama-3.1-8B
    gptq = pf.calibration_memory_bytes(shape, "gptq", 512, 2048, dtype_bytes=2)
    rtn = pf.calibration_memory_bytes(shape, "rtn", 512, 2048, dtype_bytes=2)
    assert gptq > rtn > 2 * shape.params() * 2
    s = spec(quantization={"scheme": "W4A16", "algorithm": "gptq", "calibration": {"samples": 512, "maxSeqLength": 2048}},
             resources={"gpusPerWorker": 1, "acceleratorType": "H100", "memory": "16Gi"})
    found = pf.check_model(s, big)
    assert any(w.startswith("spec.resources.memory: 16Gi is below the estimated") for w in found.warnings)
    roomy = s.model_copy(update={"resources": s.resources.model_copy(update={"memory": "256Gi"})})
    assert not any("resources.memory" in w for w in pf.check_model(roomy, big).warnings)
    assert found.figures["estimatedMemoryBytes"] == pf.check_model(roomy, big).figures["estimatedMemoryBytes"]
