"""Weight (and activation) quantization with llm-compressor into compressed-tensors checkpoints.

The API's schemes map onto compressed-tensors presets (``scheme_args``, pure) and then onto an
llm-compressor recipe (``recipe_plan``, pure; ``build_recipe``): ``rtn`` is a ``QuantizationModifier`` (no data
for weight-only and dynamic-activation schemes), ``gptq`` a ``GPTQModifier`` and ``awq`` an
``AWQModifier`` (Llama-family mappings inferred by the library). The checkpoint written by
``quantize`` is what vLLM loads on GPU and ``transformers`` loads (and decompresses) on CPU.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

# Weight bits per API scheme (the physical floor of a quantized weight against bf16 is bits / 16).
WEIGHT_BITS = {"W8A16": 8, "W4A16": 4, "W8A8": 8, "FP8": 8}
# Schemes whose weights are quantized group-wise with `groupSize`; the others are per output channel.
GROUPED_SCHEMES = ("W4A16", "W8A16")
# Minimum CUDA compute capability of fast kernels for each scheme (vLLM): FP8 tensor cores arrive
# with Ada / Hopper (8.9); Marlin (W4A16 / W8A16) needs Ampere (8.0); int8 GEMMs need Turing (7.5).
MIN_COMPUTE_CAPABILITY = {"FP8": 8.9, "W4A16": 8.0, "W8A16": 8.0, "W8A8": 7.5}


@dataclass(frozen=True)
class QuantPlan:
    """The quantization part of a spec, snake_cased (what a Ray task needs)."""

    scheme: str
    algorithm: str = "gptq"
    group_size: int = 128
    ignore: tuple[str, ...] = ("lm_head",)

    @classmethod
    def from_spec(cls, q: Any) -> "QuantPlan":
        return cls(scheme=q.scheme, algorithm=q.algorithm, group_size=q.group_size, ignore=tuple(q.ignore))

    @property
    def needs_data(self) -> bool:
        """GPTQ and AWQ calibrate on data; RTN with static weights and dynamic activations does not."""
        return self.algorithm in ("gptq", "awq")


def scheme_args(scheme: str, group_size: int) -> dict[str, dict[str, Any]]:
    """The compressed-tensors quantization arguments of an API scheme.

    Args:
        scheme: ``W8A16`` | ``W4A16`` | ``W8A8`` | ``FP8``.
        group_size: weights per scale for the group-wise schemes (W4A16, W8A16).

    Returns:
        ``{"weights": {...}, "input_activations": {...}}`` (the latter only for W8A8 / FP8),
        as keyword arguments of ``compressed_tensors.quantization.QuantizationArgs``.
    """
    if scheme in GROUPED_SCHEMES:
        return {
            "weights": {
                "num_bits": WEIGHT_BITS[scheme], "type": "int", "symmetric": True,
                "strategy": "group", "group_size": group_size,
            }
        }
    if scheme == "W8A8":
        kind = "int"
    elif scheme == "FP8":
        kind = "float"
    else:
        raise ValueError(f"spec.quantization.scheme: {scheme!r} is not one of W8A16, W4A16, W8A8, FP8")
    return {
        "weights": {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "channel"},
        # dynamic per-token activation scales: computed at run time, so no calibration is needed
        "input_activations": {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "token", "dynamic": True},
    }


def recipe_plan(plan: QuantPlan) -> list[tuple[str, dict[str, Any]]]:
    """The llm-compressor recipe of `plan` as ``[(modifier class name, keyword arguments)]`` (pure).

    ``rtn`` → ``QuantizationModifier``; ``gptq`` → ``GPTQModifier``; ``awq`` → the AWQ smoothing
    transform (``AWQModifier``, mappings inferred for Llama-family models) followed by a
    ``QuantizationModifier``, as llm-compressor 0.14 composes it.
    """
    groups = {"group_0": {"targets": ["Linear"], **scheme_args(plan.scheme, plan.group_size)}}
    quant: dict[str, Any] = {"config_groups": groups, "ignore": list(plan.ignore)}
    if plan.algorithm == "rtn":
        return [("QuantizationModifier", quant)]
    if plan.algorithm == "gptq":
        return [("GPTQModifier", quant)]
    if plan.algorithm == "awq":
        return [("AWQModifier", {}), ("QuantizationModifier", quant)]
    raise ValueError(f"spec.quantization.algorithm: {plan.algorithm!r} is not one of rtn, gptq, awq")


def build_recipe(plan: QuantPlan) -> list[Any]:
    """The llm-compressor modifiers of `plan` (see `recipe_plan`)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    classes = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier, "AWQModifier": AWQModifier}
    out = []
    for name, kwargs in recipe_plan(plan):
        kwargs = dict(kwargs)
        if "config_groups" in kwargs:
            kwargs["config_groups"] = {
                key: QuantizationScheme(
                    targets=group["targets"],
                    **{k: QuantizationArgs(**v) for k, v in group.items() if k != "targets"},
                )
                for key, group in kwargs["config_groups"].items()
            }
        out.append(classes[name](**kwargs))
    return out


