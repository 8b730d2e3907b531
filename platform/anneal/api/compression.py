"""CompressionJob: prune and/or quantize a model, then gate it on accuracy retention."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from anneal.api.common import (
    ApiModel,
    DatasetRef,
    MlflowTarget,
    ModelRef,
    RayTarget,
    Resources,
    StatusBase,
    cross_field,
)
from anneal.api.distillation import (
    ATTENTION_MAPS_DESCRIPTION,
    ATTENTION_MAPS_VALIDATION,
    KDConfig,
    StructuredPruning,
    check_attention_maps,
)

Scheme = Literal["W8A16", "W4A16", "W8A8", "FP8"]


class RecoveryConfig(ApiModel):
    """A short distillation from the unpruned model after pruning."""

    steps: int = Field(default=100, ge=1, description="Optimizer steps of recovery distillation.")
    dataset: DatasetRef = Field(default_factory=DatasetRef)
    kd: KDConfig = Field(default_factory=lambda: KDConfig(alpha=1.0))
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)


class AttentionPlan(ApiModel):
    """Attention removal: blocks that lose their attention sub-layer, then optional FFN fusion."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.dropLayers), has(self.ratio)].filter(x, x).size() == 1",
                    "message": "exactly one of dropLayers or ratio must be set",
                }
            ]
        }
    )

    drop_layers: int | list[int] | None = Field(
        default=None,
        description="Blocks whose attention is removed (indices), or how many (the least important).",
    )
    ratio: float | None = Field(
        default=None, gt=0, le=1,
        description="Share of attention sub-layers to keep (0 < ratio <= 1); the least important go.",
    )
    fuse_ffn: bool = Field(
        default=False,
        description="Fuse each run of consecutive attention-free blocks' FFNs into one wider FFN.",
    )

    @model_validator(mode="after")
    def _one(self) -> "AttentionPlan":
        chosen = [n for n in ("drop_layers", "ratio") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise cross_field("", chosen or None, "exactly one of dropLayers or ratio must be set")
        value = self.drop_layers
        if isinstance(value, bool):
            raise cross_field("dropLayers", value, "must be a count or a list of block indices")
        if isinstance(value, int) and value < 1:
            raise cross_field("dropLayers", value, "must be >= 1 (a count of attention sub-layers to remove)")
        if isinstance(value, list):
            if not value:
                raise cross_field("dropLayers", value, "must name at least one block")
            if any(i < 0 for i in value) or len(set(value)) != len(value):
                raise cross_field("dropLayers", value, "block indices must be unique and >= 0")
        return self


class PruningConfig(StructuredPruning):
    """Structured pruning by importance measured on calibration data, with optional recovery."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.depth) || has(self.width) || has(self.attention)",
                    "message": "set depth, width and/or attention",
                }
            ]
        }
    )

    attention: AttentionPlan | None = Field(
        default=None,
        description="Remove the attention sub-layer of chosen blocks (after depth and width), optionally fusing FFNs.",
    )
    recovery: RecoveryConfig | None = Field(default=None, description="Optional KD from the unpruned model.")

    @model_validator(mode="after")
    def _some(self) -> "PruningConfig":
        if self.depth is None and self.width is None and self.attention is None:
            raise cross_field("", None, "set depth, width and/or attention")
        return self


class QuantizationConfig(ApiModel):
    """Weight (and activation) quantization with llm-compressor."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.algorithm != 'awq' || self.scheme in ['W4A16', 'W8A16']",
                    "message": "awq is weight-only: use it with W4A16 or W8A16",
                    "fieldPath": ".algorithm",
                },
                {
                    "rule": "self.scheme != 'FP8' || self.algorithm == 'rtn'",
                    "message": "FP8 (dynamic) needs no calibration: use algorithm rtn",
                    "fieldPath": ".algorithm",
                },
            ]
        }
    )

    scheme: Scheme = Field(description="W8A16 | W4A16 | W8A8 | FP8.")
    algorithm: Literal["rtn", "gptq", "awq"] = Field(default="gptq", description="rtn | gptq | awq.")
    group_size: int = Field(default=128, ge=1, le=65536, description="Weights per quantization group.")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="Modules left unquantized.")
    calibration: DatasetRef = Field(default_factory=lambda: DatasetRef(samples=64))

    @model_validator(mode="after")
    def _rules(self) -> "QuantizationConfig":
        if self.algorithm == "awq" and self.scheme not in ("W4A16", "W8A16"):
            raise cross_field("algorithm", self.algorithm, "awq is weight-only: use it with W4A16 or W8A16")
        if self.scheme == "FP8" and self.algorithm != "rtn":
            raise cross_field("algorithm", self.algorithm, "FP8 (dynamic) needs no calibration: use algorithm rtn")
        return self


class CompressionEvaluation(ApiModel):
    """Accuracy gate of a compression job."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [ATTENTION_MAPS_VALIDATION]})

    dataset: DatasetRef = Field(default_factory=lambda: DatasetRef(split="eval"))
    samples: int = Field(default=64, ge=1, le=100000)
    attention_maps: int = Field(default=0, ge=0, le=1000, description=ATTENTION_MAPS_DESCRIPTION)
    reasoning_modes: list[Literal["on", "off"]] = Field(default_factory=lambda: ["on", "off"], max_length=2)
    min_retention: float | None = Field(
        default=None, ge=0, le=1, description="Required share of the source model's accuracy (0..1)."
    )
    max_new_tokens: int = Field(default=96, ge=1, le=32768)

    @model_validator(mode="after")
    def _maps(self) -> "CompressionEvaluation":
        check_attention_maps(self.attention_maps, self.samples)
        return self


class CompressionJobSpec(ApiModel):
    """Spec of a CompressionJob."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.pruning) || has(self.quantization)",
                    "message": "set at least one of pruning and quantization",
                }
            ]
        }
    )

    model: ModelRef = Field(description="The source model.")
    pruning: PruningConfig | None = None
    quantization: QuantizationConfig | None = None
    evaluation: CompressionEvaluation = Field(default_factory=CompressionEvaluation)
    resources: Resources = Field(default_factory=Resources)
    ray: RayTarget = Field(default_factory=RayTarget)
    mlflow: MlflowTarget = Field(default_factory=MlflowTarget)
    backoff_limit: int = Field(default=2, ge=0, le=100)
    active_deadline_seconds: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _some(self) -> "CompressionJobSpec":
        if self.pruning is None and self.quantization is None:
            raise cross_field("", None, "set at least one of pruning and quantization")
        return self


class CompressionJobStatus(StatusBase):
    """Status of a CompressionJob."""

    phase: Literal["Pending", "Submitted", "Running", "Succeeded", "Failed", "Cancelled", "Rejected"] | None = None
    submission_id: str | None = None
    ray_cluster: str | None = None
    ray_address: str | None = Field(
        default=None, description="The Ray Jobs API address the attempt was submitted to (empty: a RayJob). "
        "The operator keeps observing and stopping it there even if spec.ray.address is edited.")
    tracking_uri: str | None = Field(
        default=None, description="The MLflow tracking URI the attempt records to (kept, like rayAddress, "
        "so an edit of spec.mlflow mid-job does not lose its run).")
    experiment: str | None = Field(default=None, description="The MLflow experiment of the attempt's run.")
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    attempts: int = 0
    start_time: str | None = None
    completion_time: str | None = None
