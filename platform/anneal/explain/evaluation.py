"""Attention maps of evaluated answers (``evaluation.attentionMaps: N``), logged to the job's MLflow run.

The first N questions with a checkable answer of the evaluation data set, asked in the first
reasoning mode of the plan, are answered greedily in the model's chat template (as evaluation
asks them) and mapped (`anneal.explain.attention`). Each is written as ``q<i>-<mode>.{png,html,json}``
and all of them go to the run under ``explain/``, with ``explain/summary.json`` and the metric
``explain/numberAttention`` (the mean over the questions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ARTIFACT_DIR = "explain"
METRIC = "numberAttention"


def explain_evaluation(model_dir: str | Path, plan: Any, n: int, out_dir: Path, *, cache_dir: Path | None = None,
                       device: str = "cpu", model_name: str = "") -> dict[str, Any]:
    """Map the attention of `n` evaluated answers of the checkpoint in `model_dir`.

    Args:
        model_dir: a checkpoint directory.
        plan: the evaluation's `anneal.compress.evaluation.EvalPlan` (data set, modes, generation cap).
        n: how many questions (>= 1).
        out_dir: where the files go.
        cache_dir: cache for remote data sets.
        device: where the model runs.
        model_name: for the maps' titles.

    Returns:
        ``{"numberAttention": mean or None, "maps": [each map's figures and file names]}``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.data.datasets import load_samples
    from anneal.data.reasoning import check_answer
    from anneal.explain.attention import explain_prompt
    from anneal.explain.render import write_map
    from anneal.modeling.chat import model_declares_reasoning_toggle, resolve_reasoning_toggle, sample_prompt
    from anneal.modeling.layerwise_llama import register

    torch.manual_seed(0)
    register()  # anneal_llama: blocks without attention are skipped, and said so
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").to(device).eval()
    mode = plan.modes[0] if plan.modes else "off"
    # the prompts evaluation scored: the toggle's system message only for a model trained with it
    toggle = resolve_reasoning_toggle(getattr(plan, "toggle", None), model_declares_reasoning_toggle(model, tokenizer))
    samples = load_samples(plan.dataset_uri, split=plan.split, format=plan.format, samples=plan.samples,
                           reasoning=mode, cache_dir=cache_dir, toggle=toggle)
    asked = [s for s in samples if s.answer is not None][:n] or list(samples[:n])
    maps: list[dict[str, Any]] = []
    for i, s in enumerate(asked):
        question = next((m["content"] for m in reversed(s.messages) if m.get("role") == "user"), s.prompt)
        m = explain_prompt(model, tokenizer, sample_prompt(tokenizer, s), max_new_tokens=plan.max_new_tokens,
                           question=question, model_name=model_name)
        if s.answer is not None:
            m.correct = check_answer(m.answer, s.answer)
        stem = f"q{i}-{mode}"
        files = write_map(m, out_dir, stem)
        maps.append({**m.summary(), "files": [p.name for p in files]})
    values = [x["numberAttention"] for x in maps if x["numberAttention"] is not None]
    summary = {METRIC: sum(values) / len(values) if values else None, "mode": mode, "maps": maps}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def log_attention_maps(tracking_uri: str, run_id: str, model_dir: str | Path, plan: Any, n: int, out_dir: Path, *,
                       cache_dir: Path | None = None, device: str = "cpu", model_name: str = "") -> dict[str, float]:
    """`explain_evaluation`, then the files to the run under ``explain/`` and the mean as ``explain/numberAttention``.

    Returns:
        ``{"numberAttention": mean}`` for the job's status (empty when no answer could be mapped).
    """
    from mlflow import MlflowClient

    summary = explain_evaluation(model_dir, plan, n, out_dir, cache_dir=cache_dir, device=device,
                                 model_name=model_name)
    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(out_dir), artifact_path=ARTIFACT_DIR)
    value = summary[METRIC]
    if value is None:
        log.warning("attention maps: no answer token to map in %d question(s); no numberAttention", n)
        return {}
    client.log_metric(run_id, f"{ARTIFACT_DIR}/{METRIC}", float(value))
    return {METRIC: float(value)}


__all__ = ["ARTIFACT_DIR", "METRIC", "explain_evaluation", "log_attention_maps"]
