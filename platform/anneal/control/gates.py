"""Job and stage gates, once: a threshold on a figure passes only with the figure in hand.

A gate that cannot be evaluated — the figure is missing, not a number, NaN or infinite (a
retention whose source scores 0) — never passes: the caller ends the job `Rejected` (or the
pipeline at that stage) with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    value: float | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def check_threshold(metrics: Mapping[str, Any], metric: str, *, min: float | None = None,
                    max: float | None = None, why_missing: str | None = None) -> Verdict:
    """`metrics[metric]` against `min` / `max` (either may be None, not both).

    Args:
        metrics: the figures (e.g. a job's status metrics).
        metric: the one the gate is on.
        min, max: the bounds.
        why_missing: the reason to give when the figure is missing or not finite (default: a
            sentence naming the figures there are).

    Returns:
        The verdict, with a sentence saying why.
    """
    raw = metrics.get(metric)
    value = _number(raw)
    if value is None:
        if why_missing is None:
            shown = "missing" if raw is None else f"{raw!r}, not a finite number"
            why_missing = f"{metric} is {shown} (figures: {', '.join(sorted(metrics)) or 'none'})"
        return Verdict(False, f"the gate cannot be evaluated: {why_missing}; a gate without evidence never passes")
    if min is not None and value < min:
        return Verdict(False, f"{metric}={value:.4g} < min {min:g}", value)
    if max is not None and value > max:
        return Verdict(False, f"{metric}={value:.4g} > max {max:g}", value)
    bound = f">= {min:g}" if min is not None else f"<= {max:g}"
    return Verdict(True, f"{metric}={value:.4g} {bound}", value)
