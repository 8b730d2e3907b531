"""`fromResource` references, once: which fields of a spec name another resource's model, and
what they resolve to.

A reference resolves to the referenced resource's registered model (`modelUri`) once that
resource has `Succeeded`. Where the drivers differ is only how they *observe* it: the operator
reads the resource's status from the API server, `anneal run` reads the newest successful run
of that resource from MLflow. Both pass a `lookup(kind, namespace, name)` that returns what
they observed (`{"phase": ..., "modelUri": ...}`, or None when there is no such resource), and
get back either the URIs or an `Unresolved` naming the field and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

#: The job spec fields that may hold a model reference (`DistillationJob`, `CompressionJob`).
JOB_FIELDS = ("teacher", "student", "model")

Lookup = Callable[[str, str, str], "Mapping[str, Any] | None"]


@dataclass(frozen=True)
class Reference:
    """One `fromResource`: where it is written (`field`), the key of its URI, what it names."""

    field: str
    key: str
    kind: str
    name: str


class Unresolved(Exception):
    """A reference that cannot be resolved yet: the resource is missing, not done, or has no model."""

    def __init__(self, ref: Reference, reason: str):
        self.ref, self.reason = ref, reason
        super().__init__(f"{ref.field}: {ref.kind}/{ref.name} {reason}")


def references(spec: Any) -> list[Reference]:
    """Every `fromResource` of a job spec (keyed by field) or a ModelService spec (keyed by variant)."""
    out: list[Reference] = []
    variants = getattr(spec, "variants", None)
    if variants is not None:
        for i, v in enumerate(variants):
            fr = getattr(v.model, "from_resource", None)
            if fr is not None:
                out.append(Reference(f"spec.variants[{i}].model.fromResource", v.name, fr.kind, fr.name))
        return out
    for key in JOB_FIELDS:
        ref = getattr(spec, key, None)
        fr = getattr(ref, "from_resource", None) if ref is not None else None
        if fr is not None:
            out.append(Reference(f"spec.{key}.fromResource", key, fr.kind, fr.name))
    return out


def resolve(spec: Any, namespace: str, lookup: Lookup) -> dict[str, str]:
    """key (job field or variant name) → the model URI each `fromResource` of `spec` names.

    Raises:
        Unresolved: the first reference whose resource does not exist, has not `Succeeded`,
            or registered no model.
    """
    out: dict[str, str] = {}
    for ref in references(spec):
        seen = lookup(ref.kind, namespace, ref.name)
        if seen is None:
            raise Unresolved(ref, f"does not exist in namespace {namespace}")
        phase = seen.get("phase")
        if phase != "Succeeded":
            raise Unresolved(ref, f"has not succeeded (phase {phase or 'unknown'})")
        if not seen.get("modelUri"):
            raise Unresolved(ref, "succeeded without registering a model")
        out[ref.key] = str(seen["modelUri"])
    return out


__all__ = ["JOB_FIELDS", "Reference", "Unresolved", "references", "resolve"]
