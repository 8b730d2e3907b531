"""A model's own tokenizer and chat template, the same in training, evaluation and serving.

A Hugging Face instruct model is trained, scored and served in the template it ships with
(`tokenizer.chat_template`); Anneal's `<|role|>…<|end|>` format (`anneal.data.formats`) is
used only for a tokenizer without one. Batches of a tokenizer without a pad token (Llama 3,
Mistral) are padded with its eos: padded positions are masked (attention 0, labels ignored),
so the choice never reaches a loss or an answer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence


def pad_id(tokenizer: Any) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its eos, else its unk.

    The tokenizer itself is not changed (it is saved with the models trained with it).

    Raises:
        ValueError: the tokenizer has none of them.
    """
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, eos or unk token to pad "
                     "batches with; save it with a pad_token")


@contextlib.contextmanager
def padding(tokenizer: Any, side: str = "left") -> Iterator[Any]:
    """The tokenizer set up to pad a batch (`side`, and `pad_id`'s token if it has no pad token), restored after."""
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = side
    if saved_pad is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id(tokenizer))
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = saved_side
        if saved_pad is None:
            tokenizer.pad_token = None


def has_own_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """Chat messages as the prompt text the model answers after: its template, else Anneal's format."""
    if has_own_template(tokenizer):
        return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
    from anneal.data.formats import format_chat

    return format_chat(messages, add_generation_prompt=True)


def sample_prompt(tokenizer: Any, sample: Any) -> str:
    """A data set sample's prompt for this tokenizer: chat samples rendered in its template, others as they are."""
    if getattr(sample, "chat", False) and sample.messages:
        return render_prompt(tokenizer, sample.messages)
    return sample.prompt
