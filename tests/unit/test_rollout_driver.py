"""The embedded rollout driver and its control channel, against a small fake router on loopback.

The fake speaks the two serving contracts (``/-/stats`` windows, pinned variants, the chat
endpoint); the real Serve app is exercised in tests/integration/test_rollout.py.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from anneal.api import parse_manifest
from anneal.rollout import control
from anneal.rollout.control import command_from_annotations
from anneal.local.rollout import drive
from anneal.rollout.machine import Command
from anneal.settings import Settings


class FakeRouter:
    """Weighted routing, pinning, per-variant behaviour and contract-1 stats, in memory."""

    def __init__(self, behaviour: dict[str, dict[str, Any]]):
        self.behaviour = behaviour  # variant -> {"fail": rate, "wrong": bool}
        self.weights = {name: 0 for name in behaviour}
        self.records: list[tuple[float, str, bool]] = []
        self.lock = threading.Lock()
        self.rng = random.Random(0)
        router = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, doc: Any, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                since = float(q["since"][0]) if "since" in q else None
                self._send(200, router.stats(since))

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                variant = self.headers.get("x-anneal-variant") or router.pick()
                b = router.behaviour[variant]
                failed = router.rng.random() < b.get("fail", 0.0)
                with router.lock:
                    router.records.append((time.time(), variant, failed))
                if failed:
                    self._send(502, {"error": {"message": "boom"}}, {"x-anneal-variant": variant})
                    return
                question = body["messages"][-1]["content"]
                answer = solve(question)
                text = f"Answer: {answer + 1 if b.get('wrong') else answer}"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]},
                           {"x-anneal-variant": variant})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def pick(self) -> str:
        with self.lock:
            x = self.rng.random() * 100
            for name, w in self.weights.items():
                if x < w:
                    return name
                x -= w
            return next(iter(self.weights))

    def apply(self, app_name: str, args: Any, weights: dict[str, int]) -> None:
        with self.lock:
            self.weights = dict(weights)

    def stats(self, since: float | None) -> dict[str, Any]:
        with self.lock:
            records = list(self.records)
        doc: dict[str, Any] = {"time": time.time(), "since": since, "weights": dict(self.weights), "variants": {},
                               "shadow": {}, "routes": {}}
        for name in self.behaviour:
            def fig(rs: list) -> dict[str, Any]:
                n, e = len(rs), sum(1 for r in rs if r[2])
                return {"requests": n, "errors": e, "errorRate": e / n if n else None,
                        "latencyP50Ms": 5.0, "latencyP95Ms": 9.0, "latencyP99Ms": 10.0}
            mine = [r for r in records if r[1] == name]
            doc["variants"][name] = {"total": fig(mine),
                                     "window": fig([r for r in mine if since is not None and r[0] >= since])}
        return doc

    def close(self) -> None:
        self.server.shutdown()


def solve(question: str) -> int:
    """Answer a built-in-task question by reading it (the fake's 'good model')."""
    value = int(re.search(r"has (\d+)", question).group(1))
    for clause in re.split(r", then |\. ", question.split(". ", 1)[1]):
        if m := re.search(r"(buys|finds|gets|receives) (\d+) more", clause):
            value += int(m.group(2))
        elif m := re.search(r"(gives away|loses|uses|sells) (\d+)", clause):
            value -= int(m.group(2))
        elif "doubles" in clause or "2 times" in clause:
            value *= 2
        elif "triples" in clause or "3 times" in clause:
            value *= 3
    return value


def manifest(steps: list[dict[str, Any]], gates: list[dict[str, Any]], failure_limit: int = 1,
             min_requests: int = 5, interval: str = "1s") -> Any:
    return parse_manifest({
        "apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": "svc"},
        "spec": {
            "variants": [{"name": "stable", "model": {"uri": "/models/a"}, "weight": 100},
                         {"name": "canary", "model": {"uri": "/models/b"}, "weight": 0}],
            "rollout": {"stable": "stable", "candidate": "canary", "steps": steps,
                        "analysis": {"interval": interval, "minRequests": min_requests,
                                     "failureLimit": failure_limit, "gates": gates,
                                     "probes": {"perInterval": 4}}},
        },
    })


