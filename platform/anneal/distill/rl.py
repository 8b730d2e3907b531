"""`kd-rl`: hybrid KD + RL by group-relative policy optimisation (GRPO) on Ray Train.

Per step and worker: take `batchSize` prompts, sample `rl.groupSize` completions of each from the
current policy, score them with `rl.reward`, and normalise the rewards within each prompt's
group into advantages. The loss, averaged over the completion tokens of all workers
(`parallel.token_weight`), is

    -A · ratio (clipped)  +  klCoef · KL(policy ‖ start)  +  kdCoef · KD(teacher ‖ policy)

where the KL to the starting policy uses the unbiased per-token estimator
``exp(r) - r - 1`` with ``r = log p_start - log p`` (as in GRPO), and the KD term is the
chunked forward/reverse KL or JSD of `spec.kd` against the teacher on the same sampled tokens.
One policy update per batch of samples, so the ratio is 1 in value (its gradient is that of
log p); the clip is kept so that more inner updates stay a one-line change.

Rewards: `exact-answer` (1 when the last `Answer: N` equals the sample's answer, else 0), or
`python:module:function` — a user function `f(completion: str, sample) -> float` where
`sample` has `prompt`, `completion` (the reference), `answer` and `messages`.
"""

from __future__ import annotations

import importlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from anneal.api.distillation import DistillationJobSpec
from anneal.distill import harness, parallel
from anneal.distill.losses import IGNORE_INDEX
from anneal.modeling.chat import pad_id, padding, sample_prompt

RewardFn = Callable[[str, Any], float]


class RewardError(ValueError):
    """`rl.reward` cannot be loaded, or a reward function returned something that is not a number."""


# ---------------------------------------------------------------------------- rewards


def exact_answer_reward(completion: str, sample: Any) -> float:
    """1.0 when the completion's last `Answer: N` equals the sample's answer, else 0.0.

    Args:
        completion: the generated text (without the prompt).
        sample: an `anneal.data.datasets.Sample` with `answer` set.

    Returns:
        The reward.
    """
    from anneal.data.reasoning import check_answer

    if sample.answer is None:
        raise RewardError(
            "rl.reward: exact-answer needs samples with an `answer` (the built-in data set has one); "
            "use python:module:function for data without checkable answers"
        )
    return 1.0 if check_answer(completion, sample.answer) else 0.0


def load_reward(name: str) -> RewardFn:
    """The reward function an `rl.reward` value names.

    Args:
        name: `exact-answer` or `python:module:function` (module importable on every worker).

    Returns:
        A callable `(completion, sample) -> float`.

    Raises:
        RewardError: unknown form, module not importable, no such attribute, not callable.
    """
    if name == "exact-answer":
        return exact_answer_reward
    if not name.startswith("python:") or name.count(":") != 2:
        raise RewardError(f"rl.reward: {name!r} is not exact-answer or python:module:function")
    _, module_name, func_name = name.split(":")
    if not module_name or not func_name:
        raise RewardError(f"rl.reward: {name!r} is not exact-answer or python:module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(
            f"rl.reward: cannot import module {module_name!r} ({exc}); ship it with the job "
            "(spec.ray.runtimeEnv: pip or working_dir) so that every Ray worker can import it"
        ) from exc
    fn = getattr(module, func_name, None)
    if fn is None:
        raise RewardError(f"rl.reward: module {module_name!r} has no attribute {func_name!r}")
    if not callable(fn):
        raise RewardError(f"rl.reward: {module_name}.{func_name} is a {type(fn).__name__}, not a function")
    return fn


def score(fn: RewardFn, name: str, completions: Sequence[str], samples: Sequence[Any]) -> list[float]:
    """Rewards of `completions` (one sample each), checked to be finite numbers.

    Raises:
        RewardError: the function raised, or returned something that is not a finite number.
    """
    out = []
    for completion, sample in zip(completions, samples):
        try:
            value = fn(completion, sample)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"rl.reward: {name} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise RewardError(f"rl.reward: {name} returned {value!r}; it must return a finite number")
        out.append(float(value))
    return out


