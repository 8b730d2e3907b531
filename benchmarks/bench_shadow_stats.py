"""Shadow agreement gate: how many pairs it takes to reject a candidate, against the arithmetic.

A `shadowAgreement min 0.9` gate at 95 % confidence is decided on the Wilson interval of the
pairs' agreements (`anneal.rollout.statistics.wilson(k, n).decide("min", 0.9)`): ``fail`` once
the whole interval is below 0.9, ``pass`` once it is wholly at or above it. This simulates many
seeded pair streams of a candidate whose answers agree with the stable's with probability
`rate` (each pair a Bernoulli draw), and for each stream finds the first pair count at which
the gate decides, under three rules:

- ``every pair``: the interval checked after every pair, first ``fail`` or ``pass`` decides (a
  bound on how fast any analysis could decide);
- ``every 10``: checked every 10 pairs, as analyses at an interval see them;
- ``rollout defaults``: every 10 pairs, ``minRequests: 20`` as a floor and ``failureLimit: 2``
  (a rollback takes three failed analyses, a wait does not reset the count), the rule
  `anneal.rollout.machine` applies to a shadow-only stage.

Rates: 0.7 (the candidate to reject: pairs to ``fail``), 0.95 (a good one: the share wrongly
rejected, and pairs to ``pass``) and 1.0 (pairs to ``pass``). Each rule is also computed
exactly (a dynamic programme over the agreement count, no sampling), so the simulation's own
sampling error shows. The arithmetic it is compared with: `samples_to_decide` (the first n at
which a sample showing exactly `rate` is decided) and the normal-approximation sample size
z²·p(1−p)/(p−t)², plus z²·t(1−t)/(p−t)² (the same with the variance at the threshold, which is
what the Wilson interval's edge uses). Pure Python, a few seconds.

    .venv/bin/python benchmarks/bench_shadow_stats.py [--streams 2000] [--seed 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """When an analysis looks at the pairs and what ends the stage."""

    name: str
    every: int  # pairs between two checks
    floor: int  # minRequests: no verdict below this many pairs
    fails_needed: int  # failureLimit + 1 failed checks end the stage (a wait does not reset)


RULES = [
    Rule("every pair", 1, 0, 1),
    Rule("every 10", 10, 0, 1),
    Rule("rollout defaults (every 10, minRequests 20, failureLimit 2)", 10, 20, 3),
]


class Gate:
    """`wilson(k, n, confidence).decide(bound, threshold)`, memoised (the decision depends on (k, n) only)."""

    def __init__(self, threshold: float, bound: str, confidence: float):
        self.threshold, self.bound, self.confidence = threshold, bound, confidence
        self._memo: dict[tuple[int, int], str] = {}

    def __call__(self, k: int, n: int) -> str:
        from anneal.rollout.statistics import wilson

        key = (k, n)
        verdict = self._memo.get(key)
        if verdict is None:
            verdict = self._memo[key] = wilson(k, n, self.confidence).decide(self.bound, self.threshold)
        return verdict


def run_stream(rng: random.Random, rate: float, rule: Rule, gate: Gate, max_n: int) -> tuple[int, str]:
    """One stream of pairs: (pairs seen when the stage ended, ``fail`` / ``pass`` / ``undecided``)."""
    k = fails = 0
    for n in range(1, max_n + 1):
        k += rng.random() < rate
        if n % rule.every or n < rule.floor:
            continue
        verdict = gate(k, n)
        if verdict == "pass":
            return n, "pass"
        if verdict == "fail":
            fails += 1
            if fails >= rule.fails_needed:
                return n, "fail"
    return max_n, "undecided"


def exact(rate: float, rule: Rule, gate: Gate, max_n: int, tail: float = 1e-12) -> dict[int, tuple[float, float]]:
    """The exact distribution of the stage's end: {n: (P(fail at n), P(pass at n))}.

    Tracks the probability of each (agreements, failed checks so far) among the streams still
    undecided, one pair at a time; stops when less than `tail` of the mass is left.
    """
    # live[f][k]: P(undecided after n pairs, k agreements, f failed checks)
    live = [[0.0] * (max_n + 1) for _ in range(rule.fails_needed)]
    live[0][0] = 1.0
    out: dict[int, tuple[float, float]] = {}
    q = 1.0 - rate
    for n in range(1, max_n + 1):
        for row in live:
            for k in range(n, 0, -1):
                row[k] = row[k] * q + row[k - 1] * rate
            row[0] *= q
        if n % rule.every == 0 and n >= rule.floor:
            failed = passed = 0.0
            for f in range(rule.fails_needed - 1, -1, -1):
                row = live[f]
                for k in range(n + 1):
                    m = row[k]
                    if m == 0.0:
                        continue
                    verdict = gate(k, n)
                    if verdict == "pass":
                        passed += m
                        row[k] = 0.0
                    elif verdict == "fail":
                        row[k] = 0.0
                        if f + 1 >= rule.fails_needed:
                            failed += m
                        else:
                            live[f + 1][k] += m
            if failed or passed:
                out[n] = (failed, passed)
        if sum(sum(row[: n + 1]) for row in live) < tail:
            break
    return out


def _quantile(xs: list[int], q: float) -> int | None:
    """Nearest-rank quantile of sorted `xs`."""
    if not xs:
        return None
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


def _exact_quantile(dist: dict[int, tuple[float, float]], which: int, q: float) -> int | None:
    """Quantile of the end time among the streams that ended with `which` (0 fail, 1 pass)."""
    total = sum(v[which] for v in dist.values())
    if total <= 0:
        return None
    acc = 0.0
    for n in sorted(dist):
        acc += dist[n][which]
        if acc >= q * total - 1e-15:
            return n
    return max(dist)


def summarise_sim(ends: list[tuple[int, str]]) -> dict[str, Any]:
    fails = sorted(n for n, v in ends if v == "fail")
    passes = sorted(n for n, v in ends if v == "pass")
    doc: dict[str, Any] = {"streams": len(ends), "failShare": round(len(fails) / len(ends), 4),
                           "passShare": round(len(passes) / len(ends), 4),
                           "undecided": sum(v == "undecided" for _, v in ends)}
    for label, xs in (("toFail", fails), ("toPass", passes)):
        if xs:
            doc[label] = {"median": _quantile(xs, 0.5), "p90": _quantile(xs, 0.9), "p99": _quantile(xs, 0.99),
                          "mean": round(sum(xs) / len(xs), 1), "min": xs[0], "max": xs[-1]}
    return doc


def summarise_exact(dist: dict[int, tuple[float, float]]) -> dict[str, Any]:
    fail = sum(v[0] for v in dist.values())
    passed = sum(v[1] for v in dist.values())
    doc: dict[str, Any] = {"failProbability": round(fail, 6), "passProbability": round(passed, 6)}
    for label, which, mass in (("toFail", 0, fail), ("toPass", 1, passed)):
        if mass > 1e-9:
            doc[label] = {"median": _exact_quantile(dist, which, 0.5), "p90": _exact_quantile(dist, which, 0.9),
                          "p99": _exact_quantile(dist, which, 0.99),
                          "mean": round(sum(n * v[which] for n, v in dist.items()) / mass, 1)}
    return doc


def arithmetic(rate: float, threshold: float, confidence: float) -> dict[str, Any]:
    from anneal.rollout.statistics import samples_to_decide, z_of

    z = z_of(confidence)
    if rate in (0.0, 1.0):
        normal = None  # p(1−p) = 0: the normal approximation says one sample, which is meaningless
    else:
        normal = round(z * z * rate * (1 - rate) / (rate - threshold) ** 2, 2)
    return {
        "samplesToDecide": samples_to_decide(rate, threshold, "min", confidence),
        "normalApprox_p": normal,  # z²·p(1−p)/(p−t)²
        "normalApprox_t": round(z * z * threshold * (1 - threshold) / (rate - threshold) ** 2, 2),  # z²·t(1−t)/(p−t)²
    }


def fail_boundary(gate: Gate, upto: int) -> dict[int, int]:
    """For each n: the most agreements that still fail the gate (−1: none can)."""
    out = {}
    for n in range(1, upto + 1):
        out[n] = max((k for k in range(n + 1) if gate(k, n) == "fail"), default=-1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=2000, help="simulated pair streams per rate and rule")
    ap.add_argument("--rates", default="0.7,0.95,1.0", help="candidate agreement rates, comma-separated")
    ap.add_argument("--threshold", type=float, default=0.9, help="the gate: shadowAgreement min THRESHOLD")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--max-pairs", type=int, default=20000, help="a stream still undecided here counts as undecided")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--json", help="also write the results here")
    opts = ap.parse_args(argv)

    start = time.perf_counter()
    gate = Gate(opts.threshold, "min", opts.confidence)
    rates = [float(r) for r in opts.rates.split(",")]
    results: dict[str, Any] = {}
    for rate in rates:
        per_rule = {}
        for i, rule in enumerate(RULES):
            ends = [run_stream(random.Random(f"{opts.seed}/{rate}/{i}/{s}"), rate, rule, gate, opts.max_pairs)
                    for s in range(opts.streams)]
            per_rule[rule.name] = {"simulated": summarise_sim(ends),
                                   "exact": summarise_exact(exact(rate, rule, gate, opts.max_pairs))}
        results[str(rate)] = {"arithmetic": arithmetic(rate, opts.threshold, opts.confidence), "rules": per_rule}
    doc = {
        "gate": f"shadowAgreement min {opts.threshold:g} at {opts.confidence:g} confidence (Wilson)",
        "results": results,
        "failBoundary": fail_boundary(gate, 40),
        "seconds": round(time.perf_counter() - start, 1),
        "config": vars(opts),
    }
    for rate, r in results.items():
        a = r["arithmetic"]
        print(f"rate {rate}: samples_to_decide {a['samplesToDecide']}, z²p(1-p)/(p-t)² {a['normalApprox_p']}, "
              f"z²t(1-t)/(p-t)² {a['normalApprox_t']}", file=sys.stderr)
        for name, v in r["rules"].items():
            s, e = v["simulated"], v["exact"]
            print(f"  {name}: simulated fail {s['failShare']} pass {s['passShare']} "
                  f"toFail {s.get('toFail')} toPass {s.get('toPass')}; exact fail {e['failProbability']} "
                  f"toFail {e.get('toFail')} toPass {e.get('toPass')}", file=sys.stderr)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
