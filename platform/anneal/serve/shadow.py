"""Shadow comparison: pair each mirrored answer with the answer the user got, judge some, summarise them.

With `routing.shadow`, the router sends a copy of a share of live requests to a variant (in a
rollout, the candidate) and drops its answer. Here the two answers of one request become a
`Pair`: did they agree (`compare: exact` — the same text after normalisation — or `compare:
answer` — the same final answer), how long each took, whether the mirrored call failed.
`summarise` turns the pairs of a stats window into the figures the rollout's shadow gates read
(`shadowAgreement`, `shadowErrorRate`, `shadowLatencyRatio`) plus a capped sample of pairs,
disagreements first, for a person to read in MLflow. With a judge, `judge_prompt` and
`judge_verdict` turn a pair into the judge's question and its answer into a verdict
(`judgeWinRate`). Pure functions; the router keeps the ring and calls the judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from anneal.serve.routing import percentile

Compare = Literal["exact", "answer"]

#: Characters of a prompt or answer kept in a pair (the ring and the samples).
TEXT_LIMIT = 600

_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Text as compared by ``exact``: without a leading ``<think>…</think>`` block, case-folded,
    white space collapsed, surrounding white space and a final full stop removed."""
    text = _THINK.sub("", text)
    return _SPACE.sub(" ", text).strip().rstrip(".").casefold()


def extract(text: str, pattern: re.Pattern[str] | None = None) -> str | None:
    """The final answer of `text`: the last match of `pattern` (its first group, or the whole
    match), or by default the built-in task's last ``Answer: N`` / GSM8K ``#### N`` as an integer.

    Returns:
        The answer as a string (numbers without thousands separators), None when there is none.
    """
    if pattern is None:
        from anneal.data.reasoning import extract_answer

        value = extract_answer(text)
        return None if value is None else str(value)
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    found = m.group(1) if m.re.groups else m.group(0)
    return normalise(found or "")


def agree(primary: str, shadow: str, compare: Compare = "exact", pattern: re.Pattern[str] | None = None) -> bool:
    """Whether two answers to one request agree.

    ``answer``: both have a final answer and it is the same; when neither has one, the texts
    must agree exactly. ``exact``: the normalised texts are equal.
    """
    if compare == "answer":
        a, b = extract(primary, pattern), extract(shadow, pattern)
        if a is not None or b is not None:
            return a == b
    return normalise(primary) == normalise(shadow)


@dataclass(slots=True)
class Pair:
    """One request answered by the variant the user got (`primary`) and by the mirror (`shadow`).

    `shadow_error` is set when the mirrored call failed or timed out (its answer is then empty
    and `agree` is False); a request whose primary call failed makes no pair (no reference).
    """

    time: float  # when the later of the two answers came (unix seconds)
    request_id: str
    primary: str
    shadow: str
    prompt: str
    primary_answer: str
    shadow_answer: str
    primary_ms: float
    shadow_ms: float
    shadow_error: bool
    agree: bool
    primary_final: str | None = None
    shadow_final: str | None = None
    #: the judge's verdict: None (not asked), "pending", "win" (the mirror's answer is at least
    #: as good), "loss", or "error" (the judge failed or said neither yes nor no)
    judge: str | None = None

    def sample(self) -> dict[str, Any]:
        """The pair as a table row (what the rollout's MLflow run records)."""
        return {
            "time": round(self.time, 3), "requestId": self.request_id, "stable": self.primary,
            "candidate": self.shadow, "agree": self.agree, "candidateError": self.shadow_error,
            "prompt": self.prompt, "stableAnswer": self.primary_answer, "candidateAnswer": self.shadow_answer,
            "stableFinal": self.primary_final, "candidateFinal": self.shadow_final,
            "stableMs": round(self.primary_ms, 1), "candidateMs": round(self.shadow_ms, 1),
            "judge": self.judge,
        }


