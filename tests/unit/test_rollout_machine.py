"""The rollout state machine and its analysis gates: every transition, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from anneal.api.service import ModelServiceSpec, ModelServiceStatus
from anneal.rollout.analysis import PairWindow, ProbeResults, StatsWindow, VariantWindow, evaluate
from anneal.rollout.machine import HISTORY_LIMIT, Command, Reason, Transition, step

T0 = 1_700_000_000.0
GOOD_STEPS = [
    {"setWeight": 10}, {"analysis": {}},
    {"setWeight": 25}, {"analysis": {}},
    {"setWeight": 50}, {"analysis": {}},
    {"setWeight": 100},
]


def make_spec(
    steps: list[dict[str, Any]] | None = None,
    *,
    candidate_uri: str = "models:/tiny/2",
    gates: list[dict[str, Any]] | None = None,
    failure_limit: int = 1,
    min_requests: int = 10,
    auto_rollback: bool = True,
    interval: str = "10s",
    extra_variants: list[dict[str, Any]] | None = None,
    rollout: bool = True,
    shadow: bool = False,
) -> ModelServiceSpec:
    variants = [
        {"name": "stable", "model": {"uri": "models:/tiny/1"}, "weight": 100},
        {"name": "canary", "model": {"uri": candidate_uri}, "weight": 0},
    ]
    if extra_variants:
        variants[0]["weight"] = 100 - sum(v["weight"] for v in extra_variants)
        variants += extra_variants
    body: dict[str, Any] = {"variants": variants}
    if shadow:
        body["routing"] = {"shadow": {"variant": "canary", "percent": 100, "compare": "answer"}}
    if rollout:
        body["rollout"] = {
            "stable": "stable",
            "candidate": "canary",
            "steps": steps if steps is not None else GOOD_STEPS,
            "analysis": {
                "interval": interval,
                "minRequests": min_requests,
                "failureLimit": failure_limit,
                "gates": gates if gates is not None else [{"metric": "errorRate", "max": 0.05}],
                "probes": {"perInterval": 4},
            },
            "autoRollback": auto_rollback,
        }
    return ModelServiceSpec.model_validate(body)


def window(
    requests: int = 100,
    errors: int = 0,
    p95: float = 50.0,
    stable_requests: int = 100,
    stable_errors: int = 0,
    stable_p95: float = 50.0,
    probes: tuple[int, int] | None = None,
    stable_probes: tuple[int, int] | None = None,
    pairs: tuple[int, int] | None = None,
    shadow_errors: int = 0,
    ratio: float | None = 1.0,
) -> StatsWindow:
    """A stats window; `pairs` = (answered pairs, agreements) of the canary mirrored behind stable."""
    pr = {}
    if probes is not None:
        pr["canary"] = ProbeResults(*probes)
    if stable_probes is not None:
        pr["stable"] = ProbeResults(*stable_probes)
    shadow, pair_windows = {}, {}
    if pairs is not None:
        mirrored = pairs[0] + shadow_errors
        shadow["canary"] = VariantWindow(mirrored, shadow_errors, 20.0, p95, p95)
        pair_windows[("canary", "stable")] = PairWindow(mirrored, shadow_errors, pairs[0], pairs[1], ratio)
    return StatsWindow(
        time=T0,
        since=T0,
        variants={
            "canary": VariantWindow(requests, errors, 20.0, p95, p95),
            "stable": VariantWindow(stable_requests, stable_errors, 20.0, stable_p95, stable_p95),
        },
        probes=pr,
        shadow=shadow,
        pairs=pair_windows,
    )


GOOD = window()
BAD = window(errors=20)  # 20% errors
THIN = window(requests=3, errors=3)  # below minRequests, all failing


class Driver:
    """Calls `step` like the controller does and keeps what it returned."""

    def __init__(self, spec: ModelServiceSpec, status: ModelServiceStatus | None = None, now: float = T0):
        self.spec = spec
        self.status = status or ModelServiceStatus()
        self.now = now
        self.applied: list[dict[str, int]] = []
        self.events: list[Any] = []
        self.last: Transition | None = None

    def tick(self, dt: float = 0.0, win: StatsWindow | None = GOOD, command: Command | None = None,
             **kw: Any) -> Transition:
        self.now += dt
        t = step(self.spec, self.status, win, self.now, command, **kw)
        self.status = t.status
        if t.weights is not None:
            self.applied.append(t.weights)
        self.events += t.events
        self.last = t
        return t

    @property
    def phase(self) -> str | None:
        return self.status.phase

    @property
    def reasons(self) -> list[str]:
        return [e.reason for e in self.events]

    def candidate_weights(self) -> list[int]:
        return [w["canary"] for w in self.applied]

    def run_until(self, phases: tuple[str, ...], dt: float = 1.0, win: StatsWindow | None = GOOD,
                  limit: int = 500) -> None:
        for _ in range(limit):
            self.tick(dt, win)
            if self.phase in phases:
                return
        raise AssertionError(f"never reached {phases}: {self.phase}, {self.reasons}")


# ------------------------------------------------------------------------- good path


def test_good_path_goes_10_25_50_100_and_is_promoted():
    d = Driver(make_spec())
    d.tick()
    assert d.phase == "RollingOut" and d.reasons == [Reason.STARTED]
    assert d.applied == [{"stable": 100, "canary": 0}]
    d.run_until(("Promoted",))
    assert d.candidate_weights() == [0, 10, 25, 50, 100]
    assert d.status.weights == {"stable": 0, "canary": 100}
    assert d.status.rollout.outcome == "Promoted"
    assert d.reasons.count(Reason.ANALYSIS_PASSED) >= 3
    assert d.reasons[-1] == Reason.PROMOTED
    # Terminal: nothing moves any more, no weights re-applied.
    t = d.tick(3600, BAD)
    assert t.weights is None and d.phase == "Promoted" and t.events == []


def test_each_call_completes_at_most_one_step():
    d = Driver(make_spec([{"setWeight": 10}, {"setWeight": 20}, {"setWeight": 30}]))
    d.tick()
    for expected in (10, 20, 30):
        d.tick(0)
        assert d.status.weights["canary"] == expected
    d.tick(0)
    assert d.phase == "Promoted"


def test_analysis_step_waits_one_interval_before_judging():
    d = Driver(make_spec([{"setWeight": 10}, {"analysis": {}}, {"setWeight": 100}], interval="10s"))
    d.tick()
    d.tick()  # setWeight 10
    d.tick(9.0)
    assert d.status.rollout.step == 1 and d.status.rollout.last_analysis is None
    d.tick(1.0)
    assert d.status.rollout.step == 2
    assert d.status.rollout.last_analysis.verdict == "pass"


# --------------------------------------------------------------------------- gates


@pytest.mark.parametrize("failure_limit", [0, 1, 2])
def test_failure_limit_plus_one_failed_analyses_roll_back(failure_limit):
    d = Driver(make_spec(failure_limit=failure_limit, interval="10s"))
    d.tick()
    d.tick()  # candidate at 10
    for i in range(failure_limit):
        d.tick(10, BAD)
        assert d.phase == "RollingOut", f"rolled back after {i + 1} failures"
        assert d.status.rollout.consecutive_failures == i + 1
    d.tick(10, BAD)
    assert d.phase == "RolledBack"
    assert d.status.weights == {"stable": 100, "canary": 0}
    assert d.status.rollout.outcome == "RolledBack"
    assert d.reasons.count(Reason.ANALYSIS_FAILED) == failure_limit + 1
    assert d.events[-1].reason == Reason.ROLLED_BACK and d.events[-1].type == "Warning"
    last = d.status.rollout.last_analysis
    assert last.verdict == "fail" and last.failed_gates == ["errorRate"]
    assert last.figures["errorRate"] == pytest.approx(0.2)


def test_a_pass_resets_the_run_of_failures():
    d = Driver(make_spec([{"setWeight": 10}, {"pause": "1h"}], failure_limit=1))
    d.tick()
    d.tick()
    d.tick(10, BAD)
    d.tick(10, GOOD)
    d.tick(10, BAD)
    assert d.phase == "Paused" and d.status.rollout.consecutive_failures == 1
    d.tick(10, BAD)
    assert d.phase == "RolledBack"


def test_min_requests_not_reached_is_wait_not_pass_nor_fail():
    d = Driver(make_spec(failure_limit=0, min_requests=10))
    d.tick()
    d.tick()
    for _ in range(5):
        d.tick(10, THIN)
    assert d.phase == "RollingOut" and d.status.rollout.step == 1
    assert d.status.rollout.consecutive_failures == 0
    assert d.status.rollout.last_analysis.verdict == "wait"
    assert "minRequests" in d.status.rollout.last_analysis.reason
    d.tick(10, GOOD)
    assert d.status.rollout.step == 2


def test_stats_unavailable_hold_every_step_then_resume():
    d = Driver(make_spec())
    d.tick(win=None)  # starts the rollout: candidate at 0
    d.tick(win=None, unavailable="GET /-/stats: connection refused")
    assert d.status.weights["canary"] == 0 and d.status.rollout.step == 0
    assert d.status.rollout.holding == "GET /-/stats: connection refused"
    assert "holding at step 0" in d.status.message
    d.tick(100, None)
    assert d.status.rollout.step == 0 and d.status.rollout.last_analysis is None
    assert d.reasons.count(Reason.HOLDING) == 1
    d.tick(1)  # evidence again: the step goes on
    assert d.status.weights["canary"] == 10 and d.status.rollout.holding is None
    assert Reason.RESUMED in d.reasons


def test_partial_stats_hold_like_missing_ones():
    d = Driver(make_spec())
    d.tick()
    partial = StatsWindow(GOOD.time, GOOD.since, GOOD.variants, partial=True)
    d.tick(1, partial)
    assert d.status.rollout.step == 0 and "partial" in d.status.rollout.holding


def test_holding_past_the_progress_deadline_rolls_back_with_the_reason():
    spec = make_spec()
    spec.rollout.progress_deadline = "2m"
    d = Driver(spec)
    d.tick()
    d.tick(1)
    assert d.status.weights["canary"] == 10
    d.tick(1, None, unavailable="variant canary: replica has taken more than 30s to be scheduled")
    d.tick(119, None, unavailable="variant canary: replica has taken more than 30s to be scheduled")
    assert d.phase == "RollingOut"
    d.tick(1, None, unavailable="variant canary: replica has taken more than 30s to be scheduled")
    assert d.phase == "RolledBack" and d.status.weights["canary"] == 0
    assert "progressDeadline 2m" in d.status.rollout.reason and "scheduled" in d.status.rollout.reason


def test_all_error_traffic_never_promotes_without_an_error_gate():
    d = Driver(make_spec(gates=[{"metric": "latencyP95Ms", "max": 1000}], failure_limit=0))
    d.run_until(("Promoted", "RolledBack"), win=window(requests=50, errors=50))
    assert d.phase == "RolledBack" and "errorRate" in d.status.rollout.reason


def test_background_analysis_during_a_pause_rolls_back():
    d = Driver(make_spec([{"setWeight": 50}, {"pause": "10m"}, {"setWeight": 100}], failure_limit=1))
    d.tick()
    d.tick()
    d.tick(10, BAD)
    assert d.phase == "Paused"
    d.tick(10, BAD)
    assert d.phase == "RolledBack"


def test_no_analysis_before_the_candidate_takes_traffic():
    d = Driver(make_spec([{"pause": "1h"}, {"setWeight": 100}], failure_limit=0))
    d.tick()
    d.tick(30, BAD)
    d.tick(30, BAD)
    assert d.phase == "Paused" and d.status.rollout.last_analysis is None


def test_history_is_bounded_and_records_every_analysis():
    d = Driver(make_spec([{"setWeight": 10}, {"pause": {}}], min_requests=1000))
    d.tick()
    d.tick()
    for _ in range(HISTORY_LIMIT + 7):
        d.tick(10, GOOD)
    rs = d.status.rollout
    assert len(rs.history) == HISTORY_LIMIT
    assert rs.analyses == HISTORY_LIMIT + 7
    assert rs.history[-1] == rs.last_analysis
    assert all(h.verdict == "wait" for h in rs.history)


@pytest.mark.parametrize(
    "gate, win, verdict, failed",
    [
        # Rate gates are decided on a 95% Wilson interval: 0/100 errors → [0, 0.037], wholly <= 0.05.
        ({"metric": "errorRate", "max": 0.05}, window(errors=0), "pass", []),
        # 4/100 → [0.016, 0.098]: the point estimate holds, the interval straddles 0.05: wait.
        ({"metric": "errorRate", "max": 0.05}, window(errors=4), "wait", []),
        # 20/100 → [0.133, 0.289]: wholly above.
        ({"metric": "errorRate", "max": 0.05}, window(errors=20), "fail", ["errorRate"]),
        # Never pass on a few lucky requests: 0/20 → [0, 0.161].
        ({"metric": "errorRate", "max": 0.05}, window(requests=20, errors=0), "wait", []),
        ({"metric": "latencyP95Ms", "max": 200}, window(p95=150), "pass", []),
        ({"metric": "latencyP95Ms", "max": 200}, window(p95=1000), "fail", ["latencyP95Ms"]),
        # Newcombe's interval of the difference: equal rates over many requests pass...
        ({"metric": "errorRateVsStable", "max": 0.02},
         window(requests=10000, errors=100, stable_requests=10000, stable_errors=100), "pass", []),
        # ... over 100 requests each the difference is not known to 0.02 yet.
        ({"metric": "errorRateVsStable", "max": 0.02}, window(errors=10, stable_errors=9), "wait", []),
        ({"metric": "errorRateVsStable", "max": 0.02}, window(errors=10, stable_errors=0), "fail",
         ["errorRateVsStable"]),
        # No stable traffic: compared with a perfect stable.
        ({"metric": "errorRateVsStable", "max": 0.02}, window(requests=200, errors=0, stable_requests=0), "pass", []),
        ({"metric": "accuracy", "min": 0.5}, window(probes=(4, 4)), "pass", []),
        ({"metric": "accuracy", "min": 0.5}, window(probes=(0, 4)), "fail", ["accuracy"]),
        # Fewer labelled answers than perInterval (4): cannot judge quality yet.
        ({"metric": "accuracy", "min": 0.5}, window(probes=(0, 2)), "wait", []),
        ({"metric": "accuracy", "min": 0.5}, window(), "wait", []),
        ({"metric": "errorRate", "max": 0.05}, window(requests=5, errors=5), "wait", []),
        # Shadow agreement: all of 40 pairs agree → [0.912, 1]: pass; 5 of 5 → [0.57, 1]: wait.
        ({"metric": "shadowAgreement", "min": 0.9}, window(pairs=(40, 40)), "pass", []),
        ({"metric": "shadowAgreement", "min": 0.9}, window(pairs=(5, 5)), "wait", []),
        # A known-bad rate: 28 of 40 agree (70%) → [0.546, 0.819]: fail.
        ({"metric": "shadowAgreement", "min": 0.9}, window(pairs=(40, 28)), "fail", ["shadowAgreement"]),
        # No pairs (nothing mirrored yet): cannot tell.
        ({"metric": "shadowAgreement", "min": 0.9}, window(), "wait", []),
        # Failed mirrored calls are not pairs to agree on, but count for shadowErrorRate.
        ({"metric": "shadowErrorRate", "max": 0.1}, window(pairs=(20, 20), shadow_errors=20), "fail",
         ["shadowErrorRate"]),
        ({"metric": "shadowErrorRate", "max": 0.1}, window(pairs=(60, 60)), "pass", []),
        # The latency ratio is a figure, not a rate: decided on its value.
        ({"metric": "shadowLatencyRatio", "max": 1.5}, window(pairs=(10, 10), ratio=1.2), "pass", []),
        ({"metric": "shadowLatencyRatio", "max": 1.5}, window(pairs=(10, 10), ratio=3.0), "fail",
         ["shadowLatencyRatio"]),
    ],
)
def test_gates(gate, win, verdict, failed):
    shadow = gate["metric"].startswith("shadow")
    spec = make_spec(gates=[gate] if not shadow else [gate, {"metric": "errorRate", "max": 0.5}], shadow=shadow)
    outcome = evaluate(spec.rollout.analysis, win, "stable", "canary")
    assert outcome.verdict == verdict, outcome.reason
    assert outcome.failed_gates == failed


def test_stats_window_from_contract_payload():
    payload = {
        "time": T0 + 5, "since": T0, "weights": {"stable": 90, "canary": 10},
        "variants": {
            "canary": {"total": {"requests": 500, "errors": 50},
                       "window": {"requests": 40, "errors": 8, "errorRate": 0.2, "latencyP50Ms": 10,
                                  "latencyP95Ms": 30.5, "latencyP99Ms": 40}},
            "stable": {"total": {"requests": 900}, "window": {"requests": 360, "errors": 0,
                                                             "latencyP95Ms": None}},
        },
        "shadow": {}, "routes": {},
    }
    w = StatsWindow.from_stats(payload, {"canary": ProbeResults(3, 4)})
    assert w.since == T0 and w.variant("canary").requests == 40
    assert w.variant("canary").error_rate == pytest.approx(0.2)
    assert w.variant("canary").latency_p95_ms == 30.5
    assert w.variant("stable").latency_p95_ms is None
    assert w.variant("missing").requests == 0
    assert w.probes["canary"].accuracy == 0.75


# -------------------------------------------------------------------------- pauses


def test_timed_pause_waits_its_duration():
    d = Driver(make_spec([{"setWeight": 10}, {"pause": "30s"}, {"setWeight": 100}], gates=[]))
    d.tick()
    d.tick()
    d.tick(1)
    assert d.phase == "Paused" and d.status.rollout.paused_reason == "PauseStep"
    d.tick(28)
    assert d.phase == "Paused"
    d.tick(1)
    assert d.phase == "RollingOut" and d.status.rollout.step == 2
    assert d.reasons.count(Reason.PAUSED) == 1  # announced once, not every tick


def test_pause_without_duration_waits_for_promote():
    d = Driver(make_spec([{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}], gates=[]))
    d.tick()
    d.tick()
    for _ in range(5):
        d.tick(3600)
    assert d.phase == "Paused" and d.status.rollout.step == 1
    assert d.status.rollout.paused_reason == "WaitingForPromote"
    d.tick(1, command=Command("promote"))
    assert d.phase == "RollingOut" and d.status.rollout.step == 2
    assert Reason.STEP_PROMOTED in d.reasons
    d.run_until(("Promoted",))
    assert d.status.weights["canary"] == 100


@pytest.mark.parametrize(
    "command, phase, canary",
    [
        (Command("promote", full=True), "Promoted", 100),
        (Command("abort", reason="looks odd"), "RolledBack", 0),
    ],
)
@pytest.mark.parametrize("pause", ["10m", {}])
def test_promote_or_abort_during_a_pause(pause, command, phase, canary):
    d = Driver(make_spec([{"setWeight": 25}, {"pause": pause}, {"setWeight": 50}, {"setWeight": 100}]))
    d.tick()
    d.tick()
    d.tick(1)
    assert d.phase == "Paused"
    t = d.tick(1, command=command)
    assert d.phase == phase
    assert t.weights == {"stable": 100 - canary, "canary": canary}
    if command.kind == "abort":
        assert "looks odd" in d.status.rollout.reason
        assert Reason.ABORTED in d.reasons


def test_commands_that_do_not_apply_are_ignored_with_a_warning():
    d = Driver(make_spec(gates=[]))
    d.tick()
    d.run_until(("Promoted",))
    for cmd in (Command("abort"), Command("retry"), Command("promote")):
        t = d.tick(1, command=cmd)
        assert d.phase == "Promoted" and t.weights is None
        assert t.events[-1].reason == Reason.COMMAND_IGNORED and t.events[-1].type == "Warning"


# ----------------------------------------------------------------- autoRollback off


def test_auto_rollback_off_pauses_and_waits_for_a_human():
    d = Driver(make_spec(auto_rollback=False, failure_limit=0))
    d.tick()
    d.tick()
    d.tick(10, BAD)
    assert d.phase == "Paused"
    assert d.status.rollout.paused_reason == "AnalysisFailed"
    assert d.status.weights["canary"] == 10  # weights stay where they were
    assert Reason.ROLLOUT_PAUSED in d.reasons
    for _ in range(3):
        d.tick(100, GOOD)
    assert d.phase == "Paused" and d.status.rollout.step == 1
    d.tick(1, command=Command("promote"))
    assert d.phase == "RollingOut" and d.status.rollout.step == 2
    assert d.status.rollout.consecutive_failures == 0


@pytest.mark.parametrize("command, phase, step", [(Command("abort"), "RolledBack", 1), (Command("retry"), "RollingOut", 0)])
def test_failure_pause_then_abort_or_retry(command, phase, step):
    d = Driver(make_spec(auto_rollback=False, failure_limit=0))
    d.tick()
    d.tick()
    d.tick(10, BAD)
    d.tick(1, command=command)
    assert d.phase == phase and d.status.rollout.step == step
    assert d.status.weights["canary"] == 0


# ------------------------------------------------------------------ retry after rollback


def test_retry_after_rollback_starts_again_from_step_zero():
    d = Driver(make_spec(failure_limit=0))
    d.tick()
    d.tick()
    d.tick(10, BAD)
    assert d.phase == "RolledBack"
    d.tick(100)
    assert d.phase == "RolledBack"  # stays rolled back on its own
    d.tick(1, command=Command("retry"))
    rs = d.status.rollout
    assert d.phase == "RollingOut" and rs.step == 0 and rs.attempt == 2
    assert rs.consecutive_failures == 0 and len(rs.history) == 1  # history kept across attempts
    assert Reason.RETRIED in d.reasons
    d.run_until(("Promoted",))


# --------------------------------------------------------------------- spec edited


def test_steps_shortened_mid_rollout_clamps_the_step_index():
    d = Driver(make_spec([{"setWeight": 10}, {"setWeight": 20}, {"setWeight": 30}, {"pause": {}}], gates=[]))
    d.tick()
    for _ in range(4):
        d.tick()
    assert d.status.rollout.step == 3 and d.phase == "Paused"
    d.spec = make_spec([{"setWeight": 10}, {"setWeight": 60}], gates=[])
    d.tick(1)
    assert Reason.STEPS_CHANGED in d.reasons
    assert d.status.rollout.step == 2  # clamped to the last step (1), which then ran
    assert d.status.weights["canary"] == 60
    d.tick(1)
    assert d.phase == "Promoted"


def test_steps_edited_within_range_keep_the_position():
    d = Driver(make_spec([{"setWeight": 10}, {"pause": {}}, {"setWeight": 100}], gates=[]))
    d.tick()
    d.tick()
    d.tick()
    d.spec = make_spec([{"setWeight": 10}, {"pause": "5s"}, {"setWeight": 100}], gates=[])
    d.tick(6)
    assert d.status.rollout.step == 2


def test_candidate_model_changed_mid_rollout_restarts():
    d = Driver(make_spec())
    d.tick()
    d.tick()
    d.tick(10)
    d.tick()
    assert d.status.weights["canary"] == 25
    d.spec = make_spec(candidate_uri="models:/tiny/3")
    t = d.tick(1)
    rs = d.status.rollout
    assert rs.step == 0 and rs.candidate_model == "models:/tiny/3"
    assert t.weights == {"stable": 100, "canary": 0}
    assert t.events[0].reason == Reason.RESTARTED
    assert rs.attempt == 2
    assert d.status.models["canary"] == "models:/tiny/3"


def test_new_candidate_after_a_finished_rollout_starts_a_new_one():
    d = Driver(make_spec(gates=[]))
    d.tick()
    d.run_until(("Promoted",))
    d.spec = make_spec(candidate_uri="models:/tiny/4", gates=[])
    t = d.tick(1)
    assert t.events[0].reason == Reason.STARTED and d.phase == "RollingOut"
    assert t.weights == {"stable": 100, "canary": 0}


def test_desired_models_override_the_spec_uri():
    d = Driver(make_spec())
    d.tick(desired_models={"canary": "models:/tiny/9", "stable": "models:/tiny/1"})
    assert d.status.rollout.candidate_model == "models:/tiny/9"
    d.tick(desired_models={"canary": "models:/tiny/9", "stable": "models:/tiny/1"})
    assert d.status.rollout.attempt == 1


def test_rollout_removed_mid_rollout_restores_declared_weights():
    d = Driver(make_spec())
    d.tick()
    d.tick()
    d.spec = make_spec(rollout=False)
    t = d.tick(1)
    assert d.phase == "Ready" and t.weights == {"stable": 100, "canary": 0}
    assert Reason.REMOVED in d.reasons


def test_no_rollout_section_is_ready_with_declared_weights():
    d = Driver(make_spec(rollout=False))
    t = d.tick()
    assert d.phase == "Ready" and t.weights == {"stable": 100, "canary": 0}
    assert d.tick(5).weights is None


def test_candidate_already_serving_that_model_starts_nothing():
    status = ModelServiceStatus(models={"stable": "models:/tiny/1", "canary": "models:/tiny/2"})
    d = Driver(make_spec(), status)
    d.tick()
    assert d.phase == "Ready" and d.status.rollout is None and d.events == []


def test_other_variants_keep_their_share():
    extra = [{"name": "small", "model": {"uri": "models:/small/1"}, "weight": 20}]
    d = Driver(make_spec([{"setWeight": 50}, {"setWeight": 100}], gates=[], extra_variants=extra))
    d.tick()
    assert d.status.weights == {"stable": 80, "canary": 0, "small": 20}
    d.tick()
    assert d.status.weights == {"stable": 40, "canary": 40, "small": 20}
    d.tick()
    d.tick()
    assert d.phase == "Promoted" and d.status.weights == {"stable": 0, "canary": 80, "small": 20}


# --------------------------------------------------------------------------- clock


def test_clock_going_backwards_never_advances():
    d = Driver(make_spec([{"setWeight": 10}, {"pause": "30s"}, {"setWeight": 100}], failure_limit=0))
    d.tick()
    d.tick()
    d.tick(20)
    step_before = d.status.rollout.step
    t = d.tick(-3600, BAD)
    assert d.status.rollout.step == step_before and d.phase == "Paused"
    assert t.weights is None and [e.reason for e in t.events] == [Reason.CLOCK_SKEW]
    assert d.status.rollout.consecutive_failures == 0
    # The step's timers restart at the new "now": the full pause is waited again.
    d.tick(29)
    assert d.status.rollout.step == step_before
    d.tick(1)
    assert d.status.rollout.step == step_before + 1


def test_huge_jump_forward_completes_one_step_per_call():
    d = Driver(make_spec([{"setWeight": 10}, {"pause": "30s"}, {"pause": "1h"}, {"setWeight": 100}], gates=[]))
    d.tick()
    d.tick()
    d.tick(1)
    steps = []
    for _ in range(3):
        d.tick(10**9)
        steps.append(d.status.rollout.step)
    assert steps == [2, 3, 4]
    d.tick(10**9)
    assert d.phase == "Promoted"


def test_status_passed_in_is_never_modified():
    spec = make_spec()
    s0 = ModelServiceStatus()
    t1 = step(spec, s0, GOOD, T0)
    snapshot = t1.status.model_dump()
    step(spec, t1.status, GOOD, T0 + 1)
    assert t1.status.model_dump() == snapshot and s0.rollout is None


def test_status_round_trips_through_json():
    d = Driver(make_spec(failure_limit=3))
    d.tick()
    d.tick()
    d.tick(10, BAD)
    dumped = d.status.to_dict()
    assert dumped["rollout"]["candidate"] == "canary" and dumped["rollout"]["attempt"] == 1
    assert dumped["rollout"]["lastAnalysis"]["verdict"] == "fail"
    d.status = ModelServiceStatus.model_validate(dumped)
    d.tick(10, BAD)
    assert d.status.rollout.consecutive_failures == 2
