"""EleutherAI's lm-eval scores a served model through Anneal's OpenAI endpoints, and agrees with Anneal.

The service is the shipped quickstart teacher (deploy/quickstart/math-teacher, a 4-layer Llama
trained on the built-in reasoning task, ~0.97 accuracy with reasoning on) on the transformers
engine, deployed the way `anneal run` deploys a ModelService, with an API key. lm-eval runs the
tasks defined in this repository (deploy/lm-eval: the built-in questions, loaded locally, no hub)
through `local-chat-completions` (the question alone: the service adds the reasoning toggle and
the chat template) and `local-completions` (the prompt rendered by the task), with the key from
OPENAI_API_KEY. Anneal's own evaluation scores the same questions on the same checkpoint in this
process (the `lm_eval` fixture, tests/integration/conftest.py); lm-eval's accuracies must agree
with it within sampling noise, with reasoning on (~1.0) and off (~0.25, prompts only: the
service's toggle default is on). Greedy on every side, so they differ only where batched and
single-sequence float sums pick another token (measured: equal). The same tasks run against the
vllm engine in test_serve_vllm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

KEY = "k-lm-eval-3c1f"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    from anneal.local.jobs import ray_session
    from anneal.local.service import start_service
    from anneal.settings import Settings

    with pytest.MonkeyPatch.context() as env:
        # `anneal run` reads the keys from the environment its local Ray inherits.
        env.setenv("ANNEAL_LMEVAL_API_KEYS", KEY)
        env.setenv("ANNEAL_LMEVAL_ADMIN_KEY", "admin-" + KEY)
        env.setenv("ANNEAL_HOME", str(tmp_path_factory.mktemp("lm-eval-home")))
        settings = Settings()
        settings.ray.num_cpus, settings.ray.address = 2, None
        teacher = str(Path(__file__).resolve().parents[2] / "deploy" / "quickstart" / "math-teacher")
        manifest = {"apiVersion": "anneal.dev/v1alpha1", "kind": "ModelService", "metadata": {"name": "teacher"},
                    "spec": {"variants": [{"name": "v1", "model": {"uri": teacher}, "weight": 100,
                                           "resources": {"cpusPerWorker": 1}, "generation": {"maxTokens": 96}}],
                             "routing": {"reasoning": {"default": "on"}},
                             "auth": {"apiKeysEnv": "ANNEAL_LMEVAL_API_KEYS", "adminKeyEnv": "ANNEAL_LMEVAL_ADMIN_KEY"}}}
        with ray_session(settings):
            running = start_service(manifest, settings=settings, port=0, wait_s=600)
            try:
                yield {"url": running.endpoint, "model": running.app_name}  # the service's name routes
            finally:
                running.stop()


def test_lm_eval_chat_completions_scores_the_service_as_anneal_does(endpoint, lm_eval):
    out = lm_eval.run("local-chat-completions", "anneal_reasoning_chat", endpoint["url"] + "/v1/chat/completions",
                      endpoint["model"], key=KEY)
    accuracy = out["results"]["anneal_reasoning_chat"]["exact_match,answer"]
    print(f"lm-eval local-chat-completions {accuracy:.4f}, Anneal's evaluation {lm_eval.anneal_accuracy['on']:.4f} "
          f"({lm_eval.SAMPLES} questions, reasoning on)")
    assert lm_eval.anneal_accuracy["on"] > 0.8, lm_eval.anneal_accuracy  # a model that reasons
    assert lm_eval.agrees(accuracy, "on"), (accuracy, lm_eval.anneal_accuracy)
    # The answers really came from the served model: its reasoning, then the answer line.
    answered = [s["resps"][0][0] for s in out["samples"]["anneal_reasoning_chat"]]
    assert sum("Answer:" in a for a in answered) >= 0.9 * lm_eval.SAMPLES, answered[:3]


@pytest.mark.parametrize("reasoning", ["on", "off"])
def test_lm_eval_completions_with_prompts_in_the_models_template_agrees_too(endpoint, lm_eval, reasoning):
    # Prompts go through /v1/completions as they are: the task renders the toggle for each mode, so
    # "off" (an accuracy far from 0 and 1, where disagreement would show) is scored here too.
    out = lm_eval.run("local-completions", "anneal_reasoning", endpoint["url"] + "/v1/completions", endpoint["model"],
                      key=KEY, reasoning=reasoning, tokenizer_backend="huggingface", tokenizer=str(lm_eval.TEACHER),
                      tokenized_requests=False)
    accuracy = out["results"]["anneal_reasoning"]["exact_match,answer"]
    print(f"lm-eval local-completions {accuracy:.4f}, Anneal's evaluation {lm_eval.anneal_accuracy[reasoning]:.4f} "
          f"({lm_eval.SAMPLES} questions, reasoning {reasoning})")
    assert lm_eval.agrees(accuracy, reasoning), (accuracy, lm_eval.anneal_accuracy)


def test_lm_eval_without_the_key_is_refused(endpoint):
    import httpx

    r = httpx.post(f"{endpoint['url']}/v1/chat/completions", headers={"authorization": "Bearer wrong"}, timeout=60,
                   json={"model": endpoint["model"], "messages": [{"role": "user", "content": "1 + 1?"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