# ------------------------------------------------------------------------------ maths


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rewards normalised within each prompt's group: ``(r - mean_g) / (std_g + eps)``.

    A group whose samples all scored the same has zero advantage (nothing to learn from it).

    Args:
        rewards: ``[P, G]`` rewards of G samples for each of P prompts.
        eps: added to the (population) standard deviation.

    Returns:
        ``[P, G]`` fp32 advantages; each row has mean 0 and, unless constant, std ≈ 1.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, groupSize >= 2], got {tuple(rewards.shape)}")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labels (causal shift) and the mask of scored tokens.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` aligned with the inputs; ``-100`` = not scored.

    Returns:
        ``([B, T-1] fp32 log p(labels[t+1] | ≤ t), [B, T-1] bool mask)``; masked entries are 0.
    """
    logits, shifted = logits[:, :-1].float(), labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    picked = logits.gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, logp, torch.zeros_like(logp)), mask


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy-gradient loss plus ``kl_coef`` × KL to the reference, token-averaged.

    Args:
        logp: ``[B, L]`` log-probabilities of the sampled tokens under the policy (with grad).
        old_logp: ``[B, L]`` the same under the policy that sampled them (no grad).
        ref_logp: ``[B, L]`` the same under the starting policy, or None (no KL term).
        advantages: ``[B]`` one advantage per sequence.
        mask: ``[B, L]`` bool, True on completion tokens.
        kl_coef: weight of the KL term.
        clip_eps: PPO clip range of the ratio.

    Returns:
        ``(loss, {"pg": ..., "kl": ...})``; the loss is 0 with no completion token.
    """
    m = mask.float()
    count = m.sum().clamp_min(1.0)
    adv = advantages.float().unsqueeze(1)
    ratio = torch.exp(logp - old_logp.detach())
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    pg = -(surrogate * m).sum() / count
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        r = ref_logp.detach() - logp
        kl = ((torch.exp(r) - r - 1.0) * m).sum() / count
    return pg + kl_coef * kl, {"pg": float(pg.detach()), "kl": float(kl.detach())}


# ------------------------------------------------------------------------- sampling


