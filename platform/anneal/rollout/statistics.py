"""Confidence intervals for a rollout's rate gates: Wilson score intervals and Newcombe's difference.

A gate on a rate (error rate, agreement, accuracy, win rate) must not pass on three lucky
requests, nor fail on three unlucky ones. Each such gate is decided on an interval at the
analysis' `confidence` level: ``pass`` when the whole interval is on the right side of the
threshold, ``fail`` when the whole interval is on the wrong side, ``wait`` when it straddles
the threshold (more samples will tell). The Wilson score interval keeps its coverage at small
samples and at rates near 0 and 1, where the normal ("Wald") interval collapses to a point
(0 errors in 3 requests would give [0, 0]).

References: E. B. Wilson (1927), "Probable inference, the law of succession, and statistical
inference"; R. G. Newcombe (1998), "Interval estimation for the difference between independent
proportions: comparison of eleven methods" (method 10, the hybrid score interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

Verdict = Literal["pass", "fail", "wait"]


def z_of(confidence: float) -> float:
    """The two-sided standard-normal quantile of a confidence level (0.95 → 1.95996…).

    Args:
        confidence: in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


@dataclass(frozen=True)
class Interval:
    """A rate's estimate and its confidence interval over `samples` observations."""

    estimate: float
    low: float
    high: float
    samples: int

    def decide(self, bound: Literal["max", "min"], threshold: float) -> Verdict:
        """``pass`` when the whole interval is on the right side of `threshold`, ``fail``
        when the whole interval is on the wrong side, ``wait`` otherwise.

        A ``max`` gate holds for values ≤ threshold, a ``min`` gate for values ≥ threshold.
        """
        if bound == "max":
            if self.high <= threshold:
                return "pass"
            if self.low > threshold:
                return "fail"
            return "wait"
        if self.low >= threshold:
            return "pass"
        if self.high < threshold:
            return "fail"
        return "wait"


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a binomial proportion.

    Args:
        successes: the count of events (errors, agreements, correct answers), 0 ≤ successes ≤ n.
        n: the sample count; 0 gives the uninformative interval [0, 1].
        confidence: two-sided level, e.g. 0.95.

    Returns:
        The interval, with the point estimate successes / n (0.0 when n is 0).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return Interval(0.0, 0.0, 1.0, 0)
    z = z_of(confidence)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Exact at the edges: 0 of n can have no lower bound above 0, n of n no upper bound below 1.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, n)


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> Interval:
    """Interval of the difference p1 − p2 of two independent proportions (Newcombe's method 10).

    Used for ``errorRateVsStable``: p1 the candidate's error rate, p2 the stable's. The
    `samples` of the result is n1 (the candidate's count; minRequests is about it).

    Args:
        k1, n1: events and samples of the first proportion (n1 ≥ 1).
        k2, n2: of the second; n2 = 0 compares against a perfect second (p2 = 0, exactly).
        confidence: two-sided level.
    """
    a = wilson(k1, n1, confidence)
    if n2 == 0:
        return Interval(a.estimate, a.low, a.high, n1)
    b = wilson(k2, n2, confidence)
    d = a.estimate - b.estimate
    low = d - math.sqrt((a.estimate - a.low) ** 2 + (b.high - b.estimate) ** 2)
    high = d + math.sqrt((a.high - a.estimate) ** 2 + (b.estimate - b.low) ** 2)
    return Interval(d, max(-1.0, low), min(1.0, high), n1)


def samples_to_decide(rate: float, threshold: float, bound: Literal["max", "min"],
                      confidence: float = 0.95) -> int:
    """The arithmetic: the smallest n at which a sample showing exactly `rate` is decided.

    With the observed share equal to the true `rate`, the Wilson interval excludes
    `threshold` once n exceeds roughly z²·p(1−p)/(p−t)². This walks n up until the interval
    decides, so it is exact for the Wilson rule (up to rounding successes to rate·n).

    Args:
        rate: the true (and observed) rate.
        threshold: the gate's threshold.
        bound: the gate's side.
        confidence: two-sided level.

    Returns:
        The smallest n ≤ 10⁶ whose verdict is not ``wait``.
    """
    if rate == threshold:
        raise ValueError("a rate equal to its threshold is never decided")
    for n in range(1, 1_000_001):
        if wilson(round(rate * n), n, confidence).decide(bound, threshold) != "wait":
            return n
    raise ValueError("not decided within 10^6 samples")
