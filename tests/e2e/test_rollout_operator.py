"""Staged rollouts through the operator, as a user drives them with `kubectl`: a real API server,
the session's Ray head (Serve through its REST API), tiny Llama variants built here, live traffic.

What `anneal run` does embedded must happen here too (one tick, `anneal.control.rollout`):
a candidate model change starts a rollout, the annotations act once each, every field the
machine keeps survives the API server, an operator killed mid-rollout resumes at the same
step, a failing candidate is rolled back by the default error-rate gate while the stable
variant loses no request, and the operator's labelled probes fail a candidate that answers wrong
(fast and error-free) and pass one that answers right.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import answering
from tests.e2e.test_operator import _get, _job, _status
from tests.e2e.test_operator import operator  # noqa: F401 - the module-scoped operator fixture
from tests.e2e.test_service_shared import (  # noqa: F401 - module fixtures
    READY_TIMEOUT,
    _router_weights,
    _variant,
    serve_port,
    service_app,
    tiny_models,
)
from tests.e2e.test_service_shared import _wait_or_explain as _wait_serve

pytestmark = pytest.mark.e2e

NAME = "canary"
INTERVAL_S = 3
FAILURE_LIMIT = 1


def _wait_or_explain(what: str, probe: Any, timeout: float, op: Any, ray: str, app: str, every: float = 1.0) -> Any:
    """`_wait_serve`, with the service's status in the failure (the first thing to read)."""
    try:
        return _wait_serve(what, probe, timeout, op, ray, app, every)
    except AssertionError as exc:
        kube, ns = _CURRENT["kube"], _CURRENT["ns"]
        st = json.dumps(_status(kube, ns, "msvc", NAME), indent=1)[-6000:]
        raise AssertionError(f"{exc}\nstatus of msvc/{NAME}:\n{st}") from None


_CURRENT: dict[str, Any] = {}


