"""Attention removal and FFN fusion on tiny Llama models: exactness, layout, importance and round trips."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from anneal.compress.ffn_fusion import (
    attention_free_runs,
    attention_importance,
    drop_attention,
    fuse_ffn,
    fused_ffn_weights,
    remove_attention,
    resolve_attention,
    sequential_depth,
)
from anneal.compress.pruning import PruningError, count_parameters
from anneal.modeling.layerwise_llama import AnnealLlamaForCausalLM, register
from tests.unit.test_pruning import _batches  # the same calibration batches as depth pruning's tests

VOCAB = 97
HIDDEN = 32


def _model(layers: int = 6, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # distinct norm weights, so that fusion has to fold them
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _model()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    return _batches()


def _ffn(block: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One SwiGLU FFN after its RMSNorm (unit norm ``n(x)`` times the block's weight)."""
    h = block["norm"] * x
    return (torch.nn.functional.silu(h @ block["gate"].T) * (h @ block["up"].T)) @ block["down"].T


@pytest.mark.parametrize("same_norm", [True, False])
def test_fusion_of_ffns_on_one_input_is_exact(same_norm) -> None:
    g = torch.Generator().manual_seed(0)
    norm = torch.rand(HIDDEN, generator=g) + 0.5
    blocks = [
        {"norm": norm.clone() if same_norm else torch.rand(HIDDEN, generator=g) + 0.5,
         "gate": torch.randn(width, HIDDEN, generator=g), "up": torch.randn(width, HIDDEN, generator=g),
         "down": torch.randn(HIDDEN, width, generator=g)}
        for width in (16, 24, 8)
    ]
    x = torch.randn(5, HIDDEN, generator=g, dtype=torch.float64)
    blocks = [{k: v.double() for k, v in b.items()} for b in blocks]
    fused = fused_ffn_weights(blocks)
    assert fused["gate"].shape == (48, HIDDEN) and fused["down"].shape == (HIDDEN, 48)
    assert torch.equal(fused["norm"], norm.double()) if same_norm else torch.equal(fused["norm"], torch.ones(HIDDEN).double())
    expected = sum(_ffn(b, x) for b in blocks)
    assert torch.allclose(_ffn(fused, x), expected, atol=1e-10, rtol=0)


