"""DistillationJob: train a student from labels (sft), on raw text (cpt) or from a teacher (kd, lora-kd, kd-rl)."""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from anneal.api.common import (
    ApiModel,
    DatasetRef,
    MlflowTarget,
    ModelRef,
    RayTarget,
    ResourceRef,
    Resources,
    StatusBase,
    cross_field,
)

Method = Literal["sft", "cpt", "kd", "lora-kd", "kd-rl"]

#: Methods that train without a teacher (cpt mixes in the KD term when one is given).
TEACHER_OPTIONAL = ("sft", "cpt")


class StudentConfig(ApiModel):
    """A fresh (randomly initialised) student architecture; the tokenizer comes from the teacher."""

    architecture: Literal["llama"] = Field(default="llama", description="Model family.")
    hidden_size: int = Field(ge=8, le=65536, description="Hidden size.")
    layers: int = Field(ge=1, le=512, description="Decoder layers.")
    heads: int = Field(ge=1, le=1024, description="Attention heads.")
    kv_heads: int | None = Field(default=None, ge=1, le=1024, description="KV heads (GQA); default heads.")
    intermediate_size: int | None = Field(
        default=None, ge=1, le=262144, description="FFN size; default 4 × hiddenSize (rounded)."
    )
    max_position_embeddings: int = Field(default=512, ge=16, le=1048576)

    @model_validator(mode="after")
    def _shapes(self) -> "StudentConfig":
        if self.hidden_size % self.heads:
            raise cross_field(
                "hiddenSize", self.hidden_size, f"must be divisible by heads ({self.heads})"
            )
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise cross_field("kvHeads", self.kv_heads, f"must divide heads ({self.heads})")
        return self


class DepthPlan(ApiModel):
    """Depth pruning: which decoder layers to keep."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.keepLayers), has(self.dropLayers), has(self.ratio)]"
                    ".filter(x, x).size() == 1",
                    "message": "exactly one of keepLayers, dropLayers or ratio must be set",
                }
            ]
        }
    )

    keep_layers: int | list[int] | None = Field(
        default=None,
        description="How many layers to keep (the most important ones), or their explicit indices.",
    )
    drop_layers: int | list[int] | None = Field(
        default=None, description="How many layers to drop (the least important), or their indices."
    )
    ratio: float | None = Field(
        default=None, gt=0, le=1, description="Share of layers to keep (0 < ratio <= 1)."
    )

    @model_validator(mode="after")
    def _one(self) -> "DepthPlan":
        chosen = [n for n in ("keep_layers", "drop_layers", "ratio") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise cross_field("", chosen or None, "exactly one of keepLayers, dropLayers or ratio must be set")
        for name in ("keep_layers", "drop_layers"):
            value = getattr(self, name)
            alias = "keepLayers" if name == "keep_layers" else "dropLayers"
            if isinstance(value, int) and value < (1 if name == "keep_layers" else 0):
                raise cross_field(alias, value, "must be >= 1" if name == "keep_layers" else "must be >= 0")
            if isinstance(value, list):
                if not value and name == "keep_layers":
                    raise cross_field(alias, value, "must keep at least one layer")
                if any(i < 0 for i in value) or len(set(value)) != len(value):
                    raise cross_field(alias, value, "layer indices must be unique and >= 0")
        return self


class WidthPlan(ApiModel):
    """Width pruning: shares of FFN channels, attention heads and hidden channels to keep."""

    ffn_ratio: float = Field(default=1.0, gt=0, le=1, description="Share of FFN channels kept.")
    heads_ratio: float = Field(default=1.0, gt=0, le=1, description="Share of attention heads kept.")
    hidden_ratio: float = Field(default=1.0, gt=0, le=1, description="Share of hidden channels kept.")


class StructuredPruning(ApiModel):
    """Depth and/or width pruning by importance measured on calibration data (Minitron)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.depth) || has(self.width)", "message": "set depth and/or width"}
            ]
        }
    )

    depth: DepthPlan | None = None
    width: WidthPlan | None = None
    calibration: DatasetRef = Field(
        default_factory=lambda: DatasetRef(samples=64),
        description="Batches on which layer / channel importance is measured.",
    )

    @model_validator(mode="after")
    def _some(self) -> "StructuredPruning":
        if self.depth is None and self.width is None:
            raise cross_field("", None, "set depth and/or width")
        return self


class FromTeacher(StructuredPruning):
    """A student derived from the teacher by depth and/or width pruning (Minitron)."""