@pytest.fixture(scope="module")
def broken_model() -> str:
    """A tiny Llama whose weights are NaN: sampling from it raises, so every request to it fails."""
    import torch

    from anneal.modeling.tiny import LlamaShape, build_llama, save_pretrained
    from anneal.modeling.tokenizer import builtin_corpus, train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="anneal-e2e-broken-"))
    tokenizer = train_tokenizer(builtin_corpus(20), vocab_size=300)
    model = build_llama(LlamaShape(hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    path = str(save_pretrained(model, tokenizer, root / "broken"))
    yield path
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def answering_models() -> dict[str, str]:
    """Two tiny Llamas that answer `Answer: 7` (right) or `Answer: 8` (wrong), and a probe set (tests/answering.py)."""
    root = Path(tempfile.mkdtemp(prefix="anneal-e2e-answering-"))
    yield answering.build(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def traffic():
    """Built-in-task requests at 4/s to an endpoint, counted per variant (from `x-anneal-variant`)."""
    from anneal.local.rollout import TrafficGenerator

    started: list[TrafficGenerator] = []

    def start(endpoint: str, max_tokens: int = 4) -> TrafficGenerator:
        gen = TrafficGenerator(endpoint, 4, max_tokens=max_tokens, max_in_flight=8, timeout_s=60).start()
        started.append(gen)
        return gen

    yield start
    for gen in started:
        gen.stop(wait=False)


def _rollout_spec(stable: str, candidate: str, steps: list[dict[str, Any]], ray: str,
                  candidate_generation: dict[str, Any] | None = None) -> dict[str, Any]:
    cand = _variant("canary", candidate, 0)
    if candidate_generation:
        cand["generation"] = {**cand["generation"], **candidate_generation}
    return {
        "variants": [_variant("stable", stable, 100), cand],
        "ray": {"address": ray},
        "rollout": {"stable": "stable", "candidate": "canary", "steps": steps,
                    "analysis": {"interval": f"{INTERVAL_S}s", "minRequests": 3, "failureLimit": FAILURE_LIMIT},
                    "progressDeadline": "10m"},
    }


def _annotate(kube, ns: str, key: str, value: str) -> None:
    kube.kubectl("annotate", "msvc", NAME, "-n", ns, "--overwrite", f"{key}={value}")


def _rollout(kube, ns: str) -> dict[str, Any]:
    return _status(kube, ns, "msvc", NAME).get("rollout") or {}


def test_candidate_change_rolls_out_pauses_resumes_after_a_kill_and_promotes(
        kube_cluster, namespace, operator, ray_head, serve_port, tiny_models, service_app, traffic):  # noqa: F811
    kube, ns, op, app = kube_cluster, namespace, operator, service_app
    _CURRENT.update(kube=kube, ns=ns)
    steps = [{"setWeight": 50}, {"analysis": {}}, {"pause": {}}, {"setWeight": 100}]
    spec = _rollout_spec(tiny_models["small"], tiny_models["small"], steps, ray_head)
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job(NAME, spec, kind="ModelService")))
    st = _wait_or_explain("the service serving", lambda: (s := _status(kube, ns, "msvc", NAME)).get("endpoint")
                          and any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", []))
                          and s, READY_TIMEOUT, op, ray_head, app, every=2)
    gen = traffic(st["endpoint"])

    # The analysis step passes on live traffic, then the rollout waits for a promote.
    _wait_or_explain("paused, waiting for promote", lambda: _rollout(kube, ns).get("pausedReason")
                     == "WaitingForPromote", 300, op, ray_head, app, every=2)
    ro = _rollout(kube, ns)
    # Every field the state machine keeps came back from the API server (none pruned).
    assert ro["candidate"] == "canary" and ro["stable"] == "stable" and ro["attempt"] == 1, ro
    assert ro["stepsHash"] and ro["lastAnalysis"]["verdict"] == "pass" and ro["step"] == 2, ro
    assert ro["lastAnalysis"]["candidateWeight"] == 50, ro
    assert _router_weights(st["endpoint"]) == {"stable": 50, "canary": 50}
    # What a user reads: `kubectl anneal get rollout` (the plugin, found by kubectl on PATH).
    view = kube.kubectl_plugin("anneal", "get", "rollout", NAME, "-n", ns).stdout
    assert "Status:      Paused" in view and "▶ 2: pause (until promoted)" in view, view
    assert "✔ 1: analysis" in view and "Weights:     stable=50 canary=50" in view, view
    # The step-1 analysis passed; the last one is the pause's own background analysis, over a
    # window that restarted with the step: its errorRate interval may not be narrow enough yet.
    assert "step 1  pass" in view, view
    row = next(line for line in view.splitlines() if line.split()[:1] == ["errorRate"])
    assert "[0, " in row and "<= 0.05" in row and row.rstrip().endswith(("ok", "wait")), view

    # SIGKILLed mid-rollout, a new operator resumes at the same step (status is the only memory).
    op.kill()
    op.start()
    time.sleep(4 * INTERVAL_S)
    ro2 = _rollout(kube, ns)
    assert (ro2["step"], ro2["attempt"], ro2["pausedReason"]) == (2, 1, "WaitingForPromote"), ro2
    assert _status(kube, ns, "msvc", NAME)["phase"] == "Paused"

    # `kubectl anneal promote` writes a fresh annotation value, which acts once.
    said = kube.kubectl_plugin("anneal", "promote", NAME, "-n", ns).stdout
    value = said.split("anneal.dev/promote=")[1].split()[0]
    _wait_or_explain("Promoted", lambda: _status(kube, ns, "msvc", NAME).get("phase") == "Promoted", 120, op,
                     ray_head, app)
    assert _rollout(kube, ns)["handledCommands"] == {"anneal.dev/promote": value}
    # The chart's Grafana dashboard draws the operator's series from its live /metrics page.
    from tests import dashboard

    page = httpx.get(f"http://127.0.0.1:{op.env['ANNEAL_OPERATOR_METRICS_PORT']}/metrics", timeout=10).text
    assert dashboard.unknown_metrics(dashboard.load(), [page], prefix="anneal_operator_") == []
    # This operator process was started after the kill, at the pause: its analyses (over the
    # pause's own window) may all have waited on the errorRate interval, and a wait judges
    # nothing — so the gate's verdict series is 1 or not there yet, never 0; its figure and
    # interval are there.
    assert dashboard.sample(page, "anneal_operator_rollout_gate_passing", namespace=ns, name=NAME,
                            gate="errorRate") in (None, 1.0), page
    assert dashboard.sample(page, "anneal_operator_rollout_gate_interval", namespace=ns, name=NAME,
                            gate="errorRate", end="high") is not None, page
    assert dashboard.sample(page, "anneal_operator_rollout_weight", namespace=ns, name=NAME, variant="canary") == 100
    assert sum(dashboard.sample(page, "anneal_operator_rollout_analyses_total", namespace=ns, name=NAME,
                                verdict=v) or 0 for v in ("pass", "wait")) >= 1, page
    _wait_or_explain("the router at canary 100", lambda: _router_weights(st["endpoint"]) == {"stable": 0, "canary": 100},
                     120, op, ray_head, app)

    # Changing the candidate's model starts a new rollout: the new model begins at 0, not at
    # the weight the last one ended with (the bug: it went straight to its declared weight).
    patch = [{"op": "replace", "path": "/spec/variants/1/model/uri", "value": tiny_models["large"]}]
    kube.kubectl("patch", "msvc", NAME, "-n", ns, "--type=json", "-p", json.dumps(patch))
    _wait_or_explain("a second rollout", lambda: _rollout(kube, ns).get("attempt") == 2, 120, op, ray_head, app)
    ro3 = _rollout(kube, ns)
    assert ro3["candidateModel"] == tiny_models["large"], ro3
    assert _status(kube, ns, "msvc", NAME)["phase"] in ("RollingOut", "Paused")
    events = kube.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={NAME}",
                          "-o", "json").stdout
    assert "RolloutStarted" in events and "RolloutPromoted" in events, events[-3000:]
    # `--watch` follows the rollout as it goes; `promote --full` skips every remaining step.
    watch = subprocess.Popen([str(kube.bin_dir / "kubectl"), "anneal", "get", "rollout", NAME, "-n", ns, "--watch",
                              "--interval", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=kube.plugin_env())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watch.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        _wait_or_explain("the watch's first frame", lambda: any(x.startswith("Status:") for x in list(lines)), 60, op,
                         ray_head, app)
        _annotate(kube, ns, "anneal.dev/promote", "full")
        _wait_or_explain("Promoted again", lambda: _status(kube, ns, "msvc", NAME).get("phase") == "Promoted"
                         and _rollout(kube, ns).get("attempt") == 2, 600, op, ray_head, app, every=2)
        _wait_or_explain("the watch showing it", lambda: "Status:      Promoted" in "".join(lines).split("--- ")[-1],
                         30, op, ray_head, app)
    finally:
        watch.terminate()
        watch.wait(timeout=30)
        reader.join(timeout=10)
    watched = "".join(lines)
    assert _rollout(kube, ns)["handledCommands"] == {"anneal.dev/promote": "full"}
    frames = watched.split("--- ")
    assert len(frames) >= 2 and "Status:      Promoted" in frames[-1], watched[-3000:]
    assert any("Status:      RollingOut" in f or "Status:      Paused" in f for f in frames[:-1]), watched[-3000:]

    snap = gen.snapshot()
    assert snap["variants"].get("stable", {}).get("ok", 0) > 0, snap
    assert snap["variants"].get("stable", {}).get("failed", 0) == 0, (snap, list(gen.failures))
    kube.kubectl("delete", "msvc", NAME, "-n", ns, "--wait=false")
    _wait_or_explain("the resource deleted", lambda: _get(kube, ns, "msvc", NAME) is None, 120, op, ray_head, app)


def test_failing_candidate_is_rolled_back_by_the_default_error_gate(
        kube_cluster, namespace, operator, ray_head, serve_port, tiny_models, broken_model, service_app,  # noqa: F811
        traffic):
    kube, ns, op, app = kube_cluster, namespace, operator, service_app
    _CURRENT.update(kube=kube, ns=ns)
    steps = [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}]
    # No gates declared: the default errorRate <= 0.05 gate must still stop an all-error candidate.
    spec = _rollout_spec(tiny_models["small"], broken_model, steps, ray_head, {"temperature": 1.0})
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job(NAME, spec, kind="ModelService")))
    st = _wait_or_explain("the service serving", lambda: (s := _status(kube, ns, "msvc", NAME)).get("endpoint")
                          and any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", []))
                          and s, READY_TIMEOUT, op, ray_head, app, every=2)
    gen = traffic(st["endpoint"])
    _wait_or_explain("canary taking traffic", lambda: gen.snapshot()["variants"].get("canary", {}).get("sent", 0) > 0,
                     120, op, ray_head, app)
    first_candidate_request = time.monotonic()
    _wait_or_explain("RolledBack", lambda: _status(kube, ns, "msvc", NAME).get("phase") == "RolledBack", 300, op,
                     ray_head, app)
    took = time.monotonic() - first_candidate_request
    ro = _rollout(kube, ns)
    assert "errorRate" in ro["reason"], ro
    assert _status(kube, ns, "msvc", NAME)["weights"] == {"stable": 100, "canary": 0}
    _wait_or_explain("the router back at stable 100", lambda: _router_weights(st["endpoint"])
                     == {"stable": 100, "canary": 0}, 60, op, ray_head, app)
    snap = gen.snapshot()
    assert snap["variants"]["canary"]["failed"] > 0 and snap["variants"]["canary"]["ok"] == 0, snap
    assert snap["variants"].get("stable", {}).get("failed", 0) == 0, (snap, list(gen.failures))
    # The figure, not a timed assertion: benchmarks measure; this says what this run saw.
    print(f"rollback {took:.1f}s after the candidate's first request "
          f"(bound (failureLimit + 2) x interval = {(FAILURE_LIMIT + 2) * INTERVAL_S}s)")