def test_a_block_without_attention_is_its_residual_plus_ffn(model) -> None:
    dropped = drop_attention(model, [2])
    layer = dropped.model.layers[2]
    assert not hasattr(layer, "self_attn") and not hasattr(layer, "input_layernorm")
    x = torch.randn(2, 7, HIDDEN)
    out = layer(x, attention_mask=None, position_embeddings=None)
    source = model.model.layers[2]
    expected = x + source.mlp(source.post_attention_layernorm(x))
    assert torch.allclose(out, expected, atol=1e-6)
    # the other blocks are the source's own
    batch = _batches(n=1)[0]
    ids = batch["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(dropped(ids).logits, model(ids).logits, atol=1e-3)
        h = model.model.embed_tokens(ids)
        emb = model.model.rotary_emb(h, torch.arange(ids.shape[1])[None])
        for i, (a, b) in enumerate(zip(model.model.layers, dropped.model.layers)):
            h_src = a(h, position_embeddings=emb, attention_mask=None)
            h_new = b(h, position_embeddings=emb, attention_mask=None)
            if i != 2:
                assert torch.allclose(h_src, h_new, atol=1e-6)
            h = h_new


def test_dropping_no_attention_reproduces_the_llama(model, batches) -> None:
    same = drop_attention(model, [])
    assert isinstance(same, AnnealLlamaForCausalLM)
    assert same.config.intermediate_sizes is None and same.config.no_attention_layers == []
    assert count_parameters(same) == count_parameters(model)
    with torch.no_grad():
        for batch in batches:
            assert torch.allclose(same(batch["input_ids"]).logits, model(batch["input_ids"]).logits, atol=1e-6)


def _parallel_form(model: torch.nn.Module, run: list[int], x: torch.Tensor) -> torch.Tensor:
    """x + Σ_k FFN_k(norm_k(x)) over the blocks of `run`, all on the same input."""
    layers = model.model.layers
    return x + sum(layers[i].mlp(layers[i].post_attention_layernorm(x)) for i in run)


def test_fused_block_equals_the_parallel_form_and_shortens_the_model(model) -> None:
    dropped = drop_attention(model, [1, 2, 3, 5])
    fused, runs = fuse_ffn(dropped)
    assert runs == [[1, 2, 3]]  # 5 stands alone: nothing to fuse
    assert len(fused.model.layers) == 4
    assert fused.config.no_attention_layers == [1, 3] and fused.config.intermediate_sizes == [64, 192, 64, 64]
    assert sequential_depth(dropped) == 6 + 2 and sequential_depth(fused) == 4 + 2
    # same projection parameters; only the two absorbed blocks' norm weights are gone
    assert count_parameters(fused) == count_parameters(dropped) - 2 * HIDDEN
    linear = lambda m: sum(p.numel() for n, p in m.named_parameters() if "_proj" in n)  # noqa: E731
    assert linear(fused) == linear(dropped)
    x = torch.randn(3, 5, HIDDEN)
    with torch.no_grad():
        out = fused.model.layers[1](x, attention_mask=None, position_embeddings=None)
        assert torch.allclose(out, _parallel_form(dropped, [1, 2, 3], x), atol=1e-5)
        # blocks outside the run are moved, not changed
        for new, old in ((0, 0), (2, 4), (3, 5)):
            for (name, a), b in zip(fused.model.layers[new].state_dict().items(),
                                    dropped.model.layers[old].state_dict().values()):
                assert torch.equal(a, b), name


def test_the_parallel_form_only_approximates_the_sequential_one(model, batches) -> None:
    dropped = drop_attention(model, [1, 2])
    fused, _ = fuse_ffn(dropped)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        gap = (fused(ids).logits - dropped(ids).logits).abs().max()
    assert gap > 1e-4  # not exact: the second FFN no longer sees the first one's output


@pytest.mark.parametrize("plan", [{"drop_layers": [0, 1, 4]}, {"ratio": 0.5}, {"drop_layers": 2}])
def test_saved_model_reloads_with_identical_logits_and_generates(model, batches, plan, tmp_path) -> None:
    pruned, report = remove_attention(model, batches, fuse=True, **plan)
    assert report["layersAfter"] < report["layersBefore"] or not report["fusedRuns"]
    pruned.save_pretrained(tmp_path)
    register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "AnnealLlamaForCausalLM"
    assert loaded.config.model_type == "anneal_llama"
    with torch.no_grad():
        for batch in batches:
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            assert torch.equal(loaded(**kw).logits, pruned(**kw).logits)
    # KV-cached greedy decoding matches decoding without a cache (cache entries = attention blocks)
    prompt = batches[0]["input_ids"][1:, :5]
    out = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                          pad_token_id=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_attention_importance_finds_a_silent_attention(batches) -> None:
    model = _model(layers=4, seed=3)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()  # its attention adds nothing
    scores = attention_importance(model, batches)
    assert len(scores) == 4 and scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    pruned, report = remove_attention(model, batches, drop_layers=1)
    assert report["droppedAttention"] == [2] and report["attentionImportance"] == scores
    ids = batches[0]["input_ids"]
    with torch.no_grad():  # dropping an attention that adds nothing changes nothing
        assert torch.allclose(pruned(ids).logits, model(ids).logits, atol=1e-5)


def test_ratio_keeps_a_share_of_attention_and_fusion_reports_the_gap(model, batches) -> None:
    pruned, report = remove_attention(model, batches, ratio=0.5, fuse=True)
    assert len(report["droppedAttention"]) == 3
    assert report["sequentialDepthBefore"] == 12
    assert report["sequentialDepthAfter"] == 12 - 3 - sum(len(r) - 1 for r in report["fusedRuns"])
    assert report["fusedRuns"] == attention_free_runs(report["droppedAttention"])
    if report["fusedRuns"]:
        assert report["fusionGapKl"] >= 0 and 0 <= report["fusionGapTop1"] <= 1
    else:
        assert "fusionGapKl" not in report and report["layersAfter"] == 6


def test_attention_can_be_removed_again_from_an_anneal_llama(model, batches) -> None:
    first = drop_attention(model, [4])
    again, report = remove_attention(first, batches, drop_layers=[5], fuse=True)
    assert report["droppedAttention"] == [4, 5] and report["fusedRuns"] == [[4, 5]]
    assert len(again.model.layers) == 5


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"drop_layers": [1, 3]}, None, [1, 3]),
        ({"drop_layers": 2}, None, 4),
        ({"ratio": 0.5}, None, 3),
        ({"ratio": 0.01}, "pruning.attention.ratio", None),
        ({"drop_layers": [0, 1, 2, 3, 4, 5]}, "pruning.attention.dropLayers", None),
        ({"drop_layers": [6]}, "pruning.attention.dropLayers", None),
        ({"drop_layers": [1, 1]}, "pruning.attention.dropLayers", None),
        ({"drop_layers": 6}, "pruning.attention.dropLayers", None),
        ({}, "pruning.attention", None),
        ({"drop_layers": [1], "ratio": 0.5}, "pruning.attention", None),
    ],
)
def test_resolve_attention(kwargs, field, expected) -> None:
    if field is None:
        assert resolve_attention(6, **kwargs) == expected
    else:
        with pytest.raises(PruningError) as err:
            resolve_attention(6, **kwargs)
        assert err.value.field == field


