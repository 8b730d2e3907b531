"""Pre-flight checks of a CompressionJob: what will not work (errors) or not as hoped (warnings).

Two passes. `static_advice(spec)` needs the spec alone (used by `anneal validate` and before a
job starts): the scheme against the target hardware, settings that will be ignored, a missing
gate. `check_model(spec, config)` needs the source model's config (no weights): the shape the
pruning plan leaves (a plan that leaves nothing is an error naming the field), group sizes
that do not divide the quantized layers' input widths, `ignore` names that match no module, and
the memory calibration needs against `resources.memory`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from typing import Any

from anneal.compress.quantization import GROUPED_SCHEMES, MIN_COMPUTE_CAPABILITY

# CUDA compute capability of common accelerator types (`resources.acceleratorType`).
ACCELERATOR_CC = {
    "B200": 10.0, "B100": 10.0, "GH200": 9.0, "H200": 9.0, "H100": 9.0, "H800": 9.0, "H20": 9.0,
    "L40S": 8.9, "L40": 8.9, "L4": 8.9, "RTX4090": 8.9, "RTX6000ADA": 8.9,
    "A100": 8.0, "A800": 8.0, "A30": 8.0, "A40": 8.6, "A10G": 8.6, "A10": 8.6, "RTX3090": 8.6,
    "T4": 7.5, "V100": 7.0, "P100": 6.0,
}
GIB = 1024**3
# A Ray worker with torch, transformers and llm-compressor imported, before any model is loaded.
RUNTIME_OVERHEAD_BYTES = int(1.5 * GIB)


class PreflightError(ValueError):
    """The spec cannot work on this model; the message names the field, the value and the rule."""


def compute_capability(accelerator_type: str | None) -> float | None:
    """The compute capability of an accelerator type such as ``H100``, ``nvidia-l4`` or ``A100-80GB``."""
    if not accelerator_type:
        return None
    key = re.sub(r"[^A-Z0-9]", "", accelerator_type.upper()).removeprefix("NVIDIA").removeprefix("TESLA")
    for name in sorted(ACCELERATOR_CC, key=len, reverse=True):
        if key.startswith(name):
            return ACCELERATOR_CC[name]
    return None


def hardware_warnings(scheme: str, gpus_per_worker: float, accelerator_type: str | None) -> list[str]:
    """Warnings about running `scheme` fast on the target hardware (the model is produced either way)."""
    need = MIN_COMPUTE_CAPABILITY[scheme]
    field_ = "spec.quantization.scheme"
    if gpus_per_worker == 0:
        if scheme == "FP8":
            return [
                f"{field_}: 'FP8' on a CPU-only job: the model is produced and evaluated (FP8 weights are "
                f"upcast on CPU, slowly), but runs fast only on GPUs with compute capability >= {need} "
                "(Ada / Hopper: L4, L40S, H100, H200)"
            ]
        return []
    cc = compute_capability(accelerator_type)
    if cc is None:
        if scheme == "FP8" and not accelerator_type:
            return [
                f"{field_}: 'FP8' needs compute capability >= {need}; set spec.resources.acceleratorType "
                "(e.g. H100, L4) so the job is scheduled on such a GPU"
            ]
        return []
    if cc < need:
        extra = " (vLLM falls back to FP8 weight-only Marlin kernels on Ampere)" if scheme == "FP8" and cc >= 8.0 else ""
        return [
            f"{field_}: {scheme!r} needs compute capability >= {need} for fast kernels; "
            f"spec.resources.acceleratorType {accelerator_type!r} has {cc}{extra}"
        ]
    return []


def static_advice(spec: Any) -> list[str]:
    """Warnings from a parsed `CompressionJobSpec` alone (no model needed)."""
    out: list[str] = []
    q = spec.quantization
    if q is not None:
        out += hardware_warnings(q.scheme, spec.resources.gpus_per_worker, spec.resources.accelerator_type)
        if q.scheme not in GROUPED_SCHEMES and "group_size" in q.model_fields_set:
            out.append(
                f"spec.quantization.groupSize: set, but {q.scheme} quantizes weights per output channel "
                f"(groupSize applies to {' and '.join(GROUPED_SCHEMES)}); it is ignored"
            )
        if q.algorithm == "rtn" and "calibration" in q.model_fields_set:
            out.append("spec.quantization.calibration: set, but algorithm 'rtn' needs no calibration data; it is ignored")
    p = spec.pruning
    if p is not None and p.recovery is None:
        out.append(
            "spec.pruning.recovery: not set: pruned models usually lose accuracy that a short distillation "
            "from the unpruned model recovers (Minitron); consider recovery: {steps: 100}"
        )
    if spec.evaluation.min_retention is None:
        out.append("spec.evaluation.minRetention: not set: the job reports retention but never rejects a model")
    return out


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that pre-flight needs (from config.json)."""

    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool = False
    no_attention: tuple[int, ...] | None = None  # an anneal_llama's blocks without attention
    attention_free: int = 0  # blocks without attention (counted in params())

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "ModelShape":
        heads = c["num_attention_heads"]
        return cls(
            layers=c["num_hidden_layers"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab_size=c.get("vocab_size", 32000),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            no_attention=(tuple(c.get("no_attention_layers") or ()) if c.get("model_type") == "anneal_llama"
                          else None),
            attention_free=len(c.get("no_attention_layers") or ()) if c.get("model_type") == "anneal_llama" else 0,
        )

    def linear_in_features(self) -> dict[str, int]:
        """Input width of each kind of decoder Linear (what a quantization group divides)."""
        return {
            "self_attn.q_proj": self.hidden_size, "self_attn.k_proj": self.hidden_size,
            "self_attn.v_proj": self.hidden_size, "self_attn.o_proj": self.heads * self.head_dim,
            "mlp.gate_proj": self.hidden_size, "mlp.up_proj": self.hidden_size,
            "mlp.down_proj": self.intermediate_size,
        }

    def params(self) -> int:
        """Parameters (Llama layout)."""
        h, q, kv = self.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        attention = 2 * h * q + 2 * h * kv + h  # projections and input norm of one block
        return self.layers * per_layer - self.attention_free * attention + embeddings + h


def pruned_shape(shape: ModelShape, pruning: dict[str, Any], field_prefix: str = "spec.pruning") -> ModelShape:
    """The shape `pruning` (the API mapping ``{depth, width}``) leaves, by the rules of `anneal.compress.pruning`.

    Raises:
        PruningError: the plan leaves nothing (no layer, channel or head), naming the field.
    """
    from anneal.compress import pruning as P

    plan = P.PruningPlan.from_spec(pruning, field_prefix=field_prefix)
    depth = P.resolve_depth(shape.layers, plan.keep_layers, plan.drop_layers, plan.depth_ratio, f"{field_prefix}.depth")
    layers = depth if isinstance(depth, int) else len(depth)
    if plan.removes_attention:
        from anneal.compress.ffn_fusion import resolve_attention

        # block indices count the blocks left after depth pruning; at least one keeps attention
        without = (shape.no_attention or ()) if layers == shape.layers else ()
        plan_ = resolve_attention(layers, without, plan.attention_drop, plan.attention_ratio,
                                  f"{field_prefix}.attention")
        kept = plan_ if isinstance(plan_, int) else layers - len(set(without) | set(plan_))
        out_free = layers - kept
    if shape.no_attention is not None and (plan.prunes_depth or plan.prunes_width):
        raise P.PruningError(f"{field_prefix}.{'depth' if plan.prunes_depth else 'width'}", "set",
                             "the model has blocks without attention or of different FFN widths (model_type "
                             "anneal_llama); depth and width pruning take a uniform Llama: prune them in the same "
                             "job as the attention removal, or before it")
    out = replace(shape, layers=layers, attention_free=out_free if plan.removes_attention else shape.attention_free)
    if plan.prunes_width:
        w = f"{field_prefix}.width"
        ffn = P._count(shape.intermediate_size, plan.ffn_ratio, f"{w}.ffnRatio")
        groups = P._count(shape.kv_heads, plan.heads_ratio, f"{w}.headsRatio")
        heads = groups * (shape.heads // shape.kv_heads)
        if plan.hidden_ratio == 1.0 and shape.hidden_size % heads:
            raise P.PruningError(f"{w}.headsRatio", plan.heads_ratio,
                                 f"keeps {heads} attention heads, which do not divide hiddenSize {shape.hidden_size}")
        hidden = P._count(shape.hidden_size, plan.hidden_ratio, f"{w}.hiddenRatio", multiple_of=heads)
        out = replace(out, intermediate_size=ffn, kv_heads=groups, heads=heads, hidden_size=hidden)
    return out


def group_size_errors(shape: ModelShape, scheme: str, group_size: int, ignore: list[str]) -> list[str]:
    """A message per Linear kind whose input width `group_size` does not divide (group-wise schemes only)."""
    if scheme not in GROUPED_SCHEMES:
        return []
    bad = {name: n for name, n in shape.linear_in_features().items() if n % group_size and not _ignored(name, ignore)}
    if not bad:
        return []
    widths = sorted(set(shape.linear_in_features().values()))
    divisors = [g for g in (256, 128, 64, 32, 16) if all(n % g == 0 for n in widths)]
    hint = f"choose one that divides {widths}, e.g. {divisors[0]}" if divisors else f"no common group size divides {widths}"
    detail = ", ".join(f"{k} has {v}" for k, v in sorted(bad.items()))
    return [f"spec.quantization.groupSize: {group_size} does not divide the input width of every quantized layer "
            f"({detail}); {hint}"]


def _ignored(kind: str, ignore: list[str]) -> bool:
    return any(i.startswith("re:") and re.search(i[3:], f"model.layers.0.{kind}") for i in ignore) or any(
        i.endswith(kind) for i in ignore if not i.startswith("re:")
    )


def module_names(config: dict[str, Any], shape: ModelShape) -> tuple[set[str], set[str]]:
    """(module names, module class names) of the model `config` describes, resized to `shape` (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("quantization_config", "transformers_version")})
    cfg.num_hidden_layers = shape.layers
    cfg.hidden_size, cfg.intermediate_size = shape.hidden_size, shape.intermediate_size
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = shape.heads, shape.kv_heads, shape.head_dim
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[: shape.layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names = {n for n, _ in model.named_modules() if n}
    classes = {type(m).__name__ for _, m in model.named_modules()}
    return names, classes


def unknown_ignores(ignore: list[str], names: set[str], classes: set[str]) -> list[str]:
    """A warning per `ignore` entry that matches no module name, ``re:`` pattern match or class name."""
    out = []
    for i, entry in enumerate(ignore):
        if entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as exc:
                out.append(f"spec.quantization.ignore[{i}]: {entry!r} is not a valid regular expression ({exc})")
                continue
            if not any(pattern.match(n) for n in names):
                out.append(f"spec.quantization.ignore[{i}]: {entry!r} matches no module of the model")
            continue
        if entry in names or entry in classes:
            continue
        close = difflib.get_close_matches(entry, sorted(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; use a module name (e.g. lm_head) or re:<pattern>"
        out.append(f"spec.quantization.ignore[{i}]: {entry!r} matches no module of the model{hint}")
    return out


def calibration_memory_bytes(shape: ModelShape, algorithm: str | None, samples: int, seq_len: int,
                             dtype_bytes: int = 4, recovery_batch: int = 0) -> int:
    """Peak memory estimate of one compression worker.

    Two copies of the weights (the model being compressed and the source kept for evaluation
    / recovery), GPTQ's Hessians for one decoder layer (``in_features² × 4`` bytes per Linear,
    llm-compressor's sequential pipeline calibrates a layer at a time), the cached layer
    inputs and outputs of every calibration sample, AdamW state for recovery (3 × weights),
    and the runtime itself.
    """
    weights = shape.params() * dtype_bytes
    total = 2 * weights + RUNTIME_OVERHEAD_BYTES
    if algorithm in ("gptq", "awq"):
        total += 2 * samples * seq_len * shape.hidden_size * dtype_bytes
    if algorithm == "gptq":
        total += sum(n * n * 4 for n in shape.linear_in_features().values())
    if recovery_batch:
        total += 3 * shape.params() * 4 + recovery_batch * seq_len * shape.vocab_size * 4 * 2
    return int(total)


@dataclass
class Findings:
    """What pre-flight found: errors stop the job before any work, warnings go to status."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)


def check_model(spec: Any, config: dict[str, Any]) -> Findings:
    """Model-dependent checks of a parsed `CompressionJobSpec` against the source's config.json."""
    from anneal.api.common import parse_quantity
    from anneal.compress.pruning import PruningError

    found = Findings()
    try:
        shape = ModelShape.from_config(config)
    except KeyError as exc:
        found.warnings.append(f"spec.model: config.json has no {exc.args[0]!r}; shape checks skipped")
        return found
    target = shape
    if spec.pruning is not None:
        try:
            target = pruned_shape(shape, spec.pruning.to_dict())
        except PruningError as exc:
            found.errors.append(f"{exc.field}: {exc.value!r} is not allowed for this model "
                                f"({shape.layers} layers, hiddenSize {shape.hidden_size}): {exc.rule}")
            return found
        found.figures["predictedPrunedParams"] = float(target.params())
    q = spec.quantization
    if q is not None:
        found.errors += group_size_errors(target, q.scheme, q.group_size, q.ignore)
        try:
            names, classes = module_names(config, target)
            found.warnings += unknown_ignores(q.ignore, names, classes)
        except Exception as exc:  # an architecture transformers cannot build on meta: skip, do not fail
            found.warnings.append(f"spec.quantization.ignore: could not list the model's modules ({exc}); not checked")
    algorithm = q.algorithm if q is not None else None
    cal = q.calibration if q is not None else (spec.pruning.calibration if spec.pruning else None)
    samples = (cal.samples or 64) if cal is not None else 0
    seq = cal.max_seq_length if cal is not None else 256
    rec = spec.pruning.recovery if spec.pruning is not None else None
    dtype_bytes = 2 if spec.resources.gpus_per_worker > 0 else 4
    need = calibration_memory_bytes(shape, algorithm, samples, seq, dtype_bytes, rec.batch_size if rec else 0)
    found.figures["estimatedMemoryBytes"] = float(need)
    if spec.resources.memory:
        have = parse_quantity(str(spec.resources.memory))
        if need > have:
            found.warnings.append(
                f"spec.resources.memory: {spec.resources.memory} is below the estimated {need / GIB:.1f}Gi this job needs "
                f"({shape.params() / 1e6:.1f}M parameters: two copies of the weights"
                f"{', GPTQ Hessians' if algorithm == 'gptq' else ''}"
                f"{', cached calibration activations' if algorithm in ('gptq', 'awq') else ''}"
                f"{', recovery optimizer state' if rec else ''}); expect the worker to be OOM-killed, "
                "or lower quantization.calibration.samples / maxSeqLength"
            )
    return found
