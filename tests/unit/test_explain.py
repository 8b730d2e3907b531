"""Attention maps (`anneal explain`, `evaluation.attentionMaps`): the aggregation, the KPI, the pages, the command.

The models are tiny random-initialised Llamas and an `anneal_llama` with attention removed from
one block, built here; the page is opened in a real headless Chromium (tests/browser.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anneal.explain.attention import (
    AttentionMap,
    aggregate,
    attention_map_of,
    eager_attention,
    explain_prompt,
    is_numeric,
    number_attention,
    question_prompt,
)
from anneal.explain.render import render_html, render_png, write_map
from tests.browser import non_white_share, screenshot

QUESTION = "Tom has 3 apples and buys 12 more. How many apples?"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from anneal.modeling.tokenizer import builtin_tokenizer

    return builtin_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def llama(tokenizer):
    from anneal.modeling.tiny import LlamaShape, build_llama

    return build_llama(LlamaShape(hidden_size=32, layers=3, heads=4, kv_heads=2, intermediate_size=64), tokenizer).eval()


@pytest.fixture(scope="module")
def no_attention_llama(llama):
    """The same model with the attention of block 1 removed (`anneal_llama`, as attention removal saves it)."""
    from anneal.modeling.layerwise_llama import AnnealLlamaForCausalLM, from_llama_config

    model = AnnealLlamaForCausalLM(from_llama_config(llama.config, no_attention_layers=[1])).eval()
    model.load_state_dict({k: v for k, v in llama.state_dict().items() if "layers.1.self_attn" not in k
                           and "layers.1.input_layernorm" not in k}, strict=True)
    return model


# ---------------------------------------------------------------------------- the maths


def _softmax_causal(t: int, heads: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, heads, t, t, generator=g)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    return scores.softmax(-1)


@pytest.mark.parametrize("prompt_len,answer_len,heads", [(1, 1, 1), (4, 3, 2), (7, 5, 4), (5, 0, 2)])
def test_aggregate_takes_the_query_that_chose_each_answer_token(prompt_len, answer_len, heads):
    t = prompt_len + max(answer_len - 1, 0)
    layers = [_softmax_causal(t, heads, seed) for seed in range(3)]
    w = aggregate(layers, prompt_len, answer_len)
    assert w.shape == (3, answer_len, prompt_len)
    for k, a in enumerate(layers):
        for i in range(answer_len):  # answer token i was chosen at position P - 1 + i
            expected = a[0, :, prompt_len - 1 + i, :prompt_len].mean(0).numpy()
            np.testing.assert_allclose(w[k, i], expected, rtol=1e-6)
    if answer_len:
        np.testing.assert_allclose(w[:, 0].sum(-1), 1.0, rtol=1e-5)  # the first query sees only the prompt
        assert (w.sum(-1) <= 1 + 1e-5).all()


def test_aggregate_refuses_attention_too_short_for_the_answer():
    with pytest.raises(ValueError, match="does not cover a prompt of 4 and an answer of 3"):
        aggregate([_softmax_causal(5, 2, 0)], 4, 3)


@pytest.mark.parametrize("numeric,expected", [
    ([True, False, False], 1.0),   # every weight on the number
    ([False, True, True], 0.0),
    ([True, True, True], 1.0),
    ([False, False, False], 0.0),
])
def test_number_attention_is_the_share_of_prompt_mass_on_numbers(numeric, expected):
    weights = np.zeros((2, 3, 3), dtype=np.float32)
    weights[..., 0] = 0.5  # rows sum to 0.5: the rest went to earlier answer tokens
    assert number_attention(weights, numeric) == pytest.approx(expected)


def test_number_attention_weighs_by_mass_and_is_none_without_an_answer():
    weights = np.array([[[0.6, 0.2, 0.2]], [[0.1, 0.1, 0.8]]], dtype=np.float32)
    assert number_attention(weights, [False, False, True]) == pytest.approx(1.0 / 2.0)
    assert number_attention(np.zeros((2, 0, 3), dtype=np.float32), [True, False, False]) is None
    with pytest.raises(ValueError, match="2 numeric flags for 3 prompt tokens"):
        number_attention(weights, [True, False])


@pytest.mark.parametrize("text,numeric", [("3", True), (" 12", True), ("x2", True), ("apples", False), (" ", False),
                                          ("<|user|>", False)])
def test_numeric_tokens(text, numeric):
    assert is_numeric(text) is numeric


# ------------------------------------------------------------------------ real models


def test_a_map_of_a_tiny_model_has_rows_that_sum_to_at_most_one(llama, tokenizer):
    m = explain_prompt(llama, tokenizer, question_prompt(tokenizer, QUESTION, "off"), max_new_tokens=8,
                       question=QUESTION)
    assert m.layers == [0, 1, 2] and m.skipped_layers == []
    assert m.weights.shape == (3, len(m.answer_tokens), len(m.prompt_tokens)) and len(m.answer_tokens) >= 1
    sums = m.weights.sum(-1)
    assert (sums <= 1 + 1e-5).all() and (m.weights >= 0).all()
    np.testing.assert_allclose(sums[:, 0], 1.0, rtol=1e-5)
    if len(m.answer_tokens) > 1:  # later queries also look at the answer so far
        assert (sums[:, 1:] < 1 - 1e-6).all()
    assert 0.0 <= m.number_attention <= 1.0
    assert [t for t, n in zip(m.prompt_tokens, m.numeric) if n] == ["3", "1", "2"]  # the tokenizer splits digits
    assert "detailed thinking off" in "".join(m.prompt_tokens)
    assert llama.config._attn_implementation == "sdpa"  # eager only for the pass


def test_eager_attention_is_switched_on_for_the_pass_and_back(llama):
    assert llama.config._attn_implementation == "sdpa"
    with eager_attention(llama):
        assert llama.config._attn_implementation == "eager"
    assert llama.config._attn_implementation == "sdpa"


def test_blocks_without_attention_are_skipped_and_the_rest_match_the_full_model(llama, no_attention_llama, tokenizer):
    prompt = tokenizer(question_prompt(tokenizer, QUESTION, "off"), add_special_tokens=False)["input_ids"]
    answer = tokenizer(" Answer: 15", add_special_tokens=False)["input_ids"]
    full = attention_map_of(llama, tokenizer, prompt, answer)
    cut = attention_map_of(no_attention_llama, tokenizer, prompt, answer)
    assert cut.layers == [0, 2] and cut.skipped_layers == [1]
    assert cut.weights.shape == (2, len(answer), len(prompt))
    # Block 0 sees the same input in both models; block 2 does not (block 1 lost its attention).
    np.testing.assert_allclose(cut.weights[0], full.weights[0], atol=1e-5)
    assert not np.allclose(cut.weights[1], full.weights[2], atol=1e-5)
    page = render_html(cut)
    assert "no attention (skipped)" in page and "1 (no attention: removed blocks)" in page


# ---------------------------------------------------------------------------- the pages


def _map(prompt: list[str], answer: list[str], seed: int = 0) -> AttentionMap:
    rng = np.random.default_rng(seed)
    w = rng.random((2, len(answer), len(prompt))).astype(np.float32)
    w /= w.sum(-1, keepdims=True) * 1.25
    return AttentionMap(prompt_tokens=prompt, answer_tokens=answer, weights=w, layers=[0, 2], skipped_layers=[1],
                        numeric=[is_numeric(t) for t in prompt], answer="".join(answer), question="how many?",
                        model="tiny")


def test_the_page_holds_every_token_escaped_and_the_figures():
    m = _map(["<|user|>", "Tom", " has", " 3", " </script><b>x", "\n"], ["Answer", ":", " 3"])
    page = render_html(m, render_png(m))
    for token in ("&lt;|user|&gt;", "Tom", " has", " 3", "&lt;/script&gt;&lt;b&gt;x", "Answer"):
        assert token in page
    assert "</script><b>" not in page  # a token cannot end the page's script
    data = json.loads(page.split('id="attention-data">')[1].split("</script>")[0].replace("<\\/", "</"))
    assert len(data["layers"]) == 2 and len(data["mean"]) == 3 and data["prompt"] == 6
    assert f"{m.number_attention:.3f}" in page and "data:image/png;base64," in page
    assert page.count('class="p') == 6 and page.count("background:rgb(") == 6


def test_png_and_files(tmp_path):
    m = _map(["a", " 1", " b"], ["x"])
    png = render_png(m)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    paths = write_map(m, tmp_path, "q0")
    assert [p.name for p in paths] == ["q0.png", "q0.html", "q0.json"]
    figures = json.loads(paths[2].read_text())
    assert figures["skippedLayers"] == [1] and figures["numberAttention"] == pytest.approx(m.number_attention)
    assert len(figures["layerNumberAttention"]) == 2


def test_an_empty_answer_still_makes_a_page():
    m = _map(["a", " 1"], [])
    assert m.number_attention is None
    assert "n/a" in render_html(m, render_png(m))


def test_the_page_renders_in_a_browser(llama, tokenizer, tmp_path):
    m = explain_prompt(llama, tokenizer, question_prompt(tokenizer, QUESTION, "on"), max_new_tokens=6,
                       question=QUESTION)
    _, page, _ = write_map(m, tmp_path)
    shot = screenshot(page, tmp_path / "shot.png", width=1000, height=900)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 20  # text, the coloured prompt, the heatmap: not one colour
    assert non_white_share(shot) > 0.03
    heat = ((pixels[:, 0] > 150) & (pixels[:, 1] < 120) & (pixels[:, 2] < 120)).sum()  # the attention colour
    assert heat > 500


# ------------------------------------------------------------------------------ the command


def test_anneal_explain_writes_the_map_and_prints_the_figures(llama, tokenizer, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from anneal.cli import app
    from anneal.modeling.tiny import save_pretrained

    model_dir = save_pretrained(llama, tokenizer, tmp_path / "model")
    monkeypatch.setenv("ANNEAL_HOME", str(tmp_path / "home"))
    out = tmp_path / "maps"
    res = CliRunner().invoke(app, ["explain", str(model_dir), QUESTION, "--out", str(out), "--max-new-tokens", "5",
                                   "--reasoning", "on", "--device", "cpu", "-o", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["question"] == QUESTION and 0 <= doc["numberAttention"] <= 1
    assert Path(doc["html"]).is_file() and Path(doc["png"]).is_file() and doc["answerTokens"] <= 5
    assert doc["layers"] == [0, 1, 2]


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/model", "q"], "cannot load /nonexistent/model"),
    (["x", "q", "--reasoning", "maybe"], "--reasoning 'maybe': use on or off"),
    (["x", "  "], "the question is empty"),
])
def test_anneal_explain_bad_input_is_a_clear_error(args, message, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from anneal.cli import app

    monkeypatch.setenv("ANNEAL_HOME", str(tmp_path))
    res = CliRunner().invoke(app, ["explain", *args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("kind", ["DistillationJob", "CompressionJob"])
@pytest.mark.parametrize("maps,samples,ok", [(0, 4, True), (4, 4, True), (5, 4, False), (-1, 4, False)])
def test_attention_maps_is_at_most_the_evaluation_samples(kind, maps, samples, ok):
    from pydantic import ValidationError

    from anneal.api.compression import CompressionJobSpec
    from anneal.api.distillation import DistillationJobSpec

    if kind == "DistillationJob":
        cls, body = DistillationJobSpec, {"method": "sft", "student": {"uri": "/m"}}
    else:
        cls, body = CompressionJobSpec, {"model": {"uri": "/m"}, "quantization": {"scheme": "W8A16"}}
    body["evaluation"] = {"samples": samples, "attentionMaps": maps}
    if ok:
        assert cls.model_validate(body).evaluation.attention_maps == maps
        return
    with pytest.raises(ValidationError) as exc:
        cls.model_validate(body)
    err = exc.value.errors()[0]
    assert err["loc"][:2] == ("evaluation", "attentionMaps") or "attentionMaps" in str(exc.value)
    assert ("at most evaluation.samples" in str(exc.value)) == (maps > 0)


@pytest.mark.parametrize("kind,group", [("DistillationJob", "student"), ("CompressionJob", "compressed model")])
def test_number_attention_is_a_named_figure_of_the_output_model(kind, group):
    from anneal.report import figures

    [f] = figures({"numberAttention": 0.42}, kind)
    assert (f.group, f.key, f.value) == (group, "numberAttention", 0.42)
    assert "numbers" in f.label
