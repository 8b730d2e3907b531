"""What a finished resource's status says, for people: named, grouped figures and a pipeline's stage table.

Pure functions over status dicts (the same whether `anneal run` or the operator wrote them):
`anneal run` prints them at the end of a run, `-o json` keeps the raw status. A figure that
cannot be computed is not silently left out: `missing_figures` says which and why (a kd job
whose teacher answered nothing right has no retention, because retention divides by it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

#: Metric-name prefixes → the model the figure is about, in the order groups are shown.
MODEL_PREFIXES = (
    ("student", "student"),
    ("teacher", "teacher"),
    ("start", "student before training (kd-rl, cpt)"),
    ("source", "source model"),
    ("pruned", "after pruning"),
    ("quantized", "after quantization"),
)
#: Base metric names → what a person calls them.
LABELS = {
    "accuracy": "accuracy (mean of modes)",
    "accuracyOn": "accuracy, thinking on",
    "accuracyOff": "accuracy, thinking off",
    "perplexity": "perplexity",
    "heldoutTokens": "held-out tokens (cpt perplexity averages over them)",
    "sizeBytes": "size",
    "sizeRatio": "size ratio (to the source)",
    "retention": "retention (accuracy / the reference's)",
    "attentionLayers": "blocks with attention",
    "sequentialDepth": "sequential depth (attention + FFN sub-layers)",
    "sequentialDepthRatio": "sequential depth ratio (to the source)",
    "fusedRuns": "FFN runs fused",
    "fusionGapKl": "fusion gap, KL to the unfused model (nats/token)",
    "fusionGapTop1": "fusion gap, top-1 agreement with the unfused model",
    "numberAttention": "attention on the prompt's numbers (share; evaluation.attentionMaps)",
}
#: Figures that compare two models, shown in their own group.
COMPARISONS = {
    "retention": "retention (student / teacher accuracy)",
    "rlGain": "RL gain (accuracy after RL - before)",
    "sizeRatio": "size ratio (to the source)",
}
COMPRESSION_RETENTION = "retention (compressed / source accuracy)"
TRAINING = {"loggingShare": "time spent logging (share of the loop)", "trainLoss": "training loss (last step)"}


@dataclass(frozen=True)
class Figure:
    group: str
    key: str
    label: str
    value: float | None


def _label(base: str) -> str:
    return LABELS.get(base, base)


def format_value(key: str, value: float | None) -> str:
    """A figure as text: sizes in MB, fractions to 4 significant digits."""
    if value is None:
        return "-"
    if key.endswith("SizeBytes") or key == "sizeBytes":
        return f"{value / 1e6:.2f} MB"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def figures(metrics: Mapping[str, Any], kind: str | None = None) -> list[Figure]:
    """A job's metrics as named figures, grouped by the model they describe.

    Args:
        metrics: `status.metrics` of a DistillationJob or CompressionJob.
        kind: the job's kind; a CompressionJob's unprefixed figures describe its output.
    """
    # Unprefixed figures describe the job's output: the compressed model, or the trained student.
    own = "compressed model" if kind == "CompressionJob" else "student" if kind == "DistillationJob" else "model"
    groups: dict[str, list[Figure]] = {}
    for key in sorted(metrics):
        value = metrics[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        for prefix, who in MODEL_PREFIXES:
            if key.startswith(prefix) and key[len(prefix):][:1].isupper():
                base = key[len(prefix)].lower() + key[len(prefix) + 1:]
                groups.setdefault(who, []).append(Figure(who, key, _label(base), float(value)))
                break
        else:
            if key in COMPARISONS:
                label = COMPRESSION_RETENTION if kind == "CompressionJob" and key == "retention" else COMPARISONS[key]
                groups.setdefault("comparison", []).append(Figure("comparison", key, label, float(value)))
            elif key in TRAINING:
                groups.setdefault("training", []).append(Figure("training", key, TRAINING[key], float(value)))
            else:
                groups.setdefault(own, []).append(Figure(own, key, _label(key), float(value)))
    order = list(dict.fromkeys([who for _, who in MODEL_PREFIXES] + [own, "comparison", "training"]))
    return [f for g in order for f in groups.get(g, [])]


def missing_figures(metrics: Mapping[str, Any], kind: str | None = None) -> list[str]:
    """The figures a job should have but cannot, each with why (empty: nothing is missing)."""
    out = []
    m = metrics
    if kind == "CompressionJob":
        if "retention" not in m and "sourceAccuracy" in m and not m["sourceAccuracy"]:
            out.append("retention: not computed, the source model answered no evaluation question right "
                       "(sourceAccuracy 0); retention divides by it")
        if "sizeRatio" not in m and "sizeBytes" in m:
            out.append("sizeRatio: not computed, the source model's size is unknown")
        return out
    if "teacherAccuracy" in m and "retention" not in m and not m["teacherAccuracy"]:
        out.append("retention: not computed, the teacher answered no evaluation question right "
                   "(teacherAccuracy 0); retention divides by it. Train the teacher longer, or evaluate "
                   "on more samples")
    return out


def _accuracy(metrics: Mapping[str, Any], kind: str | None, mode: str) -> float | None:
    key = f"accuracy{mode}"
    if kind == "DistillationJob":
        key = f"studentAccuracy{mode}"
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _duration(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (b - a).total_seconds())


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


#: The stage table's columns, in order.
STAGE_COLUMNS = ("stage", "kind", "phase", "model", "accuracy on", "accuracy off", "retention", "size ratio",
                 "duration", "gate")


def stage_rows(status: Mapping[str, Any]) -> list[dict[str, str]]:
    """A pipeline's stages as table rows (`STAGE_COLUMNS`), in the order they ran.

    Args:
        status: a ModelPipeline's status (its `stages` records, as `anneal.control.pipeline` keeps them).
    """
    rows = []
    for name, st in (status.get("stages") or {}).items():
        kind = st.get("kind") or (st.get("resource") or "").split("/", 1)[0] or "-"
        metrics = st.get("metrics") or {}
        ratio = metrics.get("sizeRatio")
        retention = metrics.get("retention")
        model = st.get("modelUri") or st.get("endpoint") or "-"
        rows.append({
            "stage": name,
            "kind": kind,
            "phase": st.get("phase") or "-",
            "model": model,
            "accuracy on": format_value("accuracy", _accuracy(metrics, kind, "On")),
            "accuracy off": format_value("accuracy", _accuracy(metrics, kind, "Off")),
            "retention": format_value("retention", retention) if retention is not None else "-",
            "size ratio": format_value("sizeRatio", ratio) if ratio is not None else "-",
            "duration": format_duration(_duration(st.get("startTime"), st.get("completionTime"))),
            "gate": st.get("gate") or "-",
        })
    return rows


def stage_notes(status: Mapping[str, Any]) -> list[str]:
    """What the stage table cannot show: figures missing and why, a student above its teacher, warnings."""
    notes = []
    for name, st in (status.get("stages") or {}).items():
        kind = st.get("kind") or (st.get("resource") or "").split("/", 1)[0]
        metrics = st.get("metrics") or {}
        for why in missing_figures(metrics, kind):
            notes.append(f"stage {name}: {why}")
        notes.extend(f"stage {name}: {n}" for n in comparison_notes(metrics, kind))
    return notes


def comparison_notes(metrics: Mapping[str, Any], kind: str | None) -> list[str]:
    """Figures that are there but mean something other than success (retention above 1)."""
    retention = metrics.get("retention")
    if not isinstance(retention, (int, float)) or retention <= 1.0:
        return []
    other = "its teacher" if kind != "CompressionJob" else "the source model"
    return [f"retention {retention:.3g} > 1: the model scores above {other}, which usually means {other} is "
            "under-trained or the evaluation set is too small to tell them apart, not that it improved on it"]
