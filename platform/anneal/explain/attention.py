"""The attention of an answer's tokens over its prompt, per layer and averaged over heads.

For answer token ``i`` the row shown is the attention of the query that *chose* it: the position
just before it (the last prompt token for the first answer token). Its weights over the prompt
positions sum to at most 1; the rest went to the answer tokens already written. Heads are
averaged; every block with attention gives one layer of rows. Blocks without attention
(``anneal_llama`` after attention removal) have none to show: they are listed as skipped.

``numberAttention`` asks "does the model look at the numbers?": of the attention mass the answer
puts on the prompt, the share that lands on prompt tokens with a digit in them (all layers,
all answer tokens). ``numberTokenShare`` is the share of prompt tokens that are numeric, the
figure uniform attention would give, to compare it with.

The attention comes from one forward pass over prompt + answer with eager attention (the
fused kernels do not return weights), switched on only for that pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np


@dataclass
class AttentionMap:
    """One answer explained.

    Attributes:
        prompt_tokens: the prompt's tokens as text (each decoded on its own).
        answer_tokens: the answer's tokens as text.
        weights: ``[layers, answer tokens, prompt tokens]``, head-averaged attention of the
            query that chose each answer token over the prompt (rows sum to <= 1).
        layers: the block index of each row of `weights`.
        skipped_layers: blocks without attention (nothing to show).
        numeric: per prompt token, whether it has a digit.
        answer: the decoded answer.
        question: what was asked (for titles), the prompt's text when not given.
        model: where the model came from (for titles).
        correct: whether the answer was right (evaluation only).
    """

    prompt_tokens: list[str]
    answer_tokens: list[str]
    weights: np.ndarray
    layers: list[int]
    skipped_layers: list[int]
    numeric: list[bool]
    answer: str
    question: str = ""
    model: str = ""
    correct: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def number_attention(self) -> float | None:
        return number_attention(self.weights, self.numeric)

    @property
    def number_token_share(self) -> float:
        return sum(self.numeric) / max(len(self.numeric), 1)

    def layer_number_attention(self) -> list[float | None]:
        """`numberAttention` of each layer of `layers`."""
        return [number_attention(self.weights[k : k + 1], self.numeric) for k in range(len(self.layers))]

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-ready."""
        return {"question": self.question, "answer": self.answer, "model": self.model, "correct": self.correct,
                "numberAttention": self.number_attention, "numberTokenShare": self.number_token_share,
                "layers": self.layers, "skippedLayers": self.skipped_layers,
                "promptTokens": len(self.prompt_tokens), "answerTokens": len(self.answer_tokens)}


def is_numeric(token_text: str) -> bool:
    """A prompt token counts as a number when its text has a digit in it."""
    return any(c.isdigit() for c in token_text)