def sample_completions(
    model: Any, tokenizer: Any, prompts: Sequence[str], group_size: int, max_new_tokens: int, temperature: float
) -> tuple[list[list[int]], list[list[int]]]:
    """`group_size` sampled completions of every prompt (prompt-major order).

    Returns:
        ``(prompt token ids per sequence, completion token ids per sequence)``; a completion
        stops after its first eos (kept) or at `max_new_tokens`.
    """
    device = next(model.parameters()).device
    with padding(tokenizer, "left"):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                num_return_sequences=group_size,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            )
    width = enc["input_ids"].shape[1]
    prompt_ids, completion_ids = [], []
    for row in range(gen.shape[0]):
        p = row // group_size
        ids = enc["input_ids"][p][enc["attention_mask"][p].bool()].tolist()
        new = gen[row, width:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        prompt_ids.append(ids)
        completion_ids.append(new)
    return prompt_ids, completion_ids


def build_batch(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch of prompt + completion with labels on the completion only."""
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        attention[i, :n] = 1
        if c:
            labels[i, len(p) : n] = torch.tensor(c)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ------------------------------------------------------------------------ the loop


def _prompt_batches(samples: list[Any], batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless prompt batches: this rank's share of each global batch, in the data order every method
    uses (`harness.global_order`), so N workers sample the prompts one worker with N× the batch would."""
    for idx in harness.global_order(len(samples), batch_size, seed, rank, world):
        yield [samples[j] for j in idx]


def rl_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker loop of `kd-rl` (runs on every worker)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.distill.losses import chunked_kd_loss
    from anneal.modeling.layerwise_llama import register as register_anneal_llama

    worker = harness.start_worker(cfg)
    spec, rank, device = worker.spec, worker.rank, worker.device
    t, rl = spec.training, spec.rl

    register_anneal_llama()  # model_type anneal_llama (attention removal, FFN fusion)
    tokenizer = AutoTokenizer.from_pretrained(worker.student_init)
    policy = AutoModelForCausalLM.from_pretrained(worker.student_init, dtype=torch.float32)
    reference = None
    if rl.kl_coef > 0:
        reference = AutoModelForCausalLM.from_pretrained(worker.student_init, dtype=torch.float32).to(device).eval()
        reference.requires_grad_(False)
    teacher = None
    if rl.kd_coef > 0 and worker.teacher_dir:
        teacher = harness.load_teacher(worker.teacher_dir, t.precision, device)

    model, params, optimizer, start_step = parallel.prepare(policy, t, device, worker.resume_dir)
    inner = parallel.unwrap(model)

    samples = harness.dataset_samples(spec.dataset, worker.cache_dir, harness.student_toggle(spec, worker.student_init))
    reward_fn = load_reward(rl.reward)
    steps = worker.total_steps
    batches = _prompt_batches(samples, t.batch_size, t.seed, rank, worker.world)
    for _ in range(start_step * t.gradient_accumulation):
        next(batches)
    logger = worker.metrics_logger()
    step_times: list[float] = []
    log_seconds = 0.0
    try:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = harness.lr_at(t, steps, step)
            optimizer.zero_grad(set_to_none=True)
            figures: dict[str, float] = {}
            loss_sum, rewards_all = 0.0, []
            for _ in range(t.gradient_accumulation):
                prompts = next(batches)
                inner.eval()
                prompt_ids, completion_ids = sample_completions(
                    inner, tokenizer, [sample_prompt(tokenizer, s) for s in prompts], rl.group_size, rl.max_new_tokens, rl.temperature
                )
                texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
                per_seq = [s for s in prompts for _ in range(rl.group_size)]
                rewards = torch.tensor(score(reward_fn, rl.reward, texts, per_seq)).view(len(prompts), rl.group_size)
                rewards_all.append(rewards)
                advantages = group_advantages(rewards).view(-1).to(device)
                batch = {k: v.to(device) for k, v in build_batch(prompt_ids, completion_ids, pad_id(tokenizer)).items()}
                model.train()
                with harness.autocast(t.precision, device.type):
                    out = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=teacher is not None,
                    )
                    logp, mask = token_logprobs(out.logits, batch["labels"])
                    ref_logp = None
                    if reference is not None:
                        with torch.no_grad():
                            ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                        ref_logp, _ = token_logprobs(ref_logits, batch["labels"])
                    loss, parts = grpo_loss(logp, logp.detach(), ref_logp, advantages, mask, rl.kl_coef)
                    if teacher is not None:
                        with torch.no_grad():
                            t_hidden = teacher.model(
                                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                            ).last_hidden_state
                        kd = chunked_kd_loss(
                            out.hidden_states[-1], t_hidden, inner.get_output_embeddings(), teacher.get_output_embeddings(),
                            batch["labels"], kind=spec.kd.loss, temperature=spec.kd.temperature, alpha=1.0,
                            chunk_size=spec.kd.chunk_size,
                        )
                        loss = loss + rl.kd_coef * kd.kd
                        parts["kd"] = float(kd.kd.detach())
                    # token-weighted across workers, as sft/kd are (every worker takes part: one all-reduce)
                    w = parallel.token_weight(batch["labels"])
                    loss, parts = loss * w, {k: v * w for k, v in parts.items()}
                (loss / t.gradient_accumulation).backward()
                loss_sum += float(loss.detach()) / t.gradient_accumulation
                figures = {**parts, "completion_tokens": float(mask.sum()) / max(1, mask.shape[0])}
            grad_norm = parallel.clip_grad_norm(params, 1.0)
            optimizer.step()
            step_times.append(time.perf_counter() - t0)
            done = step + 1
            r = torch.cat(rewards_all)
            figures = parallel.mean_over_workers(  # every worker takes part
                {**figures, "loss": loss_sum, "reward_mean": float(r.mean()), "reward_std": float(r.std(dim=1).mean())}
            )
            loss_sum = figures.pop("loss")
            if logger is not None:
                l0 = time.perf_counter()
                logger.log(
                    {"train/loss": loss_sum, "train/lr": harness.lr_at(t, steps, step), "train/grad_norm": grad_norm,
                     "train/step": done, "train/total_steps": steps, "train/step_time_s": step_times[-1],
                     **{f"train/{k}": v for k, v in figures.items()}},
                    step=done,
                )
                log_seconds += time.perf_counter() - l0
            harness.maybe_checkpoint(
                spec, model, optimizer, tokenizer, rank, done, steps, loss_sum, step_times, log_seconds, logger,
            )
            if harness.is_checkpoint_step(spec, done, steps):
                step_times, log_seconds = [], 0.0
    finally:
        if logger is not None:
            logger.close()


def train_rl(spec: DistillationJobSpec, ctx: Any, student_init: Path, teacher_dir: Path | None, steps: int) -> Path:
    """Run the GRPO TorchTrainer; returns the directory of the trained HF checkpoint."""
    return harness.run_trainer(spec, ctx, student_init, teacher_dir, steps, loop=rl_loop)


__all__ = [
    "RewardError",
    "build_batch",
    "exact_answer_reward",
    "group_advantages",
    "grpo_loss",
    "load_reward",
    "rl_loop",
    "sample_completions",
    "score",
    "token_logprobs",
    "train_rl",
]

