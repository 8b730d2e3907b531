"""Pre-flight advice on a valid spec: things that will run but probably not as the user hopes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anneal.api.distillation import DistillationJobSpec

# Reasoning-threshold studies find long chains of thought break down below about this size.
REASONING_THRESHOLD_PARAMS = 1.6e9
# Below this a model is a toy (tests, the quickstart): the threshold advice is not meant for it.
TOY_MODEL_PARAMS = 50e6
DEFAULT_VOCAB = 32000


def llama_params(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> float:
    """Parameters of a Llama decoder (untied embeddings)."""
    head_dim = hidden // heads
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * intermediate
    return float(layers * (attn + mlp + 2 * hidden) + 2 * vocab * hidden + hidden)


def _params_of_dir(path: Path) -> float | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    c = json.loads(cfg.read_text())
    try:
        return llama_params(
            c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"], c.get("vocab_size", DEFAULT_VOCAB),
        )
    except KeyError:
        return None


def student_params(spec: DistillationJobSpec, base_dir: Path | None = None) -> float | None:
    """Estimated parameters of the student, when the spec says enough to know."""
    s = spec.student
    if s.config is not None:
        c = s.config
        return llama_params(c.hidden_size, c.layers, c.heads, c.kv_heads or c.heads,
                            c.intermediate_size or 4 * c.hidden_size, DEFAULT_VOCAB)
    if s.uri and "://" not in s.uri or (s.uri or "").startswith("file://"):
        path = Path(s.uri.removeprefix("file://"))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return _params_of_dir(path)
    return None


def distillation_advice(spec: DistillationJobSpec, base_dir: Path | None = None) -> list[str]:
    out: list[str] = []
    reasoning_on = spec.dataset.reasoning in ("on", "both")
    params = student_params(spec, base_dir)
    if reasoning_on and params is not None and TOY_MODEL_PARAMS <= params < REASONING_THRESHOLD_PARAMS:
        out.append(
            f"spec.dataset.reasoning: {spec.dataset.reasoning!r}: the student has about {params / 1e9:.2f}B parameters; "
            "long chain-of-thought reasoning tends to break down below ~1.6B (reasoning-threshold studies). "
            "Expect weak 'detailed thinking on' answers; consider reasoning: off or a larger student."
        )
    if spec.method == "sft" and spec.teacher is not None:
        out.append("spec.teacher: set, but method 'sft' trains on labels only and ignores it")
    if spec.method != "lora-kd" and "lora" in spec.model_fields_set:
        out.append(f"spec.lora: set, but only method 'lora-kd' uses it (method is {spec.method!r})")
    if spec.method != "kd-rl" and "rl" in spec.model_fields_set:
        out.append(f"spec.rl: set, but only method 'kd-rl' uses it (method is {spec.method!r})")
    if spec.method == "cpt" and spec.teacher is None and "kd" in spec.model_fields_set:
        out.append("spec.kd: set, but method 'cpt' without spec.teacher trains on next-token loss alone and ignores it")
    if spec.method == "cpt" and spec.dataset.reasoning != "both" and not spec.dataset.uri.startswith("builtin://"):
        out.append(f"spec.dataset.reasoning: {spec.dataset.reasoning!r}: method 'cpt' reads raw text; only the built-in "
                   "task is filtered by reasoning mode")
    if spec.training.precision == "fp16" and spec.resources.gpus_per_worker == 0:
        out.append("spec.training.precision: 'fp16' on CPU workers runs in fp32 (fp16 autocast needs a GPU)")
    return out


def _distilled_later(later: list[Any], name: str) -> bool:
    """Whether a later pipeline stage trains the output of stage `name` (its student is `fromStage: name`)."""
    return any(s.kind == "DistillationJob" and s.spec.student.from_stage == name for s in later)


def advice(kind: str, spec: Any, base_dir: Path | None = None) -> list[str]:
    """Warnings for a parsed spec of `kind`."""
    if kind == "DistillationJob":
        return distillation_advice(spec, base_dir)
    if kind == "ModelPipeline":
        out = []
        for i, stage in enumerate(spec.stages):
            recovered_later = _distilled_later(spec.stages[i + 1:], stage.name)
            for w in advice(stage.kind, stage.spec, base_dir):
                if recovered_later and w.startswith("spec.pruning.recovery:"):
                    continue  # a later stage trains this output (cpt / kd recovery as its own stage)
                out.append(w.replace("spec.", f"spec.stages[{i}].{stage.field}.", 1))
        return out
    if kind == "CompressionJob":
        try:
            from anneal.compress.preflight import static_advice
        except ImportError:
            return []
        return static_advice(spec)
    return []
