"""The chat format every Anneal model speaks, as a Python function and a Jinja template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from anneal.data.reasoning import REASONING_OFF_PROMPT, REASONING_ON_PROMPT

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
ROLE_TOKENS = {"system": SYSTEM_TOKEN, "user": USER_TOKEN, "assistant": ASSISTANT_TOKEN}

#: Jinja chat template set on our tokenizers; renders exactly what `format_chat` does.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def format_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render chat messages as one prompt string.

    Each message becomes `<|role|>content<|end|>`; the generation prompt is `<|assistant|>`.

    Args:
        messages: `{"role": "system"|"user"|"assistant", "content": str}` mappings.
        add_generation_prompt: end with `<|assistant|>` so a model answers next.

    Returns:
        The formatted text, identical to `tokenizer.apply_chat_template(..., tokenize=False)`
        with `CHAT_TEMPLATE`.
    """
    parts = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLE_TOKENS:
            raise ValueError(
                f"messages[{i}].role is {role!r}; use one of {sorted(ROLE_TOKENS)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        parts.append(f"{ROLE_TOKENS[role]}{content}{END_TOKEN}")
    if add_generation_prompt:
        parts.append(ASSISTANT_TOKEN)
    return "".join(parts)


def reasoning_mode_of(messages: Sequence[Mapping[str, str]]) -> str | None:
    """Which reasoning mode a conversation asks for, read from its system message.

    Args:
        messages: chat messages.

    Returns:
        `"on"` or `"off"` when a system message is "detailed thinking on/off"
        (case and surrounding space ignored), else None.
    """
    for message in messages:
        if message.get("role") != "system":
            continue
        content = str(message.get("content", "")).strip().lower()
        if content == REASONING_ON_PROMPT:
            return "on"
        if content == REASONING_OFF_PROMPT:
            return "off"
    return None
