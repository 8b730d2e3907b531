"""CompressionJob handlers: a reconcile timer and a finalizer that stops the Ray job (logic in `jobs`).

A compression recipe may end `Rejected` (accuracy retention below `evaluation.minRetention`):
that is a final answer, not a failure, and is never retried.
"""

from __future__ import annotations

import kopf

from anneal_operator.context import OperatorContext
from anneal_operator.jobs import JobReconciler, register_job_handlers

KIND = "CompressionJob"


def register(registry: kopf.OperatorRegistry, op: OperatorContext) -> JobReconciler:
    return register_job_handlers(registry, op, KIND)