def aggregate(attentions: Sequence[Any], prompt_len: int, answer_len: int) -> np.ndarray:
    """Head-averaged attention of each answer token's query over the prompt.

    Args:
        attentions: one tensor per attention layer, ``[1, heads, T, T]`` with
            ``T >= prompt_len + answer_len - 1`` (softmax rows of a causal model).
        prompt_len: P, the number of prompt tokens (>= 1).
        answer_len: A, the number of answer tokens.

    Returns:
        ``[layers, A, P]``: row ``i`` is query position ``P - 1 + i`` (the one that chose answer
        token ``i``), columns the prompt positions; each row sums to <= 1.
    """
    if prompt_len < 1:
        raise ValueError("the prompt has no tokens; there is nothing to attend to")
    rows = []
    for a in attentions:
        t = a.detach().float()
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[-1] < prompt_len + answer_len - 1:
            raise ValueError(f"attention of shape {tuple(t.shape)} does not cover a prompt of {prompt_len} and an "
                             f"answer of {answer_len} tokens (expected [1, heads, T, T], T >= {prompt_len + answer_len - 1})")
        mean = t[0].mean(dim=0)  # [T, T]
        rows.append(mean[prompt_len - 1 : prompt_len - 1 + answer_len, :prompt_len].cpu().numpy())
    if not rows:
        return np.zeros((0, answer_len, prompt_len), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


def number_attention(weights: np.ndarray, numeric: Sequence[bool]) -> float | None:
    """Of the attention mass on the prompt, the share on numeric tokens (None: no mass, no layers or no answer).

    Args:
        weights: ``[layers, answer tokens, prompt tokens]`` (`aggregate`).
        numeric: per prompt token, whether it is a number.
    """
    if weights.size == 0:
        return None
    mask = np.asarray(numeric, dtype=bool)
    if mask.shape[0] != weights.shape[-1]:
        raise ValueError(f"{mask.shape[0]} numeric flags for {weights.shape[-1]} prompt tokens")
    total = float(weights.sum())
    if total <= 0:
        return None
    return float(weights[..., mask].sum()) / total


def attention_layers(model: Any) -> tuple[list[int], list[int]]:
    """(blocks with attention, blocks without) of a causal LM, in the order its attentions come out."""
    config = getattr(model, "config", None)
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    gone = sorted(int(i) for i in (getattr(config, "no_attention_layers", None) or []))
    return [i for i in range(n) if i not in set(gone)], gone


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """The model switched to eager attention (the only kind that returns its weights), restored after."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (readable, unlike byte-level token strings)."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def attention_map_of(model: Any, tokenizer: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                     question: str = "", model_name: str = "") -> AttentionMap:
    """The attention map of an answer already generated (one forward pass, eager attention).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        prompt_ids: the prompt's token ids.
        answer_ids: the answer's token ids (an eos at the end is shown like any token).
        question: what was asked, for the title.
        model_name: where the model came from, for the title.
    """
    import torch

    prompt_ids, answer_ids = [int(i) for i in prompt_ids], [int(i) for i in answer_ids]
    layers, skipped = attention_layers(model)
    device = next(model.parameters()).device
    prompt_text = token_texts(tokenizer, prompt_ids)
    answer_text = token_texts(tokenizer, answer_ids)
    if answer_ids:
        # The last answer token is no query of any answer token: the pass stops before it.
        ids = torch.tensor([prompt_ids + answer_ids[:-1]], device=device)
        with eager_attention(model), torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
        attentions = [a for a in (out.attentions or ()) if a is not None]
        if len(attentions) != len(layers):
            if not attentions:
                raise RuntimeError(f"{type(model).__name__} returned no attention weights; it needs eager attention "
                                   "(attn_implementation='eager')")
            layers = list(range(len(attentions)))  # a model of another layout: number what it returned
        weights = aggregate(attentions, len(prompt_ids), len(answer_ids))
    else:
        weights = np.zeros((len(layers), 0, len(prompt_ids)), dtype=np.float32)
    return AttentionMap(
        prompt_tokens=prompt_text, answer_tokens=answer_text, weights=weights, layers=layers, skipped_layers=skipped,
        numeric=[is_numeric(t) for t in prompt_text],
        answer=tokenizer.decode(answer_ids, skip_special_tokens=True),
        question=question or tokenizer.decode(prompt_ids, skip_special_tokens=True), model=model_name,
    )


def greedy_answer(model: Any, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The greedy answer's token ids (ending with eos if the model stopped), as evaluation decodes."""
    import torch

    from anneal.modeling.chat import pad_id

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return [int(i) for i in gen[0, ids.shape[1]:]]


def explain_prompt(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int, question: str = "",
                   model_name: str = "") -> AttentionMap:
    """Answer `prompt` greedily and map the answer's attention over it.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        prompt: the prompt text as the model answers after it (`anneal.modeling.chat.render_prompt`).
        max_new_tokens: the answer's cap.
        question: what was asked, for the title.
        model_name: where the model came from, for the title.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ValueError("the prompt is empty: ask a question")
    answer_ids = greedy_answer(model, tokenizer, prompt_ids, max_new_tokens)
    return attention_map_of(model, tokenizer, prompt_ids, answer_ids, question=question, model_name=model_name)


def question_prompt(tokenizer: Any, question: str, reasoning: str | None) -> str:
    """A question as the model's prompt: the reasoning toggle as a system message (on/off), in its chat template."""
    from anneal.data.reasoning import system_prompt
    from anneal.modeling.chat import render_prompt

    messages = [] if reasoning is None else [{"role": "system", "content": system_prompt(reasoning == "on")}]
    messages.append({"role": "user", "content": question})
    return render_prompt(tokenizer, messages)


__all__ = ["AttentionMap", "aggregate", "attention_layers", "attention_map_of", "eager_attention", "explain_prompt",
           "greedy_answer", "is_numeric", "number_attention", "question_prompt", "token_texts"]
