"""Unit tests for anneal.data: the built-in reasoning task, chat format, dataset loading, tokenization."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from anneal.data.datasets import (
    IGNORE_INDEX,
    DatasetError,
    Sample,
    collate,
    load_samples,
    parse_dataset_uri,
    tokenize_sample,
)
from anneal.data.formats import CHAT_TEMPLATE, format_chat, reasoning_mode_of
from anneal.data.reasoning import (
    REASONING_OFF_PROMPT,
    REASONING_ON_PROMPT,
    Problem,
    check_answer,
    extract_answer,
    generate,
    render_completion,
    render_messages,
)

_STEP_RE = re.compile(r"^(\d+) ([+\-×]) (\d+) = (\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from anneal.modeling.tokenizer import builtin_tokenizer

    return builtin_tokenizer(tmp_path_factory.mktemp("tok"))


# --- the built-in task -------------------------------------------------------------------


@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_same_seed_same_problems_and_prefix_stable(difficulty):
    a = generate(50, seed=3, difficulty=difficulty)
    assert a == generate(50, seed=3, difficulty=difficulty)
    assert generate(20, seed=3, difficulty=difficulty) == a[:20]  # problem i doesn't depend on n


@pytest.mark.parametrize("difficulty", [1, 2, 4])
def test_different_seed_differs(difficulty):
    a = [p.question for p in generate(50, seed=1, difficulty=difficulty)]
    b = [p.question for p in generate(50, seed=2, difficulty=difficulty)]
    assert a != b
    assert len(set(a) & set(b)) < 10


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_steps_compute_answer(difficulty):
    for p in generate(200, seed=11, difficulty=difficulty):
        assert len(p.steps) == difficulty == p.difficulty
        assert str(p.steps[0].split()[0]) in p.question  # the chain starts from the stated quantity
        value = None
        for step in p.steps:
            m = _STEP_RE.match(step)
            assert m, step
            a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
            assert value is None or a == value  # each step continues from the previous result
            assert _OPS[op](a, b) == result
            value = result
        assert value == p.answer >= 0


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_splits_are_disjoint_by_arithmetic_with_holdout_arithmetic(difficulty):
    uri = f"builtin://reasoning?difficulty={difficulty}&seed=5&holdout=arithmetic"
    train = {s.completion for s in load_samples(uri, split="train", samples=1000, reasoning="on")}
    for split in ("eval", "test"):
        other = {s.completion for s in load_samples(uri, split=split, samples=300, reasoning="on")}
        assert not train & other
    eval_ = {s.completion for s in load_samples(uri, split="eval", samples=300, reasoning="on")}
    test = {s.completion for s in load_samples(uri, split="test", samples=300, reasoning="on")}
    assert not eval_ & test


def _questions(uri: str, split: str, n: int) -> set[str]:
    return {s.messages[-1]["content"] for s in load_samples(uri, split=split, samples=n, reasoning="on")}


@pytest.mark.parametrize("difficulty", [1, 2])
def test_splits_never_share_a_question_by_default(difficulty):
    uri = f"builtin://reasoning?difficulty={difficulty}&seed=5"
    train, eval_, test = (_questions(uri, s, n) for s, n in (("train", 1000), ("eval", 300), ("test", 300)))
    assert not train & eval_ and not train & test and not eval_ & test
    # ...while the arithmetic recurs, so the default task is learnable by a tiny model.
    steps = lambda split, n: {s.completion for s in load_samples(uri, split=split, samples=n, reasoning="on")}
    assert steps("train", 1000) & steps("eval", 300)


def test_generate_rejects_bad_difficulty():
    with pytest.raises(ValueError, match="difficulty must be 1..5"):
        generate(3, difficulty=6)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 8", 8),
        ("<think>\n5 + 3 = 8\n</think>\nAnswer: 8", 8),
        ("Answer: 3 ... wait. Answer: 12", 12),
        ("Answer:42", 42),
        ("Answer: -4", -4),
        ("the answer is 8", None),
        ("", None),
        ("Answer: eight", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "answer", "ok"),
    [
        ("Answer: 8", 8, True),
        ("Answer: 80", 8, False),
        ("Answer: 8", 9, False),
        ("8", 8, False),
        ("Answer: 7\nAnswer: 8", 8, True),
    ],
)
def test_check_answer(text, answer, ok):
    assert check_answer(text, answer) is ok


def test_renderings():
    p = Problem(id="x", question="Ana has 5 apples. She buys 3 more, then gives away 2. How many apples does she have?",
                steps=["5 + 3 = 8", "8 - 2 = 6"], answer=6, difficulty=2)
    assert render_completion(p, True) == "<think>\n5 + 3 = 8\n8 - 2 = 6\n</think>\nAnswer: 6"
    assert render_completion(p, False) == "Answer: 6"
    assert render_messages(p, True) == [
        {"role": "system", "content": REASONING_ON_PROMPT},
        {"role": "user", "content": p.question},
    ]
    assert render_messages(p, False)[0]["content"] == REASONING_OFF_PROMPT
    for on in (True, False):
        assert check_answer(render_completion(p, on), p.answer)


# --- chat format ---------------------------------------------------------------------------


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "2 + 2?"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "Answer: 4"}, {"role": "user", "content": "and\nagain?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_format_chat_matches_tokenizer_template(tokenizer, messages, add_generation_prompt):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    expected = format_chat(messages, add_generation_prompt=add_generation_prompt)
    got = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert got == expected


def test_format_chat_layout_and_bad_role():
    assert format_chat(CONVERSATIONS[1]) == (
        "<|system|>detailed thinking on<|end|><|user|>2 + 2?<|end|><|assistant|>"
    )
    with pytest.raises(ValueError, match=r"messages\[0\].role is 'tool'"):
        format_chat([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "mode"),
    [
        ([{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "q"}], "on"),
        ([{"role": "system", "content": " Detailed thinking OFF "}, {"role": "user", "content": "q"}], "off"),
        ([{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "q"}], None),
        ([{"role": "user", "content": "detailed thinking on"}], None),
        ([], None),
    ],
)
def test_reasoning_mode_of(messages, mode):
    assert reasoning_mode_of(messages) == mode


# --- dataset URIs and loading ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "fields"),
    [
        ("builtin://reasoning", {"scheme": "builtin", "task": "reasoning", "difficulty": 2, "seed": 0, "n": None}),
        ("builtin://reasoning?difficulty=4&seed=7&n=30", {"difficulty": 4, "seed": 7, "n": 30}),
        ("data/train.jsonl", {"scheme": "file", "path": Path("data/train.jsonl")}),
        ("file:///data/train.jsonl", {"scheme": "file", "path": Path("/data/train.jsonl")}),
        ("hf://datasets/org/name", {"scheme": "hf", "repo_id": "org/name", "revision": None}),
        ("hf://datasets/org/name@v1", {"scheme": "hf", "repo_id": "org/name", "revision": "v1"}),
        ("s3://bucket/dir/train.jsonl", {"scheme": "s3", "bucket": "bucket", "key": "dir/train.jsonl"}),
    ],
)
def test_parse_dataset_uri(uri, fields):
    parsed = parse_dataset_uri(uri)
    for key, value in fields.items():
        assert getattr(parsed, key) == value


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty"),
        ("builtin://arithmetic", "unknown built-in data set 'arithmetic'"),
        ("builtin://reasoning?difficulty=9", "difficulty=9 is out of range"),
        ("builtin://reasoning?seed=abc", "seed='abc' must be an integer"),
        ("builtin://reasoning?level=2", r"unknown query parameter\(s\) \['level'\]"),
        ("builtin://reasoning?n=0", "n=0 must be >= 1"),
        ("hf://org/name", "hf://datasets/org/name"),
        ("hf://datasets/name", "expected hf://datasets/org/name"),
        ("s3://bucket", "expected s3://bucket/key.jsonl"),
        ("s3://bucket/data.parquet", "only .jsonl"),
        ("gs://bucket/x.jsonl", "unsupported scheme 'gs'"),
        ("data/train.csv", "unsupported file type '.csv'"),
    ],
)
def test_bad_dataset_uris(uri, message):
    with pytest.raises(DatasetError, match=message):
        parse_dataset_uri(uri)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uri": "missing.jsonl"}, "no such file"),
        ({"uri": "builtin://reasoning", "split": "holdout"}, "unknown split 'holdout'"),
        ({"uri": "builtin://reasoning", "format": "xml"}, "format 'xml'"),
        ({"uri": "builtin://reasoning", "reasoning": "maybe"}, "reasoning 'maybe'"),
        ({"uri": "builtin://reasoning", "samples": 0}, "samples=0"),
    ],
)
def test_load_samples_errors(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=message):
        load_samples(**kwargs)


@pytest.mark.parametrize(
    ("reasoning", "modes"),
    [("both", ["on", "off"] * 3), ("on", ["on"] * 6), ("off", ["off"] * 6)],
)
def test_builtin_samples_by_reasoning(reasoning, modes):
    samples = load_samples("builtin://reasoning?difficulty=2&seed=1", samples=6, reasoning=reasoning)
    assert [s.reasoning for s in samples] == modes
    for s in samples:
        assert s.prompt == format_chat(s.messages) and s.prompt.endswith("<|assistant|>")
        assert check_answer(s.completion, s.answer)
        assert ("<think>" in s.completion) is (s.reasoning == "on")
    if reasoning == "both":  # both renderings of the same problem, side by side
        assert samples[0].messages[1] == samples[1].messages[1]


def test_builtin_n_param_and_formats():
    uri = "builtin://reasoning?n=4&seed=2"
    assert len(load_samples(uri)) == 8
    chat = load_samples(uri, reasoning="off")
    plain = load_samples(uri, reasoning="off", format="prompt-completion")
    text = load_samples(uri, reasoning="off", format="text")
    for c, p, t in zip(chat, plain, text, strict=True):
        assert "<|" not in p.prompt and c.messages[1]["content"] in p.prompt
        assert p.completion == c.completion == "Answer: " + str(c.answer)
        assert t.prompt == "" and t.completion == p.prompt + p.completion


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


JSONL_RECORDS = [
    {"messages": [{"role": "system", "content": "detailed thinking off"},
                  {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "Answer: 5"}], "answer": 5},
    {"prompt": "What is 4 × 2?", "completion": "Answer: 8<|end|>", "answer": "8"},
    {"text": "Plain text for language modelling."},
]


@pytest.mark.parametrize("as_file_uri", [False, True])
def test_jsonl_record_forms(tmp_path, as_file_uri):
    path = _write_jsonl(tmp_path / "d.jsonl", JSONL_RECORDS)
    uri = path.as_uri() if as_file_uri else str(path)
    chat, prompt_completion, plain = load_samples(uri)
    assert chat == Sample(
        prompt="<|system|>detailed thinking off<|end|><|user|>What is 2 + 3?<|end|><|assistant|>",
        completion="Answer: 5", answer=5, reasoning="off", messages=JSONL_RECORDS[0]["messages"][:2], chat=True,
    )
    assert prompt_completion.prompt == "<|user|>What is 4 × 2?<|end|><|assistant|>" and prompt_completion.chat
    assert prompt_completion.completion == "Answer: 8"  # a trailing <|end|> is not doubled
    assert prompt_completion.answer == 8 and prompt_completion.reasoning is None
    assert plain == Sample(prompt="", completion="Plain text for language modelling.")


def test_gsm8k_records_are_scored_on_their_final_figure(tmp_path):
    from anneal.data.reasoning import check_answer, extract_answer

    path = _write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72"},
        {"question": "A big one?", "answer": "It is 1,000 + 234.\n#### 1,234"},
    ])
    first, second = load_samples(str(path))
    assert first.prompt == "<|user|>Natalia sold 48 clips in April and half as many in May. How many in all?<|end|>" \
        "<|assistant|>" and first.chat
    assert first.completion.endswith("#### 72") and first.answer == 72
    assert second.answer == 1234
    assert extract_answer("so #### 72") == 72 and extract_answer("Answer: 5 then Answer: -3") == -3
    assert check_answer(first.completion, 72) and not check_answer("#### 71", 72)


@pytest.mark.parametrize(("reasoning", "count"), [("both", 3), ("off", 3), ("on", 2)])
def test_jsonl_reasoning_filter_keeps_unmarked(tmp_path, reasoning, count):
    path = _write_jsonl(tmp_path / "d.jsonl", JSONL_RECORDS)
    assert len(load_samples(str(path), reasoning=reasoning)) == count


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "q"}, r"record 0: has fields \['question'\]"),
        ({"messages": [{"role": "user", "content": "q"}]}, "must be the assistant's answer"),
        ({"messages": "hello"}, "non-empty list"),
        ({"prompt": "p", "completion": "c", "answer": "eight"}, "answer 'eight' is not an integer"),
    ],
)
def test_jsonl_bad_records(tmp_path, record, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DatasetError, match=message) as info:
        load_samples(str(path))
    assert str(path) in str(info.value)


def test_jsonl_invalid_json(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        load_samples(str(path))


def test_local_hf_dataset_dir(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([JSONL_RECORDS[1]] * 3),
        "validation": datasets.Dataset.from_list([JSONL_RECORDS[2]]),
    }).save_to_disk(str(tmp_path / "ds"))
    assert len(load_samples(str(tmp_path / "ds"))) == 3
    assert load_samples(str(tmp_path / "ds"), split="eval")[0].completion == JSONL_RECORDS[2]["text"]
    with pytest.raises(DatasetError, match=r"no split 'test'; the data set has \['train', 'validation'\]"):
        load_samples(str(tmp_path / "ds"), split="test")


def test_hf_uri_offline_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    snapshot = tmp_path / "datasets--acme--arith" / "snapshots" / ("a" * 40)
    (snapshot / "data").mkdir(parents=True)
    # A hub data set has one schema per file (the datasets library builds an Arrow table).
    records = [{"prompt": f"What is {i} + 1?", "completion": f"Answer: {i + 1}", "answer": i + 1} for i in range(4)]
    _write_jsonl(snapshot / "data" / "train.jsonl", records)
    (tmp_path / "datasets--acme--arith" / "refs").mkdir()
    (tmp_path / "datasets--acme--arith" / "refs" / "main").write_text("a" * 40)
    samples = load_samples("hf://datasets/acme/arith", cache_dir=tmp_path, format="prompt-completion")
    assert [(s.prompt, s.answer) for s in samples] == [(r["prompt"], r["answer"]) for r in records]
    with pytest.raises(DatasetError, match="could not fetch data set 'acme/missing'"):
        load_samples("hf://datasets/acme/missing", cache_dir=tmp_path)


# --- tokenization -----------------------------------------------------------------------------


def test_tokenize_sample_masks_prompt(tokenizer):
    sample = load_samples("builtin://reasoning?seed=4", samples=1, reasoning="on")[0]
    item = tokenize_sample(tokenizer, sample, max_seq_length=512)
    prompt_len = len(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
    ids, labels = item["input_ids"], item["labels"]
    assert len(ids) == len(labels) == len(item["attention_mask"]) and set(item["attention_mask"]) == {1}
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and IGNORE_INDEX not in labels[prompt_len:]
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.decode(ids) == sample.prompt + sample.completion + "<|end|>"
    assert tokenizer.decode(ids[prompt_len:]) == sample.completion + "<|end|>"


def test_tokenize_sample_truncates_and_rejects_prompt_overflow(tokenizer):
    sample = load_samples("builtin://reasoning?seed=4&difficulty=5", samples=1, reasoning="on")[0]
    prompt_len = len(tokenizer(sample.prompt, add_special_tokens=False)["input_ids"])
    item = tokenize_sample(tokenizer, sample, max_seq_length=prompt_len + 3)
    assert len(item["input_ids"]) == prompt_len + 3
    assert sum(label != IGNORE_INDEX for label in item["labels"]) == 3
    with pytest.raises(ValueError, match="raise maxSeqLength"):
        tokenize_sample(tokenizer, sample, max_seq_length=prompt_len)


def test_collate_pads(tokenizer):
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "attention_mask": [1, 1, 1]},
        {"input_ids": [8], "labels": [8], "attention_mask": [1]},
    ]
    out = collate(batch, pad_id=0)
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
