"""Anneal's built-in reasoning questions as an lm-eval data set (no hub download).

The lm-eval tasks beside this file (`anneal_reasoning*.yaml`) load their questions here, from the
same generator, split and sample count Anneal's own evaluation uses, so lm-eval's exact-match
score through a served endpoint is comparable with a job's `accuracy`. Options come from lm-eval's
`--metadata` (a JSON object):

- `uri` (default `builtin://reasoning?difficulty=2&seed=7`), `split` (default `eval`),
  `samples` (default 64), `reasoning` (`on` | `off`, default `on`);
- `tokenizer` (the prompt task only): the served model's directory; each prompt is rendered in its
  chat template with the reasoning toggle's system message, as Anneal's evaluation renders it.
  The chat task sends the question alone: the service adds the toggle (`routing.reasoning`) and
  its chat template.
"""

from __future__ import annotations

from typing import Any


def _samples(uri: str, split: str, samples: int, reasoning: str) -> list[Any]:
    from anneal.data.datasets import load_samples

    rows = load_samples(uri, split=split, format="chat", samples=samples, reasoning=reasoning, toggle=True)
    return [s for s in rows if s.answer is not None]


def _user_question(sample: Any) -> str:
    return next(m["content"] for m in sample.messages if m["role"] == "user")


def load_chat(uri: str = "builtin://reasoning?difficulty=2&seed=7", split: str = "eval", samples: int = 64,
              reasoning: str = "on", **_: Any) -> Any:
    """`{"test": Dataset}` of `question` (the user message) and `answer` (the integer, as text)."""
    import datasets

    rows = _samples(uri, split, int(samples), reasoning)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"question": _user_question(s), "answer": str(s.answer)} for s in rows])})


def load_prompts(uri: str = "builtin://reasoning?difficulty=2&seed=7", split: str = "eval", samples: int = 64,
                 reasoning: str = "on", tokenizer: str | None = None, **_: Any) -> Any:
    """`{"test": Dataset}` of `prompt` (rendered for the model in `tokenizer`) and `answer`."""
    import datasets
    from transformers import AutoTokenizer

    from anneal.modeling.chat import sample_prompt

    if not tokenizer:
        raise ValueError("anneal_reasoning: --metadata must name the served model's directory as \"tokenizer\"")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    rows = _samples(uri, split, int(samples), reasoning)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"prompt": sample_prompt(tok, s), "answer": str(s.answer)} for s in rows])})
