"""Unit tests for anneal.modeling: model URI parsing, the local tokenizer, tiny Llama models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anneal.data.datasets import load_samples
from anneal.data.formats import format_chat
from anneal.modeling.tiny import (LlamaShape, build_llama, copy_task, count_parameters, estimate_parameters,
                                 held_out_path)
from anneal.modeling.tokenizer import BUILTIN_TOKENIZER_VERSION, SPECIAL_TOKENS, builtin_tokenizer, train_tokenizer
from anneal.modeling.uris import ModelURI, parse_model_uri


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return builtin_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file:///models/student", ModelURI(raw="file:///models/student", scheme="file", path=Path("/models/student"))),
        ("/models/student", ModelURI(raw="/models/student", scheme="file", path=Path("/models/student"))),
        ("out/student", ModelURI(raw="out/student", scheme="file", path=Path("out/student"))),
        ("hf://acme/tiny", ModelURI(raw="hf://acme/tiny", scheme="hf", repo_id="acme/tiny")),
        ("hf://acme/tiny@v2", ModelURI(raw="hf://acme/tiny@v2", scheme="hf", repo_id="acme/tiny", revision="v2")),
        ("s3://bucket/models/tiny", ModelURI(raw="s3://bucket/models/tiny", scheme="s3", bucket="bucket",
                                             prefix="models/tiny")),
        ("s3://bucket/models/tiny/", ModelURI(raw="s3://bucket/models/tiny/", scheme="s3", bucket="bucket",
                                              prefix="models/tiny")),
        ("models:/Student/3", ModelURI(raw="models:/Student/3", scheme="models", name="Student", version=3)),
        ("models:/Student@champion", ModelURI(raw="models:/Student@champion", scheme="models", name="Student",
                                              alias="champion")),
    ],
)
def test_parse_model_uri(uri, expected):
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty"),
        ("models:/Student", "needs a version or an alias"),
        ("models:/Student/", "needs a version or an alias"),
        ("models:/Student/latest", "version 'latest' must be a positive integer"),
        ("models:/Student/0", "must be a positive integer"),
        ("models:/Student@", "expected models:/Name@alias"),
        ("models:/", "model name is missing"),
        ("models:Student/1", "models:/Name/3"),
        ("hf://tiny", r"expected hf://org/name\[@revision\]"),
        ("hf://a/b/c", r"expected hf://org/name\[@revision\]"),
        ("hf://acme/tiny@", "empty revision"),
        ("hf://datasets/acme/x", "this is a data set"),
        ("s3://", "the bucket is missing"),
        ("file://host/models", "absolute path"),
        ("gs://bucket/model", "unsupported scheme 'gs'"),
        ("runs:/abc/model", "unsupported scheme 'runs'"),
    ],
)
def test_parse_model_uri_rejects(uri, message):
    with pytest.raises(ValueError, match=message):
        parse_model_uri(uri)


def test_tokenizer_round_trip_on_rendered_samples(tokenizer):
    for difficulty in (1, 3, 5):
        uri = f"builtin://reasoning?difficulty={difficulty}&seed=99"
        for sample in load_samples(uri, split="eval", samples=20):
            text = sample.prompt + sample.completion + "<|end|>"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text


def test_tokenizer_special_and_digit_tokens(tokenizer):
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|end|>", "<|pad|>")
    ids = tokenizer("1234567890", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == list("1234567890")
    in_context = tokenizer.convert_ids_to_tokens(tokenizer("has 15 apples", add_special_tokens=False)["input_ids"])
    assert "1" in in_context and "5" in in_context  # no multi-digit merges inside sentences either
    assert len(tokenizer) <= 512


def test_tokenizer_training_is_deterministic_and_cached(tokenizer, tmp_path):
    texts = [format_chat([{"role": "user", "content": f"{i} apples and {i * 7} pears"}]) for i in range(200)]
    assert train_tokenizer(texts, vocab_size=300).get_vocab() == train_tokenizer(texts, vocab_size=300).get_vocab()
    again = builtin_tokenizer(tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert [p.name for p in tmp_path.iterdir()] == [f"tokenizer-{BUILTIN_TOKENIZER_VERSION}"]  # no temp leftovers
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(texts, vocab_size=100)


SHAPES = [
    LlamaShape(hidden_size=32, layers=2, heads=4, kv_heads=2, intermediate_size=64),
    LlamaShape(hidden_size=64, layers=2, heads=4, kv_heads=4, intermediate_size=128),
    LlamaShape(hidden_size=48, layers=1, heads=6, kv_heads=1, intermediate_size=96, max_position_embeddings=128),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_tiny_llama_forward_and_parameter_estimate(tokenizer, shape):
    model = build_llama(shape, tokenizer, seed=0)
    assert not model.config.tie_word_embeddings
    ids = torch.randint(0, len(tokenizer), (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 7, len(tokenizer))
    assert estimate_parameters(shape, len(tokenizer)) == count_parameters(model)


def test_build_llama_is_seeded(tokenizer):
    a, b, c = (build_llama(SHAPES[0], tokenizer, seed=s) for s in (1, 1, 2))
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (LlamaShape(hidden_size=30, heads=4), "hidden_size=30 must be divisible by heads=4"),
        (LlamaShape(heads=4, kv_heads=3), "heads=4 must be divisible by kv_heads=3"),
        (LlamaShape(layers=0), "layers=0 must be >= 1"),
    ],
)
def test_bad_shapes(tokenizer, shape, message):
    with pytest.raises(ValueError, match=message):
        build_llama(shape, tokenizer)


def test_unmerged_adapter_resolves_and_loads_onto_its_base(tmp_path, tokenizer):
    """A lora-kd output with merge: false is a directory with adapter_config.json only."""
    from peft import LoraConfig, get_peft_model

    from anneal.modeling.tiny import save_pretrained
    from anneal.modeling.uris import load_model, resolve_model_dir

    base = build_llama(LlamaShape(hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64), tokenizer, seed=3)
    base_dir = save_pretrained(base, tokenizer, tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    cfg = (tmp_path / "adapter" / "adapter_config.json")
    import json

    doc = json.loads(cfg.read_text())
    doc["base_model_name_or_path"] = str(base_dir)
    cfg.write_text(json.dumps(doc))

    assert resolve_model_dir(str(tmp_path / "adapter"), cache_dir=tmp_path / "c") == tmp_path / "adapter"
    model, tok = load_model(str(tmp_path / "adapter"), cache_dir=tmp_path / "c")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert len(tok) == len(tokenizer)


def test_copy_task_held_out_numbers_are_never_trained_on(tmp_path):
    train = copy_task(tmp_path / "copy.jsonl", 70, held_out=20)
    held = tmp_path / "copy-held-out.jsonl"
    assert held_out_path(train) == held
    seen = [int(s.completion.split()[-1]) for s in load_samples(str(train), format="prompt-completion")]
    unseen = [int(s.completion.split()[-1]) for s in load_samples(str(held), format="prompt-completion")]
    assert len(seen) == 70 and len(unseen) == 20 and not set(seen) & set(unseen)
    assert all(10 <= x < 100 for x in seen + unseen)
    # without held_out: one file, the same for the same seed
    assert copy_task(tmp_path / "plain.jsonl", 16).read_text() == copy_task(tmp_path / "again.jsonl", 16).read_text()
    assert not (tmp_path / "plain-held-out.jsonl").exists()
    with pytest.raises(ValueError, match="only 90"):
        copy_task(tmp_path / "big.jsonl", 80, held_out=11)
