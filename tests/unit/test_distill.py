"""Distillation recipe pieces: objective selection, LoRA add/merge, GRPO maths, rewards, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from anneal.api.distillation import DistillationJobSpec, LoraConfig
from anneal.distill import harness, lora, recipe, rl
from anneal.distill.losses import kd_loss, sequence_logprobs
from anneal.modeling import uris

VOCAB = 48


def tiny_llama(hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def batch(b: int = 3, t: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[0, -2:] = -100  # padding on one row
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def spec(method: str = "kd", **kd) -> DistillationJobSpec:
    return DistillationJobSpec.model_validate({
        "method": method,
        "teacher": {"uri": "/models/teacher"} if method != "sft" else None,
        "student": {"config": {"hiddenSize": 32, "layers": 1, "heads": 4}},
        "kd": kd,
    })


# ------------------------------------------------------------------------- objective


def test_sft_objective_is_the_models_own_cross_entropy():
    model, b = tiny_llama(), batch()
    loss, figures = recipe.build_objective(spec("sft"), None)(model, b)
    assert torch.allclose(loss, model(**b).loss)
    assert set(figures) == {"ce"}


@pytest.mark.parametrize("kind,temperature,alpha", [
    ("forward-kl", 1.0, 0.5), ("reverse-kl", 2.0, 1.0), ("jsd", 0.5, 0.0), ("forward-kl", 4.0, 0.9),
])
def test_kd_objective_equals_the_full_logits_reference(kind, temperature, alpha):
    student, teacher, b = tiny_llama(32, 1, seed=0), tiny_llama(64, 2, seed=1), batch()
    objective = recipe.build_objective(spec("kd", loss=kind, temperature=temperature, alpha=alpha, chunkSize=7), teacher)
    loss, figures = objective(student, b)
    s_logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ref = kd_loss(s_logits, t_logits, b["labels"], kind=kind, temperature=temperature, alpha=alpha)
    assert torch.allclose(loss, ref.loss, atol=1e-5)
    assert figures["kd"] == pytest.approx(float(ref.kd), abs=1e-5)
    assert figures["ce"] == pytest.approx(float(ref.ce), abs=1e-5)


def test_kd_objective_trains_the_student_only():
    student, teacher, b = tiny_llama(32, 1), tiny_llama(64, 2, seed=1), batch()
    teacher.requires_grad_(False)
    loss, _ = recipe.build_objective(spec("kd"), teacher)(student, b)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("method", ["kd", "lora-kd"])
def test_a_teacher_method_without_a_teacher_is_an_error(method):
    with pytest.raises(ValueError, match="needs a teacher"):
        recipe.build_objective(spec(method), None)


# ------------------------------------------------------------------------------- LoRA


def _perturbed_adapter(merge: bool):
    model = lora.add_lora(tiny_llama(), LoraConfig(rank=4, alpha=8, dropout=0.0, merge=merge))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the branches do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_only_the_lora_branches_train():
    model = _perturbed_adapter(merge=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_merged_model_gives_the_adapter_models_logits_and_has_no_adapter(tmp_path):
    model, b = _perturbed_adapter(merge=True), batch()
    with torch.no_grad():
        with_adapter = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        base_only = model.get_base_model()
        with model.disable_adapter():
            without = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert not torch.allclose(with_adapter, without, atol=1e-3)  # the branches matter
    merged = lora.finalize_lora(model, LoraConfig(merge=True))
    assert not lora.is_adapter(merged)
    assert not any("lora_" in n for n in merged.state_dict())
    with torch.no_grad():
        logits = merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(logits, with_adapter, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)
    assert not (tmp_path / uris.ADAPTER_CONFIG_FILE).exists() and (tmp_path / "config.json").exists()
    del base_only


def test_unmerged_adapter_points_at_its_base_and_reloads(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = _perturbed_adapter(merge=False)
    b = batch()
    with torch.no_grad():
        expected = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    exported = lora.finalize_lora(model, LoraConfig(merge=False))
    assert lora.is_adapter(exported)
    exported.save_pretrained(adapter_dir)
    assert (adapter_dir / uris.ADAPTER_CONFIG_FILE).exists() and not (adapter_dir / "config.json").exists()
    lora.point_adapter_at(adapter_dir, str(base_dir))
    assert uris.adapter_base(adapter_dir) == str(base_dir)
    reloaded = uris.load_adapter_model(adapter_dir, cache_dir=tmp_path / "cache")
    with torch.no_grad():
        got = reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unknown_lora_target_names_the_students_layers():
    with pytest.raises(lora.LoraTargetError, match="c_attn.*down_proj"):
        lora.add_lora(tiny_llama(), LoraConfig(target_modules=["c_attn"]))


# ------------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("rewards,expected", [
    ([[1, 0, 0, 1]], [[1, -1, -1, 1]]),
    ([[1, 1, 1, 1]], [[0, 0, 0, 0]]),
    ([[0, 0], [3, 1]], [[0, 0], [1, -1]]),
    ([[2, 0, 0, 0]], [[3 ** 0.5, -(3 ** -0.5), -(3 ** -0.5), -(3 ** -0.5)]]),
])
def test_group_advantages_normalise_within_each_group(rewards, expected):
    got = rl.group_advantages(torch.tensor(rewards, dtype=torch.float32))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(4,), (3, 1), (1, 2, 2)])
def test_group_advantages_need_groups_of_two_or_more(shape):
    with pytest.raises(ValueError, match="groupSize"):
        rl.group_advantages(torch.zeros(shape))


def test_token_logprobs_sum_to_the_sequence_logprobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, VOCAB, generator=g)
    labels = batch(3, 8)["labels"]
    logp, mask = rl.token_logprobs(logits, labels)
    assert mask.shape == (3, 7) and not logp[~mask].any()
    torch.testing.assert_close(logp.sum(-1), sequence_logprobs(logits, labels))


def test_grpo_gradient_is_advantage_weighted_token_mean():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    loss, parts = rl.grpo_loss(logp, logp.detach(), None, adv, mask, kl_coef=0.5)
    loss.backward()
    expected = -(adv.unsqueeze(1) * mask) / mask.sum()  # ratio = 1: d(-A·ratio)/dlogp = -A / tokens
    torch.testing.assert_close(logp.grad, expected)
    assert parts["kl"] == 0.0
    assert float(loss) == pytest.approx(parts["pg"])


def test_grpo_kl_to_the_start_is_zero_at_the_start_and_positive_away_from_it():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones_like(logp, dtype=torch.bool)
    zero_adv = torch.zeros(1)
    _, same = rl.grpo_loss(logp, logp, logp.clone(), zero_adv, mask, kl_coef=1.0)
    loss, moved = rl.grpo_loss(logp, logp, logp + 0.5, zero_adv, mask, kl_coef=0.1)
    assert same["kl"] == pytest.approx(0.0)
    r = 0.5
    assert moved["kl"] == pytest.approx(torch.tensor(r).exp().item() - r - 1, rel=1e-5)
    assert float(loss) == pytest.approx(0.1 * moved["kl"], rel=1e-5)


def test_build_batch_scores_the_completion_only():
    b = rl.build_batch([[5, 6, 7], [5]], [[8, 2], [9, 10, 2]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 2], [5, 9, 10, 2, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 2], [-100, 9, 10, 2, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


# ----------------------------------------------------------------------------- rewards


class _Sample:
    def __init__(self, answer):
        self.answer, self.prompt, self.completion, self.messages = answer, "p", "c", []


@pytest.mark.parametrize("text,answer,reward", [
    ("<think>\n3 + 4 = 7\n</think>\nAnswer: 7", 7, 1.0),
    ("Answer: 8", 7, 0.0),
    ("Answer: 6\nAnswer: 7", 7, 1.0),
    ("seven", 7, 0.0),
    ("Answer: -3", -3, 1.0),
])
def test_exact_answer_reward(text, answer, reward):
    fn = rl.load_reward("exact-answer")
    assert fn(text, _Sample(answer)) == reward


def test_exact_answer_needs_an_answer():
    with pytest.raises(rl.RewardError, match="python:module:function"):
        rl.exact_answer_reward("Answer: 3", _Sample(None))


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(completion, sample):
            return -len(completion) / 10
        def broken(completion, sample):
            raise KeyError("answer")
        def not_a_number(completion, sample):
            return "yes"
        CONSTANT = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_python_reward_is_loaded_and_scored(reward_module):
    fn = rl.load_reward(f"python:{reward_module}:length")
    assert rl.score(fn, "length", ["abcd", ""], [_Sample(1), _Sample(2)]) == [-0.4, 0.0]


@pytest.mark.parametrize("name,match", [
    ("python:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("python:my_rewards:missing", "has no attribute 'missing'"),
    ("python:my_rewards:CONSTANT", "is a int, not a function"),
    ("python:my_rewards", "not exact-answer or python:module:function"),
    ("shortest", "not exact-answer or python:module:function"),
])
def test_reward_loading_errors_say_what_is_wrong(reward_module, name, match):
    with pytest.raises(rl.RewardError, match=match):
        rl.load_reward(name)


@pytest.mark.parametrize("func,match", [("broken", "raised KeyError"), ("not_a_number", "finite number")])
def test_reward_function_failures_are_reward_errors(reward_module, func, match):
    fn = rl.load_reward(f"python:{reward_module}:{func}")
    with pytest.raises(rl.RewardError, match=match):
        rl.score(fn, func, ["x"], [_Sample(1)])


# ------------------------------------------------------------------ recipe and harness bits


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    def ckpt(name, step, complete=True):
        d = tmp_path / "run" / name
        d.mkdir(parents=True)
        (d / harness.STATE_FILE).write_text(json.dumps({"step": step}))
        if complete:
            (d / "model.pt").write_bytes(b"x")
            (d / "optimizer.pt").write_bytes(b"x")

    assert harness.latest_checkpoint(tmp_path) is None
    ckpt("checkpoint_a", 10)
    ckpt("checkpoint_b", 20)
    ckpt("checkpoint_c", 30, complete=False)  # killed while being written
    found = harness.latest_checkpoint(tmp_path)
    assert found is not None and found[1] == 20 and found[0].path.endswith("checkpoint_b")


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    t = spec("sft").training.model_copy(update={"learning_rate": 1.0, "warmup_steps": 10})
    assert harness.lr_at(t, 110, 0) == pytest.approx(0.1)
    assert harness.lr_at(t, 110, 9) == pytest.approx(1.0)
    assert harness.lr_at(t, 110, 10) == pytest.approx(1.0)
    assert harness.lr_at(t, 110, 110) == pytest.approx(0.1)


# ------------------------------------------------------------- workers: data order, tokens, loss weighting


@pytest.mark.parametrize("n,batch_size,world", [(14, 3, 2), (30, 2, 4), (5, 4, 2)])
def test_n_workers_draw_the_global_batches_one_worker_draws(n, batch_size, world):
    """sft/kd (recipe._batches' order) and kd-rl (rl._prompt_batches) alike: each step the ranks' shares are
    disjoint and together are one worker's batch of world × batch_size, epoch after epoch."""
    items = [f"s{i}" for i in range(n)]
    one = rl._prompt_batches(items, batch_size * world, seed=5)
    ranks = [rl._prompt_batches(items, batch_size, seed=5, rank=r, world=world) for r in range(world)]
    for step in range(12):
        shares = [next(r) for r in ranks]
        whole = next(one)
        if n >= batch_size * world:
            assert sum(len(s) for s in shares) == len(whole) == batch_size * world
            assert sorted(x for s in shares for x in s) == sorted(whole), step
        else:  # fewer samples than one global batch: every rank gets all of them
            assert all(sorted(s) == sorted(items) for s in shares)


def test_a_rank_tokenizes_only_the_samples_its_batches_draw():
    calls = []
    samples = list(range(40))
    tokenized = harness.Tokenized(samples, lambda s: calls.append(s) or {"input_ids": [s + 3], "labels": [s + 3],
                                                                           "attention_mask": [1]})
    batches = recipe._batches(tokenized, batch_size=4, seed=1, pad_id=0, rank=1, world=2)
    drawn = [next(batches)["input_ids"].view(-1).tolist() for _ in range(3)]  # 3 steps: 12 of 40 samples
    assert sorted(calls) == sorted(x - 3 for b in drawn for x in b) and len(calls) == 12
    next(recipe._batches(tokenized, batch_size=4, seed=1, pad_id=0, rank=1, world=2))
    assert len(calls) == 12  # a drawn sample is tokenized once


def uneven_batch() -> dict[str, torch.Tensor]:
    """Four rows; the first two (worker 0's) have 6 labelled tokens each, the last two (worker 1's) 2 each."""
    b = batch(b=4, t=10)
    b["labels"] = b["input_ids"].clone()
    b["labels"][:, :4] = -100
    b["labels"][2:, :8] = -100
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    return b


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_two_workers_weighted_by_their_tokens_give_one_workers_loss_and_gradients(method):
    """Two workers' halves of a batch (12 and 4 tokens), each scaled by `parallel.token_share` as the objective
    does on a process group, then averaged as DDP/FSDP average: one worker's loss and gradients on the whole.
    (`parallel.token_weight` is the same share with the total all-reduced; the 2-worker Ray Train run of
    tests/integration/test_distill.py checks it on real gloo workers.)"""
    from anneal.distill import parallel

    teacher = tiny_llama(hidden=48, seed=3) if method == "kd" else None
    whole = uneven_batch()
    halves = [{k: v[r * 2:(r + 1) * 2] for k, v in whole.items()} for r in (0, 1)]
    counts = [parallel.labelled_tokens(h["labels"]) for h in halves]
    assert counts == [12, 4] and parallel.labelled_tokens(whole["labels"]) == 16

    def run(batches, weights):
        model = tiny_llama()
        objective = recipe._method_objective(spec(method), teacher)
        losses = []
        for b, w in zip(batches, weights):
            loss, _ = objective(model, b)
            (loss * w / len(batches)).backward()  # DDP/FSDP: the mean of the workers' gradients
            losses.append(float(loss.detach()) * w)
        return sum(losses) / len(losses), torch.cat([p.grad.view(-1) for p in model.parameters()])

    one_loss, one_grad = run([whole], [1.0])
    weighted = [parallel.token_share(n, sum(counts), 2) for n in counts]
    two_loss, two_grad = run(halves, weighted)
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert torch.allclose(two_grad, one_grad, rtol=1e-4, atol=1e-7)
    # unweighted (as before), the halves count equally: 12 tokens and 4 are not one worker's mean
    _, plain_grad = run(halves, [1.0, 1.0])
    assert not torch.allclose(plain_grad, one_grad, rtol=1e-2, atol=1e-5)
    assert parallel.token_weight(whole["labels"]) == 1.0  # no process group: one worker, no weighting


# ------------------------------------------------------------------------- teacher precision


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                             ("fp16", torch.float32)])  # fp16 has no CPU kernels: fp32 there
def test_the_teacher_runs_frozen_in_the_training_precision(tmp_path, precision, dtype):
    tiny_llama(hidden=48, seed=3).save_pretrained(tmp_path)
    teacher = harness.load_teacher(tmp_path, precision, torch.device("cpu"))
    assert {p.dtype for p in teacher.parameters()} == {dtype}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    b = batch()
    with torch.no_grad():
        hidden = teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    assert hidden.dtype == dtype  # the forward itself ran in that precision
    # The kd step as the worker runs it (autocast in the training precision): a finite loss, gradients
    # in the fp32 student only.
    student = tiny_llama().train()
    with harness.autocast(precision, "cpu"):
        loss, figures = recipe.build_objective(spec("kd"), teacher)(student, b)
    loss.backward()
    assert torch.isfinite(loss) and figures["kd"] > 0
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())
