"""A Llama whose decoder blocks may lack attention and differ in FFN width (attention removal, FFN fusion).

``model_type: anneal_llama`` is ``LlamaConfig`` plus two per-layer fields:

* ``no_attention_layers``: indices of blocks without an attention sub-layer. Such a block is
  ``x + FFN(post_attention_layernorm(x))``: no ``input_layernorm``, no ``self_attn`` weights,
  no KV cache entry.
* ``intermediate_sizes``: the FFN width of every block (``None``: ``intermediate_size`` for all).
  A block made by FFN fusion is wider than the others.

Everything else is Llama's own code (attention, MLP, RMSNorm, rotary embeddings, the causal LM
head), so a checkpoint with no block changed computes exactly what ``LlamaForCausalLM`` does.
The classes are registered with ``AutoConfig`` / ``AutoModelForCausalLM`` by :func:`register`
(no ``trust_remote_code``, nothing executed from the checkpoint): every Anneal code path that
loads a model calls it first, and so must any other program (``import anneal.modeling.layerwise_llama``
then ``register()``). vLLM's ``LlamaForCausalLM`` needs attention in every layer and cannot load
it (docs/resources.md, "Attention removal and FFN fusion").
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama import modeling_llama as L

MODEL_TYPE = "anneal_llama"


@strict
class AnnealLlamaConfig(LlamaConfig):
    """``LlamaConfig`` with per-layer attention presence and per-layer FFN widths."""

    model_type = MODEL_TYPE

    no_attention_layers: list[int] | None = None
    intermediate_sizes: list[int] | None = None

    def attention_layers(self) -> list[int]:
        """Indices of the blocks that keep attention, in order."""
        gone = set(self.no_attention_layers or [])
        return [i for i in range(self.num_hidden_layers) if i not in gone]

    def intermediate_size_of(self, layer: int) -> int:
        """The FFN width of block ``layer``."""
        sizes = self.intermediate_sizes
        return int(sizes[layer]) if sizes else int(self.intermediate_size)

    def validate_architecture(self):
        super().validate_architecture()
        n = self.num_hidden_layers
        gone = list(self.no_attention_layers or [])
        if any(not 0 <= i < n for i in gone) or len(set(gone)) != len(gone):
            raise ValueError(f"no_attention_layers {gone} must be distinct indices in 0..{n - 1}")
        if len(gone) >= n:
            raise ValueError("no_attention_layers removes every attention: at least one block must keep it "
                             "(the KV cache and positions are read from the first attention block)")
        sizes = self.intermediate_sizes
        if sizes is not None and (len(sizes) != n or any(int(s) < 1 for s in sizes)):
            raise ValueError(f"intermediate_sizes {sizes} must give a width >= 1 for each of the {n} layers")


class AnnealLlamaMLP(L.LlamaMLP):
    """Llama's SwiGLU FFN with a width of its own."""

    def __init__(self, config: AnnealLlamaConfig, intermediate_size: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = L.ACT2FN[config.hidden_act]


class AnnealLlamaDecoderLayer(L.LlamaDecoderLayer):
    """A Llama block; without attention it is ``x + mlp(post_attention_layernorm(x))``.

    ``cache_index`` numbers the attention blocks consecutively (the KV cache has one entry per
    attention block, and reads the sequence length from entry 0).
    """

    def __init__(self, config: AnnealLlamaConfig, layer_idx: int, cache_index: int | None) -> None:
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.has_attention = cache_index is not None
        if self.has_attention:
            self.self_attn = L.LlamaAttention(config=config, layer_idx=cache_index)
            self.input_layernorm = L.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = AnnealLlamaMLP(config, config.intermediate_size_of(layer_idx))
        self.post_attention_layernorm = L.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Any = None,
                use_cache: bool | None = False, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: Any) -> torch.Tensor:
        if self.has_attention:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class AnnealLlamaPreTrainedModel(L.LlamaPreTrainedModel):
    config_class = AnnealLlamaConfig
    config: AnnealLlamaConfig
    _no_split_modules = ["AnnealLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": AnnealLlamaDecoderLayer, "attentions": L.LlamaAttention}


class AnnealLlamaModel(AnnealLlamaPreTrainedModel, L.LlamaModel):
    """``LlamaModel`` with :class:`AnnealLlamaDecoderLayer` blocks (forward is Llama's)."""

    def __init__(self, config: AnnealLlamaConfig) -> None:
        AnnealLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        cache = {layer: k for k, layer in enumerate(config.attention_layers())}
        self.layers = nn.ModuleList(
            [AnnealLlamaDecoderLayer(config, i, cache.get(i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = L.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = L.LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class AnnealLlamaForCausalLM(AnnealLlamaPreTrainedModel, L.LlamaForCausalLM):
    """``LlamaForCausalLM`` over :class:`AnnealLlamaModel`."""

    def __init__(self, config: AnnealLlamaConfig) -> None:
        AnnealLlamaPreTrainedModel.__init__(self, config)
        self.model = AnnealLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


_registered = False


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type: anneal_llama`` (idempotent)."""
    global _registered
    if _registered:
        return
    AutoConfig.register(MODEL_TYPE, AnnealLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(AnnealLlamaConfig, AnnealLlamaForCausalLM, exist_ok=True)
    _registered = True


def from_llama_config(config: LlamaConfig, no_attention_layers: list[int],
                      intermediate_sizes: list[int] | None = None,
                      num_hidden_layers: int | None = None) -> AnnealLlamaConfig:
    """An :class:`AnnealLlamaConfig` with ``config``'s values and the per-layer fields given.

    ``intermediate_sizes`` that all equal ``config.intermediate_size`` are stored as None.
    """
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "no_attention_layers", "intermediate_sizes"):
        values.pop(key, None)
    if num_hidden_layers is not None:
        values["num_hidden_layers"] = num_hidden_layers
    if intermediate_sizes is not None and all(int(s) == int(config.intermediate_size) for s in intermediate_sizes):
        intermediate_sizes = None
    out = AnnealLlamaConfig(**values, no_attention_layers=sorted(int(i) for i in no_attention_layers),
                            intermediate_sizes=None if intermediate_sizes is None else [int(s) for s in intermediate_sizes])
    out.architectures = ["AnnealLlamaForCausalLM"]
    return out


__all__ = [
    "MODEL_TYPE",
    "AnnealLlamaConfig",
    "AnnealLlamaDecoderLayer",
    "AnnealLlamaForCausalLM",
    "AnnealLlamaModel",
    "from_llama_config",
    "register",
]