def make_pair(*, time: float, request_id: str, primary: str, shadow: str, prompt: str, primary_answer: str,
              shadow_answer: str | None, primary_ms: float, shadow_ms: float, compare: Compare = "exact",
              pattern: re.Pattern[str] | None = None) -> Pair:
    """A `Pair` of two finished calls; `shadow_answer` None means the mirrored call failed."""
    failed = shadow_answer is None
    shadow_text = shadow_answer or ""
    finals = (None, None)
    if compare == "answer":
        finals = (extract(primary_answer, pattern), None if failed else extract(shadow_text, pattern))
    return Pair(
        time=time, request_id=request_id, primary=primary, shadow=shadow, prompt=prompt[-TEXT_LIMIT:],
        primary_answer=primary_answer[:TEXT_LIMIT], shadow_answer=shadow_text[:TEXT_LIMIT],
        primary_ms=primary_ms, shadow_ms=shadow_ms, shadow_error=failed,
        agree=(not failed) and agree(primary_answer, shadow_text, compare, pattern),
        primary_final=finals[0], shadow_final=finals[1],
    )


def summarise(pairs: Iterable[Pair], samples: int = 20) -> dict[str, Any]:
    """The figures of some pairs (one primary → shadow direction), as `/-/stats` reports them.

    Returns:
        ``{"mirrored", "shadowErrors", "pairs", "agreements", "latencyRatioP50", "judged", "wins",
        "judgeErrors", "samples"}``: mirrored = every pair; pairs = those the mirror answered
        (the agreement sample); latencyRatioP50 = the median of shadow / primary latency over
        answered pairs; judged / wins = pairs the judge scored / found the mirror at least as good;
        samples = up to `samples` pairs as rows, disagreements (failures included) first,
        newest first within each kind.
    """
    pairs = list(pairs)
    answered = [p for p in pairs if not p.shadow_error]
    ratios = sorted(p.shadow_ms / p.primary_ms for p in answered if p.primary_ms > 0)
    chosen: list[Pair] = []
    if samples > 0:
        newest = sorted(pairs, key=lambda p: p.time, reverse=True)
        chosen = [p for p in newest if not p.agree][:samples]
        chosen += [p for p in newest if p.agree][: samples - len(chosen)]
    return {
        "mirrored": len(pairs),
        "shadowErrors": len(pairs) - len(answered),
        "pairs": len(answered),
        "agreements": sum(p.agree for p in answered),
        "latencyRatioP50": None if not ratios else round(percentile(ratios, 50), 4),
        "judged": sum(p.judge in ("win", "loss") for p in pairs),
        "wins": sum(p.judge == "win" for p in pairs),
        "judgeErrors": sum(p.judge == "error" for p in pairs),
        "samples": [p.sample() for p in chosen],
    }


def merge_summaries(parts: list[dict[str, Any]], samples: int = 20) -> dict[str, Any]:
    """Several router replicas' `summarise` results for one direction, as one.

    Counts add up; the latency ratio is the one of the replica with the most answered pairs
    (medians do not add); samples are pooled, disagreements first, and capped again.
    """
    counts = ("mirrored", "shadowErrors", "pairs", "agreements", "judged", "wins", "judgeErrors")
    out: dict[str, Any] = {**{key: 0 for key in counts}, "latencyRatioP50": None, "samples": []}
    most = -1
    for part in parts:
        for key in counts:
            out[key] += int(part.get(key) or 0)
        if part.get("latencyRatioP50") is not None and int(part.get("pairs") or 0) > most:
            most = int(part.get("pairs") or 0)
            out["latencyRatioP50"] = part["latencyRatioP50"]
        out["samples"] += list(part.get("samples") or [])
    rows = sorted(out["samples"], key=lambda r: r.get("time") or 0, reverse=True)
    out["samples"] = ([r for r in rows if not r.get("agree")] + [r for r in rows if r.get("agree")])[:samples]
    return out


_VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def judge_prompt(template: str, pair: Pair) -> str:
    """The judge's question about one pair (A: the answer the user got, B: the mirror's)."""
    return template.format(question=pair.prompt, stable=pair.primary_answer, candidate=pair.shadow_answer)


def judge_verdict(text: str) -> str:
    """``win`` when the judge's first yes/no (after any ``<think>`` block) is yes, ``loss`` when
    no, ``error`` when it says neither."""
    m = _VERDICT.search(_THINK.sub("", text))
    if m is None:
        return "error"
    return "win" if m.group(1).lower() == "yes" else "loss"
