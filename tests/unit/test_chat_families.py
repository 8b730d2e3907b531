"""Hugging Face chat models: trained, scored and served in their own chat template; tokenizers without a pad token work.

The models are built here in the shapes of real families (`anneal.modeling.families`): a
Llama-3-style one with no pad token and its header template, a Qwen2-style ChatML one, a
Mistral-style `[INST]` one with no pad token.
"""

from __future__ import annotations

import pytest

from anneal.data.datasets import collate, load_samples, tokenize_sample
from anneal.data.formats import format_chat
from anneal.modeling.chat import pad_id, padding, render_prompt, sample_prompt
from anneal.modeling.families import FAMILIES, build_family_model, train_family_tokenizer
from anneal.modeling.tiny import LlamaShape, save_pretrained

DATA = "builtin://reasoning?difficulty=1&seed=3"
SHAPE = LlamaShape(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizers():
    return {name: train_family_tokenizer(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def samples():
    return load_samples(DATA, split="eval", samples=4, reasoning="both")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_renders_the_prompt_the_server_renders(tokenizers, samples, family, tmp_path):
    from anneal.serve.engines import GenerateRequest, TransformersEngine

    tok = tokenizers[family]
    path = save_pretrained(build_family_model(family, SHAPE, tok), tok, tmp_path / family)
    engine = TransformersEngine(str(path), cache_dir=str(tmp_path / "cache"), device="cpu")
    from anneal.serve.app import engine_takes_toggle

    assert engine_takes_toggle("transformers", engine, None) is False  # a family model does not declare it
    assert engine_takes_toggle("transformers", engine, True) is True  # the variant's reasoningToggle wins
    for s in samples:
        served = engine.render(GenerateRequest(messages=s.messages, max_tokens=4))
        assert served == tok.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True)
        assert sample_prompt(tok, s) == served  # training and evaluation see the same text
        ids = tokenize_sample(tok, s, 512)
        prompt_len = sum(1 for label in ids["labels"] if label == -100)
        assert ids["input_ids"][:prompt_len] == tok(served, add_special_tokens=False)["input_ids"]
        assert ids["input_ids"][-1] == tok.eos_token_id  # the answer ends where the template ends a turn
    assert "<|assistant|>" not in served  # not Anneal's format


def test_anneals_own_tokenizer_keeps_anneals_format(samples, tmp_path):
    from anneal.modeling.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer(tmp_path)
    for s in samples:
        assert sample_prompt(tok, s) == s.prompt == format_chat(s.messages)
        assert render_prompt(tok, s.messages) == s.prompt


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_a_tokenizer_without_a_pad_token_batches_generates_and_is_left_as_it_was(tokenizers, samples, family):
    from anneal.compress.evaluation import EvalPlan, evaluate

    tok = tokenizers[family]
    assert tok.pad_token is None
    batch = collate([tokenize_sample(tok, s, 256) for s in samples], pad_id(tok))  # was: pad_id None -> TypeError
    assert batch["input_ids"].shape[0] == len(samples)
    padded = batch["attention_mask"] == 0
    assert (batch["input_ids"][padded] == tok.eos_token_id).all() and (batch["labels"][padded] == -100).all()
    with padding(tok, "left") as t:
        enc = t([sample_prompt(tok, s) for s in samples], padding=True, add_special_tokens=False)
        assert len({len(x) for x in enc["input_ids"]}) == 1
    assert tok.pad_token is None and tok.padding_side == "right"  # restored: it is saved with trained models
    model = build_family_model(family, SHAPE, tok).eval()
    metrics, scored = evaluate(model, tok, EvalPlan(dataset_uri=DATA, split="eval", samples=2, modes=("on", "off"),
                                                    max_new_tokens=4, max_seq_length=256, perplexity=True))
    assert set(metrics) >= {"accuracy", "perplexity"}
    assert all(s.prompt.startswith(FAMILIES[family].bos) for s in scored)  # scored in the model's own template


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_reasoning_toggle_is_in_a_family_models_prompts_only_once_it_declares_it(tokenizers, family):
    """A Hugging Face chat model that does not declare the toggle never saw "detailed thinking on/off": it is
    scored once, without it; declared (as Anneal's training writes it), it is scored per mode, with it."""
    from anneal.compress.evaluation import EvalPlan, evaluate
    from anneal.modeling.chat import REASONING_TOGGLE_KEY

    tok = tokenizers[family]
    model = build_family_model(family, SHAPE, tok).eval()
    plan = EvalPlan(dataset_uri=DATA, split="eval", samples=2, modes=("on", "off"), max_new_tokens=2,
                    max_seq_length=256, perplexity=False)
    metrics, scored = evaluate(model, tok, plan)
    assert set(metrics) == {"accuracy"} and len(scored) == 2
    assert not any("detailed thinking" in s.prompt for s in scored)
    setattr(model.config, REASONING_TOGGLE_KEY, True)
    metrics, scored = evaluate(model, tok, plan)
    assert set(metrics) == {"accuracyOn", "accuracyOff", "accuracy"} and len(scored) == 4
    assert ["detailed thinking on" in s.prompt for s in scored] == [True, True, False, False]
    assert ["detailed thinking off" in s.prompt for s in scored] == [False, False, True, True]
    setattr(model.config, REASONING_TOGGLE_KEY, False)  # the plan's setting wins over the declaration
    assert set(evaluate(model, tok, EvalPlan(**{**plan.__dict__, "toggle": True}))[0]) >= {"accuracyOn"}


def test_without_the_toggle_samples_keep_their_mode_and_drop_only_its_system_message():
    kept = {"role": "system", "content": "You are terse."}
    for fmt in ("chat", "prompt-completion", "text"):
        on = load_samples(DATA, split="eval", samples=4, reasoning="both", format=fmt)
        off = load_samples(DATA, split="eval", samples=4, reasoning="both", format=fmt, toggle=False)
        assert [s.reasoning for s in off] == [s.reasoning for s in on] == ["on", "off", "on", "off"]
        assert [s.completion for s in off if fmt != "text"] == [s.completion for s in on if fmt != "text"]
        assert all("detailed thinking" in (s.prompt + s.completion) for s in on), fmt
        assert not any("detailed thinking" in (s.prompt + s.completion) for s in off), fmt
    from anneal.modeling.chat import without_reasoning_toggle

    messages = [{"role": "system", "content": " Detailed Thinking ON "}, kept, {"role": "user", "content": "2+2?"}]
    assert without_reasoning_toggle(messages) == messages[1:]
