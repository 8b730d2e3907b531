"""Attention removal and FFN fusion (Llama-Nemotron's Puzzle / FFN Fusion) for Llama-family causal LMs.

Two steps, each pure (the model passed in is never modified; a new
:class:`~anneal.modeling.layerwise_llama.AnnealLlamaForCausalLM` is returned):

1. **Attention removal** (:func:`drop_attention`): the chosen blocks lose their attention
   sub-layer and become ``x + FFN(norm(x))``. Which blocks: explicit indices, or the least
   important by :func:`attention_importance` — the Block Influence (ShortGPT, as depth pruning
   measures it in :mod:`anneal.compress.pruning`) of the attention sub-layer alone,
   ``1 − cos(h, h + attn(norm(h)))`` averaged over the calibration tokens.
2. **FFN fusion** (:func:`fuse_ffn`): a run of consecutive attention-free blocks ``i..j``,
   sequentially ``x_{k+1} = x_k + FFN_k(norm_k(x_k))``, becomes the parallel form
   ``x_out = x_i + Σ_k FFN_k(norm_k(x_i))``, which for SwiGLU FFNs is *exactly* one wider FFN:
   gate/up projections stacked by rows, down projections side by side (columns), down biases
   summed. RMSNorm is ``w ⊙ n(x)`` with ``n`` the unit-weight norm, so ``G_k (w_k ⊙ n(x)) =
   (G_k diag(w_k)) n(x)``: when the blocks' norm weights differ each ``w_k`` is folded into
   the columns of its gate/up projections and one unit-weight norm serves the fused block.
   The fused block is exact relative to the parallel form; the parallel form approximates the
   sequential one (:func:`fusion_gap` measures by how much; the recovery KD after it closes it).

Fusion keeps every projection weight (same parameters) and removes ``j − i`` sequential
blocks; only the ``j − i`` extra norm weight vectors go.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from anneal.compress.pruning import (
    Batch,
    PruningError,
    PruningPlan,
    _first_tensor,
    _layer_prefix,
    _layers,
    _output_tensor,
    _run_calibration,
    count_parameters,
    prune,
    select_layers,
)


def _no_attention(model: nn.Module) -> list[int]:
    return sorted(int(i) for i in (getattr(model.config, "no_attention_layers", None) or []))


def _intermediate_sizes(model: nn.Module) -> list[int]:
    return [int(layer.mlp.down_proj.in_features) for layer in _layers(model)]


def attention_layers(model: nn.Module) -> list[int]:
    """Indices of the blocks of ``model`` that have attention."""
    gone = set(_no_attention(model))
    return [i for i in range(len(_layers(model))) if i not in gone]


def sequential_depth(model: nn.Module) -> int:
    """Residual sub-layers a token passes through one after another: attention blocks + FFN blocks."""
    return len(attention_layers(model)) + len(_layers(model))


def attention_importance(model: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """Block Influence of each block's attention sub-layer: mean of ``1 − cos(h, h + attn(norm(h)))``.

    An attention whose output barely turns the residual stream scores ≈ 0 and is the first to drop.

    Args:
        model: a Llama-family causal LM (``LlamaForCausalLM`` or ``AnnealLlamaForCausalLM``).
        batches: calibration batches ``{input_ids [B, T], attention_mask [B, T]}``.

    Returns:
        ``[L]`` importance per block, in layer order; ``0.0`` for a block that has no attention.
    """
    layers = _layers(model)
    totals = [0.0] * len(layers)
    tokens = [0.0]
    state: dict[str, Any] = {}

    def on_batch(mask: torch.Tensor) -> None:
        state["mask"] = mask
        tokens[0] += float(mask.sum())

    def layer_hook(i: int):
        def hook(module, args, kwargs):
            state[i] = _first_tensor(args, kwargs, "hidden_states")

        return hook

    def attn_hook(i: int):
        def hook(module, args, kwargs, output):
            h = state.pop(i).float()
            out = h + _output_tensor(output).float()
            cos = torch.nn.functional.cosine_similarity(h, out, dim=-1)  # [B, T]
            totals[i] += float(((1.0 - cos) * state["mask"]).sum())

        return hook

    handles = []
    for i in attention_layers(model):
        handles.append(layers[i].register_forward_pre_hook(layer_hook(i), with_kwargs=True))
        handles.append(layers[i].self_attn.register_forward_hook(attn_hook(i), with_kwargs=True))
    try:
        _run_calibration(model, batches, on_batch)
    finally:
        for h in handles:
            h.remove()
    return [t / max(tokens[0], 1.0) for t in totals]


def resolve_attention(
    num_layers: int,
    without: Sequence[int] = (),
    drop_layers: int | Sequence[int] | None = None,
    ratio: float | None = None,
    field_prefix: str = "pruning.attention",
) -> int | list[int]:
    """Turn the API's attention plan into how many attention sub-layers to keep, or which to drop.

    Exactly one of:

    * ``drop_layers`` (``dropLayers``): a list of block indices whose attention goes, or an int =
      how many attention sub-layers to drop (the least important);
    * ``ratio``: the **share of attention sub-layers to keep**, in ``(0, 1]`` (as depth's
      ``ratio`` is the share of layers kept), rounded to the nearest count.

    At least one block keeps its attention (the KV cache and positions are read from it).

    Args:
        num_layers: the model's number of decoder blocks.
        without: blocks that already have no attention (an ``anneal_llama`` source).
        field_prefix: where the plan lives in the resource, for error messages.

    Returns:
        An ``int``: how many of the present attention sub-layers to keep (chosen by importance),
        or a sorted ``list`` of the blocks whose attention to drop.

    Raises:
        PruningError: both or neither given, an index outside ``0..num_layers-1`` or repeated, or
            nothing left.
    """
    present = [i for i in range(num_layers) if i not in set(without)]
    if (drop_layers is None) == (ratio is None):
        raise PruningError(field_prefix, {"dropLayers": drop_layers, "ratio": ratio},
                           "give exactly one of dropLayers, ratio")
    if ratio is not None:
        name = f"{field_prefix}.ratio"
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise PruningError(name, ratio, "must be the share of attention sub-layers to keep, within (0, 1]")
        keep = math.floor(ratio * len(present) + 0.5)
        if keep < 1:
            raise PruningError(name, ratio, f"keeps {keep} of {len(present)} attention sub-layers; "
                                            "at least one block must keep its attention")
        return keep
    name = f"{field_prefix}.dropLayers"
    if isinstance(drop_layers, bool):
        raise PruningError(name, drop_layers, "must be a count or a list of block indices")
    if isinstance(drop_layers, int):
        if not 0 <= drop_layers < len(present):
            raise PruningError(name, drop_layers, f"must be between 0 and {len(present) - 1}: "
                                                  "at least one block must keep its attention")
        return len(present) - drop_layers
    assert drop_layers is not None
    drop = [int(i) for i in drop_layers]
    bad = [i for i in drop if not 0 <= i < num_layers]
    if bad:
        raise PruningError(name, list(drop_layers), f"indices {bad} are outside 0..{num_layers - 1}")
    if len(set(drop)) != len(drop):
        raise PruningError(name, list(drop_layers), "indices must not repeat")
    if not [i for i in present if i not in set(drop)]:
        raise PruningError(name, list(drop_layers), "removes every attention; at least one block must keep it")
    return sorted(drop)


def _build(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh ``AnnealLlamaForCausalLM`` from ``config`` with ``state`` (strict), on ``model``'s device and dtype."""
    from anneal.modeling.layerwise_llama import AnnealLlamaForCausalLM

    param = next(model.parameters())
    new = AnnealLlamaForCausalLM(config).to(device=param.device, dtype=param.dtype)
    missing, unexpected = new.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the new layout: missing {missing}, unexpected {unexpected}")
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def _split(key: str, prefix: str) -> tuple[int, str] | None:
    if not key.startswith(prefix):
        return None
    index, rest = key[len(prefix):].split(".", 1)
    return int(index), rest


