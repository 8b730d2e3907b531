"""Shared building blocks of every Anneal resource: base model, durations, quantities, refs, status."""

from __future__ import annotations

import enum
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Iterator, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# --------------------------------------------------------------------------- base


class ApiModel(BaseModel):
    """Base of every spec/status model: camelCase in YAML, snake_case in Python, no unknown fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=False,
    )

    def to_dict(self) -> dict[str, Any]:
        """The camelCase, JSON-ready form, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cross_field(path: str, value: Any, rule: str) -> PydanticCustomError:
    """A cross-field rule violation located at ``path`` (relative to the model that raises it).

    The error keeps the sub-path, the offending value and the rule so `anneal validate` and the
    operator can print ``spec.variants[1].weight: 30: weights of all variants must sum to 100``.
    """
    return PydanticCustomError(
        "cross_field",
        "{path}: {rule}",
        {"path": path, "value": _short(value), "rule": rule},
    )


def _short(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if isinstance(value, (list, tuple)):
        return [_short(v) for v in value]
    return value


# ------------------------------------------------------------------ scalar types

_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

Duration = Annotated[
    str,
    StringConstraints(pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$", max_length=32),
    Field(description="A duration such as 30s, 5m, 1h or 1h30m."),
]


def parse_duration(text: str) -> float:
    """Seconds in a duration string such as ``30s``, ``5m``, ``1h30m`` or ``250ms``.

    Raises:
        ValueError: the text is not a duration.
    """
    if not isinstance(text, str) or not _DURATION_RE.match(text.strip()):
        raise ValueError(f"{text!r} is not a duration (use e.g. 30s, 5m, 1h)")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text.strip()))


_QUANTITY_PATTERN = r"^([+]?[0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|[eE][+]?[0-9]+)?$"
_QUANTITY_SUFFIX = {
    "": 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "m": 10**-3,
}

Quantity = Annotated[
    str,
    StringConstraints(pattern=_QUANTITY_PATTERN, max_length=32),
    Field(description="A Kubernetes quantity such as 16Gi, 512Mi or 2."),
]


