"""Minitron-style structured pruning of Llama-family causal LMs: importance, depth and width.

Shared by ``DistillationJob.student.fromTeacher`` and ``CompressionJob.pruning``. Every function
is pure: it reads a model (and calibration batches) and returns numbers or a *new* model; the
model passed in is never modified. Supported are Hugging Face causal LMs laid out like
``LlamaForCausalLM`` (Mistral, Qwen2 and friends share it)::

    model.model.embed_tokens, model.model.layers[i].{input_layernorm, post_attention_layernorm}
    model.model.layers[i].self_attn.{q,k,v,o}_proj, model.model.layers[i].mlp.{gate,up,down}_proj
    model.model.norm, model.lm_head

Calibration input is an iterable of ``{"input_ids": [B, T], "attention_mask": [B, T]}`` batches;
padded positions (mask 0) are left out of every average. Importance is activation based
(Minitron, Muralidharan et al. 2024): depth by Block Influence (ShortGPT), width by the mean
magnitude of each channel's / head's activations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]


class PruningError(ValueError):
    """A pruning plan that cannot be applied; names the spec field, the value and the rule."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"{field}: {value!r} is not allowed: {rule}")


# --------------------------------------------------------------------------- helpers


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise TypeError(
            f"{type(model).__name__} is not a Llama-family causal LM "
            "(expected model.model.layers and model.lm_head)"
        )
    return inner