def test_accuracy_gate_with_operator_probes_rolls_back_a_wrong_model_and_promotes_a_right_one(
        kube_cluster, namespace, operator, ray_head, serve_port, answering_models, service_app, traffic):  # noqa: F811
    kube, ns, op, app = kube_cluster, namespace, operator, service_app
    _CURRENT.update(kube=kube, ns=ns)
    gen_settings = {"maxTokens": 16, "temperature": 0}
    variants = [{**_variant("stable", answering_models["right"], 100), "generation": gen_settings},
                {**_variant("canary", answering_models["wrong"], 0), "generation": gen_settings}]
    spec = {
        "variants": variants, "ray": {"address": ray_head},
        "rollout": {"stable": "stable", "candidate": "canary",
                    "steps": [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}],
                    "analysis": {"interval": f"{INTERVAL_S}s", "minRequests": 3, "failureLimit": FAILURE_LIMIT,
                                 "gates": [{"metric": "accuracy", "min": 0.8}],
                                 "probes": {"dataset": {"uri": answering_models["probes"]}, "perInterval": 4}},
                    "progressDeadline": "10m"},
    }
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job(NAME, spec, kind="ModelService")))
    st = _wait_or_explain("the service serving", lambda: (s := _status(kube, ns, "msvc", NAME)).get("endpoint")
                          and any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", []))
                          and s, READY_TIMEOUT, op, ray_head, app, every=2)
    gen = traffic(st["endpoint"])

    # The wrong model is fast and error-free: only the operator's labelled probes can fail it.
    _wait_or_explain("RolledBack", lambda: _status(kube, ns, "msvc", NAME).get("phase") == "RolledBack", 300, op,
                     ray_head, app, every=2)
    ro = _rollout(kube, ns)
    analysis = ro["lastAnalysis"]
    assert analysis["verdict"] == "fail" and analysis["failedGates"] == ["accuracy"], ro
    assert analysis["figures"]["accuracy"] == 0.0 and analysis["figures"]["stableAccuracy"] == 1.0, ro
    assert analysis["figures"]["probes"] >= 4, ro
    assert "accuracy" in ro["reason"], ro
    assert _status(kube, ns, "msvc", NAME)["weights"] == {"stable": 100, "canary": 0}
    snap = gen.snapshot()
    assert snap["variants"].get("canary", {}).get("failed", 0) == 0, (snap, list(gen.failures))

    # The same service with the candidate changed to the right model: a new rollout, passed by the probes.
    patch = [{"op": "replace", "path": "/spec/variants/1/model/uri", "value": answering_models["right"]}]
    kube.kubectl("patch", "msvc", NAME, "-n", ns, "--type=json", "-p", json.dumps(patch))
    _wait_or_explain("Promoted", lambda: _status(kube, ns, "msvc", NAME).get("phase") == "Promoted"
                     and _rollout(kube, ns).get("attempt") == 2, 300, op, ray_head, app, every=2)
    ro = _rollout(kube, ns)
    assert ro["candidateModel"] == answering_models["right"], ro
    analysis = ro["lastAnalysis"]
    assert analysis["verdict"] == "pass" and analysis["figures"]["accuracy"] == 1.0, ro
    _wait_or_explain("the router at canary 100", lambda: _router_weights(st["endpoint"]) == {"stable": 0, "canary": 100},
                     120, op, ray_head, app)
    snap = gen.snapshot()
    assert snap["variants"].get("stable", {}).get("ok", 0) > 0, snap
    assert snap["variants"].get("stable", {}).get("failed", 0) == 0, (snap, list(gen.failures))
    kube.kubectl("delete", "msvc", NAME, "-n", ns, "--wait=false")
    _wait_or_explain("the resource deleted", lambda: _get(kube, ns, "msvc", NAME) is None, 120, op, ray_head, app)


