"""Labelled probe requests: built-in-task questions pinned to a variant, answers scored exactly.

The `accuracy` gate needs a figure the router cannot measure on user traffic (it does not
know the right answers). The controller asks questions it can check itself, through the same
public endpoint, pinned to one variant with the override header, so a candidate that is fast
and error-free but wrong still fails its gate.
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from anneal.api.service import Probes
from anneal.rollout.analysis import ProbeResults

log = logging.getLogger(__name__)

POOL_SIZE = 256


@dataclass(frozen=True)
class LabelledQuestion:
    messages: list[dict[str, str]]
    answer: int


def load_questions(probes: Probes, size: int = POOL_SIZE) -> list[LabelledQuestion]:
    """The probe questions from `probes.dataset` (records without a checkable answer are skipped).

    Raises:
        ValueError: the data set yields no record with an answer.
    """
    from anneal.data.datasets import load_samples

    ds = probes.dataset
    cap = min(ds.samples or size, size)
    samples = load_samples(ds.uri, split=ds.split, format="chat", samples=cap, reasoning=probes.reasoning)
    questions = [LabelledQuestion(list(s.messages), int(s.answer)) for s in samples
                 if s.answer is not None and s.messages]
    if not questions:
        raise ValueError(
            f"rollout.analysis.probes.dataset: {ds.uri} ({ds.split}) has no chat records with an answer; "
            "the accuracy gate needs labelled questions (use builtin://reasoning)"
        )
    return questions


class ProbeSender:
    """Sends labelled probes to one variant at a time and scores them.

    Args:
        endpoint: the service's base URL (``http://127.0.0.1:8000/svc``).
        questions: the labelled questions, cycled through.
        override_header: the header that pins a variant (``routing.overrideHeader``).
        reasoning_header, reasoning: the reasoning toggle header and the mode probes use.
        max_tokens: cap on each answer; None (default) uses the variant's own generation
            settings, so probes measure what users get (a candidate misconfigured with a
            tiny maxTokens or a high temperature fails its accuracy gate).
        timeout_s: per request; a timeout counts as a wrong answer.
        concurrency: probes in flight at once.
    """

    def __init__(self, endpoint: str, questions: Sequence[LabelledQuestion], *,
                 override_header: str = "x-anneal-variant", reasoning_header: str = "x-anneal-reasoning",
                 reasoning: str = "off", max_tokens: int | None = None, timeout_s: float = 30.0,
                 concurrency: int = 2):
        import httpx

        self.url = endpoint.rstrip("/") + "/v1/chat/completions"
        self._cycle = itertools.cycle(list(questions))
        self._lock = threading.Lock()
        self.override_header = override_header
        self.reasoning_header = reasoning_header
        self.reasoning = reasoning
        self.max_tokens = max_tokens
        self.concurrency = max(1, concurrency)
        self._http = httpx.Client(timeout=timeout_s)

    def _next(self) -> LabelledQuestion:
        with self._lock:
            return next(self._cycle)

    def ask(self, variant: str, question: LabelledQuestion) -> bool:
        """One probe: True when the variant answered exactly."""
        from anneal.data.reasoning import check_answer

        body: dict[str, Any] = {"messages": question.messages}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        headers = {self.override_header: variant, self.reasoning_header: self.reasoning,
                   "x-anneal-probe": "1"}
        try:
            r = self._http.post(self.url, json=body, headers=headers)
            if r.status_code != 200:
                return False
            text = r.json()["choices"][0]["message"]["content"] or ""
        except Exception as exc:  # noqa: BLE001 - a probe that cannot be answered is a wrong answer
            log.debug("probe to %s failed: %s", variant, exc)
            return False
        return check_answer(text, question.answer)

    def send(self, variant: str, n: int) -> ProbeResults:
        """Ask `n` questions pinned to `variant`; the exact answers out of `n`."""
        if n <= 0:
            return ProbeResults()
        questions = [self._next() for _ in range(n)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, n)) as pool:
            results = list(pool.map(lambda q: self.ask(variant, q), questions))
        return ProbeResults(sum(results), len(results))

    def close(self) -> None:
        self._http.close()
