"""Model evaluation on the reasoning task: exact-answer accuracy per reasoning mode and perplexity."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate a model on."""

    dataset_uri: str = "builtin://reasoning"
    split: str = "eval"
    format: str = "chat"
    samples: int = 64
    modes: tuple[str, ...] = ("on", "off")
    max_new_tokens: int = 96
    max_seq_length: int = 256
    batch_size: int = 32
    perplexity: bool = True
    #: The reasoning toggle's system message in the prompts (`reasoningToggle`); None: as the model declares
    #: (`anneal.modeling.chat.declares_reasoning_toggle`).
    toggle: bool | None = None


@dataclass
class Scored:
    """One scored generation, for reports."""

    mode: str
    prompt: str
    output: str
    answer: int | None
    correct: bool


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches), without the prompt text.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer (one without a pad token pads with its eos).
        prompts: prompts rendered for this tokenizer (`anneal.modeling.chat.sample_prompt`).
        max_new_tokens: generation cap per prompt.
        batch_size: prompts per generate() call.

    Returns:
        One decoded completion per prompt (special tokens removed).
    """
    import torch

    from anneal.modeling.chat import pad_id, padding

    device = next(model.parameters()).device
    out: list[str] = []
    with padding(tokenizer, "left"):
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id(tokenizer),
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def perplexity(model: Any, tokenizer: Any, samples: Sequence[Any], max_seq_length: int, batch_size: int = 16) -> float:
    """exp(mean cross-entropy) over completion tokens of `samples` (anneal.data Samples)."""
    import torch
    import torch.nn.functional as F

    from anneal.data.datasets import collate, tokenize_sample
    from anneal.modeling.chat import pad_id

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = collate(
            [tokenize_sample(tokenizer, s, max_seq_length) for s in samples[i : i + batch_size]],
            pad_id(tokenizer),
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((labels != -100).sum())
    return math.exp(total / max(count, 1))


def evaluate(model: Any, tokenizer: Any, plan: EvalPlan, *, cache_dir: Path | None = None) -> tuple[dict[str, float], list[Scored]]:
    """Accuracy per reasoning mode (``accuracyOn``, ``accuracyOff``), their mean ``accuracy``, and ``perplexity``.

    The reasoning toggle's system message is in the prompts only for a model trained with it
    (`plan.toggle`, else what the model declares). Without it the modes' prompts are the same
    question: accuracy is scored once, as ``accuracy`` (on the first mode's samples), and the
    modes only choose the reference answers perplexity is measured on.

    Args:
        model: a causal LM (eval mode).
        tokenizer: its tokenizer.
        plan: data set, sample count, modes and generation cap.
        cache_dir: cache for remote data sets.

    Returns:
        The metrics and the scored generations.
    """
    from anneal.data.datasets import load_samples
    from anneal.data.reasoning import check_answer
    from anneal.modeling.chat import model_declares_reasoning_toggle, resolve_reasoning_toggle, sample_prompt

    toggle = resolve_reasoning_toggle(plan.toggle, model_declares_reasoning_toggle(model, tokenizer))
    metrics: dict[str, float] = {}
    scored: list[Scored] = []
    accs = []
    ppl_samples = []
    for i, mode in enumerate(plan.modes):
        samples = load_samples(
            plan.dataset_uri, split=plan.split, format=plan.format, samples=plan.samples, reasoning=mode,
            cache_dir=cache_dir, toggle=toggle,
        )
        ppl_samples.extend(samples)
        with_answer = [s for s in samples if s.answer is not None]
        if with_answer and (toggle or i == 0):
            prompts = [sample_prompt(tokenizer, s) for s in with_answer]  # in the model's own chat template
            outputs = generate(model, tokenizer, prompts, plan.max_new_tokens, plan.batch_size)
            ok = [check_answer(o, s.answer) for o, s in zip(outputs, with_answer)]
            acc = sum(ok) / len(ok)
            if toggle:
                metrics[f"accuracy{mode.capitalize()}"] = acc
            accs.append(acc)
            scored.extend(Scored(mode if toggle else "none", p, o, s.answer, c)
                          for p, s, o, c in zip(prompts, with_answer, outputs, ok))
    if accs:
        metrics["accuracy"] = sum(accs) / len(accs)
    if plan.perplexity and ppl_samples:
        metrics["perplexity"] = perplexity(model, tokenizer, ppl_samples, plan.max_seq_length)
    return metrics, scored


def evaluate_dir(model_dir: str | Path, plan: EvalPlan, *, cache_dir: Path | None = None, device: str = "cpu") -> dict[str, float]:
    """Load a checkpoint directory and evaluate it (see `evaluate`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.modeling.layerwise_llama import register as register_anneal_llama

    torch.manual_seed(0)
    register_anneal_llama()  # model_type anneal_llama (attention removal, FFN fusion)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device).eval()
    metrics, _ = evaluate(model, tokenizer, plan, cache_dir=cache_dir)
    return metrics


def cached_evaluate_dir(model_dir: str | Path, plan: EvalPlan, key: str, cache_dir: Path, device: str = "cpu") -> dict[str, float]:
    """`evaluate_dir`, cached on disk by (model key, plan): a teacher is scored once per version."""
    digest = hashlib.sha256(json.dumps([key, plan.__dict__], sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir / "eval" / f"{digest}.json"
    if path.exists():
        return json.loads(path.read_text())
    metrics = evaluate_dir(model_dir, plan, cache_dir=cache_dir, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return metrics


def model_key(model_dir: str | Path) -> str:
    """A content key of a checkpoint directory (file names, sizes and mtimes)."""
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(model_dir)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()
