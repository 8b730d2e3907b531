"""Continued pretraining (method cpt): the raw-text documents, their held-out share, packed blocks, perplexity.

Continued pretraining recovers a compressed model on plain text before SFT (Llama-Nemotron's
"KD + continued pretraining" stage): next-token loss on every token of documents packed into
`maxSeqLength` blocks with eos between documents, plus the KD term when the job has a teacher.
The recipe (`anneal.distill.recipe`) trains on `Documents.train` and measures perplexity on
`Documents.heldout`; this module decides, once, which documents are which, so the Ray Train
workers and the evaluation agree without passing text around.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from anneal.api.distillation import DistillationJobSpec

#: Share of a single-split source's documents held out for perplexity (the last ones, at least one).
HELDOUT_SHARE = 0.1


@dataclass(frozen=True)
class Documents:
    """The training documents and the held-out ones perplexity is measured on."""

    train: list[str]
    heldout: list[str]
    #: Where the held-out text came from, for the run's params.
    heldout_source: str


def documents(spec: DistillationJobSpec, cache_dir: str | Path) -> Documents:
    """The documents of a cpt job, split into training and held-out text.

    Held-out text is `evalDataset` when given; else the built-in task's `eval` split (problems
    disjoint from training); else, since a file is one split, the last tenth of the training
    source's documents (at least one), which then are not trained on.

    Raises:
        DatasetError: the data cannot be read, has no `text`, or is a single document with no
            `evalDataset` to measure on.
    """
    from anneal.data.datasets import DatasetError, load_texts, parse_dataset_uri

    cache = Path(cache_dir) / "datasets"
    ds = spec.dataset
    train = load_texts(ds.uri, split=ds.split, samples=ds.samples, reasoning=ds.reasoning, cache_dir=cache)
    if spec.eval_dataset is not None:
        ev = spec.eval_dataset
        heldout = load_texts(ev.uri, split=ev.split, samples=ev.samples or spec.evaluation.samples,
                             reasoning=ev.reasoning, cache_dir=cache)
        return Documents(train, heldout, f"evalDataset {ev.uri} (split {ev.split})")
    if parse_dataset_uri(ds.uri).scheme == "builtin":
        heldout = load_texts(ds.uri, split="eval", samples=spec.evaluation.samples, reasoning=ds.reasoning)
        return Documents(train, heldout, f"{ds.uri} (split eval)")
    if len(train) < 2:
        raise DatasetError(
            f"{ds.uri}: one document: nothing can be held out to measure perplexity on; add documents "
            "or give spec.evalDataset"
        )
    k = max(1, round(len(train) * HELDOUT_SHARE))
    return Documents(train[:-k], train[-k:], f"the last {k} of {len(train)} documents of {ds.uri}")


def text_perplexity(model: Any, tokenizer: Any, texts: Sequence[str], block_size: int, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean next-token cross-entropy) over `texts` packed as in training.

    Args:
        model: a causal LM (eval mode).
        tokenizer: its tokenizer.
        texts: the documents.
        block_size: tokens per packed block (`maxSeqLength`).
        batch_size: blocks per forward pass.

    Returns:
        (perplexity, the number of predicted tokens it averages over).
    """
    import torch
    import torch.nn.functional as F

    from anneal.data.datasets import IGNORE_INDEX, collate, pack_texts
    from anneal.modeling.chat import pad_id

    blocks = pack_texts(tokenizer, texts, block_size)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = {k: v.to(device) for k, v in collate(blocks[i : i + batch_size], pad_id(tokenizer)).items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    return math.exp(total / max(count, 1)), count


def dir_perplexity(model_dir: str | Path, texts: Sequence[str], block_size: int,
                   device: str = "cpu") -> tuple[float, int]:
    """`text_perplexity` of a checkpoint directory (fp32, on `device`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anneal.modeling.layerwise_llama import register as register_anneal_llama

    register_anneal_llama()  # a fused (anneal_llama) checkpoint is a usual cpt start
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    return text_perplexity(model, tokenizer, texts, block_size)


def heldout_metrics(spec: DistillationJobSpec, docs: Documents, student_dir: Path, start_dir: Path,
                    teacher_dir: Path | None, device: str = "cpu") -> dict[str, float]:
    """Perplexity on the held-out text of the trained student, its start, and the teacher.

    Returns:
        `perplexity` (the trained student), `startPerplexity`, `teacherPerplexity` (with a
        teacher), `heldoutTokens` (how many predicted tokens each averages over).
    """
    block = spec.dataset.max_seq_length
    ppl, tokens = dir_perplexity(student_dir, docs.heldout, block, device)
    out = {"perplexity": ppl, "startPerplexity": dir_perplexity(start_dir, docs.heldout, block, device)[0],
           "heldoutTokens": float(tokens)}
    if teacher_dir is not None:
        out["teacherPerplexity"] = dir_perplexity(teacher_dir, docs.heldout, block, device)[0]
    return out