def test_shadow_agreement_rolls_back_a_wrong_candidate_before_it_answers_any_user(
        kube_cluster, namespace, operator, ray_head, serve_port, answering_models, service_app, traffic):  # noqa: F811
    """Issue 15's bar under kubectl: a fast, error-free candidate that answers wrong is rolled back
    on live-traffic agreement during a shadow-only stage, at weight 0 throughout."""
    kube, ns, op, app = kube_cluster, namespace, operator, service_app
    _CURRENT.update(kube=kube, ns=ns)
    gen_settings = {"maxTokens": 16, "temperature": 0}
    spec = {
        "variants": [{**_variant("stable", answering_models["right"], 100), "generation": gen_settings},
                     {**_variant("canary", answering_models["wrong"], 0), "generation": gen_settings}],
        "ray": {"address": ray_head},
        "routing": {"shadow": {"variant": "canary", "percent": 100, "compare": "answer"}},
        "rollout": {"stable": "stable", "candidate": "canary",
                    "steps": [{"setWeight": 0}, {"analysis": {}}, {"setWeight": 100}],
                    "analysis": {"interval": f"{INTERVAL_S}s", "minRequests": 5, "failureLimit": FAILURE_LIMIT,
                                 "gates": [{"metric": "shadowAgreement", "min": 0.9}]},
                    "progressDeadline": "10m"},
    }
    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job(NAME, spec, kind="ModelService")))
    st = _wait_or_explain("the service serving", lambda: (s := _status(kube, ns, "msvc", NAME)).get("endpoint")
                          and any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions", []))
                          and s, READY_TIMEOUT, op, ray_head, app, every=2)
    gen = traffic(st["endpoint"], max_tokens=16)  # "Answer: 7" is 7 tokens: cut short, both answers would agree
    _wait_or_explain("RolledBack", lambda: _status(kube, ns, "msvc", NAME).get("phase") == "RolledBack", 300, op,
                     ray_head, app, every=2)
    ro = _rollout(kube, ns)
    analysis = ro["lastAnalysis"]
    assert analysis["verdict"] == "fail" and analysis["failedGates"] == ["shadowAgreement"], ro
    figures = analysis["figures"]
    assert figures["shadowAgreement"] == 0.0 and figures["shadowRequests"] >= 5 and figures["errors"] == 0, figures
    # Each gate's interval came back through the API server (declared in the CRD, not pruned).
    gate = next(g for g in analysis["gates"] if g["metric"] == "shadowAgreement")
    assert gate["verdict"] == "fail" and gate["high"] < 0.9 and gate["samples"] == figures["shadowPairs"], gate
    assert analysis["confidence"] == 0.95
    # No user request reached the candidate: weight 0 in every analysis, nothing routed to it.
    assert all(h.get("candidateWeight") == 0 for h in ro["history"]), ro["history"]
    assert _status(kube, ns, "msvc", NAME)["weights"] == {"stable": 100, "canary": 0}
    stats = httpx.get(st["endpoint"] + "/-/stats", timeout=10).json()
    assert stats["variants"]["canary"]["total"]["requests"] == 0, stats["variants"]["canary"]
    assert stats["shadow"]["canary"]["requests"] >= 5 and stats["pairs"]["canary"]["stable"]["agreements"] == 0
    snap = gen.snapshot()
    assert snap["variants"].get("canary", {}).get("sent", 0) == 0, snap
    assert snap["variants"]["stable"]["ok"] > 0 and snap["variants"]["stable"].get("failed", 0) == 0, snap
    # What a user reads: the gate, its interval and why it failed.
    view = kube.kubectl_plugin("anneal", "get", "rollout", NAME, "-n", ns).stdout
    row = next(line for line in view.splitlines() if line.startswith("  shadowAgreement "))
    assert row.rstrip().endswith("fail") and "[0, " in row and ">= 0.9" in row, view
    kube.kubectl("delete", "msvc", NAME, "-n", ns, "--wait=false")
    _wait_or_explain("the resource deleted", lambda: _get(kube, ns, "msvc", NAME) is None, 120, op, ray_head, app)
