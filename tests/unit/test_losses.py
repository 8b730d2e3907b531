"""KD losses: against explicit formulas, limiting cases, and chunked == unchunked."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from anneal.distill.losses import (
    ce_loss,
    chunked_kd_loss,
    kd_divergence,
    kd_loss,
    sequence_logprobs,
)

KINDS = ["forward-kl", "reverse-kl", "jsd"]
V = 11


def _logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).double()


def _reference(student: torch.Tensor, teacher: torch.Tensor, kind: str, t: float) -> torch.Tensor:
    """Explicit sums over the vocabulary, per row, times T²."""
    q = torch.softmax(student / t, -1)
    p = torch.softmax(teacher / t, -1)
    if kind == "forward-kl":
        div = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse-kl":
        div = (q * (q.log() - p.log())).sum(-1)
    else:
        m = (p + q) / 2
        div = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return div * t * t


def _labels(b: int, t: int, seed: int, prompt: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[:, :prompt] = -100  # prompt tokens are not trained on
    labels[0, -2:] = -100  # padding at the end of the first sequence
    return labels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_divergence_matches_explicit_formula_value_and_grad(kind: str, temperature: float) -> None:
    student = _logits(6, V, seed=1).requires_grad_()
    teacher = _logits(6, V, seed=2)
    ours = kd_divergence(student, teacher, kind, temperature)
    ref = _reference(student, teacher, kind, temperature).float()
    assert ours.shape == (6,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), student)
    ref_student = student.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(_reference(ref_student, teacher, kind, temperature).sum(), ref_student)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "p_is"), [("forward-kl", "teacher"), ("reverse-kl", "student")]
)
def test_temperature_one_is_plain_kl(kind: str, p_is: str) -> None:
    student, teacher = _logits(5, V, seed=3), _logits(5, V, seed=4)
    p, q = (teacher, student) if p_is == "teacher" else (student, teacher)
    expected = kl_divergence(Categorical(logits=p), Categorical(logits=q)).float()
    torch.testing.assert_close(kd_divergence(student, teacher, kind, 1.0), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_identical_distributions_give_zero(kind: str, temperature: float) -> None:
    logits = _logits(7, V, seed=5)
    out = kd_divergence(logits, logits.clone(), kind, temperature)
    torch.testing.assert_close(out, torch.zeros(7), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_jsd_symmetric_and_bounded(temperature: float) -> None:
    a, b = _logits(9, V, seed=6, scale=8.0), _logits(9, V, seed=7, scale=8.0)
    ab = kd_divergence(a, b, "jsd", temperature)
    torch.testing.assert_close(ab, kd_divergence(b, a, "jsd", temperature))
    assert (ab >= -1e-6).all()
    assert (ab <= math.log(2) * temperature**2 + 1e-5).all()
    # disjoint supports reach the bound
    far = torch.full((1, V), -1e4)
    far_a, far_b = far.clone(), far.clone()
    far_a[0, 0], far_b[0, 1] = 1e4, 1e4
    torch.testing.assert_close(
        kd_divergence(far_a, far_b, "jsd", 1.0), torch.tensor([math.log(2)]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [-1e9, float("-inf"), torch.finfo(torch.float32).min])
def test_masked_vocabulary_gives_no_nan(kind: str, masked: float) -> None:
    student = torch.randn(4, V, requires_grad=True)
    teacher = torch.randn(4, V)
    with torch.no_grad():
        teacher[:, :3] = masked
    s_in = student.clone()
    s_in[:, :3] = s_in[:, :3] + masked  # student masks the same entries
    out = kd_divergence(s_in, teacher, kind, 2.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(student.grad).all()
    # masking the same entries is the same as dropping them from the vocabulary
    torch.testing.assert_close(
        out, kd_divergence(student[:, 3:], teacher[:, 3:], kind, 2.0), rtol=1e-5, atol=1e-5
    )


def _manual_kd_loss(student, teacher, labels, kind, t, alpha):
    """Loop over tokens with the causal shift spelt out."""
    kd_terms, ce_terms = [], []
    for b in range(labels.shape[0]):
        for pos in range(labels.shape[1] - 1):
            target = int(labels[b, pos + 1])
            if target == -100:
                continue
            s, te = student[b, pos : pos + 1], teacher[b, pos : pos + 1]
            kd_terms.append(_reference(s, te, kind, t)[0])
            ce_terms.append(-torch.log_softmax(s[0], -1)[target])
    kd = torch.stack(kd_terms).mean()
    ce = torch.stack(ce_terms).mean()
    return alpha * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (2.0, 0.3), (0.7, 0.9)])
def test_kd_loss_matches_token_loop(kind: str, temperature: float, alpha: float) -> None:
    student = _logits(2, 6, V, seed=8).requires_grad_()
    teacher = _logits(2, 6, V, seed=9)
    labels = _labels(2, 6, seed=10)
    out = kd_loss(student, teacher, labels, kind, temperature, alpha)
    ref = _manual_kd_loss(student.detach().clone().requires_grad_(), teacher, labels, kind, temperature, alpha)
    for ours, theirs in zip(out, ref):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(out.loss, student)
    ref_student = student.detach().clone().requires_grad_()
    ref_loss = _manual_kd_loss(ref_student, teacher, labels, kind, temperature, alpha)[0]
    (g_ref,) = torch.autograd.grad(ref_loss, ref_student)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)
    # labelled-out positions get no gradient (position t is scored by label t+1)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == -100
    ignored[:, -1] = True
    assert (g_ours[ignored] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_zero_is_cross_entropy_and_alpha_one_is_pure_kd(kind: str) -> None:
    student, teacher = _logits(3, 7, V, seed=11).float(), _logits(3, 7, V, seed=12).float()
    labels = _labels(3, 7, seed=13)
    ce = F.cross_entropy(student[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    zero = kd_loss(student, teacher, labels, kind, 2.0, alpha=0.0)
    torch.testing.assert_close(zero.loss, ce)
    torch.testing.assert_close(ce_loss(student, labels), ce)
    one = kd_loss(student, teacher, labels, kind, 2.0, alpha=1.0)
    torch.testing.assert_close(one.loss, one.kd)
    assert not torch.allclose(one.loss, zero.loss)


def test_only_labelled_positions_count() -> None:
    student, teacher = _logits(2, 8, V, seed=14).float(), _logits(2, 8, V, seed=15).float()
    labels = _labels(2, 8, seed=16)
    base = kd_loss(student, teacher, labels, "forward-kl", 1.0, 0.5).loss
    # changing logits whose next label is ignored changes nothing
    student2, teacher2 = student.clone(), teacher.clone()
    # (random noise, not a constant shift, which softmax would not see)
    student2[:, 0:2] += 5.0 * torch.randn(2, 2, V)  # positions 0,1 predict labels 1,2 (prompt)
    teacher2[:, -1] += 3.0 * torch.randn(2, V)  # the last position predicts nothing
    torch.testing.assert_close(kd_loss(student2, teacher2, labels, "forward-kl", 1.0, 0.5).loss, base)
    student2[1, 4] += 5.0 * torch.randn(V)  # a completion position
    assert not torch.allclose(kd_loss(student2, teacher, labels, "forward-kl", 1.0, 0.5).loss, base)


def test_no_labelled_token_gives_zero_not_nan() -> None:
    student = torch.randn(2, 5, V, requires_grad=True)
    labels = torch.full((2, 5), -100)
    out = kd_loss(student, torch.randn(2, 5, V), labels, "jsd", 2.0, 0.5)
    assert out.loss.item() == 0.0
    out.loss.backward()
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, V)
    out = chunked_kd_loss(hidden, torch.randn(2, 5, 4), head, torch.nn.Linear(4, V), labels, "jsd", 2.0, 0.5, 3)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert (hidden.grad == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("chunk_size", "bias"), [(1, False), (3, True), (7, False), (1000, True)])
def test_chunked_equals_unchunked(kind: str, chunk_size: int, bias: bool) -> None:
    torch.manual_seed(17)
    b, t, hs, ht, vocab = 2, 9, 8, 12, 23
    labels = torch.randint(0, vocab, (b, t))
    labels[:, :2] = -100
    labels[1, -3:] = -100
    s_head = torch.nn.Linear(hs, vocab, bias=bias)
    t_head = torch.nn.Linear(ht, vocab, bias=bias)
    s_hidden = torch.randn(b, t, hs, requires_grad=True)
    t_hidden = torch.randn(b, t, ht)
    args = (labels, kind, 1.7, 0.6)

    full = kd_loss(s_head(s_hidden), t_head(t_hidden), *args)
    full_grads = torch.autograd.grad(full.loss, [s_hidden, s_head.weight])

    chunked = chunked_kd_loss(s_hidden, t_hidden, s_head, t_head, *args, chunk_size=chunk_size)
    chunked_grads = torch.autograd.grad(chunked.loss, [s_hidden, s_head.weight])
    for ours, theirs in zip(chunked, full):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(chunked_grads, full_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_chunked_accepts_weights_and_leaves_teacher_without_grad() -> None:
    torch.manual_seed(18)
    labels = torch.randint(0, V, (2, 6))
    s_weight = torch.randn(V, 8, requires_grad=True)
    t_weight = torch.randn(V, 5, requires_grad=True)
    t_hidden = torch.randn(2, 6, 5, requires_grad=True)
    s_hidden = torch.randn(2, 6, 8, requires_grad=True)
    out = chunked_kd_loss(s_hidden, t_hidden, s_weight, t_weight, labels, "reverse-kl", 1.0, 1.0, 4)
    out.loss.backward()
    assert s_weight.grad is not None and s_hidden.grad is not None
    assert t_weight.grad is None and t_hidden.grad is None
    ref = kd_loss(s_hidden @ s_weight.T, t_hidden @ t_weight.T, labels, "reverse-kl", 1.0, 1.0)
    torch.testing.assert_close(out.loss, ref.loss)


def test_sequence_logprobs_sums_shifted_label_logprobs() -> None:
    logits = _logits(2, 6, V, seed=19).float()
    labels = _labels(2, 6, seed=20)
    expected = torch.zeros(2)
    for b in range(2):
        for pos in range(5):
            if labels[b, pos + 1] != -100:
                expected[b] += torch.log_softmax(logits[b, pos], -1)[labels[b, pos + 1]]
    torch.testing.assert_close(sequence_logprobs(logits, labels), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "kl"}, "kd.loss"),
        ({"temperature": 0.0}, "kd.temperature"),
        ({"alpha": 1.5}, "kd.alpha"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, match: str) -> None:
    params = {"kind": "jsd", "temperature": 1.0, "alpha": 0.5} | kwargs
    with pytest.raises(ValueError, match=match):
        kd_loss(torch.randn(1, 3, V), torch.randn(1, 3, V), torch.zeros(1, 3, dtype=torch.long), **params)
