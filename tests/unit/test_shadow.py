"""Shadow comparison: answer extraction, pairing (missing or failed mirrors), window figures, merging."""

from __future__ import annotations

import re

import pytest

from anneal.serve.metrics import ServiceMetrics, merge_stats
from anneal.serve.shadow import agree, extract, make_pair, merge_summaries, normalise, summarise


@pytest.mark.parametrize(
    "text, pattern, want",
    [
        ("<think>\n5 + 3 = 8\n</think>\nAnswer: 8", None, "8"),
        ("Answer: 7. No wait. Answer: 9", None, "9"),  # the last one counts
        ("so #### 1,234", None, "1234"),
        ("I think it is eight", None, None),
        ("The capital is Paris.", r"capital is (\w+)", "paris"),
        ("B is better", r"\b[AB]\b", "b"),  # no group: the whole match
        ("nothing here", r"capital is (\w+)", None),
    ],
)
def test_extract(text, pattern, want):
    assert extract(text, re.compile(pattern) if pattern else None) == want


@pytest.mark.parametrize(
    "a, b, compare, want",
    [
        ("Answer: 8", "  answer:   8. ", "exact", True),
        ("<think>steps</think> Answer: 8", "Answer: 8", "exact", True),
        ("Answer: 8", "Answer: 9", "exact", False),
        ("<think>5+3</think>\nAnswer: 8", "Answer: 8", "answer", True),
        ("Long way round... Answer: 8", "Answer: 8", "answer", True),
        ("Answer: 8", "Answer: 7", "answer", False),
        ("Answer: 8", "no idea", "answer", False),  # one side without an answer disagrees
        ("hello there", "Hello there", "answer", True),  # neither has one: the texts decide
    ],
)
def test_agree(a, b, compare, want):
    assert agree(a, b, compare) is want


def test_normalise():
    assert normalise("<think>x</think>\n  The  Answer\tIS 8. ") == "the answer is 8"


def _pair(t, agree_, *, failed=False, primary_ms=10.0, shadow_ms=20.0, rid=None):
    return make_pair(time=t, request_id=rid or f"r{t}", primary="stable", shadow="canary", prompt="q" * 2000,
                     primary_answer="Answer: 7", shadow_answer=None if failed else ("Answer: 7" if agree_ else "Answer: 8"),
                     primary_ms=primary_ms, shadow_ms=shadow_ms, compare="answer")


def test_a_failed_mirror_is_an_error_not_a_disagreement_sample():
    p = _pair(1.0, True, failed=True)
    assert p.shadow_error and not p.agree and p.shadow_answer == "" and p.shadow_final is None
    assert len(p.prompt) == 600  # the end of a long prompt is kept (the question is last)


def test_summarise_counts_orders_samples_and_takes_the_median_ratio():
    pairs = [_pair(1, True, shadow_ms=10), _pair(2, False, shadow_ms=30), _pair(3, True, shadow_ms=20),
             _pair(4, True, failed=True), _pair(5, False, shadow_ms=40)]
    s = summarise(pairs, samples=3)
    assert (s["mirrored"], s["shadowErrors"], s["pairs"], s["agreements"]) == (5, 1, 4, 2)
    assert s["latencyRatioP50"] == 2.0  # ratios 1, 3, 2, 4 → nearest-rank median 2
    # Disagreements (the failure included) first, newest first; then agreements.
    assert [r["requestId"] for r in s["samples"]] == ["r5", "r4", "r2"]
    assert s["samples"][0]["stableFinal"] == "7" and s["samples"][0]["candidateFinal"] == "8"
    assert summarise(pairs, samples=0)["samples"] == []


