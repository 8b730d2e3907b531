"""A model's own tokenizer and chat template, the same in training, evaluation and serving.

A Hugging Face instruct model is trained, scored and served in the template it ships with
(`tokenizer.chat_template`); Anneal's `<|role|>…<|end|>` format (`anneal.data.formats`) is
used only for a tokenizer without one. Batches of a tokenizer without a pad token (Llama 3,
Mistral) are padded with its eos: padded positions are masked (attention 0, labels ignored),
so the choice never reaches a loss or an answer.

The reasoning toggle's system message ("detailed thinking on/off") goes only to a model trained
with it: what a model declares (`declares_reasoning_toggle`: config.json's
`anneal_reasoning_toggle`, else Anneal's own format yes, a template of its own no), unless a
`reasoningToggle` setting says otherwise; training data, evaluation and serving all ask here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
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


# ----------------------------------------------------------------------- reasoning toggle

#: The config.json key by which a model declares it was trained with the reasoning toggle's
#: system message ("detailed thinking on/off"). Anneal's training writes it on every model it
#: registers (`true` or `false`); `transformers` keeps it through load and save.
REASONING_TOGGLE_KEY = "anneal_reasoning_toggle"


def _template_of(tokenizer: Any) -> str | None:
    return getattr(tokenizer, "chat_template", None) or None


def speaks_anneal_format(chat_template: str | None) -> bool:
    """A tokenizer whose chat template is Anneal's own (or absent: Anneal's format is used then)."""
    from anneal.data.formats import CHAT_TEMPLATE

    return not chat_template or chat_template == CHAT_TEMPLATE


def declares_reasoning_toggle(config: Any, chat_template: str | None) -> bool:
    """Whether a model takes the reasoning toggle's system message, by what it declares.

    Args:
        config: its config (a `PretrainedConfig`, or config.json as a mapping; None: none).
        chat_template: its tokenizer's chat template (None: it has none).

    Returns:
        The config's `anneal_reasoning_toggle` when set; else True for a model in Anneal's own
        chat format (its tokenizer's template is Anneal's, or it has none: such models are made
        for the built-in task, whose samples carry the toggle), False for any model with a chat
        template of its own (a Hugging Face chat model that does not declare it never saw it).
    """
    value = config.get(REASONING_TOGGLE_KEY) if isinstance(config, Mapping) else getattr(config, REASONING_TOGGLE_KEY, None)
    if value is not None:
        return bool(value)
    return speaks_anneal_format(chat_template)


def model_declares_reasoning_toggle(model: Any, tokenizer: Any) -> bool:
    """`declares_reasoning_toggle` of a loaded model and its tokenizer."""
    return declares_reasoning_toggle(getattr(model, "config", None), _template_of(tokenizer))


def dir_declares_reasoning_toggle(model_dir: str | Path) -> bool:
    """`declares_reasoning_toggle` of a saved Hugging Face model directory (reads its files, loads nothing).

    The chat template is looked for where `transformers` saves it: `chat_template.jinja`,
    `chat_template.json`, or `tokenizer_config.json`'s `chat_template`.
    """
    import json

    d = Path(model_dir)
    config = json.loads(_declaring_file(d).read_text()) if _declaring_file(d).exists() else {}
    template = None
    if (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text()
    elif (d / "chat_template.json").exists():
        template = json.loads((d / "chat_template.json").read_text()).get("chat_template")
    elif (d / "tokenizer_config.json").exists():
        template = json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return declares_reasoning_toggle(config, template)


def _declaring_file(d: Path) -> Path:
    """Where a saved model declares the toggle: its config.json; an unmerged LoRA adapter (no
    config.json, lora-kd with merge: false) in its adapter_config.json (PEFT and vLLM ignore the key)."""
    if not (d / "config.json").exists() and (d / "adapter_config.json").exists():
        return d / "adapter_config.json"
    return d / "config.json"


def mark_reasoning_toggle(model_dir: str | Path, toggle: bool) -> None:
    """Write the declaration into a saved model's config.json (what Anneal's training trained it with)."""
    import json

    path = _declaring_file(Path(model_dir))
    config = json.loads(path.read_text())
    config[REASONING_TOGGLE_KEY] = bool(toggle)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_reasoning_toggle(setting: bool | None, declared: bool) -> bool:
    """The `reasoningToggle` setting when given, else what the model declares."""
    return declared if setting is None else bool(setting)


def is_reasoning_toggle(message: Mapping[str, Any], prompts: Sequence[str] | None = None) -> bool:
    """A system message that is exactly a toggle prompt (case and surrounding space ignored)."""
    from anneal.data.reasoning import REASONING_OFF_PROMPT, REASONING_ON_PROMPT

    if message.get("role") != "system" or not isinstance(message.get("content"), str):
        return False
    wanted = {p.strip().lower() for p in (prompts or (REASONING_ON_PROMPT, REASONING_OFF_PROMPT))}
    return str(message["content"]).strip().lower() in wanted


def without_reasoning_toggle(messages: Sequence[Mapping[str, Any]],
                             prompts: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The messages less any toggle system message (for a model not trained with the toggle)."""
    return [dict(m) for m in messages if not is_reasoning_toggle(m, prompts)]
