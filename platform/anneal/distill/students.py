"""Students derived from the teacher (Minitron depth/width pruning) and teacher/student compatibility checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from anneal.api.common import DatasetRef
from anneal.api.distillation import FromTeacher


class IncompatibleModelsError(ValueError):
    """Teacher and student cannot be distilled together (e.g. different tokenizers)."""


def calibration_batches(tokenizer: Any, ref: DatasetRef, cache_dir: str | Path, batch_size: int = 8,
                        toggle: bool = True) -> Iterator[dict[str, Any]]:
    """Tokenized calibration batches (prompt + completion) from a DatasetRef (`toggle`: the reasoning toggle's
    system message in the prompts, for a model trained with it)."""
    from anneal.data.datasets import collate, load_samples, tokenize_sample
    from anneal.modeling.chat import pad_id

    samples = load_samples(
        ref.uri, split=ref.split, format=ref.format, samples=ref.samples or 64, reasoning=ref.reasoning,
        cache_dir=Path(cache_dir) / "datasets", toggle=toggle,
    )
    tokenized = [tokenize_sample(tokenizer, s, ref.max_seq_length) for s in samples]
    for i in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[i : i + batch_size], pad_id(tokenizer))
        yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def derive_student(teacher_dir: str | Path, plan: FromTeacher, cache_dir: str | Path,
                   device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """Prune the teacher into a student by depth and/or width importance on `plan.calibration`.

    The teacher is loaded in fp32 on `device` (the importance passes run there); the student
    comes back on it too.

    Returns:
        (student model, the teacher's tokenizer, a report of figures: params before/after, kept layers).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.compress.pruning import PruningPlan, prune
    from anneal.modeling.chat import dir_declares_reasoning_toggle
    from anneal.modeling.layerwise_llama import register as register_anneal_llama

    register_anneal_llama()  # model_type anneal_llama (attention removal, FFN fusion)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).to(device).eval()
    pruning_plan = PruningPlan.from_spec(plan.to_dict(), field_prefix="student.fromTeacher")
    batches = list(calibration_batches(tokenizer, plan.calibration, cache_dir,
                                       toggle=dir_declares_reasoning_toggle(teacher_dir)))
    student, report = prune(teacher, pruning_plan, batches)
    figures = {
        "teacherParams": float(report["paramsBefore"]),
        "studentParams": float(report["paramsAfter"]),
        "studentParamRatio": float(report["paramRatio"]),
        "studentLayers": float(len(report["keptLayers"])),
    }
    return student, tokenizer, figures


def _vocab(model_dir: Path) -> dict[str, int]:
    path = Path(model_dir) / "tokenizer.json"
    if path.exists():
        return json.loads(path.read_text())["model"]["vocab"]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()


def check_tokenizers_match(teacher_dir: str | Path, student_dir: str | Path) -> None:
    """Raise IncompatibleModelsError unless teacher and student share a vocabulary (logit KD needs it)."""
    t, s = _vocab(Path(teacher_dir)), _vocab(Path(student_dir))
    if t != s:
        only_t = len(set(t) - set(s))
        only_s = len(set(s) - set(t))
        raise IncompatibleModelsError(
            f"spec.student: the student's tokenizer differs from the teacher's ({len(t)} vs {len(s)} tokens; "
            f"{only_t} only in the teacher, {only_s} only in the student). Logit distillation compares "
            "token distributions, so both must share one tokenizer: use student.config or student.fromTeacher "
            "(which take the teacher's tokenizer) or a student trained with the teacher's tokenizer."
        )
