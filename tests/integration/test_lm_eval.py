"""EleutherAI's lm-eval scores a served model through Anneal's OpenAI endpoints, and agrees with Anneal.

The service is the shipped quickstart teacher (deploy/quickstart/math-teacher, a 4-layer Llama
trained on the built-in reasoning task, ~0.97 accuracy with reasoning on) on the transformers
engine, deployed the way `anneal run` deploys a ModelService, with an API key. lm-eval runs the
tasks defined in this repository (deploy/lm-eval: the built-in questions, loaded locally, no hub)
through `local-chat-completions` (the question alone: the service adds the reasoning toggle and
the chat template) and `local-completions` (the prompt rendered by the task), with the key from
OPENAI_API_KEY. Anneal's own evaluation scores the same questions on the same checkpoint in this
process; lm-eval's accuracies must agree with it within sampling noise, with reasoning on (~1.0)
and off (~0.25, prompts only: the service's toggle default is on). Greedy on every side, so they
differ only where batched and single-sequence float sums pick another token (measured: equal).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "deploy" / "quickstart" / "math-teacher"
TASKS = ROOT / "deploy" / "lm-eval"
URI = "builtin://reasoning?difficulty=2&seed=7"
SAMPLES = 48
KEY = "k-lm-eval-3c1f"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, monkeypatch_module):
    from anneal.local.jobs import ray_session
    from anneal.local.service import start_service
    from anneal.settings import Settings

    # `anneal run` reads the keys from the environment its local Ray inherits.
    monkeypatch_module.setenv("ANNEAL_LMEVAL_API_KEYS", KEY)
    monkeypatch_module.setenv("ANNEAL_LMEVAL_ADMIN_KEY", "admin-" + KEY)
    monkeypatch_module.setenv("ANNEAL_HOME", str(tmp_path_factory.mktemp("lm-eval-home")))
    settings = Settings()
    settings.ray.num_cpus, settings.ray.address = 2, None
    manifest = {"apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": "teacher"},
                "spec": {"variants": [{"name": "v1", "model": {"uri": str(TEACHER)}, "weight": 100,
                                       "resources": {"cpusPerWorker": 1}, "generation": {"maxTokens": 96}}],
                         "routing": {"reasoning": {"default": "on"}},
                         "auth": {"apiKeysEnv": "ANNEAL_LMEVAL_API_KEYS", "adminKeyEnv": "ANNEAL_LMEVAL_ADMIN_KEY"}}}
    with ray_session(settings):
        running = start_service(manifest, settings=settings, port=0, wait_s=600)
        try:
            yield {"url": running.endpoint, "model": running.app_name}  # the service's name routes
        finally:
            running.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def anneal_accuracy():
    """Anneal's own figures per reasoning mode: the evaluation a job reports, on the same questions."""
    from anneal.compress.evaluation import EvalPlan, evaluate_dir

    plan = EvalPlan(dataset_uri=URI, split="eval", samples=SAMPLES, modes=("on", "off"), max_new_tokens=96,
                    perplexity=False, toggle=True)
    metrics = evaluate_dir(TEACHER, plan)
    return {"on": metrics["accuracyOn"], "off": metrics["accuracyOff"]}


def _lm_eval(model: str, task: str, endpoint: dict, path: str, monkeypatch, reasoning: str = "on",
             **model_args) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    args = ",".join(f"{k}={v}" for k, v in {"model": endpoint["model"], "base_url": endpoint["url"] + path,
                                             "num_concurrent": 4,
                                             "max_retries": 1, **model_args}.items())
    # What lm_eval's --include_path and --metadata do on the command line.
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False,
                        metadata={"uri": URI, "samples": SAMPLES, "reasoning": reasoning, "tokenizer": str(TEACHER)})
    out = simple_evaluate(model=model, model_args=args, tasks=[task], task_manager=tasks,
                          apply_chat_template=model.endswith("chat-completions"), log_samples=True)
    return out


def _agrees(a: float, b: float, n: int) -> bool:
    """Within two standard errors of a binomial proportion (at least 2 answers of n)."""
    p = (a + b) / 2
    return abs(a - b) <= max(2 * math.sqrt(p * (1 - p) / n) * math.sqrt(2), 2 / n)


def test_lm_eval_chat_completions_scores_the_service_as_anneal_does(endpoint, anneal_accuracy, monkeypatch):
    out = _lm_eval("local-chat-completions", "anneal_reasoning_chat", endpoint, "/v1/chat/completions", monkeypatch)
    result = out["results"]["anneal_reasoning_chat"]
    samples = out["samples"]["anneal_reasoning_chat"]
    assert len(samples) == SAMPLES
    accuracy = result["exact_match,answer"]
    print(f"lm-eval local-chat-completions {accuracy:.4f}, Anneal's evaluation {anneal_accuracy['on']:.4f} "
          f"({SAMPLES} questions, reasoning on)")
    assert anneal_accuracy["on"] > 0.8, anneal_accuracy  # a model that reasons: agreement means something
    assert _agrees(accuracy, anneal_accuracy["on"], SAMPLES), (accuracy, anneal_accuracy)
    # The answers really came from the served model: its reasoning, then the answer line.
    answered = [s["resps"][0][0] for s in samples]
    assert sum("Answer:" in a for a in answered) >= 0.9 * SAMPLES, answered[:3]


@pytest.mark.parametrize("reasoning", ["on", "off"])
def test_lm_eval_completions_with_prompts_in_the_models_template_agrees_too(endpoint, anneal_accuracy, monkeypatch,
                                                                           reasoning):
    # Prompts go through /v1/completions as they are: the task renders the toggle for each mode, so
    # "off" (an accuracy far from 0 and 1, where disagreement would show) is scored here too.
    out = _lm_eval("local-completions", "anneal_reasoning", endpoint, "/v1/completions", monkeypatch, reasoning,
                   tokenizer_backend="huggingface", tokenizer=str(TEACHER), tokenized_requests=False)
    accuracy = out["results"]["anneal_reasoning"]["exact_match,answer"]
    print(f"lm-eval local-completions {accuracy:.4f}, Anneal's evaluation {anneal_accuracy[reasoning]:.4f} "
          f"({SAMPLES} questions, reasoning {reasoning})")
    assert len(out["samples"]["anneal_reasoning"]) == SAMPLES
    assert _agrees(accuracy, anneal_accuracy[reasoning], SAMPLES), (accuracy, anneal_accuracy)


def test_lm_eval_without_the_key_is_refused(endpoint, monkeypatch):
    import httpx

    r = httpx.post(f"{endpoint['url']}/v1/chat/completions", json={"model": endpoint["model"], "messages": [{"role": "user", "content": "1 + 1?"}]},
                   headers={"authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
