"""Staged rollouts through the operator, as a user drives them with `kubectl`: a real API server,
the session's Ray head (Serve through its REST API), tiny Llama variants built here, live traffic.

What `anneal run` does embedded must happen here too (one tick, `anneal.control.rollout`):
a candidate model change starts a rollout, the annotations act once each, every field the
machine keeps survives the API server, an operator killed mid-rollout resumes at the same
step, and a failing candidate is rolled back by the default error-rate gate while the stable
variant loses no request.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture
def traffic():
    """Built-in-task requests at 4/s to an endpoint, counted per variant (from `x-anneal-variant`)."""
    from anneal.local.rollout import TrafficGenerator

    started: list[TrafficGenerator] = []

    def start(endpoint: str) -> TrafficGenerator:
        gen = TrafficGenerator(endpoint, 4, max_tokens=4, max_in_flight=8, timeout_s=60).start()
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

    # SIGKILLed mid-rollout, a new operator resumes at the same step (status is the only memory).
    op.kill()
    op.start()
    time.sleep(4 * INTERVAL_S)
    ro2 = _rollout(kube, ns)
    assert (ro2["step"], ro2["attempt"], ro2["pausedReason"]) == (2, 1, "WaitingForPromote"), ro2
    assert _status(kube, ns, "msvc", NAME)["phase"] == "Paused"

    # A promote annotation acts once; the same value again does nothing.
    _annotate(kube, ns, "anneal.dev/promote", "go")
    _wait_or_explain("Promoted", lambda: _status(kube, ns, "msvc", NAME).get("phase") == "Promoted", 120, op,
                     ray_head, app)
    assert _rollout(kube, ns)["handledCommands"] == {"anneal.dev/promote": "go"}
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
    _annotate(kube, ns, "anneal.dev/promote", "full")
    _wait_or_explain("Promoted again", lambda: _status(kube, ns, "msvc", NAME).get("phase") == "Promoted"
                     and _rollout(kube, ns).get("attempt") == 2, 600, op, ray_head, app, every=2)
    assert _rollout(kube, ns)["handledCommands"] == {"anneal.dev/promote": "full"}

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