def test_metrics_window_pairs_by_direction_and_since():
    now = [100.0]
    m = ServiceMetrics(["stable", "canary"], clock=lambda: now[0])
    m.record_pair(_pair(90, True))
    m.record_pair(_pair(101, False))
    m.record_pair(make_pair(time=102, request_id="x", primary="canary", shadow="stable", prompt="", primary_answer="a",
                            shadow_answer="a", primary_ms=1, shadow_ms=1))
    doc = m.stats(100.0, {"stable": 100, "canary": 0})
    assert doc["pairs"]["canary"]["stable"]["pairs"] == 1 and doc["pairs"]["canary"]["stable"]["agreements"] == 0
    assert doc["pairs"]["stable"]["canary"]["agreements"] == 1
    assert m.stats(None, {})["pairs"]["canary"]["stable"]["pairs"] == 2  # no since: the whole ring


def test_merge_stats_adds_pair_counts_of_router_replicas():
    docs = []
    for agree_ in (True, False):
        m = ServiceMetrics(["stable", "canary"], clock=lambda: 5.0)
        m.record("canary", 3.0, False, shadow=True)
        m.record_pair(_pair(5.0, agree_, rid=f"r{agree_}"))
        docs.append(m.stats(0.0, {"stable": 100, "canary": 0}))
    merged = merge_stats(docs)
    p = merged["pairs"]["canary"]["stable"]
    assert (p["pairs"], p["agreements"], len(p["samples"])) == (2, 1, 2)
    assert p["samples"][0]["agree"] is False
    assert merged["shadow"]["canary"]["window"]["requests"] == 2
    assert merge_summaries([{"pairs": 3, "latencyRatioP50": 1.5}, {"pairs": 9, "latencyRatioP50": 2.5}])[
        "latencyRatioP50"] == 2.5  # the replica with the most pairs


def test_a_shadow_only_stage_is_judged_on_mirrored_requests():
    """Weight 0: no routed request, yet minRequests, errorRate and shadowAgreement are measured."""
    from anneal.api.service import ModelServiceSpec
    from anneal.rollout.analysis import StatsWindow, evaluate

    spec = ModelServiceSpec.model_validate({
        "variants": [{"name": "stable", "model": {"uri": "/m/1"}, "weight": 100},
                     {"name": "canary", "model": {"uri": "/m/2"}, "weight": 0}],
        "routing": {"shadow": {"variant": "canary", "percent": 100, "compare": "answer"}},
        "rollout": {"stable": "stable", "candidate": "canary", "steps": [{"setWeight": 0}, {"analysis": {}}],
                    "analysis": {"minRequests": 10, "gates": [{"metric": "shadowAgreement", "min": 0.9}]}},
    })
    m = ServiceMetrics(["stable", "canary"], clock=lambda: 10.0)
    for i in range(80):
        m.record("stable", 5.0, False)
        m.record("canary", 4.0, False, shadow=True)
        m.record_pair(_pair(10.0, True, rid=f"r{i}"))
    window = StatsWindow.from_stats(m.stats(0.0, {"stable": 100, "canary": 0}))
    out = evaluate(spec.rollout.analysis, window, "stable", "canary")
    assert out.verdict == "pass", out.reason
    assert out.figures["requests"] == 0 and out.figures["shadowRequests"] == 80
    assert out.figures["errorRate"] == 0.0 and out.figures["latencyP95Ms"] == 4.0
    checks = {g.metric: g for g in out.gates}
    assert checks["shadowAgreement"].samples == 80 and checks["errorRate"].samples == 80  # default error gate
    assert len(out.pair_samples) == 20


# ------------------------------------------------------- the router's pairing, in process

def _router(monkeypatch, canary: dict):
    """The real Router and FastAPI app (tests/unit/test_serve_hardening.py's harness), every
    request mirrored to `canary`; each variant's engine requests are recorded."""
    from anneal.serve.app import VariantArgs
    from tests.unit.test_serve_hardening import make_router

    variants = [VariantArgs(name="stable", engine="echo", max_tokens=32), VariantArgs(name="canary", **canary)]
    router, _, client = make_router(monkeypatch, variants=variants, shadow_variant="canary", shadow_percent=100,
                                    shadow_compare="exact")
    seen: dict[str, list] = {"stable": [], "canary": []}
    for name, handle in router.handles.items():
        remote = handle.generate.remote

        def record(req, _remote=remote, _name=name):
            seen[_name].append(req)
            return _remote(req)

        handle.generate.remote = record
    return router, client, seen