def parse_quantity(text: str) -> float:
    """The numeric value of a Kubernetes quantity (``16Gi`` → 17179869184).

    Raises:
        ValueError: the text is not a quantity.
    """
    m = re.match(_QUANTITY_PATTERN, str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (use e.g. 16Gi, 512Mi, 2)")
    number, suffix = float(m.group(1)), m.group(3) or ""
    if suffix[:1] in ("e", "E"):
        return number * 10 ** int(suffix[1:])
    return number * _QUANTITY_SUFFIX[suffix]


def format_quantity(value: float) -> str:
    """A Kubernetes quantity for `value`: the largest binary suffix it is a whole number of
    (``32Gi``, ``512Mi``), else the largest decimal one it is at least one of (``1.5G``)."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        n = value / _QUANTITY_SUFFIX[suffix]
        if n >= 1 and n.is_integer():
            return f"{int(n)}{suffix}"
    for suffix in ("E", "P", "T", "G", "M", "k"):
        if value >= _QUANTITY_SUFFIX[suffix]:
            return f"{value / _QUANTITY_SUFFIX[suffix]:g}{suffix}"
    return f"{value:g}"


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: A Kubernetes object name such as a Secret's (RFC 1123 subdomain, at most 253 characters).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: A key of a Secret's data.
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
Name = Annotated[
    str,
    StringConstraints(pattern=DNS_LABEL, min_length=1, max_length=63),
]

ReasoningMode = Literal["on", "off"]

# ------------------------------------------------------------------------- refs

KIND_NAMES = ("DistillationJob", "CompressionJob", "ModelService", "ModelPipeline")

_MODEL_URI_RE = re.compile(
    r"^(file://.+|hf://[^/@\s]+/[^@\s]+(@[^\s]+)?|s3://[^/\s]+(/.*)?"
    r"|models:/[^/@\s]+(/[0-9]+|@[A-Za-z0-9_-]+)|[^:\s]+)$"
)


class ResourceRef(ApiModel):
    """Another Anneal resource in the same namespace whose registered output model is used."""

    kind: Literal["DistillationJob", "CompressionJob"] = Field(
        description="Kind of the resource whose output model is used."
    )
    name: Name = Field(description="Name of that resource, in the same namespace.")


class ModelRef(ApiModel):
    """A model: exactly one of `uri`, `fromResource` or `fromStage`."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.uri), has(self.fromResource), has(self.fromStage)]"
                    ".filter(x, x).size() == 1",
                    "message": "exactly one of uri, fromResource or fromStage must be set",
                }
            ]
        }
    )

    uri: str | None = Field(
        default=None,
        max_length=2048,
        description="file:///abs/path, a path, hf://org/name[@revision], s3://bucket/prefix, "
        "models:/Name/3 or models:/Name@alias.",
    )
    from_resource: ResourceRef | None = Field(
        default=None, description="The registered output of another Anneal resource."
    )
    from_stage: Name | None = Field(
        default=None, description="Inside a ModelPipeline only: the output of an earlier stage."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelRef":
        chosen = [n for n in ("uri", "from_resource", "from_stage") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise cross_field(
                "",
                [to_camel(n) for n in chosen] or None,
                "exactly one of uri, fromResource or fromStage must be set",
            )
        if self.uri is not None and not _MODEL_URI_RE.match(self.uri):
            raise cross_field(
                "uri",
                self.uri,
                "must be file://, a path, hf://org/name[@rev], s3://bucket/prefix, "
                "models:/Name/N or models:/Name@alias",
            )
        return self

    def describe(self) -> str:
        if self.uri:
            return self.uri
        if self.from_resource:
            return f"{self.from_resource.kind}/{self.from_resource.name}"
        return f"stage:{self.from_stage}"


class Toleration(ApiModel):
    """A Kubernetes toleration for the worker pods."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class Resources(ApiModel):
    """Compute for a workload: Ray workers (training) or replicas (serving)."""

    workers: int = Field(default=1, ge=1, le=1024, description="Ray Train workers (>=1).")
    gpus_per_worker: float = Field(default=0, ge=0, le=16, description="GPUs per worker (>=0).")
    cpus_per_worker: float = Field(default=1, gt=0, le=512, description="CPUs per worker (>0).")
    memory: Quantity | None = Field(default=None, description="Memory per worker, e.g. 16Gi.")
    accelerator_type: str | None = Field(
        default=None, max_length=63, description="GPU type, e.g. H100 (node selector and Ray resource)."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector for workers.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for workers.")
    priority_class_name: str | None = Field(default=None, max_length=253)
    queue: str | None = Field(
        default=None, max_length=63, description="Kueue / Volcano queue name (gang scheduling)."
    )


class HeadResources(ApiModel):
    """Resources of the Ray head of a per-resource KubeRay cluster."""

    cpus: float = Field(default=2, gt=0)
    memory: Quantity = "8Gi"


class SecretKeySelector(ApiModel):
    """One key of a Kubernetes Secret in the resource's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, min_length=1, max_length=253,
                      description="Name of the Secret, in the resource's namespace.")
    key: str = Field(pattern=SECRET_KEY, min_length=1, max_length=253, description="Key in the Secret's data.")


class EnvVarSource(ApiModel):
    """An environment variable's value read from a Secret (Kubernetes' own `secretKeyRef` shape)."""

    secret_key_ref: SecretKeySelector = Field(description="The Secret and key that hold the value.")


def _env_value_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    if isinstance(value, (dict, EnvVarSource)):
        return "object[secretKeyRef]"
    return None


#: A plain value or `{secretKeyRef: {name, key}}`. The branch tags are ones the error paths
#: leave out (`anneal.api.resources._BRANCH_TAG`), so an error reads `envVars.X.secretKeyRef.name`.
EnvValue = Annotated[
    Annotated[str, Tag("str")] | Annotated[EnvVarSource, Tag("object[secretKeyRef]")],
    Discriminator(
        _env_value_kind,
        custom_error_type="env_value",
        custom_error_message="must be a string (quote numbers and booleans) or {secretKeyRef: {name, key}}",
    ),
]


class RuntimeEnv(ApiModel):
    """Extra Ray runtime environment for the workload."""

    pip: list[str] = Field(default_factory=list, description="Extra pip packages.")
    env_vars: dict[str, EnvValue] = Field(
        default_factory=dict,
        description="Extra environment variables: a value, or {secretKeyRef: {name, key}} to read it from a "
        "Secret in the resource's namespace. Values never reach the job's command line or MLflow.",
    )


class RayTarget(ApiModel):
    """Where the work runs: a shared Ray cluster (`address`) or a per-resource KubeRay cluster."""

    address: str | None = Field(
        default=None,
        pattern=r"^(https?://[^\s]+|ray://[^\s]+|auto|local)$",
        max_length=512,
        description="Dashboard URL of a shared Ray head, e.g. http://ray-head:8265. "
        "Without it the operator creates a KubeRay cluster for the resource.",
    )
    image: str | None = Field(default=None, max_length=512, description="Ray image for KubeRay clusters.")
    ray_version: str | None = Field(default=None, max_length=32, description="Ray version of the image.")
    head_resources: HeadResources = Field(default_factory=HeadResources)
    runtime_env: RuntimeEnv = Field(default_factory=RuntimeEnv)


class MlflowTarget(ApiModel):
    """Where the run is recorded in MLflow."""

    experiment: str | None = Field(default=None, max_length=256, description="Experiment name.")
    registered_model_name: str | None = Field(
        default=None, max_length=256, description="Registered model name for the output."
    )
    tracking_uri: str | None = Field(
        default=None, max_length=1024, description="Overrides the operator's default tracking URI."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the run and version.")


class DatasetRef(ApiModel):
    """A data set: the built-in reasoning task, a .jsonl file, hf://datasets/..., or s3://."""

    uri: str = Field(
        default="builtin://reasoning",
        max_length=2048,
        pattern=r"^(builtin://reasoning(\?.*)?|hf://datasets/.+|s3://.+|file://.+|[^:]+\.jsonl)$",
        description="builtin://reasoning[?difficulty=2&seed=7], a .jsonl path, hf://datasets/..., s3://.",
    )
    split: str = Field(default="train", max_length=64, description="Split to read.")
    format: Literal["chat", "text", "prompt-completion"] = Field(
        default="chat", description="Record format."
    )
    samples: int | None = Field(default=None, ge=1, description="Cap on the number of samples.")
    max_seq_length: int = Field(default=256, ge=8, le=131072, description="Token cap per sample.")
    reasoning: Literal["on", "off", "both"] = Field(
        default="both", description='Which "detailed thinking" forms the samples take.'
    )


# ----------------------------------------------------------------------- status


class ConditionStatus(str, enum.Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    model_config = ConfigDict(extra="ignore")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition], type: str, status: str, reason: str, message: str = ""
) -> list[Condition]:
    """Conditions with ``type`` set; lastTransitionTime moves only when the status flips."""
    out: list[Condition] = []
    found = False
    for c in conditions:
        if c.type == type:
            found = True
            flipped = c.status != status
            out.append(
                Condition(
                    type=type,
                    status=status,
                    reason=reason,
                    message=message,
                    last_transition_time=now_iso() if flipped else c.last_transition_time,
                )
            )
        else:
            out.append(c)
    if not found:
        out.append(
            Condition(type=type, status=status, reason=reason, message=message, last_transition_time=now_iso())
        )
    return out


class StatusBase(ApiModel):
    """Fields every status has."""

    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    message: str | None = None


def iter_model_refs(obj: Any, path: str = "") -> Iterator[tuple[str, ModelRef]]:
    """Every ModelRef inside a spec, with its camelCase path (``stages[2].compression.model``)."""
    if isinstance(obj, ModelRef):
        yield path, obj
        return
    if isinstance(obj, BaseModel):
        for name, field in type(obj).model_fields.items():
            key = field.alias or name
            yield from iter_model_refs(getattr(obj, name), f"{path}.{key}" if path else key)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from iter_model_refs(item, f"{path}[{i}]")
