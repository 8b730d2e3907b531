"""Staged A/B rollouts: the pure state machine, analysis gates, probes and MLflow aliases.

`machine.step` and `analysis.evaluate` are pure; `anneal.control.rollout.tick` wraps them for
both drivers (`anneal.local.rollout.drive` and the operator); `control` holds the manual
commands (CLI files and Kubernetes annotations).
"""

from anneal.rollout.analysis import ProbeResults, StatsWindow, VariantWindow, evaluate
from anneal.rollout.machine import Command, Event, Phase, Reason, Transition, step

__all__ = [
    "Command",
    "Event",
    "Phase",
    "ProbeResults",
    "Reason",
    "StatsWindow",
    "Transition",
    "VariantWindow",
    "evaluate",
    "step",
]
