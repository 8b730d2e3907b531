"""The typed resource API: pydantic models of every Anneal resource and CRD generation."""

from anneal.api.common import (
    DatasetRef,
    MlflowTarget,
    ModelRef,
    RayTarget,
    Resources,
    parse_duration,
    parse_quantity,
)
from anneal.api.compression import CompressionJobSpec, CompressionJobStatus
from anneal.api.distillation import DistillationJobSpec, DistillationJobStatus, JobPhase
from anneal.api.pipeline import ModelPipelineSpec, ModelPipelineStatus
from anneal.api.resources import (
    API_GROUP_VERSION,
    KINDS,
    FieldError,
    Manifest,
    ManifestError,
    parse_manifest,
    parse_spec,
)
from anneal.api.service import ModelServiceSpec, ModelServiceStatus

__all__ = [
    "API_GROUP_VERSION",
    "KINDS",
    "CompressionJobSpec",
    "CompressionJobStatus",
    "DatasetRef",
    "DistillationJobSpec",
    "DistillationJobStatus",
    "FieldError",
    "JobPhase",
    "Manifest",
    "ManifestError",
    "MlflowTarget",
    "ModelPipelineSpec",
    "ModelPipelineStatus",
    "ModelRef",
    "ModelServiceSpec",
    "ModelServiceStatus",
    "RayTarget",
    "Resources",
    "parse_duration",
    "parse_manifest",
    "parse_quantity",
]
