"""`kubectl anneal`'s views (pure): a rollout's steps, weights, gates and history; a model's lineage from registry tags.

The commands themselves run against the real API server in tests/e2e/test_rollout_operator.py.
"""

from __future__ import annotations

from anneal.kubectl import format_lineage, lineage_of, rollout_view

SERVICE = {
    "metadata": {"name": "canary", "namespace": "team"},
    "spec": {
        "variants": [{"name": "stable", "model": {"uri": "models:/m/1"}, "weight": 100},
                     {"name": "canary", "model": {"uri": "models:/m/2"}, "weight": 0}],
        "rollout": {"stable": "stable", "candidate": "canary",
                    "steps": [{"setWeight": 20}, {"analysis": {}}, {"pause": {}}, {"setWeight": 100}],
                    "analysis": {"gates": [{"metric": "accuracy", "min": 0.8}]}},
    },
    "status": {
        "phase": "Paused", "weights": {"canary": 20, "stable": 80},  # as the API server returns it: sorted
        "rollout": {"step": 2, "attempt": 1, "pausedReason": "WaitingForPromote", "candidateModel": "models:/m/2",
                    "lastAnalysis": {"time": "2026-12-03T10:00:00Z", "step": 1, "verdict": "pass", "candidateWeight": 20,
                                     "figures": {"accuracy": 0.9, "errorRate": 0.0, "requests": 40.0}},
                    "history": [{"time": "2026-12-03T09:59:30Z", "step": 1, "verdict": "wait"},
                                {"time": "2026-12-03T10:00:00Z", "step": 1, "verdict": "pass"}]},
    },
}


def test_rollout_view_shows_steps_weights_each_gate_against_its_threshold_and_history():
    text = rollout_view(SERVICE)
    assert "Status:      Paused" in text and "WaitingForPromote (kubectl anneal promote to go on)" in text
    assert "Weights:     stable=80 canary=20" in text
    assert "✔ 0: setWeight 20" in text and "✔ 1: analysis" in text and "▶ 2: pause (until promoted)" in text
    assert "· 3: setWeight 100" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  accuracy ")
            or line.startswith("  errorRate ")}
    assert rows["accuracy"] == ["0.9", ">=", "0.8", "ok"]
    assert rows["errorRate"] == ["0", "<=", "0.05", "ok"]  # the default gate is shown too: it is checked
    assert "History:" in text and "step 1  wait" in text


def test_a_failed_gate_and_an_unmeasured_one_are_told_apart():
    svc = {**SERVICE, "status": {**SERVICE["status"], "phase": "RolledBack", "rollout": {
        **SERVICE["status"]["rollout"], "outcome": "RolledBack", "reason": "accuracy 0 < 0.8",
        "lastAnalysis": {"verdict": "fail", "step": 1, "failedGates": ["accuracy"], "figures": {"accuracy": 0.0}}}}}
    text = rollout_view(svc)
    assert "Outcome:     RolledBack: accuracy 0 < 0.8" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("  accuracy ", "  errorRate "))}
    assert lines["accuracy"].rstrip().endswith("fail")
    assert "n/a" in lines["errorRate"] and lines["errorRate"].rstrip().endswith("-")


def test_lineage_walks_from_the_deployed_version_back_to_the_teacher():
    registry = {
        "models:/math-student-w8a16/1": {"anneal.kind": "CompressionJob", "anneal.name": "math-quantized",
                                         "anneal.namespace": "team", "anneal.source": "models:/math-student/1",
                                         "anneal.mlflow_run_id": "r3"},
        "models:/math-student/1": {"anneal.kind": "DistillationJob", "anneal.method": "kd", "anneal.name": "math-student",
                                   "anneal.namespace": "team", "anneal.teacher": "models:/math-teacher@champion",
                                   "anneal.teacher_version": "1"},
        "models:/math-teacher/1": {"anneal.kind": "DistillationJob", "anneal.method": "sft",
                                   "anneal.name": "math-teacher", "anneal.namespace": "team"},
    }
    root = lineage_of("models:/math-student-w8a16/1", "deployed as student (50%)", registry.get)
    (student,) = root.parents
    (teacher,) = student.parents
    assert (root.kind, student.method, teacher.uri) == ("CompressionJob", "kd", "models:/math-teacher/1")
    text = format_lineage([root, lineage_of("/local/teacher", "deployed as teacher (50%)", registry.get)])
    assert text.splitlines()[0].startswith("deployed as student (50%): models:/math-student-w8a16/1  CompressionJob")
    assert "  └─ source: models:/math-student/1  DistillationJob (kd)  DistillationJob/team/math-student" in text
    assert "    └─ teacher: models:/math-teacher/1  DistillationJob (sft)" in text
    assert "deployed as teacher (50%): /local/teacher  [not a registered model]" in text


def test_each_gate_shows_its_interval_samples_and_verdict():
    checks = [{"metric": "accuracy", "bound": "min", "threshold": 0.8, "value": 0.9, "low": 0.74, "high": 0.97,
               "samples": 40, "verdict": "wait"},
              {"metric": "errorRate", "bound": "max", "threshold": 0.05, "value": 0.0, "low": 0.0, "high": 0.0456,
               "samples": 80, "verdict": "pass"}]
    svc = {**SERVICE, "status": {**SERVICE["status"], "rollout": {
        **SERVICE["status"]["rollout"], "lastAnalysis": {**SERVICE["status"]["rollout"]["lastAnalysis"],
                                                         "verdict": "wait", "gates": checks, "confidence": 0.95}}}}
    text = rollout_view(svc)
    assert "interval (95%)" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()
            if line.startswith(("  accuracy ", "  errorRate "))}
    # The point estimate 0.9 is above 0.8, but its interval reaches below it: the gate waits.
    assert rows["accuracy"] == ["0.9", "[0.74,", "0.97]", "n=40", ">=", "0.8", "wait"]
    assert rows["errorRate"] == ["0", "[0,", "0.0456]", "n=80", "<=", "0.05", "ok"]
