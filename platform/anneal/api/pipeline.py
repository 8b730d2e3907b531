"""ModelPipeline: ordered stages (distill → compress → serve) with quality gates between them."""

from __future__ import annotations

import enum

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from anneal.api.common import ApiModel, Name, StatusBase, cross_field, iter_model_refs
from anneal.api.compression import CompressionJobSpec
from anneal.api.distillation import DistillationJobSpec
from anneal.api.service import ModelServiceSpec


class StageGate(ApiModel):
    """A threshold on one of the stage's status metrics, e.g. retention >= 0.9."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.max) != has(self.min)", "message": "set exactly one of max or min"}
            ]
        }
    )

    metric: str = Field(max_length=128, description="A key of the stage's status.metrics, e.g. retention.")
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one(self) -> "StageGate":
        if (self.max is None) == (self.min is None):
            raise cross_field("", self.to_dict(), "set exactly one of max or min")
        return self

    def check(self, metrics: dict[str, float]) -> tuple[bool, str]:
        """Whether the metrics pass, with a sentence saying why (a missing or NaN figure fails)."""
        from anneal.control.gates import check_threshold

        v = check_threshold(metrics, self.metric, min=self.min, max=self.max)
        return v.passed, v.reason


STAGE_KINDS = {"distillation": "DistillationJob", "compression": "CompressionJob", "service": "ModelService"}


class Stage(ApiModel):
    """One stage: exactly one of distillation, compression or service."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.distillation), has(self.compression), has(self.service)]"
                    ".filter(x, x).size() == 1",
                    "message": "a stage has exactly one of distillation, compression or service",
                }
            ]
        }
    )

    name: Name
    distillation: DistillationJobSpec | None = None
    compression: CompressionJobSpec | None = None
    service: ModelServiceSpec | None = None
    gate: StageGate | None = None

    @model_validator(mode="after")
    def _one(self) -> "Stage":
        chosen = [n for n in STAGE_KINDS if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise cross_field("", chosen or None, "a stage has exactly one of distillation, compression or service")
        return self

    @property
    def kind(self) -> str:
        return next(STAGE_KINDS[n] for n in STAGE_KINDS if getattr(self, n) is not None)

    @property
    def field(self) -> str:
        return next(n for n in STAGE_KINDS if getattr(self, n) is not None)

    @property
    def spec(self) -> DistillationJobSpec | CompressionJobSpec | ModelServiceSpec:
        return getattr(self, self.field)


class ModelPipelineSpec(ApiModel):
    """Spec of a ModelPipeline."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
                    "message": "stage names must be unique",
                    "fieldPath": ".stages",
                }
            ]
        }
    )

    stages: list[Stage] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _order(self) -> "ModelPipelineSpec":
        seen: list[str] = []
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise cross_field(f"stages[{i}].name", stage.name, "stage names must be unique")
            for path, ref in iter_model_refs(stage.spec, f"stages[{i}].{stage.field}"):
                if ref.from_stage is not None and ref.from_stage not in seen:
                    later = any(s.name == ref.from_stage for s in self.stages[i:])
                    rule = (
                        "fromStage must name an earlier stage (it names this or a later one)"
                        if later
                        else f"fromStage names no stage (earlier stages: {seen or 'none'})"
                    )
                    raise cross_field(f"{path}.fromStage", ref.from_stage, rule)
            student = getattr(stage.spec, "student", None)
            if student is not None and student.from_stage is not None and student.from_stage not in seen:
                raise cross_field(
                    f"stages[{i}].distillation.student.fromStage",
                    student.from_stage,
                    "fromStage must name an earlier stage",
                )
            seen.append(stage.name)
        return self


class PipelinePhase(str, enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class StageStatus(ApiModel):
    model_config = ConfigDict(extra="allow")

    phase: str | None = None
    resource: str | None = None
    kind: str | None = Field(default=None, description="The stage resource's kind.")
    model_uri: str | None = None
    endpoint: str | None = Field(default=None, description="A service stage's endpoint.")
    gate: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    start_time: str | None = Field(default=None, description="When the stage's resource started (its status).")
    completion_time: str | None = Field(default=None, description="When it ended (its status).")


class ModelPipelineStatus(StatusBase):
    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = None
    current_stage: str | None = None
    stages: dict[str, StageStatus] = Field(default_factory=dict)
