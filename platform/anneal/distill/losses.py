"""Knowledge-distillation losses: logit divergences, the KD/CE mix, a chunked low-memory variant.

Conventions shared by every function here:

* **Shifted labels (causal LM).** ``labels`` are aligned with the *inputs*, as Hugging Face
  causal LMs expect them: the logits at position ``t`` predict ``labels[t + 1]``. Each loss
  therefore pairs ``logits[:, :-1]`` with ``labels[:, 1:]``; callers pass ``labels`` exactly as
  they pass them to ``model(input_ids, labels=labels)``.
* **Completion tokens.** A label of ``-100`` (:data:`IGNORE_INDEX`) marks a token that is not
  trained on (prompt, padding). Both the KD and the CE terms are averaged over the positions
  whose *next* label is not ``-100``; with no such position the losses are ``0`` (not NaN).
* **Temperature.** KD divergences compare ``softmax(logits / T)`` and are multiplied by ``T²``
  (Hinton et al.) so that gradient magnitudes do not shrink as ``T`` grows. CE always uses the
  unscaled logits.
* All divergence maths runs in fp32, whatever the logits' dtype.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

KDKind = Literal["forward-kl", "reverse-kl", "jsd"]
KD_KINDS: tuple[str, ...] = ("forward-kl", "reverse-kl", "jsd")


class KDLossOutput(NamedTuple):
    """The mixed distillation loss and its two parts (scalars).

    ``loss = alpha * kd + (1 - alpha) * ce``; ``kd`` and ``ce`` are the token-averaged terms.
    """

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def _check(kind: str, temperature: float, alpha: float | None = None) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"kd.loss: {kind!r} is not one of {', '.join(KD_KINDS)}")
    if not temperature > 0:
        raise ValueError(f"kd.temperature: {temperature!r} must be > 0")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd.alpha: {alpha!r} must be within [0, 1]")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 log-softmax of ``logits / T``, clamped so that ``-inf`` entries stay finite.

    Clamping to the most negative finite float keeps ``0 * log 0`` terms at 0 instead of NaN
    (a vocabulary entry masked with ``-inf`` has probability exactly 0 after ``exp``).
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.clamp_min(torch.finfo(logp.dtype).min)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row from log-probabilities ``[N, V]`` -> ``[N]``."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: KDKind = "forward-kl",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence between the teacher's and the student's next-token distributions.

    With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``:

    * ``forward-kl``: ``KL(p‖q)`` (mean-seeking; the classic KD loss),
    * ``reverse-kl``: ``KL(q‖p)`` (mode-seeking),
    * ``jsd``: ``½ KL(p‖m) + ½ KL(q‖m)`` with ``m = (p + q) / 2``, computed in log space
      (``log m = logaddexp(log p, log q) − ln 2``); bounded by ``ln 2 · T²``.

    Every kind is multiplied by ``T²``.

    Args:
        student_logits: ``[N, V]`` (any leading shape ``[..., V]`` works), any float dtype.
        teacher_logits: ``[N, V]``, same shape; usually computed without grad.
        kind: ``"forward-kl"`` | ``"reverse-kl"`` | ``"jsd"``.
        temperature: ``T > 0``.

    Returns:
        ``[N]`` fp32 divergence per token (``[...]`` for other leading shapes), ≥ 0.
    """
    _check(kind, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (same vocabulary)"
        )
    logq = _log_probs(student_logits, temperature)
    logp = _log_probs(teacher_logits, temperature)
    if kind == "forward-kl":
        div = _kl(logp, logq)
    elif kind == "reverse-kl":
        div = _kl(logq, logp)
    else:
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        div = 0.5 * _kl(logp, logm) + 0.5 * _kl(logq, logm)
    return div * (temperature**2)


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ``logits[:, :-1]`` with ``labels[:, 1:]`` (causal-LM shift)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must share [B, T]"
        )
    return logits[:, :-1], labels[:, 1:]


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens (shifted, ``-100`` ignored).

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` int64, aligned with the inputs; ``-100`` = ignore.

    Returns:
        ``[]`` fp32 scalar; ``0`` when no token is labelled.
    """
    logits, labels = _shift(logits, labels)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kind: KDKind = "forward-kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
) -> KDLossOutput:
    """Distillation loss on full logits: ``alpha * KD + (1 - alpha) * CE``.

    Both terms are averaged over the positions ``t`` whose next label ``labels[:, t + 1]`` is
    not ``-100`` (the shifted causal-LM convention: logits at ``t`` predict label ``t + 1``).
    This holds the whole ``[B, T, V]`` logits of both models; see :func:`chunked_kd_loss` for
    the memory-efficient equivalent.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``; detached here (no gradient flows into the teacher).
        labels: ``[B, T]`` int64, aligned with the inputs; ``-100`` = ignore.
        kind: ``"forward-kl"`` | ``"reverse-kl"`` | ``"jsd"``.
        temperature: ``T > 0`` for the KD term.
        alpha: weight of the KD term in ``[0, 1]``; ``0`` = plain CE, ``1`` = pure KD.

    Returns:
        :class:`KDLossOutput` of fp32 scalars ``(loss, kd, ce)``.
    """
    _check(kind, temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    s_logits, shifted = _shift(student_logits, labels)
    t_logits = teacher_logits.detach()[:, :-1]
    mask = shifted != IGNORE_INDEX
    count = mask.sum().clamp_min(1)
    kd = kd_divergence(s_logits[mask], t_logits[mask], kind, temperature).sum() / count
    ce = ce_loss(student_logits, labels)
    return KDLossOutput(alpha * kd + (1.0 - alpha) * ce, kd, ce)


def _head_params(head: nn.Linear | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, torch.Tensor) and head.dim() == 2:
        return head, None
    raise TypeError(f"an LM head must be an nn.Linear or a [V, H] weight, not {type(head)!r}")


def _chunk_sums(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor,
    kind: str,
    temperature: float,
) -> torch.Tensor:
    """Summed KD and CE of one chunk of ``c`` tokens -> ``[2]`` fp32.

    Builds the ``[c, V]`` fp32 logits of both heads; :class:`_ChunkedKD` keeps none of it after
    the forward pass and recomputes it chunk by chunk during backward.
    """
    s_logits = F.linear(
        student_hidden.float(),
        student_weight.float(),
        None if student_bias is None else student_bias.float(),
    )
    with torch.no_grad():
        t_logits = F.linear(
            teacher_hidden.float(),
            teacher_weight.float(),
            None if teacher_bias is None else teacher_bias.float(),
        )
    kd = kd_divergence(s_logits, t_logits, kind, temperature).sum()  # type: ignore[arg-type]
    ce = F.cross_entropy(s_logits, labels, reduction="sum")
    return torch.stack([kd, ce])


class _ChunkedKD(torch.autograd.Function):
    """Summed ``[KD, CE]`` over all tokens, chunk by chunk, recomputing chunks in backward.

    This is activation checkpointing per chunk, written out: the forward pass runs every chunk
    without a graph and keeps only the inputs (hidden states and head weights, which exist
    anyway); the backward pass rebuilds one chunk's graph at a time, takes its gradients, and
    frees it before the next. Double backward is not supported.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        s_tokens: torch.Tensor,
        s_weight: torch.Tensor,
        s_bias: torch.Tensor | None,
        t_tokens: torch.Tensor,
        t_weight: torch.Tensor,
        t_bias: torch.Tensor | None,
        targets: torch.Tensor,
        kind: str,
        temperature: float,
        chunk_size: int,
    ) -> torch.Tensor:
        sums = torch.zeros(2, dtype=torch.float32, device=s_tokens.device)
        n = targets.shape[0]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            sums += _chunk_sums(
                s_tokens[start:end], s_weight, s_bias, t_tokens[start:end], t_weight, t_bias,
                targets[start:end], kind, temperature,
            )
        ctx.save_for_backward(s_tokens, s_weight, s_bias, t_tokens, t_weight, t_bias, targets)
        ctx.kind, ctx.temperature, ctx.chunk_size = kind, temperature, chunk_size
        return sums

    @staticmethod
    def backward(ctx, grad_sums):  # type: ignore[override]
        s_tokens, s_weight, s_bias, t_tokens, t_weight, t_bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and s_bias is not None
        grad_h = torch.zeros_like(s_tokens) if need_h else None
        # accumulate in fp32 whatever the weights' dtype, cast once at the end
        grad_w = torch.zeros_like(s_weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(s_bias, dtype=torch.float32) if need_b else None
        weight = s_weight.detach().requires_grad_(need_w)
        bias = None if s_bias is None else s_bias.detach().requires_grad_(need_b)
        n = targets.shape[0]
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            hidden = s_tokens[start:end].detach().requires_grad_(need_h)
            wanted = [t for t, need in ((hidden, need_h), (weight, need_w), (bias, need_b)) if need]
            if not wanted:
                break
            with torch.enable_grad():
                sums = _chunk_sums(
                    hidden, weight, bias, t_tokens[start:end], t_weight, t_bias,
                    targets[start:end], ctx.kind, ctx.temperature,
                )
                grads = iter(torch.autograd.grad((sums * grad_sums).sum(), wanted))
            if need_h:
                grad_h[start:end] = next(grads)
            if need_w:
                grad_w += next(grads)
            if need_b:
                grad_b += next(grads)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(s_weight.dtype),
            None if grad_b is None else grad_b.to(s_bias.dtype),
            None, None, None, None, None, None, None,
        )


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Linear | torch.Tensor,
    teacher_head: nn.Linear | torch.Tensor,
    labels: torch.Tensor,
    kind: KDKind = "forward-kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    chunk_size: int = 1024,
) -> KDLossOutput:
    """:func:`kd_loss` computed from final hidden states, ``chunk_size`` tokens at a time.

    Only completion positions (shifted labels ≠ ``-100``) are gathered, ``[N, H]``. For each
    chunk of at most ``chunk_size`` of them, both heads' fp32 logits ``[c, V]``, the divergence
    and the CE are computed and reduced to two sums. A custom autograd function (activation
    checkpointing per chunk) keeps nothing else from the forward pass; the backward pass
    recomputes one chunk's logits at a time and frees them before the next.
    The full ``[N, V]`` logits are never materialised, neither in forward nor for backward;
    peak extra memory is a few ``[chunk_size, V]`` fp32 tensors plus the head-weight gradient.
    The cost is one more logits matmul per model (the recomputation).

    Value and gradients (w.r.t. ``student_hidden`` and the student head) equal
    ``kd_loss(student_head(student_hidden), teacher_head(teacher_hidden), labels, ...)``.

    Args:
        student_hidden: ``[B, T, Hs]`` final hidden states of the student (after its last norm).
        teacher_hidden: ``[B, T, Ht]`` final hidden states of the teacher; detached.
        student_head: the student's ``lm_head`` (``nn.Linear`` ``Hs -> V``) or its ``[V, Hs]``
            weight.
        teacher_head: the teacher's ``lm_head`` or its ``[V, Ht]`` weight; detached.
        labels: ``[B, T]`` int64 aligned with the inputs; ``-100`` = ignore.
        kind: ``"forward-kl"`` | ``"reverse-kl"`` | ``"jsd"``.
        temperature: ``T > 0`` for the KD term.
        alpha: weight of the KD term in ``[0, 1]``.
        chunk_size: tokens per chunk (≥ 1); larger is faster, smaller uses less memory.

    Returns:
        :class:`KDLossOutput` of fp32 scalars ``(loss, kd, ce)``.
    """
    _check(kind, temperature, alpha)
    if chunk_size < 1:
        raise ValueError(f"kd.chunkSize: {chunk_size!r} must be ≥ 1")
    if student_hidden.shape[:2] != labels.shape or teacher_hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} and "
            f"labels {tuple(labels.shape)} must share [B, T]"
        )
    s_weight, s_bias = _head_params(student_head)
    t_weight, t_bias = _head_params(teacher_head)
    t_weight = t_weight.detach()
    t_bias = None if t_bias is None else t_bias.detach()
    if s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError(
            f"student vocabulary {s_weight.shape[0]} != teacher vocabulary {t_weight.shape[0]}"
        )

    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    s_tokens = student_hidden[:, :-1][mask]  # [N, Hs]
    t_tokens = teacher_hidden.detach()[:, :-1][mask]  # [N, Ht]
    targets = shifted[mask]  # [N]
    n = targets.shape[0]

    sums = _ChunkedKD.apply(
        s_tokens, s_weight, s_bias, t_tokens, t_weight, t_bias, targets, kind, temperature,
        chunk_size,
    )
    kd, ce = sums / max(n, 1)
    return KDLossOutput(alpha * kd + (1.0 - alpha) * ce, kd, ce)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the labels' log-probabilities per sequence (for policy-gradient RL).

    Shifted like the other losses: ``logits[:, t]`` scores ``labels[:, t + 1]``; positions with
    label ``-100`` contribute 0.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` int64 aligned with the inputs; ``-100`` = ignore.

    Returns:
        ``[B]`` fp32 ``Σ_t log p(labels[t + 1] | ≤ t)`` over labelled positions.
    """
    logits, shifted = _shift(logits, labels)
    mask = shifted != IGNORE_INDEX
    logits = logits.float()
    picked = logits.gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    token_logp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(dim=-1)


__all__ = [
    "IGNORE_INDEX",
    "KD_KINDS",
    "KDKind",
    "KDLossOutput",
    "ce_loss",
    "chunked_kd_loss",
    "kd_divergence",
    "kd_loss",
    "sequence_logprobs",
]