def _layers(model: nn.Module) -> nn.ModuleList:
    return _decoder(model).layers


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _token_mask(batch: Batch, device: torch.device) -> torch.Tensor:
    """``[B, T]`` float mask of real (non-padding) tokens."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    return mask.to(device=device, dtype=torch.float32)


def _run_calibration(model: nn.Module, batches: Iterable[Batch], on_batch) -> int:
    """Forward every batch (eval mode, no grad); ``on_batch(mask)`` is called before each.

    Returns the number of batches seen. Restores the model's training mode afterwards.
    """
    device = _device(model)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                mask = _token_mask(batch, device)
                on_batch(mask)
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=mask.long(),
                    use_cache=False,
                )
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise PruningError("calibration", "[]", "importance needs at least one calibration batch")
    return seen


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs[name]


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- depth


def layer_importance(model: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """Block Influence of every decoder layer: mean over tokens of ``1 − cos(h_in, h_out)``.

    A layer that barely changes the residual stream (output ≈ input) scores ≈ 0 and is the
    first candidate to drop (ShortGPT; Minitron's depth importance).

    Args:
        model: a Llama-family causal LM.
        batches: calibration batches ``{input_ids [B, T], attention_mask [B, T]}``.

    Returns:
        ``[L]`` importance per layer, in layer order (higher = more important).
    """
    layers = _layers(model)
    totals = [0.0] * len(layers)
    tokens = [0.0]
    state: dict[str, torch.Tensor] = {}

    def on_batch(mask: torch.Tensor) -> None:
        state["mask"] = mask
        tokens[0] += float(mask.sum())

    def make_hook(i: int):
        def hook(module, args, kwargs, output):
            h_in = _first_tensor(args, kwargs, "hidden_states").float()
            h_out = _output_tensor(output).float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # [B, T]
            totals[i] += float(((1.0 - cos) * state["mask"]).sum())

        return hook

    handles = [
        layer.register_forward_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        _run_calibration(model, batches, on_batch)
    finally:
        for h in handles:
            h.remove()
    return [t / max(tokens[0], 1.0) for t in totals]


def select_layers(importance: Sequence[float], keep: int) -> list[int]:
    """Indices of the ``keep`` most important layers, in their original order.

    Ties go to the earlier layer. ``keep`` is clamped to ``[1, len(importance)]``: a model
    always keeps at least one layer.

    Args:
        importance: ``[L]`` scores from :func:`layer_importance`.
        keep: how many layers to keep.

    Returns:
        Sorted list of ``keep`` layer indices.
    """
    n = len(importance)
    keep = max(1, min(int(keep), n))
    ranked = sorted(range(n), key=lambda i: (-importance[i], i))
    return sorted(ranked[:keep])


def _ratio_count(n: int, ratio: float, field: str) -> int:
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise PruningError(field, ratio, "must be a fraction to keep, within (0, 1]")
    count = math.floor(ratio * n + 0.5)
    if count < 1:
        raise PruningError(field, ratio, f"keeps {count} of {n}; at least 1 must remain")
    return count


def _check_indices(indices: Sequence[int], n: int, field: str) -> list[int]:
    out = [int(i) for i in indices]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise PruningError(field, list(indices), f"indices {bad} are outside 0..{n - 1}")
    if len(set(out)) != len(out):
        raise PruningError(field, list(indices), "indices must not repeat")
    return sorted(out)


def resolve_depth(
    num_layers: int,
    keep_layers: int | Sequence[int] | None = None,
    drop_layers: int | Sequence[int] | None = None,
    ratio: float | None = None,
    field_prefix: str = "pruning.depth",
) -> int | list[int]:
    """Turn the API's depth plan into a layer count or an explicit list of layers to keep.

    At most one of the three may be given:

    * ``keep_layers`` (``keepLayers``): an int = how many layers to keep (chosen by
      importance), or a list of the layer indices to keep;
    * ``drop_layers`` (``dropLayers``): a list of layer indices to drop, or an int = how many
      layers to drop (chosen by importance);
    * ``ratio``: the **fraction of layers to keep**, in ``(0, 1]`` (``0.5`` = Minitron's
      "drop 50% of the layers"), rounded to the nearest count.

    Args:
        num_layers: the model's number of decoder layers.
        field_prefix: where the plan lives in the resource, for error messages
            (``pruning.depth`` or ``student.fromTeacher.depth``).

    Returns:
        An ``int`` count to keep (select by importance), or a sorted ``list`` of indices to
        keep. With nothing given, ``num_layers`` (keep everything).

    Raises:
        PruningError: more than one option, nothing left, a count out of range, or an index
            outside ``0..num_layers-1``.
    """
    given = {
        name: value
        for name, value in (
            ("keepLayers", keep_layers),
            ("dropLayers", drop_layers),
            ("ratio", ratio),
        )
        if value is not None
    }
    if len(given) > 1:
        raise PruningError(
            field_prefix, sorted(given), "give only one of keepLayers, dropLayers, ratio"
        )
    if not given:
        return num_layers
    if ratio is not None:
        return _ratio_count(num_layers, ratio, f"{field_prefix}.ratio")
    if keep_layers is not None:
        name = f"{field_prefix}.keepLayers"
        if isinstance(keep_layers, bool):
            raise PruningError(name, keep_layers, "must be a count or a list of layer indices")
        if isinstance(keep_layers, int):
            if not 1 <= keep_layers <= num_layers:
                raise PruningError(name, keep_layers, f"must be between 1 and {num_layers}")
            return keep_layers
        kept = _check_indices(keep_layers, num_layers, name)
        if not kept:
            raise PruningError(name, list(keep_layers), "at least one layer must be kept")
        return kept
    name = f"{field_prefix}.dropLayers"
    assert drop_layers is not None
    if isinstance(drop_layers, bool):
        raise PruningError(name, drop_layers, "must be a count or a list of layer indices")
    if isinstance(drop_layers, int):
        if not 0 <= drop_layers < num_layers:
            raise PruningError(
                name, drop_layers, f"must be between 0 and {num_layers - 1}: one layer must remain"
            )
        return num_layers - drop_layers
    dropped = set(_check_indices(drop_layers, num_layers, name))
    kept = [i for i in range(num_layers) if i not in dropped]
    if not kept:
        raise PruningError(name, list(drop_layers), "drops every layer; at least one must remain")
    return kept


def _rebuild(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model of the same class from ``config``, loaded with ``state`` (strict).

    Building from the config (rather than editing modules in place) keeps every derived
    attribute (``layer_idx``, ``head_dim``, ``num_key_value_groups``, rotary buffers) consistent.
    """
    param = next(model.parameters())
    new = type(model)(config).to(device=param.device, dtype=param.dtype)
    missing, unexpected = new.load_state_dict(state, strict=False)
    tied = set(getattr(new, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit: missing {missing}, unexpected {unexpected}")
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def prune_depth(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with only the decoder layers ``keep`` (kept in their order).

    The new config has ``num_hidden_layers = len(keep)`` (and ``layer_types`` sliced when the
    config has it); layers are renumbered ``0..len(keep)-1`` so that attention ``layer_idx``
    matches the KV cache.

    Args:
        model: a Llama-family causal LM (not modified).
        keep: layer indices to keep, e.g. from :func:`select_layers`.

    Returns:
        The pruned model, same class, dtype and device.
    """
    n = model.config.num_hidden_layers
    where = "pruning.depth.keepLayers"
    kept = _check_indices(keep, n, where)
    if not kept:
        raise PruningError(where, list(keep), "at least one layer must be kept")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept]
    renumber = {old: new for new, old in enumerate(kept)}
    state = {}
    prefix = _layer_prefix(model)
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix) :].split(".", 1)
            if int(old) not in renumber:
                continue
            key = f"{prefix}{renumber[int(old)]}.{rest}"
        state[key] = value.detach().clone()
    return _rebuild(model, config, state)


def _layer_prefix(model: nn.Module) -> str:
    layers = _layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    raise TypeError("decoder layers not found")


# --------------------------------------------------------------------------- width


@dataclass
class WidthImportance:
    """Activation-based importance of every prunable width unit.

    Attributes:
        ffn: ``[L][I]`` per layer, per MLP channel: mean ``|act(gate) * up|``.
        heads: ``[L][H]`` per layer, per query head: mean L2 norm of the head's attention
            output (before ``o_proj``). Pruning works on KV groups; see :meth:`kv_groups`.
        hidden: ``[D]`` per embedding channel: mean ``|x|`` of the embeddings' output plus
            every RMSNorm's output (input / post-attention norms of all layers, final norm),
            summed.
    """

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]
    hidden: torch.Tensor
    num_key_value_heads: int = field(default=0)

    def kv_groups(self, layer: int) -> torch.Tensor:
        """``[G]`` importance of each KV group of ``layer``: the sum over its query heads."""
        heads = self.heads[layer]
        return heads.reshape(self.num_key_value_heads, -1).sum(dim=-1)


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def width_importance(model: nn.Module, batches: Iterable[Batch]) -> WidthImportance:
    """Measure FFN-channel, attention-head and hidden-channel importance on calibration data.

    Args:
        model: a Llama-family causal LM.
        batches: calibration batches ``{input_ids [B, T], attention_mask [B, T]}``.

    Returns:
        :class:`WidthImportance` (all fp32, on CPU), averaged over real tokens.
    """
    config = model.config
    decoder = _decoder(model)
    layers = decoder.layers
    n_heads = config.num_attention_heads
    head_dim = _head_dim(config)
    ffn = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    heads = [torch.zeros(n_heads) for _ in layers]
    hidden = torch.zeros(config.hidden_size)
    tokens = [0.0]
    state: dict[str, torch.Tensor] = {}

    def on_batch(mask: torch.Tensor) -> None:
        state["mask"] = mask
        tokens[0] += float(mask.sum())

    def masked_sum(x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, ...] -> [...] summed over real tokens
        mask = state["mask"].reshape(*state["mask"].shape, *([1] * (x.dim() - 2)))
        return (x.float() * mask).sum(dim=(0, 1)).cpu()

    def ffn_hook(i: int):
        def hook(module, args):
            ffn[i] += masked_sum(args[0].abs())

        return hook

    def head_hook(i: int):
        def hook(module, args):
            x = args[0]
            x = x.reshape(*x.shape[:-1], n_heads, head_dim)
            heads[i] += masked_sum(x.float().norm(dim=-1))

        return hook

    def hidden_hook(module, args, output):
        hidden.add_(masked_sum(_output_tensor(output).abs()))

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(layer.input_layernorm.register_forward_hook(hidden_hook))
        handles.append(layer.post_attention_layernorm.register_forward_hook(hidden_hook))
    handles.append(decoder.embed_tokens.register_forward_hook(hidden_hook))
    handles.append(decoder.norm.register_forward_hook(hidden_hook))
    try:
        _run_calibration(model, batches, on_batch)
    finally:
        for h in handles:
            h.remove()
    denom = max(tokens[0], 1.0)
    return WidthImportance(
        ffn=[f / denom for f in ffn],
        heads=[h / denom for h in heads],
        hidden=hidden / denom,
        num_key_value_heads=config.num_key_value_heads,
    )


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores, sorted ascending (original order kept)."""
    # stable sort: ties keep the earlier channel
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return torch.sort(order).values


def _count(n: int, ratio: float, field: str, multiple_of: int = 1) -> int:
    count = _ratio_count(n, ratio, field)
    if multiple_of > 1:
        count = (count // multiple_of) * multiple_of
        if count < 1:
            raise PruningError(
                field,
                ratio,
                f"keeps fewer than {multiple_of} channels, the number of attention heads left",
            )
    return count


def prune_width(
    model: nn.Module,
    importance: WidthImportance,
    ffn_ratio: float = 1.0,
    heads_ratio: float = 1.0,
    hidden_ratio: float = 1.0,
    field_prefix: str = "pruning.width",
) -> nn.Module:
    """A copy of ``model`` keeping the most important FFN channels, heads and hidden channels.

    Each ratio is the fraction to keep, in ``(0, 1]``, rounded to the nearest count; the kept
    units are the top-scoring ones, in their original order.

    * **FFN** (``ffn_ratio``): rows of ``gate_proj``/``up_proj`` and columns of ``down_proj``;
      the same count in every layer (``intermediate_size``), chosen per layer.
    * **Heads** (``heads_ratio``) are pruned in units of **KV groups**: a group is one key/value
      head and the ``num_attention_heads / num_key_value_heads`` query heads that share it,
      scored by the sum of those query heads' importance. Keeping whole groups keeps the
      grouping ratio an integer and each kept query head paired with its own key/value head.
      ``heads_ratio`` is applied to the number of groups (for MHA, a group is one head).
    * **Hidden** (``hidden_ratio``): the embedding channels, sliced consistently in the
      embeddings, every norm, every projection's input (q/k/v/gate/up, lm_head) and output
      (o_proj, down_proj). Llama configs require ``hidden_size`` to be a multiple of
      ``num_attention_heads``, so the kept count is rounded down to such a multiple (with
      ``hidden_ratio`` 1.0 nothing is rounded: a head count that does not divide
      ``hidden_size`` is an error).
      ``head_dim`` is written explicitly into the config so it does not change with
      ``hidden_size``. (RMSNorm then averages over fewer channels, which is why hidden pruning
      wants a distillation pass afterwards, as in Minitron.)

    Ratios of 1.0 reproduce the original model exactly.

    Args:
        model: a Llama-family causal LM (not modified).
        importance: from :func:`width_importance` on this model.
        ffn_ratio, heads_ratio, hidden_ratio: fractions to keep, in ``(0, 1]``.
        field_prefix: where the plan lives in the resource, for error messages.

    Returns:
        The pruned model, same class, dtype and device, with an updated config.

    Raises:
        PruningError: a ratio outside ``(0, 1]``, one that leaves no channel, head or group, or
            a head count that does not divide the hidden size.
    """
    config = model.config
    layers = _layers(model)
    n_heads = config.num_attention_heads
    n_kv = config.num_key_value_heads
    group = n_heads // n_kv
    head_dim = _head_dim(config)

    ffn_keep = _count(config.intermediate_size, ffn_ratio, f"{field_prefix}.ffnRatio")
    groups_keep = _count(n_kv, heads_ratio, f"{field_prefix}.headsRatio")
    heads_keep = groups_keep * group
    if hidden_ratio == 1.0 and config.hidden_size % heads_keep:
        raise PruningError(
            f"{field_prefix}.headsRatio",
            heads_ratio,
            f"keeps {heads_keep} attention heads, which do not divide hiddenSize "
            f"{config.hidden_size} (a Llama config rule); choose a headsRatio that does, "
            "or also set hiddenRatio",
        )
    hidden_keep = _count(
        config.hidden_size, hidden_ratio, f"{field_prefix}.hiddenRatio", multiple_of=heads_keep
    )

    hidden_idx = _top(importance.hidden, hidden_keep)
    ffn_idx = [_top(importance.ffn[i], ffn_keep) for i in range(len(layers))]
    kv_idx = []  # [L] kept KV groups
    q_rows = []  # [L] kept rows of q_proj / columns of o_proj
    kv_rows = []  # [L] kept rows of k_proj / v_proj
    for i in range(len(layers)):
        g = _top(importance.heads[i].reshape(n_kv, group).sum(-1), groups_keep)
        kv_idx.append(g)
        heads_kept = (g[:, None] * group + torch.arange(group)).reshape(-1)
        q_rows.append((heads_kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1))
        kv_rows.append((g[:, None] * head_dim + torch.arange(head_dim)).reshape(-1))

    new_config = copy.deepcopy(config)
    new_config.intermediate_size = ffn_keep
    new_config.num_attention_heads = heads_keep
    new_config.num_key_value_heads = groups_keep
    new_config.hidden_size = hidden_keep
    new_config.head_dim = head_dim

    prefix = _layer_prefix(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if key.startswith(prefix):
            index_str, rest = key[len(prefix) :].split(".", 1)
            i = int(index_str)
            value = _slice_layer_param(rest, value, hidden_idx, ffn_idx[i], q_rows[i], kv_rows[i])
        elif value.dim() >= 1 and value.shape[-1] == config.hidden_size and (
            key.endswith("embed_tokens.weight") or key.endswith("lm_head.weight")
        ):
            value = value.index_select(-1, hidden_idx.to(value.device))
        elif key.endswith("norm.weight") and value.dim() == 1:
            value = value.index_select(0, hidden_idx.to(value.device))
        state[key] = value.clone()
    return _rebuild(model, new_config, state)


def _slice_layer_param(
    name: str,
    value: torch.Tensor,
    hidden_idx: torch.Tensor,
    ffn_idx: torch.Tensor,
    q_rows: torch.Tensor,
    kv_rows: torch.Tensor,
) -> torch.Tensor:
    """Slice one decoder-layer tensor (``name`` relative to the layer) to the kept units."""
    dev = value.device
    hid, ffn, q, kv = (t.to(dev) for t in (hidden_idx, ffn_idx, q_rows, kv_rows))
    module, kind = name.rsplit(".", 1)
    leaf = module.rsplit(".", 1)[-1]
    # (rows, columns) of each Linear: output and input units
    units = {
        "q_proj": (q, hid),
        "k_proj": (kv, hid),
        "v_proj": (kv, hid),
        "o_proj": (hid, q),
        "gate_proj": (ffn, hid),
        "up_proj": (ffn, hid),
        "down_proj": (hid, ffn),
    }
    if leaf in units:
        rows, cols = units[leaf]
        if kind == "weight":
            return value.index_select(0, rows).index_select(1, cols)
        if kind == "bias":
            return value.index_select(0, rows)
    if leaf.endswith("layernorm") and kind == "weight":
        return value.index_select(0, hid)
    # q_norm / k_norm (Qwen3-style, per head_dim) and anything else: unchanged
    return value


# --------------------------------------------------------------------------- plan


@dataclass
class PruningPlan:
    """The pruning part of a spec (``pruning`` or ``student.fromTeacher``), snake_cased.

    Depth: at most one of ``keep_layers``, ``drop_layers``, ``depth_ratio`` (see
    :func:`resolve_depth`). Width: fractions to keep, 1.0 = untouched. Attention (CompressionJob
    only): ``attention_drop`` or ``attention_ratio`` and ``fuse_ffn`` (see
    :mod:`anneal.compress.ffn_fusion`).
    """

    keep_layers: int | list[int] | None = None
    drop_layers: int | list[int] | None = None
    depth_ratio: float | None = None
    ffn_ratio: float = 1.0
    heads_ratio: float = 1.0
    hidden_ratio: float = 1.0
    attention_drop: int | list[int] | None = None
    attention_ratio: float | None = None
    fuse_ffn: bool = False
    field_prefix: str = "pruning"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | Any, field_prefix: str = "pruning") -> PruningPlan:
        """From the API's camelCase mapping ``{depth: {...}, width: {...}}`` or a pydantic model."""
        if hasattr(spec, "model_dump"):
            spec = spec.model_dump(by_alias=True, exclude_none=True)
        depth = dict(spec.get("depth") or {})
        width = dict(spec.get("width") or {})
        attention = dict(spec.get("attention") or {})

        def ratio(key: str) -> float:
            value = width.get(key)
            return 1.0 if value is None else value

        return cls(
            keep_layers=depth.get("keepLayers"),
            drop_layers=depth.get("dropLayers"),
            depth_ratio=depth.get("ratio"),
            ffn_ratio=ratio("ffnRatio"),
            heads_ratio=ratio("headsRatio"),
            hidden_ratio=ratio("hiddenRatio"),
            attention_drop=attention.get("dropLayers"),
            attention_ratio=attention.get("ratio"),
            fuse_ffn=bool(attention.get("fuseFfn", False)),
            field_prefix=field_prefix,
        )

    @property
    def prunes_width(self) -> bool:
        return (self.ffn_ratio, self.heads_ratio, self.hidden_ratio) != (1.0, 1.0, 1.0)

    @property
    def prunes_depth(self) -> bool:
        return any(v is not None for v in (self.keep_layers, self.drop_layers, self.depth_ratio))

    @property
    def removes_attention(self) -> bool:
        return self.attention_drop is not None or self.attention_ratio is not None


def prune(
    model: nn.Module,
    plan: PruningPlan | Mapping[str, Any],
    batches: Iterable[Batch],
) -> tuple[nn.Module, dict[str, Any]]:
    """Depth then width pruning of ``model`` by ``plan``; returns the new model and a report.

    The plan's attention part is applied after this by
    :func:`anneal.compress.ffn_fusion.prune_with_attention`.

    Importance is measured on ``batches`` (materialised into a list, since width importance is
    measured again on the depth-pruned model). Calibration is skipped when the plan needs no
    scores (explicit layer lists, ratios of 1.0).

    Args:
        model: a Llama-family causal LM (not modified).
        plan: a :class:`PruningPlan` or the API mapping ``{depth: {...}, width: {...}}``.
        batches: calibration batches ``{input_ids [B, T], attention_mask [B, T]}``.

    Returns:
        ``(pruned_model, report)``; the report holds ``paramsBefore``, ``paramsAfter``,
        ``paramRatio``, ``layersBefore``, ``keptLayers``, ``layerImportance`` (or None),
        ``config`` (the new sizes) and ``width`` (the ratios applied).
    """
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan.from_spec(plan)
    batches = list(batches)
    prefix = plan.field_prefix
    num_layers = model.config.num_hidden_layers
    if (plan.prunes_depth or plan.prunes_width) and (
        getattr(model.config, "no_attention_layers", None) or getattr(model.config, "intermediate_sizes", None)
    ):
        raise PruningError(
            f"{prefix}.depth" if plan.prunes_depth else f"{prefix}.width",
            "set",
            "the model already has blocks without attention or of different FFN widths (model_type "
            "anneal_llama); depth and width pruning take a uniform Llama: prune depth and width in the "
            "same job as the attention removal, or before it",
        )
    depth = resolve_depth(
        num_layers, plan.keep_layers, plan.drop_layers, plan.depth_ratio, f"{prefix}.depth"
    )
    # validate width ratios before spending time on calibration
    for name, value in (
        ("ffnRatio", plan.ffn_ratio),
        ("headsRatio", plan.heads_ratio),
        ("hiddenRatio", plan.hidden_ratio),
    ):
        _ratio_count(1_000_000, value, f"{prefix}.width.{name}")

    scores: list[float] | None = None
    if isinstance(depth, int):
        if depth < num_layers:
            scores = layer_importance(model, batches)
            kept = select_layers(scores, depth)
        else:
            kept = list(range(num_layers))
    else:
        kept = depth
    pruned = prune_depth(model, kept) if len(kept) < num_layers else model

    if plan.prunes_width:
        importance = width_importance(pruned, batches)
        pruned = prune_width(
            pruned,
            importance,
            plan.ffn_ratio,
            plan.heads_ratio,
            plan.hidden_ratio,
            field_prefix=f"{prefix}.width",
        )
    if pruned is model:
        pruned = copy.deepcopy(model)

    before, after = count_parameters(model), count_parameters(pruned)
    cfg = pruned.config
    report = {
        "paramsBefore": before,
        "paramsAfter": after,
        "paramRatio": after / before,
        "layersBefore": num_layers,
        "keptLayers": kept,
        "layerImportance": scores,
        "config": {
            "numHiddenLayers": cfg.num_hidden_layers,
            "hiddenSize": cfg.hidden_size,
            "intermediateSize": cfg.intermediate_size,
            "numAttentionHeads": cfg.num_attention_heads,
            "numKeyValueHeads": cfg.num_key_value_heads,
            "headDim": _head_dim(cfg),
        },
        "width": {
            "ffnRatio": plan.ffn_ratio,
            "headsRatio": plan.heads_ratio,
            "hiddenRatio": plan.hidden_ratio,
        },
    }
    return pruned, report


__all__ = [
    "PruningError",
    "PruningPlan",
    "WidthImportance",
    "count_parameters",
    "layer_importance",
    "prune",
    "prune_depth",
    "prune_width",
    "resolve_depth",
    "select_layers",
    "width_importance",
]
