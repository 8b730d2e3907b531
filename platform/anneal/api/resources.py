"""The four kinds: their models, names and printer columns, and parsing of whole manifests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from anneal import API_GROUP, API_VERSION
from anneal.api.common import DNS_SUBDOMAIN, SECRET_KEY, iter_model_refs
from anneal.api.compression import CompressionJobSpec, CompressionJobStatus
from anneal.api.distillation import DistillationJobSpec, DistillationJobStatus
from anneal.api.pipeline import ModelPipelineSpec, ModelPipelineStatus
from anneal.api.service import ModelServiceSpec, ModelServiceStatus

API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    priority: int = 0
    description: str = ""


@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: tuple[PrinterColumn, ...] = field(default_factory=tuple)


_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date")
_PHASE = PrinterColumn("Phase", ".status.phase")

KINDS: dict[str, KindInfo] = {
    "DistillationJob": KindInfo(
        "DistillationJob",
        "distillationjobs",
        "distillationjob",
        ("dj",),
        DistillationJobSpec,
        DistillationJobStatus,
        (
            _PHASE,
            PrinterColumn("Method", ".spec.method"),
            PrinterColumn("Step", ".status.progress.step", "integer"),
            PrinterColumn("Retention", ".status.metrics.retention", "number"),
            PrinterColumn("Model", ".status.modelUri"),
            _AGE,
        ),
    ),
    "CompressionJob": KindInfo(
        "CompressionJob",
        "compressionjobs",
        "compressionjob",
        ("cj", "cmpj"),
        CompressionJobSpec,
        CompressionJobStatus,
        (
            _PHASE,
            PrinterColumn("Scheme", ".spec.quantization.scheme"),
            PrinterColumn("Size", ".status.metrics.sizeRatio", "number"),
            PrinterColumn("Retention", ".status.metrics.retention", "number"),
            PrinterColumn("Model", ".status.modelUri"),
            _AGE,
        ),
    ),
    "ModelService": KindInfo(
        "ModelService",
        "modelservices",
        "modelservice",
        ("msvc",),
        ModelServiceSpec,
        ModelServiceStatus,
        (
            _PHASE,
            PrinterColumn("Weights", ".status.weightsSummary"),
            PrinterColumn("Step", ".status.rollout.step", "integer"),
            PrinterColumn("Endpoint", ".status.endpoint"),
            _AGE,
        ),
    ),
    "ModelPipeline": KindInfo(
        "ModelPipeline",
        "modelpipelines",
        "modelpipeline",
        ("mpipe",),
        ModelPipelineSpec,
        ModelPipelineStatus,
        (_PHASE, PrinterColumn("Stage", ".status.currentStage"), _AGE),
    ),
}


class ManifestError(ValueError):
    """A manifest that does not parse; `errors` holds one FieldError per problem."""

    def __init__(self, errors: list["FieldError"]):
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


@dataclass
class FieldError:
    path: str
    value: Any
    rule: str

    def __str__(self) -> str:
        return f"{self.path}: {_show(self.value)}: {self.rule}"


def _show(value: Any) -> str:
    if value is _MISSING:
        return "<missing>"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING = object()
_PATTERN_RULES = {
    r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$": "must be a duration such as 30s, 5m or 1h",
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$": "must be a DNS label (lowercase letters, digits and '-')",
    DNS_SUBDOMAIN: "must be a Kubernetes object name (lowercase letters, digits, '-' and '.')",
    SECRET_KEY: "must be a Secret key (letters, digits, '-', '_' and '.')",
}
_BRANCH_TAG = re.compile(r"^(int|float|str|bool|none|constrained-str|[a-z-]+\[.*\])$")


def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def field_errors(exc: ValidationError, prefix: str = "spec") -> list[FieldError]:
    """Turn a pydantic ValidationError into FieldErrors with full camelCase paths."""
    out: list[FieldError] = []
    for err in exc.errors(include_url=False):
        # Unions report each branch under a tag (``int``, ``list[int]``): drop the tags from the path.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _BRANCH_TAG.match(p)))
        if err["type"] == "cross_field":
            ctx = err.get("ctx", {})
            sub = ctx.get("path", "")
            path = _path(prefix, loc)
            if sub:
                path = f"{path}.{sub}" if path else sub
            out.append(FieldError(path, ctx.get("value"), ctx.get("rule", err["msg"])))
            continue
        value = _MISSING if err["type"] == "missing" else err.get("input")
        rule = err["msg"]
        if err["type"] == "extra_forbidden":
            rule = "unknown field"
        if err["type"] == "missing":
            rule = "required field is missing"
        if err["type"] == "string_pattern_mismatch":
            rule = _PATTERN_RULES.get(err.get("ctx", {}).get("pattern", ""), rule)
        out.append(FieldError(_path(prefix, loc), value, rule))
    # A union (int | list[int]) reports one error per branch: keep the most specific one.
    unique: list[FieldError] = []
    for e in out:
        if any(e.path == u.path for u in unique):
            continue
        if any(o.path.startswith((e.path + "[", e.path + ".")) for o in out):
            continue
        unique.append(e)
    return unique


def parse_spec(kind: str, spec: Any, *, prefix: str = "spec") -> BaseModel:
    """Validate a spec of ``kind``; raises ManifestError naming every bad field."""
    info = KINDS.get(kind)
    if info is None:
        raise ManifestError([FieldError("kind", kind, f"unknown kind (expected one of {', '.join(KINDS)})")])
    if not isinstance(spec, dict):
        raise ManifestError([FieldError(prefix, _MISSING if spec is None else spec, "spec must be a mapping")])
    try:
        parsed = info.spec.model_validate(spec)
    except ValidationError as exc:
        raise ManifestError(field_errors(exc, prefix)) from None
    if kind != "ModelPipeline":
        stray = [
            FieldError(f"{prefix}.{path}.fromStage", ref.from_stage, "fromStage is only allowed inside a ModelPipeline stage")
            for path, ref in iter_model_refs(parsed)
            if ref.from_stage is not None
        ]
        student = getattr(parsed, "student", None)
        if student is not None and student.from_stage is not None:
            stray.append(FieldError(f"{prefix}.student.fromStage", student.from_stage,
                                    "fromStage is only allowed inside a ModelPipeline stage"))
        if stray:
            raise ManifestError(stray)
    return parsed


@dataclass
class Manifest:
    """A parsed Anneal resource."""

    kind: str
    name: str
    namespace: str
    spec: Any
    raw: dict[str, Any]

    @property
    def info(self) -> KindInfo:
        return KINDS[self.kind]

    @property
    def uid(self) -> str | None:
        return (self.raw.get("metadata") or {}).get("uid")

    @property
    def generation(self) -> int | None:
        return (self.raw.get("metadata") or {}).get("generation")


def parse_manifest(doc: Any, default_namespace: str = "default") -> Manifest:
    """Validate a whole resource (apiVersion, kind, metadata.name, spec)."""
    if not isinstance(doc, dict):
        raise ManifestError([FieldError("(document)", doc, "a resource must be a mapping")])
    errors: list[FieldError] = []
    api_version = doc.get("apiVersion")
    if api_version != API_GROUP_VERSION:
        errors.append(FieldError("apiVersion", api_version if api_version is not None else _MISSING,
                                 f"must be {API_GROUP_VERSION}"))
    kind = doc.get("kind")
    if kind not in KINDS:
        errors.append(FieldError("kind", kind if kind is not None else _MISSING,
                                 f"unknown kind (expected one of {', '.join(KINDS)})"))
    metadata = doc.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name:
        errors.append(FieldError("metadata.name", name if name is not None else _MISSING, "required"))
    if errors:
        raise ManifestError(errors)
    spec = parse_spec(kind, doc.get("spec"))
    return Manifest(kind, name, metadata.get("namespace") or default_namespace, spec, doc)
