"""Tiny randomly initialised Llama models, built locally for prototypes and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class LlamaShape:
    """The size of a Llama decoder."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot make a Llama model."""
        for name in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaShape.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.heads:
            raise ValueError(
                f"LlamaShape.hidden_size={self.hidden_size} must be divisible by heads={self.heads}"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"LlamaShape.heads={self.heads} must be divisible by kv_heads={self.kv_heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.heads


def llama_config(shape: LlamaShape, tokenizer: Any) -> LlamaConfig:
    """The `LlamaConfig` for a shape, with vocabulary and special ids from the tokenizer.

    Args:
        shape: model size.
        tokenizer: the tokenizer the model will use.

    Returns:
        The config (untied embeddings, no biases).
    """
    return LlamaConfig(**config_kwargs(shape, tokenizer))


def config_kwargs(shape: LlamaShape, tokenizer: Any) -> dict[str, Any]:
    """The decoder-config fields a shape and a tokenizer give (shared by Llama, Qwen2 and Mistral configs).

    Raises:
        ValueError: the shape cannot make a model (`LlamaShape.validate`).
    """
    shape.validate()
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llama(shape: LlamaShape, tokenizer: Any, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama model; the same seed gives the same weights.

    Args:
        shape: model size.
        tokenizer: gives the vocabulary size and special token ids.
        seed: initialisation seed.

    Returns:
        The model in float32, on CPU.
    """
    config = llama_config(shape, tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once).

    Args:
        model: any torch module.

    Returns:
        The parameter count.
    """
    return sum(p.numel() for p in model.parameters())


def estimate_parameters(shape: LlamaShape, vocab_size: int) -> int:
    """Parameter count of a Llama model of this shape, computed without building it.

    Args:
        shape: model size.
        vocab_size: vocabulary size.

    Returns:
        Embeddings + per-layer attention, MLP and norms + final norm + untied lm_head.
    """
    shape.validate()
    h, kv_width = shape.hidden_size, shape.kv_heads * shape.head_dim
    attention = 2 * h * h + 2 * h * kv_width  # q and o; k and v
    mlp = 3 * h * shape.intermediate_size  # gate, up, down
    norms = 2 * h
    return 2 * vocab_size * h + shape.layers * (attention + mlp + norms) + h


def save_pretrained(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Save a model and its tokenizer as one Hugging Face checkpoint directory.

    Args:
        model: a `PreTrainedModel`.
        tokenizer: its tokenizer.
        path: target directory (created).

    Returns:
        The directory, holding `config.json`, weights and tokenizer files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def held_out_path(path: str | Path) -> Path:
    """Where `copy_task(path, ..., held_out=N)` writes its held-out items: `<stem>-held-out.jsonl` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}-held-out.jsonl")


def copy_task(path: str | Path, n: int, seed: int = 0, held_out: int = 0) -> Path:
    """A JSONL data set of `n` trivially learnable samples ("Repeat: 42" → "Answer: 42").

    A tiny model memorises it in a few hundred steps, which gives compression tests and
    benchmarks a source model whose accuracy (1.0) any loss shows up against. With `held_out`
    > 0, that many further numbers (none of the `n`) go to `held_out_path(path)` beside it
    (`n + held_out` <= 90).
    """
    import json
    import random

    path = Path(path)
    if n + held_out > 90:
        raise ValueError(f"copy_task: {n} + {held_out} items; there are only 90 two-digit numbers")
    rng = random.Random(seed)
    numbers = rng.sample(range(10, 100), n + held_out)

    def write(target: Path, chosen: list[int]) -> None:
        with target.open("w") as f:
            for x in chosen:
                f.write(json.dumps({"prompt": f"Repeat: {x}\n", "completion": f"Answer: {x}", "answer": x}) + "\n")

    write(path, numbers[:n])
    if held_out:
        write(held_out_path(path), numbers[n:])
    return path


def memorize_copy_task(root: str | Path, shape: LlamaShape, samples: int, max_steps: int,
                       seed: int = 1, held_out: int = 0) -> tuple[Path, Path]:
    """Train a tiny Llama (local tokenizer) until it has memorised a copy task.

    Full-batch AdamW until the loss is below 0.01 or `max_steps`; the model is saved under
    `root/source`, the data under `root/copy.jsonl`. With `held_out` > 0, that many further
    items (numbers the model never saw) go to `held_out_path(root/copy.jsonl)`, to measure copying
    rather than recall (`samples + held_out` <= 90).

    Returns:
        (model directory, training data file).
    """
    from anneal.data.datasets import collate, load_samples, tokenize_sample
    from anneal.modeling.tokenizer import builtin_tokenizer

    root = Path(root)
    data = copy_task(root / "copy.jsonl", samples, held_out=held_out)
    tokenizer = builtin_tokenizer(root / "cache" / "tokenizers")
    model = build_llama(shape, tokenizer, seed=seed)
    batch = collate([tokenize_sample(tokenizer, s, 64) for s in load_samples(str(data), format="prompt-completion")],
                    tokenizer.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(max_steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    return save_pretrained(model.eval(), tokenizer, root / "source"), data