def drop_attention(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """A copy of ``model`` whose blocks ``drop`` have no attention sub-layer (nor its input norm).

    Args:
        model: a ``LlamaForCausalLM`` or ``AnnealLlamaForCausalLM`` (not modified).
        drop: block indices; blocks already without attention may be listed.

    Returns:
        An ``AnnealLlamaForCausalLM`` on the same device and dtype.
    """
    from anneal.modeling.layerwise_llama import from_llama_config

    gone = sorted(set(_no_attention(model)) | {int(i) for i in drop})
    config = from_llama_config(model.config, gone, _intermediate_sizes(model))
    prefix = _layer_prefix(model)
    state = {}
    for key, value in model.state_dict().items():
        where = _split(key, prefix)
        if where and where[0] in gone and where[1].startswith(("self_attn.", "input_layernorm.")):
            continue
        state[key] = value.detach().clone()
    return _build(model, config, state)


def attention_free_runs(no_attention: Sequence[int]) -> list[list[int]]:
    """Maximal runs of consecutive attention-free blocks of length ≥ 2 (the ones fusion shortens)."""
    runs: list[list[int]] = []
    for i in sorted(no_attention):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [r for r in runs if len(r) >= 2]


def fused_ffn_weights(blocks: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The one FFN (and its norm weight) equal to the sum of ``blocks``' FFNs on one input.

    Args:
        blocks: per block, ``{"norm": [D], "gate": [I_k, D], "up": [I_k, D], "down": [D, I_k]}``
            and optionally ``"gate_bias"``, ``"up_bias"`` ``[I_k]``, ``"down_bias"`` ``[D]``.

    Returns:
        ``{"norm": [D], "gate": [ΣI, D], "up": [ΣI, D], "down": [D, ΣI]}`` (+ biases): the norm is
        the blocks' common weight when they all have the same one, else ones with each block's
        weight folded into the columns of its gate/up projections.
    """
    norms = [b["norm"] for b in blocks]
    shared = all(torch.equal(norms[0], w) for w in norms[1:])
    fold = [torch.ones_like(w) if shared else w for w in norms]
    out = {
        "norm": norms[0].clone() if shared else torch.ones_like(norms[0]),
        "gate": torch.cat([b["gate"] * w[None, :] for b, w in zip(blocks, fold)], dim=0),
        "up": torch.cat([b["up"] * w[None, :] for b, w in zip(blocks, fold)], dim=0),
        "down": torch.cat([b["down"] for b in blocks], dim=1),
    }
    if "gate_bias" in blocks[0]:
        out["gate_bias"] = torch.cat([b["gate_bias"] for b in blocks])
        out["up_bias"] = torch.cat([b["up_bias"] for b in blocks])
        out["down_bias"] = torch.stack([b["down_bias"] for b in blocks]).sum(dim=0)
    return out


def fuse_ffn(model: nn.Module) -> tuple[nn.Module, list[list[int]]]:
    """Fuse each run of ≥ 2 consecutive attention-free blocks into one block with one wider FFN.

    Args:
        model: an ``AnnealLlamaForCausalLM`` (not modified); a model without such runs is copied.

    Returns:
        ``(fused_model, runs)``: the new model (fewer blocks, same projection weights) and the
        runs of original block indices that were fused.
    """
    from anneal.modeling.layerwise_llama import from_llama_config

    gone = _no_attention(model)
    runs = attention_free_runs(gone)
    if not runs:
        return copy.deepcopy(model), []
    layers = _layers(model)
    sizes = _intermediate_sizes(model)
    first_of = {r[0]: r for r in runs}
    absorbed = {i for r in runs for i in r[1:]}
    order = [i for i in range(len(layers)) if i not in absorbed]  # old index of each new block
    new_sizes = [sum(sizes[i] for i in first_of[o]) if o in first_of else sizes[o] for o in order]
    new_gone = [n for n, o in enumerate(order) if o in set(gone)]
    config = from_llama_config(model.config, new_gone, new_sizes, num_hidden_layers=len(order))
    prefix = _layer_prefix(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        where = _split(key, prefix)
        if where is None:
            state[key] = value.detach().clone()
        elif where[0] in set(order) and where[0] not in first_of:
            state[f"{prefix}{order.index(where[0])}.{where[1]}"] = value.detach().clone()
    for first, run in first_of.items():
        new = f"{prefix}{order.index(first)}."
        blocks = []
        for i in run:
            mlp = layers[i].mlp
            block = {"norm": layers[i].post_attention_layernorm.weight.detach(), "gate": mlp.gate_proj.weight.detach(),
                     "up": mlp.up_proj.weight.detach(), "down": mlp.down_proj.weight.detach()}
            if mlp.gate_proj.bias is not None:
                block.update(gate_bias=mlp.gate_proj.bias.detach(), up_bias=mlp.up_proj.bias.detach(),
                             down_bias=mlp.down_proj.bias.detach())
            blocks.append(block)
        fused = fused_ffn_weights(blocks)
        state[f"{new}post_attention_layernorm.weight"] = fused["norm"]
        for proj in ("gate", "up", "down"):
            state[f"{new}mlp.{proj}_proj.weight"] = fused[proj]
            if f"{proj}_bias" in fused:
                state[f"{new}mlp.{proj}_proj.bias"] = fused[f"{proj}_bias"]
    return _build(model, config, state), runs


def fusion_gap(sequential: nn.Module, fused: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """How far the fused (parallel) model is from the sequential one on calibration tokens.

    Args:
        sequential: the model before fusion.
        fused: :func:`fuse_ffn`'s result.
        batches: calibration batches ``{input_ids [B, T], attention_mask [B, T]}``.

    Returns:
        ``{"kl": mean KL(p_sequential ‖ p_fused) per token (nats), "top1": share of tokens whose
        greedy next token agrees}``.
    """
    kl_sum, agree, tokens = 0.0, 0.0, 0.0
    was = (sequential.training, fused.training)
    sequential.eval()
    fused.eval()
    device = next(sequential.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = (torch.ones_like(ids) if mask is None else mask.to(device)).float()
                a = sequential(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits.float()
                b = fused(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits.float()
                la, lb = a.log_softmax(-1), b.log_softmax(-1)
                kl = (la.exp() * (la - lb)).sum(-1)  # [B, T]
                kl_sum += float((kl * mask).sum())
                agree += float(((a.argmax(-1) == b.argmax(-1)).float() * mask).sum())
                tokens += float(mask.sum())
    finally:
        sequential.train(was[0])
        fused.train(was[1])
    if not tokens:
        raise PruningError("calibration", "[]", "the fusion gap needs at least one calibration token")
    return {"kl": kl_sum / tokens, "top1": agree / tokens}


def remove_attention(
    model: nn.Module,
    batches: Sequence[Batch],
    drop_layers: int | Sequence[int] | None = None,
    ratio: float | None = None,
    fuse: bool = False,
    field_prefix: str = "pruning.attention",
) -> tuple[nn.Module, dict[str, Any]]:
    """Attention removal by plan, then (``fuse``) FFN fusion; returns the new model and a report.

    Returns:
        ``(model, report)``; the report holds ``droppedAttention`` (block indices, original
        numbering), ``attentionImportance`` (or None when the blocks were given), ``fusedRuns``,
        ``layersBefore``/``layersAfter`` (decoder blocks), ``sequentialDepthBefore``/``After``
        (attention + FFN sub-layers in sequence) and, with ``fuse``, ``fusionGapKl`` and
        ``fusionGapTop1`` (:func:`fusion_gap`).
    """
    n = len(_layers(model))
    already = _no_attention(model)
    plan = resolve_attention(n, already, drop_layers, ratio, field_prefix)
    scores = None
    if isinstance(plan, int):
        scores = attention_importance(model, batches)
        present = attention_layers(model)
        keep = select_layers([scores[i] for i in present], plan)
        drop = [present[k] for k in range(len(present)) if k not in set(keep)]
    else:
        drop = plan
    pruned = drop_attention(model, drop)
    report: dict[str, Any] = {
        "droppedAttention": sorted(set(already) | set(drop)),
        "attentionImportance": scores,
        "fusedRuns": [],
        "layersBefore": n,
        "sequentialDepthBefore": sequential_depth(model),
    }
    if fuse:
        fused, runs = fuse_ffn(pruned)
        report["fusedRuns"] = runs
        if runs:
            report.update({f"fusionGap{k.capitalize()}": v for k, v in fusion_gap(pruned, fused, batches).items()})
        pruned = fused
    report["layersAfter"] = len(_layers(pruned))
    report["sequentialDepthAfter"] = sequential_depth(pruned)
    return pruned, report


def prune_with_attention(model: nn.Module, plan: PruningPlan | Mapping[str, Any],
                         batches: Iterable[Batch]) -> tuple[nn.Module, dict[str, Any]]:
    """A whole ``CompressionJob.pruning`` plan: depth, width (:func:`anneal.compress.pruning.prune`), then attention.

    Returns:
        ``(model, report)``: :func:`~anneal.compress.pruning.prune`'s report; when the plan removes
        attention also ``attention`` (:func:`remove_attention`'s report, block indices counted after
        depth pruning), ``config.noAttentionLayers`` and ``config.intermediateSizes``.
    """
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan.from_spec(plan)
    batches = list(batches)
    if not plan.removes_attention:
        return prune(model, plan, batches)
    if plan.prunes_depth or plan.prunes_width:
        pruned, report = prune(model, plan, batches)
    else:
        n = len(_layers(model))
        pruned, report = model, {"keptLayers": list(range(n)), "layerImportance": None, "layersBefore": n,
                                 "width": {"ffnRatio": 1.0, "headsRatio": 1.0, "hiddenRatio": 1.0}}
    pruned, attention = remove_attention(pruned, batches, plan.attention_drop, plan.attention_ratio,
                                         fuse=plan.fuse_ffn, field_prefix=f"{plan.field_prefix}.attention")
    before, after = count_parameters(model), count_parameters(pruned)
    cfg = pruned.config
    report.update({
        "paramsBefore": before, "paramsAfter": after, "paramRatio": after / before,
        "sequentialDepthBefore": sequential_depth(model),
        "attention": attention,
        "config": {
            "numHiddenLayers": cfg.num_hidden_layers, "hiddenSize": cfg.hidden_size,
            "intermediateSize": cfg.intermediate_size, "numAttentionHeads": cfg.num_attention_heads,
            "numKeyValueHeads": cfg.num_key_value_heads, "headDim": cfg.head_dim,
            "noAttentionLayers": list(cfg.no_attention_layers or []),
            "intermediateSizes": list(cfg.intermediate_sizes or []),
        },
    })
    return pruned, report


__all__ = [
    "attention_free_runs",
    "attention_importance",
    "attention_layers",
    "drop_attention",
    "fuse_ffn",
    "fused_ffn_weights",
    "fusion_gap",
    "prune_with_attention",
    "remove_attention",
    "resolve_attention",
    "sequential_depth",
]