class StudentSpec(ApiModel):
    """The student: exactly one of uri, fromResource, fromStage, config or fromTeacher."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.uri), has(self.fromResource), has(self.fromStage), "
                    "has(self.config), has(self.fromTeacher)].filter(x, x).size() == 1",
                    "message": "exactly one of uri, fromResource, fromStage, config or fromTeacher must be set",
                }
            ]
        }
    )

    uri: str | None = Field(default=None, max_length=2048, description="Start from an existing model.")
    from_resource: ResourceRef | None = Field(default=None, description="Start from another resource's output.")
    from_stage: str | None = Field(default=None, max_length=63, description="Pipeline only: an earlier stage's output.")
    config: StudentConfig | None = Field(default=None, description="A fresh student of this shape.")
    from_teacher: FromTeacher | None = Field(default=None, description="Prune the teacher into the student.")

    @model_validator(mode="after")
    def _one(self) -> "StudentSpec":
        names = ("uri", "from_resource", "from_stage", "config", "from_teacher")
        chosen = [n for n in names if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise cross_field(
                "", chosen or None, "exactly one of uri, fromResource, fromStage, config or fromTeacher must be set"
            )
        return self

    def model_ref(self) -> ModelRef | None:
        """The student as a ModelRef when it starts from an existing model."""
        if self.uri or self.from_resource or self.from_stage:
            return ModelRef.model_construct(
                uri=self.uri, from_resource=self.from_resource, from_stage=self.from_stage
            )
        return None


class KDConfig(ApiModel):
    """The knowledge-distillation loss."""

    loss: Literal["forward-kl", "reverse-kl", "jsd"] = Field(default="forward-kl", description="Divergence.")
    temperature: float = Field(default=1.0, gt=0, le=100, description="Softmax temperature (>0); loss scaled by T².")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KD term against cross-entropy.")
    chunk_size: int = Field(default=1024, ge=1, le=1048576, description="Tokens per loss chunk.")


class LoraConfig(ApiModel):
    """LoRA branches for lora-kd (LLM-NEO)."""

    rank: int = Field(default=16, ge=1, le=4096, description="LoRA rank (>=1).")
    alpha: float = Field(default=32, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names that get LoRA branches.",
    )
    merge: bool = Field(default=True, description="Merge the branches into the weights after training.")


class RLConfig(ApiModel):
    """Hybrid KD + RL (group-relative policy optimisation)."""

    algorithm: Literal["grpo"] = "grpo"
    reward: str = Field(
        default="exact-answer",
        pattern=r"^(exact-answer|python:[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$",
        max_length=256,
        description="exact-answer (built-in data) or python:module:function.",
    )
    group_size: int = Field(default=4, ge=2, le=256, description="Samples per prompt (>=2).")
    kd_coef: float = Field(default=0.1, ge=0, description="Weight of the KD term.")
    kl_coef: float = Field(default=0.02, ge=0, description="Weight of the KL to the starting policy.")
    max_new_tokens: int = Field(default=64, ge=1, le=32768, description="Generation length per sample.")
    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature.")


#: Methods FSDP can shard. lora-kd trains adapters small enough for DDP; kd-rl generates with the
#: policy, and sharded generation would need every worker to decode in lockstep.
FSDP_METHODS = ("sft", "cpt", "kd")
FSDP_METHODS_RULE = "strategy fsdp is supported for methods sft, cpt and kd; use ddp for lora-kd and kd-rl"
EVAL_ACCURACY_FORMAT_RULE = (
    "accuracy is scored on questions with checkable answers: use format chat or prompt-completion"
)
IMPORT_RULE = (
    "training.steps: 0 imports a model without training: it needs method sft and a student that exists "
    "(student.uri, fromResource or fromStage)"
)
CPT_FORMAT_RULE = (
    "method cpt trains on raw text (next-token loss on every token, documents packed into maxSeqLength "
    "blocks): set format: text (jsonl records with a 'text' field, or builtin://reasoning rendered as text)"
)


class TrainingConfig(ApiModel):
    """The optimisation loop."""

    steps: int | None = Field(
        default=None,
        ge=0,
        description="Optimizer steps (default 100 if no epochs). 0, for sft from an existing student (uri, "
        "fromResource, fromStage): no training, the model is evaluated and registered as it is (an import).",
    )
    epochs: float | None = Field(default=None, gt=0, description="Passes over the data set.")
    batch_size: int = Field(default=8, ge=1, le=65536, description="Samples per step per worker.")
    gradient_accumulation: int = Field(default=1, ge=1, le=1024)
    learning_rate: float = Field(default=1e-3, gt=0, le=10)
    warmup_steps: int = Field(default=0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="Compute precision. bf16/fp16 keep fp32 master weights and optimizer state; "
        "bf16 also writes the output model in bf16.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="How resources.workers share the student: ddp (a full copy per worker) or fsdp "
        "(FSDP2 fully_shard: parameters, gradients and optimizer state sharded across workers).",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (less memory, ~30% more compute)."
    )
    seed: int = Field(default=0, ge=0)
    checkpoint_every: int | None = Field(default=None, ge=1, description="Checkpoint every N steps.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainingConfig":
        if self.steps is not None and self.epochs is not None:
            raise cross_field("epochs", self.epochs, "set steps or epochs, not both")
        return self


#: The rule of `evaluation.attentionMaps`, shared by DistillationJob and CompressionJob.
ATTENTION_MAPS_RULE = "attentionMaps must be at most evaluation.samples (it maps that many evaluated answers)"
ATTENTION_MAPS_DESCRIPTION = (
    "Render the attention of the answer tokens over the prompt for this many evaluation questions "
    "(PNG + HTML, logged to the job's MLflow run under explain/, with the numberAttention figure); 0: off."
)
ATTENTION_MAPS_VALIDATION = {
    "rule": "!has(self.attentionMaps) || self.attentionMaps <= (has(self.samples) ? self.samples : 64)",
    "message": ATTENTION_MAPS_RULE,
    "fieldPath": ".attentionMaps",
}


def check_attention_maps(attention_maps: int, samples: int) -> None:
    """`evaluation.attentionMaps` <= `evaluation.samples`, or a field error naming both."""
    if attention_maps > samples:
        raise cross_field("attentionMaps", attention_maps, f"{ATTENTION_MAPS_RULE} ({samples})")


class EvaluationConfig(ApiModel):
    """What is measured after training."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [ATTENTION_MAPS_VALIDATION]})

    samples: int = Field(default=64, ge=1, le=100000, description="Evaluation problems per mode.")
    attention_maps: int = Field(default=0, ge=0, le=1000, description=ATTENTION_MAPS_DESCRIPTION)
    reasoning_modes: list[Literal["on", "off"]] = Field(default_factory=lambda: ["on", "off"], max_length=2)
    metrics: list[Literal["accuracy", "perplexity"]] = Field(
        default_factory=lambda: ["accuracy", "perplexity"], max_length=2
    )
    max_new_tokens: int = Field(default=96, ge=1, le=32768, description="Generation cap when scoring answers.")
    dataset: DatasetRef | None = Field(
        default=None,
        description="Where accuracy is scored (records with checkable answers). Default: evalDataset, or the "
        "training data's eval split; for cpt (raw text): the built-in task's eval split in chat form when the "
        "training data is built-in, else no accuracy unless set.",
    )

    @model_validator(mode="after")
    def _maps(self) -> "EvaluationConfig":
        check_attention_maps(self.attention_maps, self.samples)
        return self