def test_resolve_attention_counts_only_present_attention() -> None:
    assert resolve_attention(6, without=[0, 1], ratio=0.5) == 2
    with pytest.raises(PruningError, match="at least one block"):
        resolve_attention(3, without=[0, 1], drop_layers=[2])


@pytest.mark.parametrize(("gone", "runs"), [([], []), ([3], []), ([1, 2, 4], [[1, 2]]),
                                            ([0, 1, 2, 5, 6], [[0, 1, 2], [5, 6]])])
def test_attention_free_runs(gone, runs) -> None:
    assert attention_free_runs(gone) == runs


LLAMA4 = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


def _spec(pruning: dict) -> object:
    from anneal.api.compression import CompressionJobSpec

    return CompressionJobSpec.model_validate({"model": {"uri": "x"}, "pruning": pruning,
                                              "evaluation": {"minRetention": 0.9}})


@pytest.mark.parametrize(
    ("config", "pruning", "error"),
    [
        (LLAMA4, {"attention": {"dropLayers": [1, 2], "fuseFfn": True}}, None),
        (LLAMA4, {"attention": {"dropLayers": [4]}}, "spec.pruning.attention.dropLayers: [4] is not allowed"),
        (LLAMA4, {"attention": {"dropLayers": [0, 1, 2, 3]}}, "at least one block must keep it"),
        # indices count the blocks left after depth pruning
        (LLAMA4, {"depth": {"keepLayers": 2}, "attention": {"dropLayers": [2]}}, "outside 0..1"),
        ({**LLAMA4, "model_type": "anneal_llama", "no_attention_layers": [0, 1, 2]},
         {"attention": {"ratio": 0.5}}, None),
        ({**LLAMA4, "model_type": "anneal_llama", "no_attention_layers": [0, 1, 2]},
         {"attention": {"dropLayers": [3]}}, "at least one block must keep it"),
        ({**LLAMA4, "model_type": "anneal_llama", "no_attention_layers": [1]},
         {"width": {"ffnRatio": 0.5}}, "spec.pruning.width"),
    ],
)
def test_preflight_checks_the_attention_plan_against_the_model(config, pruning, error) -> None:
    from anneal.compress.preflight import check_model

    found = check_model(_spec(pruning), config)
    if error is None:
        assert found.errors == []
    else:
        assert len(found.errors) == 1 and error in found.errors[0], found.errors


def test_prune_with_attention_applies_depth_first_then_attention(model, batches) -> None:
    from anneal.compress.ffn_fusion import prune_with_attention

    pruned, report = prune_with_attention(
        model, {"depth": {"keepLayers": [0, 1, 2, 4, 5]}, "attention": {"dropLayers": [2, 3], "fuseFfn": True}}, batches)
    assert report["keptLayers"] == [0, 1, 2, 4, 5]
    assert report["attention"]["fusedRuns"] == [[2, 3]]  # blocks 2 and 4 of the source, adjacent after depth pruning
    assert report["config"]["numHiddenLayers"] == 4 and report["config"]["noAttentionLayers"] == [2]
    assert report["config"]["intermediateSizes"] == [64, 64, 128, 64]
    assert report["sequentialDepthBefore"] == 12 and report["attention"]["sequentialDepthAfter"] == 7
    assert report["paramsAfter"] == count_parameters(pruned) < report["paramsBefore"]


def test_the_report_names_the_fusion_figures() -> None:
    from anneal.report import figures

    shown = {f.key: (f.group, f.label) for f in figures(
        {"prunedSequentialDepth": 5.0, "prunedFusionGapKl": 0.03, "prunedAttentionLayers": 2.0}, "CompressionJob")}
    assert shown["prunedSequentialDepth"] == ("after pruning", "sequential depth (attention + FFN sub-layers)")
    assert shown["prunedFusionGapKl"][1].startswith("fusion gap, KL")
    assert shown["prunedAttentionLayers"][1] == "blocks with attention"


@pytest.mark.parametrize("attention", [{"dropLayers": [1, 2, 4]}, {"ratio": 0.5}, {"dropLayers": 2}])
def test_preflight_predicts_the_parameters_attention_removal_leaves(model, batches, attention) -> None:
    from anneal.compress.preflight import check_model

    pruned, _ = remove_attention(model, batches, attention.get("dropLayers"), attention.get("ratio"))
    found = check_model(_spec({"attention": attention}), model.config.to_dict())
    assert found.figures["predictedPrunedParams"] == count_parameters(pruned)
