"""Scheme → llm-compressor recipe mapping, size accounting and the retention gate (pure)."""

from __future__ import annotations

import json
import struct

import pytest

from anneal.compress import quantization as qz
from anneal.compress.recipe import gate, prefixed, retention


@pytest.mark.parametrize(
    ("scheme", "group", "weights", "acts"),
    [
        ("W4A16", 128, {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, None),
        ("W4A16", 32, {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}, None),
        ("W8A16", 64, {"num_bits": 8, "type": "int", "strategy": "group", "group_size": 64}, None),
        ("W8A8", 128, {"num_bits": 8, "type": "int", "strategy": "channel"},
         {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
        ("FP8", 128, {"num_bits": 8, "type": "float", "strategy": "channel"},
         {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}),
    ],
)
def test_scheme_args(scheme, group, weights, acts):
    args = qz.scheme_args(scheme, group)
    for k, v in weights.items():
        assert args["weights"][k] == v
    assert args["weights"]["symmetric"] is True
    if acts is None:
        assert "input_activations" not in args
    else:
        for k, v in acts.items():
            assert args["input_activations"][k] == v


def test_scheme_args_matches_compressed_tensors_presets():
    """Our W8A8 / FP8 / default W4A16 are the library's presets (so vLLM picks the same kernels)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    for ours, preset in (("W4A16", "W4A16"), ("W8A8", "W8A8"), ("FP8", "FP8_DYNAMIC")):
        args = qz.scheme_args(ours, 128)
        for part in ("weights", "input_activations"):
            if part in args or PRESET_SCHEMES[preset].get(part) is not None:
                mine = QuantizationArgs(**args[part])
                theirs = PRESET_SCHEMES[preset][part]
                assert (mine.num_bits, mine.type, mine.strategy, mine.group_size, mine.dynamic) == (
                    theirs.num_bits, theirs.type, theirs.strategy, theirs.group_size, theirs.dynamic)


@pytest.mark.parametrize(
    ("algorithm", "names"),
    [("rtn", ["QuantizationModifier"]), ("gptq", ["GPTQModifier"]), ("awq", ["AWQModifier", "QuantizationModifier"])],
)
def test_recipe_plan(algorithm, names):
    plan = qz.QuantPlan(scheme="W4A16", algorithm=algorithm, group_size=64, ignore=("lm_head", "re:.*gate"))
    recipe = qz.recipe_plan(plan)
    assert [n for n, _ in recipe] == names
    quant = recipe[-1][1]
    assert quant["ignore"] == ["lm_head", "re:.*gate"]
    assert quant["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert quant["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert plan.needs_data == (algorithm != "rtn")


def test_build_recipe_makes_library_modifiers():
    mods = qz.build_recipe(qz.QuantPlan(scheme="W8A8", algorithm="gptq"))
    assert [type(m).__name__ for m in mods] == ["GPTQModifier"]
    group = mods[0].config_groups["group_0"]
    assert group.input_activations.dynamic is True and group.weights.num_bits == 8


def test_bad_scheme_names_the_field():
    with pytest.raises(ValueError, match="spec.quantization.scheme"):
        qz.scheme_args("W3A3", 128)


def _write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_size_accounting(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    # a 256x512 Linear in fp32 plus an embedding; quantized to 4 bits, group 128, bf16 scales
    _write_safetensors(src / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight": ("F32", (256, 512), 256 * 512 * 4),
        "model.embed_tokens.weight": ("F32", (100, 512), 100 * 512 * 4),
    })
    _write_safetensors(out / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight_packed": ("I32", (256, 64), 256 * 64 * 4),
        "model.layers.0.mlp.up_proj.weight_scale": ("BF16", (256, 4), 256 * 4 * 2),
        "model.layers.0.mlp.up_proj.weight_shape": ("I64", (2,), 16),
        "model.embed_tokens.weight": ("F32", (100, 512), 100 * 512 * 4),
    })
    (out / "config.json").write_text("{}")
    figures = qz.linear_size_figures(qz.tensor_bytes(out), qz.tensor_bytes(src))
    assert figures["quantizedModules"] == 1
    assert figures["quantizedLinearBf16Bytes"] == 256 * 512 * 2
    expected = (256 * 64 * 4 + 256 * 4 * 2 + 16) / (256 * 512 * 2)
    assert figures["quantizedLinearRatio"] == pytest.approx(expected)
    assert abs(figures["quantizedLinearRatio"] - qz.physical_floor("W4A16")) < 0.05
    assert qz.checkpoint_bytes(out) == (out / "model.safetensors").stat().st_size  # config.json not counted


@pytest.mark.parametrize(("scheme", "floor"), [("W4A16", 0.25), ("W8A16", 0.5), ("W8A8", 0.5), ("FP8", 0.5)])
def test_physical_floor(scheme, floor):
    assert qz.physical_floor(scheme) == floor


@pytest.mark.parametrize(
    ("acc", "src", "expected"), [(0.5, 1.0, 0.5), (0.9, 0.9, 1.0), (0.3, 0.0, None), (None, 0.5, None)]
)
def test_retention(acc, src, expected):
    assert retention(acc, src) == expected


def test_gate():
    m = {"accuracy": 0.4, "sourceAccuracy": 0.8, "retention": 0.5, "sizeRatio": 0.3}
    passed, msg = gate(m, 0.9)
    assert not passed
    assert msg.startswith("retention 0.5000 < minRetention 0.9") and "0.4000 vs source 0.8000" in msg and "sizeRatio 0.3000" in msg
    assert gate(m, 0.5)[0]
    assert gate(m, None) == (True, "no gate (evaluation.minRetention not set)")
    # A source scoring 0 leaves no retention to check: the gate cannot pass without evidence.
    passed, msg = gate({"accuracy": 0.0, "sourceAccuracy": 0.0}, 0.9, 64)
    assert not passed
    assert "retention cannot be computed: the source model scores 0 accuracy on 64 questions" in msg
    assert "never passes" in msg
    passed, msg = gate({"accuracy": 0.5, "sourceAccuracy": 0.5, "retention": float("nan")}, 0.9)
    assert not passed and "cannot be evaluated" in msg


def test_prefixed():
    assert prefixed("pruned", {"accuracy": 1.0, "sizeBytes": 2.0}) == {"prunedAccuracy": 1.0, "prunedSizeBytes": 2.0}
