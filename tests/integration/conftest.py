"""Shared integration fixtures: one local Ray per module, started the way `anneal run` starts it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray (with `ray_session`'s longer start window and retries); yields its GCS address."""
    import ray

    from anneal.local.jobs import ray_session
    from anneal.settings import Settings

    settings = Settings()
    settings.ray.num_cpus = 2
    settings.ray.address = None
    with ray_session(settings):
        yield ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A module's MLflow SQLite store and artifact root in a temp dir (what a recipe's JobContext points at)."""
    root = tmp_path_factory.mktemp("anneal")
    return {"root": root, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifacts": str(root / "artifacts")}


# ------------------------------------------------------------------ lm-eval against a served model

class LmEval:
    """EleutherAI's lm-eval on the repo's tasks (deploy/lm-eval), and Anneal's own figure beside it.

    The model scored is the shipped quickstart teacher (deploy/quickstart/math-teacher), a model
    that reasons, so agreement between the two means something.
    """

    from pathlib import Path as _Path

    ROOT = _Path(__file__).resolve().parents[2]
    TEACHER = ROOT / "deploy" / "quickstart" / "math-teacher"
    TASKS = ROOT / "deploy" / "lm-eval"
    URI = "builtin://reasoning?difficulty=2&seed=7"
    SAMPLES = 48

    def __init__(self, monkeypatch: pytest.MonkeyPatch, anneal_accuracy: dict[str, float]):
        self.monkeypatch = monkeypatch
        self.anneal_accuracy = anneal_accuracy  # per reasoning mode

    def run(self, model: str, task: str, base_url: str, served_model: str, *, key: str = "", reasoning: str = "on",
            **model_args) -> dict:
        """`lm_eval --model <model> --tasks <task> --include_path deploy/lm-eval --metadata ...`, in process."""
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        self.monkeypatch.setenv("OPENAI_API_KEY", key)
        args = ",".join(f"{k}={v}" for k, v in {"model": served_model, "base_url": base_url, "num_concurrent": 4,
                                                 "max_retries": 1, **model_args}.items())
        tasks = TaskManager(include_path=str(self.TASKS), include_defaults=False,
                            metadata={"uri": self.URI, "samples": self.SAMPLES, "reasoning": reasoning,
                                      "tokenizer": str(self.TEACHER)})
        out = simple_evaluate(model=model, model_args=args, tasks=[task], task_manager=tasks,
                              apply_chat_template=model.endswith("chat-completions"), log_samples=True)
        assert len(out["samples"][task]) == self.SAMPLES
        return out

    def agrees(self, accuracy: float, reasoning: str) -> bool:
        """Within sampling noise of Anneal's figure: two standard errors of the difference of two
        proportions over SAMPLES questions (at least 2 answers)."""
        import math

        a, b, n = accuracy, self.anneal_accuracy[reasoning], self.SAMPLES
        p = (a + b) / 2
        return abs(a - b) <= max(2 * math.sqrt(2 * p * (1 - p) / n), 2 / n)


@pytest.fixture(scope="session")
def teacher_accuracy() -> dict[str, float]:
    """Anneal's own accuracy of the quickstart teacher per reasoning mode: the evaluation a job reports."""
    from anneal.compress.evaluation import EvalPlan, evaluate_dir

    plan = EvalPlan(dataset_uri=LmEval.URI, split="eval", samples=LmEval.SAMPLES, modes=("on", "off"),
                    max_new_tokens=96, perplexity=False, toggle=True)
    metrics = evaluate_dir(LmEval.TEACHER, plan)
    return {"on": metrics["accuracyOn"], "off": metrics["accuracyOff"]}


@pytest.fixture
def lm_eval(monkeypatch, teacher_accuracy) -> LmEval:
    return LmEval(monkeypatch, teacher_accuracy)
