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
import time
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
                 concurrency: int = 2, api_key: str | None = None):
        import httpx

        self.url = endpoint.rstrip("/") + "/v1/chat/completions"
        self._cycle = itertools.cycle(list(questions))
        self._lock = threading.Lock()
        self.override_header = override_header
        self.reasoning_header = reasoning_header
        self.reasoning = reasoning
        self.max_tokens = max_tokens
        self.concurrency = max(1, concurrency)
        # A probe pins a variant: with `spec.auth` that takes the admin key.
        self._auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
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
                   "x-anneal-probe": "1", **self._auth}
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


class ProbeLoop:
    """Sends a batch of labelled probes to the candidate and the stable once per interval.

    Results are kept per step (keyed by the step's start time) so the figures handed to the
    analysis cover exactly the window since the step began.
    """

    def __init__(self, sender: Any, stable: str, candidate: str, per_interval: int, interval_s: float):
        self.sender = sender
        self.stable = stable
        self.candidate = candidate
        self.per_interval = per_interval
        self.interval_s = interval_s
        self._key: float | None = None
        self._active = False
        self._results: dict[str, ProbeResults] = {}
        self._last_batch = -float("inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anneal-probes", daemon=True)

    def start(self) -> "ProbeLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sender.close()

    def follow_plan(self, plan: Any) -> None:
        """Follow a `anneal.control.rollout.ProbePlan` (the tick's word on what to measure)."""
        self.follow(plan.step_started_at, plan.active)

    def follow(self, key: float | None, active: bool) -> None:
        """The current step (its start time) and whether probing is wanted."""
        with self._lock:
            if key != self._key:
                self._key = key
                self._results = {}
                self._last_batch = -float("inf")
            self._active = active

    def results(self) -> dict[str, ProbeResults]:
        with self._lock:
            return dict(self._results)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                key, active = self._key, self._active
                due = active and time.monotonic() - self._last_batch >= self.interval_s
                if due:
                    self._last_batch = time.monotonic()
            if not due:
                self._stop.wait(0.1)
                continue
            for variant in (self.candidate, self.stable):
                got = self.sender.send(variant, self.per_interval)
                with self._lock:
                    if self._key != key:
                        break  # the step moved on while we asked: these answers belong to no window
                    self._results[variant] = self._results.get(variant, ProbeResults()) + got


def start_probe_loop(spec: Any, endpoint: str, api_key: str | None = None) -> ProbeLoop | None:
    """The probe loop a ModelService's rollout needs (None: it has no ``accuracy`` gate).

    `api_key` is the service's admin key when it has ``spec.auth`` (probes pin variants).

    Raises:
        ValueError: the probe data set has no labelled questions.
    """
    from anneal.api.common import parse_duration
    from anneal.control.rollout import wants_probes

    if not wants_probes(spec):
        return None
    r = spec.rollout
    p = r.analysis.probes
    sender = ProbeSender(
        endpoint, load_questions(p), override_header=spec.routing.override_header,
        reasoning_header=spec.routing.reasoning.header, reasoning=p.reasoning, api_key=api_key,
    )
    return ProbeLoop(sender, r.stable, r.candidate, p.per_interval, parse_duration(r.analysis.interval)).start()