def _pairs(router, n: int, timeout_s: float = 5.0) -> list:
    import time

    deadline = time.time() + timeout_s
    while len(router.metrics.pair_ring) < n and time.time() < deadline:
        time.sleep(0.02)
    return list(router.metrics.pair_ring)


CHAT = {"messages": [{"role": "user", "content": "Ana has 5 apples and buys 3. How many?"}]}


def test_the_router_pairs_a_mirrored_answer_with_the_users_and_asks_with_the_candidates_settings(monkeypatch):
    router, client, seen = _router(monkeypatch, {"engine": "echo", "temperature": 1.5, "max_tokens": 7})
    with client:
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.headers["x-anneal-variant"] == "stable"
        (pair,) = _pairs(router, 1)
        assert (pair.primary, pair.shadow, pair.agree, pair.shadow_error) == ("stable", "canary", True, False)
        assert pair.prompt == CHAT["messages"][0]["content"] and pair.request_id.startswith("chatcmpl")
        # The mirror is asked as the candidate would be: its temperature, its cap.
        assert seen["stable"][0].temperature == 0.0 and seen["canary"][0].temperature == 1.5
        assert seen["canary"][0].max_tokens == 7 and seen["stable"][0].max_tokens == 32
        # A streamed answer is paired on its whole text.
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200 and "[DONE]" in r.text
        pairs = _pairs(router, 2)
        assert len(pairs) == 2 and pairs[1].agree, pairs[1]
        doc = client.get("/-/stats", params={"since": 0}).json()
    summary = doc["pairs"]["canary"]["stable"]
    assert (summary["mirrored"], summary["pairs"], summary["agreements"]) == (2, 2, 2)
    assert doc["shadow"]["canary"]["window"]["requests"] == 2
    assert doc["variants"]["canary"]["total"]["requests"] == 0  # mirrors are not routed requests


def test_a_failed_mirror_is_a_shadow_error_and_a_failed_user_call_makes_no_pair(monkeypatch):
    router, client, _ = _router(monkeypatch, {"engine": "faulty", "engine_options": {"fail_rate": 1.0}})
    with client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # the user never sees it
        (pair,) = _pairs(router, 1)
        assert pair.shadow_error and not pair.agree
        # Now the stable fails too: no reference answer, so no pair (and no agreement sample).
        router.handles["stable"].server.reconfigure({"engine": "faulty", "model_uri": None,
                                                     "engine_options": {"fail_rate": 1.0}})
        assert client.post("/v1/chat/completions", json=CHAT).status_code >= 500
        assert len(_pairs(router, 2, timeout_s=1.0)) == 1


# ------------------------------------------------------------------------------ the judge

@pytest.mark.parametrize(
    "said, verdict",
    [("yes", "win"), ("Yes, B is as good.", "win"), ("no", "loss"), ("<think>yes or no?</think> No.", "loss"),
     ("B is better", "error"), ("", "error")],
)
def test_judge_verdict(said, verdict):
    from anneal.serve.shadow import judge_verdict

    assert judge_verdict(said) == verdict


