"""Staged A/B rollouts: the pure state machine, analysis gates, probes, MLflow aliases and the embedded driver.

`machine.step` and `analysis.evaluate` are pure; `embedded.drive` runs them against a local
Serve app; `control` holds the manual commands (CLI files and Kubernetes annotations).
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