class DistillationJobSpec(ApiModel):
    """Spec of a DistillationJob."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.method == 'sft' || self.method == 'cpt' || has(self.teacher)",
                    "message": "teacher is required for every method but sft and cpt",
                    "fieldPath": ".teacher",
                },
                {
                    "rule": "!has(self.student.fromTeacher) || has(self.teacher)",
                    "message": "student.fromTeacher needs a teacher",
                    "fieldPath": ".student.fromTeacher",
                },
                {
                    "rule": "!has(self.training) || !has(self.training.strategy) || self.training.strategy != 'fsdp'"
                    " || self.method == 'sft' || self.method == 'cpt' || self.method == 'kd'",
                    "message": FSDP_METHODS_RULE,
                    "fieldPath": ".training.strategy",
                },
                {
                    "rule": "!has(self.training) || !has(self.training.steps) || self.training.steps > 0 || "
                    "(self.method == 'sft' && (has(self.student.uri) || has(self.student.fromResource) || "
                    "has(self.student.fromStage)))",
                    "message": IMPORT_RULE,
                    "fieldPath": ".training.steps",
                },
                {
                    "rule": "self.method != 'cpt' || (has(self.dataset) && has(self.dataset.format)"
                    " && self.dataset.format == 'text')",
                    "message": CPT_FORMAT_RULE,
                    "fieldPath": ".dataset.format",
                },
                {
                    "rule": "self.method != 'cpt' || !has(self.evalDataset) || !has(self.evalDataset.format)"
                    " || self.evalDataset.format == 'text'",
                    "message": "method cpt measures perplexity on held-out raw text: evalDataset.format must be "
                    "text (score accuracy on another data set with evaluation.dataset)",
                    "fieldPath": ".evalDataset.format",
                },
                {
                    "rule": "!has(self.evaluation) || !has(self.evaluation.dataset) || "
                    "!has(self.evaluation.dataset.format) || self.evaluation.dataset.format != 'text'",
                    "message": EVAL_ACCURACY_FORMAT_RULE,
                    "fieldPath": ".evaluation.dataset.format",
                },
            ]
        }
    )

    method: Method = Field(
        description="sft (labels only) | cpt (continued pretraining: next-token loss on raw text, plus the KD "
        "term when a teacher is given) | kd | lora-kd | kd-rl."
    )
    teacher: ModelRef | None = Field(
        default=None, description="Required for every method but sft and cpt (cpt with a teacher adds the KD term)."
    )
    student: StudentSpec = Field(description="The model being trained.")
    kd: KDConfig = Field(default_factory=KDConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    dataset: DatasetRef = Field(default_factory=DatasetRef)
    eval_dataset: DatasetRef | None = Field(
        default=None,
        description="Default: the training data set's `eval` split. For cpt: the held-out raw text perplexity is "
        "measured on (default: the built-in task's eval split, or the last tenth of a file's documents).",
    )
    reasoning_toggle: bool | None = Field(
        default=None,
        description="Whether the student is trained and scored with the reasoning toggle's system message "
        "(\"detailed thinking on/off\"). Unset: as the student's starting model declares (config.json "
        "anneal_reasoning_toggle; a model in Anneal's own chat format takes it, one with a chat template of its own "
        "does not unless it declares it); a fresh or derived student follows the teacher, or takes it without one. "
        "The output model declares what it was trained with.",
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    resources: Resources = Field(default_factory=Resources)
    ray: RayTarget = Field(default_factory=RayTarget)
    mlflow: MlflowTarget = Field(default_factory=MlflowTarget)
    backoff_limit: int = Field(default=2, ge=0, le=100, description="Retries after a failure.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Wall-clock limit.")

    @model_validator(mode="after")
    def _rules(self) -> "DistillationJobSpec":
        if self.method not in TEACHER_OPTIONAL and self.teacher is None:
            raise cross_field("teacher", None, f"teacher is required for method {self.method!r}")
        if self.method == "cpt":
            if self.dataset.format != "text":
                raise cross_field("dataset.format", self.dataset.format, CPT_FORMAT_RULE)
            if self.eval_dataset is not None and self.eval_dataset.format != "text":
                raise cross_field(
                    "evalDataset.format", self.eval_dataset.format,
                    "method cpt measures perplexity on held-out raw text: set format: text "
                    "(score accuracy on another data set with evaluation.dataset)",
                )
        ev_data = self.evaluation.dataset
        if ev_data is not None and ev_data.format == "text":
            raise cross_field("evaluation.dataset.format", ev_data.format, EVAL_ACCURACY_FORMAT_RULE)
        if self.student.from_teacher is not None and self.teacher is None:
            raise cross_field("student.fromTeacher", "set", "a student derived from the teacher needs spec.teacher")
        if self.training.steps == 0 and (self.method != "sft" or self.student.model_ref() is None):
            raise cross_field("training.steps", 0, IMPORT_RULE)
        if self.training.strategy == "fsdp" and self.method not in FSDP_METHODS:
            raise cross_field("training.strategy", "fsdp", FSDP_METHODS_RULE)
        return self

    @property
    def imports(self) -> bool:
        """An import: sft for zero steps, so the student is evaluated and registered as it is."""
        return self.training.steps == 0

    def eval_dataset_ref(self) -> DatasetRef:
        """The evaluation data set: `evalDataset`, or the training data's `eval` split."""
        if self.eval_dataset is not None:
            return self.eval_dataset
        return self.dataset.model_copy(update={"split": "eval", "samples": None})

    def accuracy_dataset_ref(self) -> DatasetRef | None:
        """Where accuracy is scored: `evaluation.dataset`, else the evaluation data set.

        A cpt job's data is raw text, with no questions to answer: its accuracy is scored on the
        built-in task's eval split in chat form when it trains on the built-in task, else only
        when `evaluation.dataset` is set (None: no accuracy).
        """
        if self.evaluation.dataset is not None:
            return self.evaluation.dataset
        if self.method != "cpt":
            return self.eval_dataset_ref()
        if self.dataset.uri.startswith("builtin://"):
            return self.dataset.model_copy(update={"split": "eval", "samples": None, "format": "chat"})
        return None


class JobPhase(str, enum.Enum):
    PENDING = "Pending"
    SUBMITTED = "Submitted"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    REJECTED = "Rejected"


TERMINAL_JOB_PHASES = {JobPhase.SUCCEEDED.value, JobPhase.FAILED.value, JobPhase.CANCELLED.value, JobPhase.REJECTED.value}


class Progress(ApiModel):
    model_config = ConfigDict(extra="allow")

    step: int = 0
    total_steps: int | None = None
    loss: float | None = None


class DistillationJobStatus(StatusBase):
    """Status of a DistillationJob."""

    phase: Literal["Pending", "Submitted", "Running", "Succeeded", "Failed", "Cancelled"] | None = None
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
    progress: Progress | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    attempts: int = 0
    start_time: str | None = None
    completion_time: str | None = None