@pytest.fixture
def settings(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNEAL_HOME", str(tmp_path))
    return Settings()


def run(router: FakeRouter, m: Any, settings: Settings, **kw: Any):
    updates: list[Any] = []
    status = drive(m, endpoint=router.endpoint, app_name="svc", args=None, settings=settings,
                   apply=router.apply, tick_s=0.1, track=False, timeout_s=40, on_update=updates.append,
                   traffic_options={"max_tokens": 8}, **kw)
    return status, updates


STEPS = [{"setWeight": 20}, {"analysis": {}}, {"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}]


def test_good_candidate_is_promoted_under_generated_traffic(settings):
    router = FakeRouter({"stable": {}, "canary": {}})
    try:
        status, updates = run(router, manifest(STEPS, [{"metric": "errorRate", "max": 0.05}]), settings,
                              traffic_rps=40)
    finally:
        router.close()
    assert status.phase == "Promoted"
    assert router.weights == {"stable": 0, "canary": 100}
    seen = [u.status.weights.get("canary") for u in updates]
    assert [w for i, w in enumerate(seen) if i == 0 or w != seen[i - 1]] == [0, 20, 50, 100]
    traffic = updates[-1].traffic["variants"]
    assert traffic["stable"]["failed"] == 0 and traffic["canary"]["ok"] > 0
    state = control.status("svc", home=settings.anneal.root)
    assert state["status"]["phase"] == "Promoted" and state["stopped"] is True


def test_erroring_candidate_is_rolled_back(settings):
    router = FakeRouter({"stable": {}, "canary": {"fail": 0.5}})
    try:
        status, updates = run(router, manifest(STEPS, [{"metric": "errorRate", "max": 0.05}]), settings,
                              traffic_rps=40)
    finally:
        router.close()
    assert status.phase == "RolledBack"
    assert router.weights == {"stable": 100, "canary": 0}
    assert status.rollout.last_analysis.failed_gates == ["errorRate"]
    assert status.rollout.consecutive_failures == 2


def test_wrong_answers_fail_the_accuracy_gate_through_probes(settings):
    router = FakeRouter({"stable": {}, "canary": {"wrong": True}})
    try:
        status, _ = run(router, manifest(STEPS, [{"metric": "accuracy", "min": 0.8}], min_requests=0), settings)
    finally:
        router.close()
    assert status.phase == "RolledBack"
    figures = status.rollout.last_analysis.figures
    assert figures["accuracy"] == 0.0 and figures["stableAccuracy"] == 1.0
    # Probes were pinned: the candidate got them although its weight was 20.
    pinned = [r for r in router.records if r[1] == "canary"]
    assert len(pinned) >= 8


def test_right_answers_pass_the_accuracy_gate(settings):
    router = FakeRouter({"stable": {}, "canary": {}})
    try:
        status, _ = run(router, manifest(STEPS, [{"metric": "accuracy", "min": 0.8}], min_requests=0), settings)
    finally:
        router.close()
    assert status.phase == "Promoted"


def test_promote_and_status_through_the_control_channel(settings):
    router = FakeRouter({"stable": {}, "canary": {}})
    m = manifest([{"setWeight": 30}, {"pause": {}}, {"setWeight": 100}], [])
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(status=run(router, m, settings)[0]))
    t.start()
    try:
        home = settings.anneal.root
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if control.status("svc", home=home)["status"].get("phase") == "Paused":
                    break
            except control.ControlError:
                pass
            time.sleep(0.1)
        state = control.status("svc", home=home)
        assert state["running"] and state["currentStep"] == "pause {}"
        assert "waiting for promote" in control.format_status(state)
        ignored = control.retry("svc", home=home)
        assert ignored.handled and not ignored.accepted
        done = control.promote("svc", home=home)
        assert done.handled and done.accepted
        t.join(20)
    finally:
        router.close()
    assert result["status"].phase == "Promoted"


def test_control_commands_need_a_running_service(tmp_path):
    with pytest.raises(control.ControlError, match="anneal run"):
        control.promote("nope", home=tmp_path)


@pytest.mark.parametrize(
    "annotations, handled, expected",
    [
        ({}, {}, None),
        ({"anneal.dev/promote": "1"}, {}, Command("promote", source=("anneal.dev/promote", "1"))),
        ({"anneal.dev/promote": "1"}, {"anneal.dev/promote": "1"}, None),
        ({"anneal.dev/promote": "2"}, {"anneal.dev/promote": "1"}, Command("promote", source=("anneal.dev/promote", "2"))),
        ({"anneal.dev/promote": "full"}, {}, Command("promote", full=True, source=("anneal.dev/promote", "full"))),
        ({"anneal.dev/promote": "1", "anneal.dev/abort": "x"}, {},
         Command("abort", source=("anneal.dev/abort", "x"))),
        ({"anneal.dev/retry": "r1", "other": "y"}, {}, Command("retry", source=("anneal.dev/retry", "r1"))),
    ],
)
def test_command_from_annotations(annotations, handled, expected):
    got = command_from_annotations(annotations, handled)
    if expected is None:
        assert got is None
    else:
        assert (got.kind, got.full, got.source) == (expected.kind, expected.full, expected.source)


def test_annotation_command_is_recorded_as_handled_by_the_machine():
    from anneal.api.service import ModelServiceStatus
    from anneal.rollout.analysis import StatsWindow
    from anneal.rollout.machine import step

    m = manifest([{"setWeight": 30}, {"pause": {}}, {"setWeight": 100}], [])
    st = step(m.spec, ModelServiceStatus(), StatsWindow(1000.0, None), 1000.0).status
    st = step(m.spec, st, StatsWindow(1001.0, None), 1001.0).status
    ann = {"anneal.dev/promote": "a"}
    cmd = command_from_annotations(ann, st.rollout.handled_commands)
    st = step(m.spec, st, StatsWindow(1002.0, None), 1002.0, cmd).status
    assert st.rollout.step == 2
    assert command_from_annotations(ann, st.rollout.handled_commands) is None


def test_solver_matches_the_builtin_task():
    from anneal.data.reasoning import generate

    assert all(solve(p.question) == p.answer for p in generate(200, seed=3, difficulty=4))