@pytest.mark.parametrize(
    "stable, candidate, said",
    [("Answer: 7", "Answer: 7", "yes"), ("Answer: 7", "Answer: 8", "no"), ("no idea", "Answer: 3", "yes"),
     ("Answer: 7", "no idea", "no")],
)
def test_the_rule_judge_stand_in(stable, candidate, said):
    """The deterministic stand-in for a judge model (tests only) reads the default template."""
    from anneal.api.service import DEFAULT_JUDGE_TEMPLATE
    from anneal.serve.engines import GenerateRequest, RuleJudgeEngine
    from anneal.serve.shadow import judge_prompt

    pair = make_pair(time=0, request_id="r", primary="stable", shadow="canary", prompt="What is 3 + 4?",
                     primary_answer=stable, shadow_answer=candidate, primary_ms=1, shadow_ms=1)
    prompt = judge_prompt(DEFAULT_JUDGE_TEMPLATE, pair)
    assert "Question: What is 3 + 4?" in prompt and f"Answer B: {candidate}" in prompt
    got = RuleJudgeEngine().generate(GenerateRequest(messages=[{"role": "user", "content": prompt}])).text
    assert got == said


def test_the_router_judges_a_capped_share_of_pairs_after_the_user_is_answered(monkeypatch):
    from anneal.serve.app import VariantArgs
    from tests.unit.test_serve_hardening import make_router

    variants = [VariantArgs(name="stable", engine="echo"), VariantArgs(name="canary", engine="echo"),
                # a slow judge: the user's answer must not wait for it
                VariantArgs(name="judge", engine="judge-rule", engine_options={"delay_ms": 300})]
    router, _, client = make_router(monkeypatch, variants=variants, shadow_variant="canary", shadow_percent=100,
                                    judge_variant="judge", judge_share=1.0, judge_max_per_minute=2)
    body = {"messages": [{"role": "user", "content": "Say it. Answer: 7"}]}
    import time

    with client:
        started = time.perf_counter()
        for _ in range(4):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert time.perf_counter() - started < 1.2  # 4 answers, no 300 ms judge in their way
        deadline = time.time() + 5
        while time.time() < deadline and any(p.judge == "pending" for p in router.metrics.pair_ring):
            time.sleep(0.05)
        doc = client.get("/-/stats", params={"since": 0}).json()
    summary = doc["pairs"]["canary"]["stable"]
    # Echoed answers carry the same "Answer: 7": the rule judge finds B as good; only 2 a minute.
    assert (summary["pairs"], summary["judged"], summary["wins"], summary["judgeErrors"]) == (4, 2, 2, 0)
    assert doc["judge_skipped"] == 2
    assert doc["variants"]["judge"]["total"]["requests"] == 0  # judge calls are not user traffic


def test_judge_win_rate_is_a_rate_gate_on_judged_pairs():
    from anneal.api.service import ModelServiceSpec
    from anneal.rollout.analysis import PairWindow, StatsWindow, VariantWindow, evaluate

    spec = ModelServiceSpec.model_validate({
        "variants": [{"name": "stable", "model": {"uri": "/m/1"}, "weight": 100},
                     {"name": "canary", "model": {"uri": "/m/2"}, "weight": 0},
                     {"name": "judge", "model": {"uri": "/m/j"}, "weight": 0}],
        "routing": {"shadow": {"variant": "canary", "percent": 100, "judge": {"variant": "judge"}}},
        "rollout": {"stable": "stable", "candidate": "canary",
                    "analysis": {"minRequests": 10, "gates": [{"metric": "judgeWinRate", "min": 0.5},
                                                              {"metric": "errorRate", "max": 0.5}]}},
    })

    def window(judged: int, wins: int) -> StatsWindow:
        return StatsWindow(time=1, since=0, variants={"stable": VariantWindow(100)},
                           shadow={"canary": VariantWindow(100)},
                           pairs={("canary", "stable"): PairWindow(100, 0, 100, 50, 1.0, (), judged, wins)})

    verdicts = [evaluate(spec.rollout.analysis, window(j, w), "stable", "canary") for j, w in
                ((0, 0), (6, 4), (40, 30), (40, 8))]
    assert [v.verdict for v in verdicts] == ["wait", "wait", "pass", "fail"]
    assert verdicts[3].failed_gates == ["judgeWinRate"]
    gate = next(g for g in verdicts[2].gates if g.metric == "judgeWinRate")
    assert gate.samples == 40 and gate.value == 0.75 and gate.low > 0.5
