"""Continued pretraining (method cpt): text loading, packing with eos between documents, held-out text, the loss."""

from __future__ import annotations

import json

import pytest
import torch

from anneal.api.distillation import DistillationJobSpec
from anneal.data.datasets import IGNORE_INDEX, DatasetError, collate, load_texts, pack_texts
from anneal.distill import cpt, recipe
from anneal.distill.losses import kd_loss


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from anneal.modeling.tokenizer import builtin_tokenizer

    return builtin_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny(tokenizer, hidden: int = 32, layers: int = 1, seed: int = 0):
    from anneal.modeling.tiny import LlamaShape, build_llama

    return build_llama(LlamaShape(hidden, layers, 4, 2, 2 * hidden, 128), tokenizer, seed=seed)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def spec(uri: str, **extra) -> DistillationJobSpec:
    return DistillationJobSpec.model_validate({
        "method": "cpt", "student": {"uri": "/models/student"},
        "dataset": {"uri": uri, "format": "text", "maxSeqLength": 16}, **extra,
    })


# ---------------------------------------------------------------------------- packing


def test_packing_joins_documents_with_eos_and_cuts_full_blocks(tokenizer):
    texts = ["Ana has 3 apples.", "Bo eats 12 pears and 4 plums.", "7 + 8 = 15"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = [tok for doc in ids for tok in (*doc, tokenizer.eos_token_id)]
    blocks = pack_texts(tokenizer, texts, 8)
    # every token of every document, in order, one eos after each, nothing padded or dropped
    assert [t for b in blocks for t in b["input_ids"]] == stream
    assert stream.count(tokenizer.eos_token_id) == 3
    assert all(len(b["input_ids"]) == 8 for b in blocks[:-1]) and 2 <= len(blocks[-1]["input_ids"]) <= 8
    for b in blocks:  # loss on every token: labels are the inputs, the mask is all ones
        assert b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * len(b["input_ids"])


def test_packing_drops_only_a_lone_trailing_token(tokenizer):
    one = tokenizer("Ana", add_special_tokens=False)["input_ids"]
    n = len(one) + 1  # the document and its eos
    blocks = pack_texts(tokenizer, ["Ana"] * 5, n * 2 - 1)  # leaves exactly one token over at the end
    assert sum(len(b["input_ids"]) for b in blocks) == 5 * n - 1


def test_packing_needs_an_eos_and_two_tokens_a_block(tokenizer):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        pack_texts(tokenizer, ["x"], 1)


# ------------------------------------------------------------------------------- loading


def test_jsonl_text_records_load_as_documents(tmp_path):
    uri = write_jsonl(tmp_path / "c.jsonl", [{"text": "one"}, {"text": "  "}, {"text": "two", "source": "web"}])
    assert load_texts(uri) == ["one", "two"]  # blank documents are skipped, other fields ignored
    assert load_texts(uri, samples=1) == ["one"]


def test_a_record_without_text_is_an_error_naming_the_record(tmp_path):
    uri = write_jsonl(tmp_path / "chat.jsonl", [{"text": "ok"}, {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DatasetError, match=r"record 1 has fields \['messages'\].*'text' field"):
        load_texts(uri)
    uri = write_jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    with pytest.raises(DatasetError, match="record 0: text must be a string, got int"):
        load_texts(uri)


def test_builtin_task_renders_as_text_with_the_worked_answer():
    texts = load_texts("builtin://reasoning?difficulty=1&seed=3", samples=4, reasoning="on")
    assert len(texts) == 4
    assert all(t.startswith("detailed thinking on\n") and "Answer:" in t for t in texts)


def test_a_saved_hugging_face_dataset_with_a_text_column_loads(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"], "id": [1, 2]}),
        "validation": datasets.Dataset.from_dict({"text": ["held out"], "id": [3]}),
    }).save_to_disk(str(tmp_path / "hf"))
    assert load_texts(str(tmp_path / "hf")) == ["alpha beta", "gamma"]
    assert load_texts(str(tmp_path / "hf"), split="eval") == ["held out"]


# ---------------------------------------------------------------------------- held-out text


def test_a_file_holds_out_its_last_tenth(tmp_path):
    uri = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    docs = cpt.documents(spec(uri), tmp_path)
    assert docs.train == [f"doc {i}" for i in range(18)] and docs.heldout == ["doc 18", "doc 19"]
    assert "last 2 of 20" in docs.heldout_source


def test_eval_dataset_is_the_held_out_text_and_all_training_text_is_trained_on(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    held = write_jsonl(tmp_path / "h.jsonl", [{"text": "other"}])
    docs = cpt.documents(spec(train, evalDataset={"uri": held, "format": "text"}), tmp_path)
    assert len(docs.train) == 5 and docs.heldout == ["other"]


def test_builtin_held_out_text_is_the_eval_split(tmp_path):
    s = spec("builtin://reasoning?difficulty=1&seed=3", evaluation={"samples": 6})
    s.dataset.samples = 40
    docs = cpt.documents(s, tmp_path)
    assert len(docs.train) == 40 and len(docs.heldout) == 6 and not set(docs.train) & set(docs.heldout)


def test_one_document_and_no_eval_dataset_is_a_clear_error(tmp_path):
    uri = write_jsonl(tmp_path / "one.jsonl", [{"text": "only"}])
    with pytest.raises(DatasetError, match="nothing can be held out.*evalDataset"):
        cpt.documents(spec(uri), tmp_path)


@pytest.mark.parametrize("uri,accuracy_on", [
    ("builtin://reasoning?difficulty=1", "builtin://reasoning?difficulty=1"),  # its eval split, in chat form
    ("/data/corpus.jsonl", None),  # raw text has no questions: no accuracy unless evaluation.dataset
])
def test_where_a_cpt_job_scores_accuracy(uri, accuracy_on):
    ref = spec(uri).accuracy_dataset_ref()
    assert (ref.uri if ref else None) == accuracy_on
    if ref:
        assert (ref.split, ref.format) == ("eval", "chat")
    chosen = spec(uri, evaluation={"dataset": {"uri": "/q.jsonl", "format": "prompt-completion"}})
    assert chosen.accuracy_dataset_ref().uri == "/q.jsonl"


# ------------------------------------------------------------------------------- the loss


def packed_batch(tokenizer, block: int = 12):
    texts = ["Ana has 3 apples and buys 4 more.", "12 - 5 = 7", "Bo has 9 pears."]
    return collate(pack_texts(tokenizer, texts, block), tokenizer.pad_token_id)


def test_cpt_without_a_teacher_is_next_token_loss_on_every_token(tokenizer):
    model, batch = tiny(tokenizer), packed_batch(tokenizer)
    loss, figures = recipe.build_objective(spec("/c.jsonl"), None)(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, ref, atol=1e-6) and set(figures) == {"ce"}
    # only the last block's padding is ignored: every real token after the first of a block is a target
    assert int((labels != IGNORE_INDEX).sum()) == int(batch["attention_mask"][:, 1:].sum())


def test_cpt_with_a_teacher_mixes_kd_and_next_token_loss_by_alpha(tokenizer):
    student, teacher = tiny(tokenizer, 32, 1, seed=0), tiny(tokenizer, 64, 2, seed=1).eval()
    batch = packed_batch(tokenizer)
    s = spec("/c.jsonl", teacher={"uri": "/t"}, kd={"alpha": 0.3, "temperature": 2.0, "chunkSize": 5})
    loss, figures = recipe.build_objective(s, teacher)(student, batch)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = kd_loss(s_logits, t_logits, batch["labels"], kind="forward-kl", temperature=2.0, alpha=0.3)
    assert torch.allclose(loss, ref.loss, atol=1e-5)
    assert figures["kd"] == pytest.approx(float(ref.kd), abs=1e-5) and figures["ce"] == pytest.approx(float(ref.ce), abs=1e-5)


def test_training_on_packed_text_lowers_held_out_perplexity(tokenizer):
    # The held-out documents are new sentences of the same template: what cpt is for.
    train = [f"Ana has {a} apples. Bo has {b} pears." for a in range(10) for b in range(0, 10, 3)]
    heldout = [f"Ana has {a} apples. Bo has {b} pears." for a, b in ((10, 1), (11, 5), (12, 8))]
    model = tiny(tokenizer, 32, 1, seed=0)
    before, tokens = cpt.text_perplexity(model.eval(), tokenizer, heldout, 32)
    batches = pack_texts(tokenizer, train, 32)
    objective = recipe.build_objective(spec("/c.jsonl"), None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        batch = collate(batches[(step * 4) % len(batches):][:4] or batches[:4], tokenizer.pad_token_id)
        loss, _ = objective(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = cpt.text_perplexity(model.eval(), tokenizer, heldout, 32)
    assert tokens == sum(len(b["input_ids"]) - 1 for b in pack_texts(tokenizer, heldout, 32))
    assert after < before / 3, (before, after)


def test_a_cpt_job_on_chat_records_fails_before_training_naming_the_record(tmp_path):
    """The recipe reads the text up front (no Ray worker starts): the job ends Failed with the record."""
    from anneal.distill.recipe import JobContext, run

    uri = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]}])
    job = DistillationJobSpec.model_validate({
        "method": "cpt", "student": {"config": {"hiddenSize": 32, "layers": 1, "heads": 4}},
        "dataset": {"uri": uri, "format": "text"},
    })
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = JobContext(kind="DistillationJob", namespace="t", name="bad-cpt", uid="u1", tracking_uri=tracking,
                     experiment="t", registered_model_name="bad-cpt", work_dir=str(tmp_path / "work"),
                     cache_dir=str(tmp_path / "cache"), artifact_root=str(tmp_path / "artifacts"))
    result = run(job, ctx)
    assert result.phase == "Failed" and result.model_uri is None
    assert "record 0 has fields ['messages']" in result.message and "'text' field" in result.message
    assert not (tmp_path / "work" / "ray").exists()  # no trainer was started
