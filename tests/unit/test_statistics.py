"""Interval decisions of the rate gates: Wilson and Newcombe intervals, table-driven."""

from __future__ import annotations

import pytest

from anneal.rollout.statistics import Interval, newcombe_difference, samples_to_decide, wilson, z_of


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        # Reference values (95%, two-sided), as tabulated for the Wilson score interval.
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (81, 263, 0.2553, 0.3662),
        (1, 100, 0.0018, 0.0545),
    ],
)
def test_wilson_matches_reference_values(k, n, low, high):
    iv = wilson(k, n, 0.95)
    assert iv.estimate == pytest.approx(k / n)
    assert (iv.low, iv.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert iv.samples == n


def test_no_sample_is_the_whole_range_and_bad_counts_are_refused():
    assert wilson(0, 0) == Interval(0.0, 0.0, 1.0, 0)
    for k, n in ((3, 2), (-1, 5), (0, -1)):
        with pytest.raises(ValueError):
            wilson(k, n)
    with pytest.raises(ValueError):
        z_of(1.0)
    assert z_of(0.95) == pytest.approx(1.959964, abs=1e-6)


def test_newcombe_difference_matches_the_published_example():
    # Newcombe (1998), Table II, example (a): 56/70 vs 48/80 → difference 0.2, 95% CI 0.0524 to 0.3339.
    iv = newcombe_difference(56, 70, 48, 80, 0.95)
    assert iv.estimate == pytest.approx(0.2)
    assert (iv.low, iv.high) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))
    # Without a second sample the first is compared with an exact zero.
    assert newcombe_difference(1, 50, 0, 0) == wilson(1, 50)


@pytest.mark.parametrize(
    "k, n, bound, threshold, verdict",
    [
        # All agree, small n: the interval still reaches below 0.9 → wait, never a pass on luck.
        (3, 3, "min", 0.9, "wait"),
        (20, 20, "min", 0.9, "wait"),
        # All agree, large n → pass.
        (35, 35, "min", 0.9, "pass"),
        (400, 420, "min", 0.9, "pass"),
        # A known-bad rate (70% agreement) → fail once the interval is wholly below.
        (28, 40, "min", 0.9, "fail"),
        (0, 5, "min", 0.9, "fail"),
        # max gates: error rates.
        (0, 3, "max", 0.05, "wait"),
        (0, 73, "max", 0.05, "pass"),
        (0, 72, "max", 0.05, "wait"),
        (3, 3, "max", 0.05, "fail"),
        (4, 100, "max", 0.05, "wait"),
    ],
)
def test_interval_decisions(k, n, bound, threshold, verdict):
    assert wilson(k, n, 0.95).decide(bound, threshold) == verdict


def test_a_lower_confidence_decides_sooner():
    assert wilson(0, 20, 0.95).decide("max", 0.1) == "wait"
    assert wilson(0, 20, 0.8).decide("max", 0.1) == "pass"


def test_samples_to_decide_is_the_first_n_the_rule_decides():
    assert samples_to_decide(1.0, 0.9, "min") == 35
    assert samples_to_decide(0.0, 0.05, "max") == 73
    n = samples_to_decide(0.7, 0.9, "min")
    assert wilson(round(0.7 * n), n).decide("min", 0.9) == "fail"
    assert wilson(round(0.7 * (n - 1)), n - 1).decide("min", 0.9) == "wait"
    with pytest.raises(ValueError):
        samples_to_decide(0.9, 0.9, "min")
