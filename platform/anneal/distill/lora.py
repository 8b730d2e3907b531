"""LoRA branches for `lora-kd` (LLM-NEO): add them to a student, merge them away, or keep an adapter.

The student is trained only through low-rank branches (peft) on the KD loss. With
`lora.merge: true` (the default) the branches are folded into the base weights after training,
so the registered model is a plain `transformers` checkpoint with no adapter and no inference
cost. With `merge: false` the registered model is the adapter alone; its
`adapter_config.json` names the base it applies to (`base_model_name_or_path`, rewritten by
`point_adapter_at` to a durable URI) and the model version carries the same URI as the tag
`anneal.adapter_base`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anneal.api.distillation import LoraConfig as LoraSpec

ADAPTER_CONFIG = "adapter_config.json"
TAG_ADAPTER_BASE = "anneal.adapter_base"


class LoraTargetError(ValueError):
    """`lora.targetModules` names no module of the student."""


def _linear_names(model: Any) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def add_lora(model: Any, cfg: LoraSpec) -> Any:
    """Wrap `model` in LoRA branches; only the branches are trainable afterwards.

    Args:
        model: a `transformers` causal LM.
        cfg: the spec's `lora` block (rank, alpha, dropout, targetModules).

    Returns:
        A `peft.PeftModel` whose base weights are frozen.

    Raises:
        LoraTargetError: a target module name matches no linear layer of the model.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    present = _linear_names(model)
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        raise LoraTargetError(
            f"lora.targetModules: {missing} match no linear layer of the student; "
            f"its linear layers are {sorted(present)}"
        )
    peft_cfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def is_adapter(model: Any) -> bool:
    """Whether `model` is a peft model (still carries LoRA branches)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def finalize_lora(model: Any, cfg: LoraSpec) -> Any:
    """The model to export after training.

    Args:
        model: the trained peft model.
        cfg: the spec's `lora` block.

    Returns:
        With `merge: true`, the base model with the branches merged into its weights (a plain
        `PreTrainedModel`; `save_pretrained` writes a full checkpoint). With `merge: false`, the
        peft model itself (`save_pretrained` writes `adapter_config.json` + adapter weights).
    """
    if not is_adapter(model):
        return model
    if cfg.merge:
        return model.merge_and_unload()
    return model


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The `base_model_name_or_path` an adapter directory points at (None if not an adapter)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("base_model_name_or_path")


def point_adapter_at(adapter_dir: str | Path, base_uri: str) -> None:
    """Rewrite an adapter's `base_model_name_or_path` to `base_uri` (a durable model URI)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_uri
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def load_adapter_model(adapter_dir: str | Path, *, cache_dir: str | Path, tracking_uri: str | None = None) -> Any:
    """Load a registered (unmerged) adapter on top of its base, resolving the base URI.

    The base may be any model URI (`models:/`, `runs:/.../base-model`, a path): `runs:/` is
    downloaded through MLflow, the rest through `anneal.modeling.uris.resolve_model_dir`.

    Args:
        adapter_dir: a directory with `adapter_config.json` and the adapter weights.
        cache_dir: download cache for the base.
        tracking_uri: MLflow tracking URI for `models:/` and `runs:/` bases.

    Returns:
        The peft model in eval mode.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_uri = adapter_base(adapter_dir)
    if not base_uri:
        raise ValueError(f"{adapter_dir}: no {ADAPTER_CONFIG} with base_model_name_or_path; not an adapter")
    base_dir = resolve_base(base_uri, cache_dir=cache_dir, tracking_uri=tracking_uri)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def resolve_base(base_uri: str, *, cache_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """A local directory for an adapter's base URI (`runs:/` included)."""
    if base_uri.startswith("runs:/"):
        import hashlib

        import mlflow.artifacts

        target = Path(cache_dir) / "runs" / hashlib.sha256(base_uri.encode()).hexdigest()[:16]
        if not (target / "config.json").exists():
            target.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(artifact_uri=base_uri, dst_path=str(target), tracking_uri=tracking_uri)
        found = [p.parent for p in target.rglob("config.json")]
        if not found:
            raise FileNotFoundError(f"{base_uri}: no config.json in the downloaded base")
        return found[0]
    from anneal.modeling.uris import resolve_model_dir

    return resolve_model_dir(base_uri, cache_dir=cache_dir, tracking_uri=tracking_uri)
