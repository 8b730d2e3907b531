"""Structured pruning of tiny Llama models: importance, depth, width, plans and round trips."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from anneal.compress.pruning import (
    PruningError,
    PruningPlan,
    count_parameters,
    layer_importance,
    prune,
    prune_depth,
    prune_width,
    resolve_depth,
    select_layers,
    width_importance,
)

VOCAB = 97


def _model(layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        initializer_range=0.2,  # larger than default so that layers do visible work
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _batches(n: int = 2, b: int = 2, t: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, -3:] = 0  # right padding in the first row
        out.append({"input_ids": torch.randint(1, VOCAB, (b, t), generator=g), "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _model()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    return _batches()


def _logits(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return m(**batch).logits


# --------------------------------------------------------------------------- depth


@pytest.mark.parametrize(
    ("scores", "keep", "expected"),
    [
        ([0.1, 0.5, 0.3, 0.9], 2, [1, 3]),
        ([0.1, 0.5, 0.3, 0.9], 3, [1, 2, 3]),
        ([0.9, 0.1, 0.8, 0.2], 2, [0, 2]),
        ([0.2, 0.2, 0.2], 1, [0]),  # ties go to the earlier layer
        ([0.3, 0.1], 0, [0]),  # at least one layer stays
        ([0.3, 0.1], 5, [0, 1]),
    ],
)
def test_select_layers_keeps_largest_in_order(scores, keep, expected) -> None:
    assert select_layers(scores, keep) == expected


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 6),
        ({"keep_layers": 4}, 4),
        ({"keep_layers": [5, 0, 2]}, [0, 2, 5]),
        ({"drop_layers": [1, 3]}, [0, 2, 4, 5]),
        ({"drop_layers": 2}, 4),
        ({"ratio": 0.5}, 3),
        ({"ratio": 1.0}, 6),
        ({"ratio": 0.1}, 1),
    ],
)
def test_resolve_depth(kwargs, expected) -> None:
    assert resolve_depth(6, **kwargs) == expected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"keep_layers": 0}, "pruning.depth.keepLayers"),
        ({"keep_layers": 7}, "pruning.depth.keepLayers"),
        ({"keep_layers": []}, "pruning.depth.keepLayers"),
        ({"keep_layers": [0, 6]}, "pruning.depth.keepLayers"),
        ({"keep_layers": [1, 1]}, "pruning.depth.keepLayers"),
        ({"drop_layers": [0, 1, 2, 3, 4, 5]}, "pruning.depth.dropLayers"),
        ({"drop_layers": [-1]}, "pruning.depth.dropLayers"),
        ({"drop_layers": 6}, "pruning.depth.dropLayers"),
        ({"ratio": 0.0}, "pruning.depth.ratio"),
        ({"ratio": 1.5}, "pruning.depth.ratio"),
        ({"ratio": 0.05}, "pruning.depth.ratio"),  # rounds to 0 layers
        ({"keep_layers": 2, "ratio": 0.5}, "pruning.depth"),
    ],
)
def test_bad_depth_plans_name_the_field(kwargs, field) -> None:
    with pytest.raises(PruningError) as err:
        resolve_depth(6, **kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:")


def test_layer_importance_finds_an_identity_layer(batches) -> None:
    m = _model()
    with torch.no_grad():
        layer = m.model.layers[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    scores = layer_importance(m, batches)
    assert len(scores) == 4
    assert scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    pruned, report = prune(m, {"depth": {"keepLayers": 3}}, batches)
    assert report["keptLayers"] == [0, 1, 3]
    # dropping an identity layer changes nothing
    torch.testing.assert_close(_logits(pruned, batches[0]), _logits(m, batches[0]), atol=1e-5, rtol=1e-5)


def test_layer_importance_ignores_padding(model) -> None:
    batch = _batches(n=1)[0]
    padded = {k: v.clone() for k, v in batch.items()}
    padded["input_ids"][0, -3:] = 5  # different tokens under the mask
    assert layer_importance(model, [batch]) == pytest.approx(layer_importance(model, [padded]), rel=1e-5)


@pytest.mark.parametrize("keep", [[0, 2], [1], [0, 1, 3]])
def test_prune_depth_shapes_and_renumbering(model, batches, keep) -> None:
    pruned = prune_depth(model, keep)
    assert pruned is not model and model.config.num_hidden_layers == 4
    assert pruned.config.num_hidden_layers == len(keep) == len(pruned.model.layers)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(len(keep)))
    for new, old in enumerate(keep):
        assert torch.equal(
            pruned.model.layers[new].mlp.up_proj.weight, model.model.layers[old].mlp.up_proj.weight
        )
    assert _logits(pruned, batches[0]).shape == (2, 12, VOCAB)


def test_prune_depth_slices_layer_types(batches) -> None:
    m = _model()
    m.config.layer_types = ["full_attention", "a", "b", "c"]
    assert prune_depth(m, [1, 3]).config.layer_types == ["a", "c"]


# --------------------------------------------------------------------------- width


def test_width_importance_shapes(model, batches) -> None:
    imp = width_importance(model, batches)
    assert len(imp.ffn) == len(imp.heads) == 4
    assert all(f.shape == (64,) for f in imp.ffn)
    assert all(h.shape == (4,) for h in imp.heads)
    assert imp.hidden.shape == (32,)
    assert imp.kv_groups(0).shape == (2,)
    assert all((f >= 0).all() for f in imp.ffn) and (imp.hidden > 0).all()


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 4), (4, 1)])
def test_ratio_one_reproduces_the_model_exactly(batches, heads, kv_heads) -> None:
    m = _model(heads=heads, kv_heads=kv_heads)
    pruned = prune_width(m, width_importance(m, batches))
    assert pruned is not m
    for batch in batches:
        assert torch.equal(_logits(pruned, batch), _logits(m, batch))


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        # (ffn, heads, hidden) -> (intermediate, heads, kv heads, hidden)
        ((0.5, 1.0, 1.0), (32, 4, 2, 32)),
        ((1.0, 0.5, 1.0), (64, 2, 1, 32)),
        ((1.0, 1.0, 0.5), (64, 4, 2, 16)),
        ((0.25, 0.5, 0.75), (16, 2, 1, 24)),
        ((1.0, 1.0, 0.7), (64, 4, 2, 20)),  # 22.4 -> 22 -> rounded down to a multiple of 4 heads
    ],
)
def test_prune_width_shapes_and_config(model, batches, ratios, expected) -> None:
    pruned = prune_width(model, width_importance(model, batches), *ratios)
    inter, heads, kv, hidden = expected
    cfg = pruned.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == expected
    assert cfg.head_dim == 8  # unchanged even when hidden_size shrinks
    layer = pruned.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (heads * 8, hidden)
    assert layer.self_attn.k_proj.weight.shape == (kv * 8, hidden)
    assert layer.self_attn.v_proj.weight.shape == (kv * 8, hidden)
    assert layer.self_attn.o_proj.weight.shape == (hidden, heads * 8)
    assert layer.mlp.gate_proj.weight.shape == (inter, hidden)
    assert layer.mlp.down_proj.weight.shape == (hidden, inter)
    assert layer.input_layernorm.weight.shape == (hidden,)
    assert pruned.model.embed_tokens.weight.shape == (VOCAB, hidden)
    assert pruned.lm_head.weight.shape == (VOCAB, hidden)
    assert pruned.model.norm.weight.shape == (hidden,)
    assert count_parameters(pruned) < count_parameters(model)
    assert torch.isfinite(_logits(pruned, batches[0])).all()


def test_ffn_pruning_keeps_the_top_channels_in_order(model, batches) -> None:
    imp = width_importance(model, batches)
    pruned = prune_width(model, imp, ffn_ratio=0.25)
    for i in range(4):
        kept = torch.sort(torch.topk(imp.ffn[i], 16).indices).values
        assert torch.equal(pruned.model.layers[i].mlp.up_proj.weight, model.model.layers[i].mlp.up_proj.weight[kept])
        assert torch.equal(
            pruned.model.layers[i].mlp.down_proj.weight, model.model.layers[i].mlp.down_proj.weight[:, kept]
        )


def test_unimportant_ffn_channels_do_not_matter(batches) -> None:
    m = _model()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.up_proj.weight[40:].zero_()  # these channels output exactly 0
    imp = width_importance(m, batches)
    assert all((f[40:] == 0).all() and (f[:40] > 0).all() for f in imp.ffn)
    pruned = prune_width(m, imp, ffn_ratio=40 / 64)
    assert pruned.config.intermediate_size == 40
    torch.testing.assert_close(_logits(pruned, batches[0]), _logits(m, batches[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dead_kv", "heads_ratio"),
    [(4, 2, 0, 0.5), (4, 2, 1, 0.5), (4, 4, 2, 0.5), (8, 4, 1, 0.5), (8, 8, 5, 0.5)],
)
def test_a_silenced_kv_group_is_least_important_and_pruned_first(
    batches, heads, kv_heads, dead_kv, heads_ratio
) -> None:
    m = _model(heads=heads, kv_heads=kv_heads)
    head_dim = m.config.head_dim
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.v_proj.weight[dead_kv * head_dim : (dead_kv + 1) * head_dim].zero_()
    imp = width_importance(m, batches)
    group = heads // kv_heads
    for i in range(len(m.model.layers)):
        dead_heads = imp.heads[i][dead_kv * group : (dead_kv + 1) * group]
        assert (dead_heads == 0).all()
        assert int(imp.kv_groups(i).argmin()) == dead_kv
    pruned = prune_width(m, imp, heads_ratio=heads_ratio)
    kept_groups = round(kv_heads * heads_ratio)
    assert pruned.config.num_key_value_heads == kept_groups
    assert pruned.config.num_attention_heads == kept_groups * group
    for new_layer in pruned.model.layers:  # the silent group is gone: no all-zero value head
        v_heads = new_layer.self_attn.v_proj.weight.reshape(kept_groups, head_dim, -1)
        assert (v_heads.abs().sum(dim=(1, 2)) > 0).all()
    if kept_groups == kv_heads - 1:
        # the silent group contributed nothing, so removing only it changes nothing
        torch.testing.assert_close(_logits(pruned, batches[0]), _logits(m, batches[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("ratios", "field"),
    [
        ({"ffn_ratio": 0.0}, "pruning.width.ffnRatio"),
        ({"ffn_ratio": 0.001}, "pruning.width.ffnRatio"),
        ({"heads_ratio": 0.1}, "pruning.width.headsRatio"),  # 0.2 of 2 KV groups -> 0
        ({"heads_ratio": 1.2}, "pruning.width.headsRatio"),
        ({"hidden_ratio": 0.05}, "pruning.width.hiddenRatio"),  # 2 channels < 4 heads
    ],
)
def test_bad_width_ratios_name_the_field(model, batches, ratios, field) -> None:
    with pytest.raises(PruningError) as err:
        prune_width(model, width_importance(model, batches), **ratios)
    assert err.value.field == field


def test_head_count_must_divide_hidden_size(batches) -> None:
    m = _model(heads=4, kv_heads=4)
    imp = width_importance(m, batches)
    with pytest.raises(PruningError, match="divide hiddenSize 32") as err:
        prune_width(m, imp, heads_ratio=0.75)  # 3 heads
    assert err.value.field == "pruning.width.headsRatio"
    # with hidden pruning too, hidden_size is rounded down to a multiple of the heads kept
    pruned = prune_width(m, imp, heads_ratio=0.75, hidden_ratio=0.9)
    assert (pruned.config.num_attention_heads, pruned.config.hidden_size) == (3, 27)


def test_prune_reports_and_names_the_distillation_field(model, batches) -> None:
    plan = PruningPlan.from_spec(
        {"depth": {"ratio": 0.5}, "width": {"ffnRatio": 0.5}}, field_prefix="student.fromTeacher"
    )
    pruned, report = prune(model, plan, iter(batches))  # a one-shot iterator is enough
    assert report["keptLayers"] == select_layers(report["layerImportance"], 2)
    assert report["config"]["numHiddenLayers"] == 2 and report["config"]["intermediateSize"] == 32
    assert report["paramsBefore"] == count_parameters(model) > report["paramsAfter"] == count_parameters(pruned)
    bad = PruningPlan.from_spec({"width": {"headsRatio": 0}}, field_prefix="student.fromTeacher")
    with pytest.raises(PruningError, match=r"^student\.fromTeacher\.width\.headsRatio"):
        prune(model, bad, batches)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "plan",
    [
        {"depth": {"dropLayers": [1]}, "width": {"ffnRatio": 0.5, "headsRatio": 0.5, "hiddenRatio": 0.5}},
        {"depth": {"keepLayers": 2}},
        {"width": {"hiddenRatio": 0.75}},
    ],
)
def test_pruned_model_saves_reloads_and_generates(model, batches, plan, tmp_path) -> None:
    pruned, _ = prune(model, plan, batches)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is LlamaForCausalLM
    for batch in batches:
        assert torch.equal(_logits(reloaded, batch), _logits(pruned, batch))

    prompt = batches[0]["input_ids"][1:, :6]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **kwargs)
    uncached = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **kwargs)
    assert cached.shape == (1, 12)
    # the KV cache is indexed by layer_idx: a wrong numbering would change the tokens
    assert torch.equal(cached, uncached)
