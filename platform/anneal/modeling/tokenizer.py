"""Training the small byte-level BPE tokenizer our locally built models use."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from anneal.data.formats import (
    ASSISTANT_TOKEN,
    CHAT_TEMPLATE,
    END_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    format_chat,
)
from anneal.data.reasoning import THINK_CLOSE, THINK_OPEN, generate, render_completion, render_messages

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
#: In id order: pad is 0, bos 1, end (eos) 2.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, END_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN,
                  THINK_OPEN, THINK_CLOSE]
#: Bump when the training corpus or settings change, so caches are not reused across them.
BUILTIN_TOKENIZER_VERSION = "reasoning-bpe512-v1"
BUILTIN_CORPUS_PROBLEMS = 600  # per difficulty, rendered both ways


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` that splits digits, trained on `texts` with `special_tokens` first.

    Raises:
        ValueError: `vocab_size` cannot hold the byte alphabet and the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at least {minimum}")
    tok = Tokenizer(models.BPE())
    # Digits one by one, so numbers are sequences of digit tokens a small model can add up.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer that splits digits and knows the chat tokens.

    Args:
        texts: training corpus.
        vocab_size: total vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
        A fast tokenizer with eos `<|end|>`, pad `<|pad|>`, bos `<|bos|>` and the Anneal
        chat template; no tokens are added automatically when encoding.
    """
    tok = train_bpe(texts, vocab_size, SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, THINK_OPEN, THINK_CLOSE],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def builtin_corpus(problems_per_difficulty: int = BUILTIN_CORPUS_PROBLEMS) -> list[str]:
    """Chat-formatted built-in problems at every difficulty, each rendered with and without reasoning.

    Args:
        problems_per_difficulty: problems drawn at each difficulty.

    Returns:
        Full conversations (prompt, answer, `<|end|>`) as strings.
    """
    texts = []
    for difficulty in range(1, 6):
        for problem in generate(problems_per_difficulty, seed=1234, difficulty=difficulty):
            for on in (True, False):
                messages = render_messages(problem, on)
                messages.append({"role": "assistant", "content": render_completion(problem, on)})
                texts.append(format_chat(messages, add_generation_prompt=False))
    return texts


def builtin_tokenizer(cache_dir: Path) -> PreTrainedTokenizerFast:
    """The tokenizer for the built-in task, trained once and cached.

    Args:
        cache_dir: directory under which `tokenizer-<version>/` is kept.

    Returns:
        The tokenizer; the same on every call and machine.
    """
    target = Path(cache_dir) / f"tokenizer-{BUILTIN_TOKENIZER_VERSION}"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer(builtin_corpus())
        # Save beside the target and rename, so a concurrent reader never sees half a tokenizer.
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target))
