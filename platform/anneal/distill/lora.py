"""LoRA branches for `lora-kd` (LLM-NEO): add them to a student, merge them away, or keep an adapter.

The student is trained only through low-rank branches (peft) on the KD loss. With
`lora.merge: true` (the default) the branches are folded into the base weights after training,
so the registered model is a plain `transformers` checkpoint with no adapter and no inference
cost. With `merge: false` the registered model is the adapter alone; its
`adapter_config.json` names the base it applies to (`base_model_name_or_path`, rewritten by
`point_adapter_at` to a durable URI) and the model version carries the same URI as the tag
`anneal.adapter_base`. Loading such an adapter onto its base is `anneal.modeling.uris`' work
(`load_adapter_model`), as for any other registered model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anneal.api.distillation import LoraConfig as LoraSpec
from anneal.modeling.uris import ADAPTER_CONFIG_FILE

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


def point_adapter_at(adapter_dir: str | Path, base_uri: str) -> None:
    """Rewrite an adapter's `base_model_name_or_path` to `base_uri` (a durable model URI)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG_FILE
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_uri
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