def calibration_dataset(tokenizer: Any, samples: Sequence[Any], max_seq_length: int) -> Any:
    """A ``datasets.Dataset`` of tokenized calibration samples (prompt + completion)."""
    from datasets import Dataset

    from anneal.data.datasets import tokenize_sample

    rows = []
    for s in samples:
        t = tokenize_sample(tokenizer, s, max_seq_length)
        rows.append({"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]})
    return Dataset.from_list(rows)


def quantize(model_dir: Path, out_dir: Path, plan: QuantPlan, calibration: Sequence[Any] | None,
             max_seq_length: int = 256) -> dict[str, Any]:
    """Quantize the checkpoint in `model_dir` into a compressed-tensors checkpoint in `out_dir`.

    Args:
        model_dir: a Hugging Face checkpoint (loaded in its own dtype).
        out_dir: where the compressed checkpoint (and tokenizer) is written.
        plan: scheme, algorithm, group size, ignored modules.
        calibration: anneal.data Samples for GPTQ / AWQ (ignored by data-free RTN).
        max_seq_length: token cap per calibration sample.

    Returns:
        Figures: ``calibrationSamples`` and ``quantizedModules``.
    """
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.modeling.layerwise_llama import register as register_anneal_llama

    register_anneal_llama()  # model_type anneal_llama (attention removal, FFN fusion)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    kwargs: dict[str, Any] = {}
    n = 0
    if plan.needs_data:
        if not calibration:
            raise ValueError(f"spec.quantization.calibration: algorithm {plan.algorithm!r} needs calibration samples")
        kwargs = {
            "dataset": calibration_dataset(tokenizer, calibration, max_seq_length),
            "num_calibration_samples": len(calibration),
            "max_seq_length": max_seq_length,
        }
        n = len(calibration)
    torch.manual_seed(0)
    with _cpu_safe_pinning(plan):
        oneshot(model=model, recipe=build_recipe(plan), **kwargs)
    quantized = sum(1 for _, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    return {"calibrationSamples": n, "quantizedModules": quantized}


@contextlib.contextmanager
def _cpu_safe_pinning(plan: QuantPlan) -> Iterator[None]:
    """Let AWQ run on CPU-only workers.

    llm-compressor 0.14's AWQ pins its cached calibration tensors before the grid search, which
    raises "Found no NVIDIA driver" without CUDA. Pinning only speeds host-to-device copies,
    so without a GPU it is skipped for the duration of the call.
    """
    import torch

    if plan.algorithm != "awq" or torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


# ----------------------------------------------------------------------- size accounting

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of the weight files of a checkpoint (config and tokenizer files left out)."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def tensor_bytes(model_dir: Path) -> dict[str, tuple[int, str, tuple[int, ...]]]:
    """``{tensor name: (bytes, dtype, shape)}`` of every tensor in a checkpoint's safetensors files."""
    import json
    import struct

    out: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = (end - start, info["dtype"], tuple(info["shape"]))
    return out


# parts of one quantized Linear in a compressed-tensors checkpoint
_QUANT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape",
                "input_scale", "input_zero_point", "weight")


def linear_size_figures(compressed: Mapping[str, tuple[int, str, tuple[int, ...]]],
                        source: Mapping[str, tuple[int, str, tuple[int, ...]]]) -> dict[str, float]:
    """Bytes of the quantized Linear layers against the same weights in bf16.

    A module counts as quantized when the compressed checkpoint has a ``weight_scale`` for it.
    ``quantizedLinearRatio`` = (packed weights + scales + zero points) / (parameters × 2 bytes),
    the figure to hold against the physical floor (bits / 16).

    Args:
        compressed: `tensor_bytes` of the compressed checkpoint.
        source: `tensor_bytes` of the checkpoint it was made from (for parameter counts).

    Returns:
        ``quantizedLinearBytes``, ``quantizedLinearBf16Bytes``, ``quantizedLinearRatio``,
        ``quantizedModules`` (0 and no ratio when nothing was quantized).
    """
    modules = sorted({name.rsplit(".", 1)[0] for name in compressed if name.endswith(".weight_scale")})
    qbytes = 0
    params = 0
    for m in modules:
        for part in _QUANT_PARTS:
            entry = compressed.get(f"{m}.{part}")
            if entry is not None:
                qbytes += entry[0]
        src = source.get(f"{m}.weight")
        if src is not None:
            n = 1
            for d in src[2]:
                n *= d
            params += n
    out: dict[str, float] = {"quantizedModules": float(len(modules)), "quantizedLinearBytes": float(qbytes)}
    if params:
        out["quantizedLinearBf16Bytes"] = float(params * 2)
        out["quantizedLinearRatio"] = qbytes / (params * 2)
    return out


def physical_floor(scheme: str) -> float:
    """Size of a quantized weight against bf16, scales left out: bits / 16 (0.25 for 4-bit, 0.5 for 8-bit)."""
    return WEIGHT_BITS[scheme] / 16
