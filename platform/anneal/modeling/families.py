"""Small random-init models in the shapes of real chat-model families, with locally trained tokenizers.

No model can be downloaded here, so tests (and users trying Anneal without a hub) build
stand-ins that behave like the real checkpoints where it matters to the platform: the
architecture class in `config.json`, the special tokens, the chat template, and whether
there is a pad token at all.

- ``llama3``: `LlamaForCausalLM`, `<|begin_of_text|>` / `<|eot_id|>`, header-style template,
  **no pad token** (as Meta's Llama 3 tokenizers).
- ``qwen2``: `Qwen2ForCausalLM` (q/k/v biases), ChatML `<|im_start|>` / `<|im_end|>`, pad
  `<|endoftext|>`.
- ``mistral``: `MistralForCausalLM`, `<s>` / `</s>`, `[INST]` template with the system message
  folded into the first user turn, **no pad token**.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from anneal.modeling.tiny import LlamaShape

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN2_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    bos: str | None
    eos: str
    pad: str | None
    specials: tuple[str, ...]
    chat_template: str


FAMILIES = {
    "llama3": Family("llama3", "llama", "<|begin_of_text|>", "<|eot_id|>", None,
                     ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"), LLAMA3_TEMPLATE),
    "qwen2": Family("qwen2", "qwen2", None, "<|im_end|>", "<|endoftext|>",
                    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), QWEN2_TEMPLATE),
    "mistral": Family("mistral", "mistral", "<s>", "</s>", None, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
                      MISTRAL_TEMPLATE),
}


def family_of(name: str) -> Family:
    """The family called `name`.

    Raises:
        ValueError: naming the families there are.
    """
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r}: use one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_corpus(family: str, problems: int = 200) -> list[str]:
    """Built-in problems rendered as whole conversations in the family's chat template."""
    from anneal.data.reasoning import generate, render_completion, render_messages

    from jinja2 import Template

    f = family_of(family)

    template = Template(f.chat_template)
    texts = []
    for difficulty in (1, 2, 3):
        for problem in generate(problems, seed=4321, difficulty=difficulty):
            for on in (True, False):
                messages = render_messages(problem, on) + [
                    {"role": "assistant", "content": render_completion(problem, on)}]
                texts.append(template.render(messages=messages, add_generation_prompt=False, bos_token=f.bos or "",
                                             eos_token=f.eos))
    return texts


def train_family_tokenizer(family: str, texts: Iterable[str] | None = None, vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer with the family's special tokens and chat template (trained here).

    Args:
        family: one of `FAMILIES`.
        texts: training corpus (default: `family_corpus`).
        vocab_size: total vocabulary size.
    """
    from transformers import PreTrainedTokenizerFast

    from anneal.modeling.tokenizer import train_bpe

    f = family_of(family)
    tok = train_bpe(list(texts) if texts is not None else family_corpus(family), vocab_size, list(f.specials))
    kwargs: dict[str, Any] = {"eos_token": f.eos}
    if f.bos:
        kwargs["bos_token"] = f.bos
    if f.pad:
        kwargs["pad_token"] = f.pad
    if family == "mistral":
        kwargs["unk_token"] = "<unk>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, model_max_length=4096,
                                   **kwargs)
    fast.chat_template = f.chat_template
    return fast


def build_family_model(family: str, shape: LlamaShape, tokenizer: Any, seed: int = 0) -> Any:
    """A random-init causal LM of the family's architecture class, sized by `shape`, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    from anneal.modeling.tiny import config_kwargs

    f = family_of(family)
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[f.architecture]
    config = config_class(**config_kwargs(shape, tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_family_model(family: str, out_dir: str | Path, shape: LlamaShape | None = None, seed: int = 0) -> Path:
    """Train the family's tokenizer, build a model of its shape and save both (a Hugging Face model directory)."""
    from anneal.modeling.tiny import save_pretrained

    tokenizer = train_family_tokenizer(family)
    model = build_family_model(family, shape or LlamaShape(hidden_size=64, layers=2, heads=4, kv_heads=2,
                                                           intermediate_size=128), tokenizer, seed)
    return Path(save_pretrained(model, tokenizer, Path(out_dir)))
