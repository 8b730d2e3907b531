"""Dataset URIs, loading them as prompt/completion samples, and tokenizing those for training."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from anneal.data import reasoning as reasoning_task
from anneal.data.formats import END_TOKEN, format_chat, reasoning_mode_of

IGNORE_INDEX = -100
DEFAULT_BUILTIN_PROBLEMS = 1000
BUILTIN_TASKS = ("reasoning",)
FORMATS = ("chat", "text", "prompt-completion")
REASONING_CHOICES = ("both", "on", "off")
_BUILTIN_PARAMS = {"difficulty", "seed", "n", "holdout"}
_HF_SPLIT_ALIASES = {
    "train": ("train",),
    "eval": ("eval", "validation", "valid", "dev"),
    "validation": ("validation", "eval", "valid", "dev"),
    "test": ("test",),
}


class DatasetError(ValueError):
    """A dataset URI that cannot be parsed or loaded; the message names the URI."""


@dataclass
class Sample:
    """One training or evaluation example.

    `prompt` is already formatted (for `chat`: up to and including `<|assistant|>`);
    `completion` is the reference answer without the closing `<|end|>` (which
    `tokenize_sample` appends); `messages` are the prompt's chat messages (no assistant
    answer), empty for plain-text records. `chat`: the prompt was rendered from `messages`
    in Anneal's format, so a model with a chat template of its own gets them rendered in it
    instead (`anneal.modeling.chat.sample_prompt`).
    """

    prompt: str
    completion: str
    answer: int | None = None
    reasoning: Literal["on", "off"] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    chat: bool = False


@dataclass(frozen=True)
class DatasetURI:
    """A parsed dataset URI; which fields are set depends on `scheme`."""

    raw: str
    scheme: Literal["builtin", "file", "hf", "s3"]
    task: str | None = None
    difficulty: int = 2
    seed: int = 0
    n: int | None = None
    holdout: str = "problem"
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    bucket: str | None = None
    key: str | None = None


def _int_param(uri: str, params: dict[str, list[str]], name: str, default: int | None) -> int | None:
    if name not in params:
        return default
    value = params[name][-1]
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{uri}: query parameter {name}={value!r} must be an integer") from None


def parse_dataset_uri(uri: str) -> DatasetURI:
    """Parse a dataset URI.

    Accepted: `builtin://reasoning[?difficulty=1..5&seed=N&n=N&holdout=problem|arithmetic]`, a `.jsonl` path
    (relative, absolute or `file:///abs`), a local Hugging Face dataset directory,
    `hf://datasets/org/name[@revision]`, `s3://bucket/key.jsonl`.

    Args:
        uri: the URI from a DatasetRef.

    Returns:
        The parsed URI.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise DatasetError(f"dataset uri {uri!r} is empty; give e.g. builtin://reasoning or a .jsonl path")
    uri = uri.strip()
    if uri.startswith("builtin://"):
        parts = urlsplit(uri)
        task = parts.netloc + parts.path.rstrip("/")
        if task not in BUILTIN_TASKS:
            raise DatasetError(f"{uri}: unknown built-in data set {task!r}; available: {list(BUILTIN_TASKS)}")
        params = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(params) - _BUILTIN_PARAMS)
        if unknown:
            raise DatasetError(
                f"{uri}: unknown query parameter(s) {unknown}; allowed: {sorted(_BUILTIN_PARAMS)}"
            )
        difficulty = _int_param(uri, params, "difficulty", 2)
        if not reasoning_task.MIN_DIFFICULTY <= difficulty <= reasoning_task.MAX_DIFFICULTY:
            raise DatasetError(
                f"{uri}: difficulty={difficulty} is out of range; use "
                f"{reasoning_task.MIN_DIFFICULTY}..{reasoning_task.MAX_DIFFICULTY} (steps per problem)"
            )
        n = _int_param(uri, params, "n", None)
        if n is not None and n < 1:
            raise DatasetError(f"{uri}: n={n} must be >= 1")
        holdout = params.get("holdout", ["problem"])[-1]
        if holdout not in reasoning_task.HOLDOUTS:
            raise DatasetError(f"{uri}: holdout={holdout!r}; use one of {list(reasoning_task.HOLDOUTS)}")
        return DatasetURI(raw=uri, scheme="builtin", task=task, difficulty=difficulty,
                          seed=_int_param(uri, params, "seed", 0), n=n, holdout=holdout)
    if uri.startswith("hf://"):
        rest = uri[len("hf://"):]
        if not rest.startswith("datasets/"):
            raise DatasetError(f"{uri}: a Hugging Face data set is written hf://datasets/org/name[@revision]")
        rest = rest[len("datasets/"):]
        repo, _, revision = rest.partition("@")
        pieces = repo.strip("/").split("/")
        if len(pieces) != 2 or not all(pieces):
            raise DatasetError(f"{uri}: expected hf://datasets/org/name[@revision], got repo {repo!r}")
        if "@" in uri and not revision:
            raise DatasetError(f"{uri}: empty revision after '@'; drop the '@' or name a branch, tag or commit")
        return DatasetURI(raw=uri, scheme="hf", repo_id="/".join(pieces), revision=revision or None)
    if uri.startswith("s3://"):
        parts = urlsplit(uri)
        key = parts.path.lstrip("/")
        if not parts.netloc or not key:
            raise DatasetError(f"{uri}: expected s3://bucket/key.jsonl")
        if not key.endswith(".jsonl"):
            raise DatasetError(f"{uri}: only .jsonl objects can be read from S3; got key {key!r}")
        return DatasetURI(raw=uri, scheme="s3", bucket=parts.netloc, key=key)
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise DatasetError(f"{uri}: file URIs must be local, e.g. file:///data/train.jsonl")
        path = Path(unquote(parts.path))
    elif "://" in uri:
        raise DatasetError(
            f"{uri}: unsupported scheme {uri.split('://')[0]!r}; use builtin://, hf://datasets/, "
            "s3://, file:// or a path"
        )
    else:
        path = Path(uri).expanduser()
    if path.suffix and path.suffix != ".jsonl" and not path.is_dir():
        raise DatasetError(f"{uri}: unsupported file type {path.suffix!r}; give a .jsonl file or a data set directory")
    return DatasetURI(raw=uri, scheme="file", path=path)


def split_seed(seed: int, split: str) -> int:
    """The seed a built-in split is drawn with, derived from the base seed.

    Args:
        seed: the base seed from the URI.
        split: `train`, `eval` or `test` (aliases accepted).

    Returns:
        A 63-bit seed, different per split.
    """
    name = reasoning_task.normalize_split(split)
    digest = hashlib.sha256(f"anneal-split:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _builtin_records(parsed: DatasetURI, split: str, samples: int | None,
                     reasoning: str) -> list[dict[str, Any]]:
    modes = [True, False] if reasoning == "both" else [reasoning == "on"]
    n = parsed.n
    if n is None:
        n = math.ceil(samples / len(modes)) if samples else DEFAULT_BUILTIN_PROBLEMS
    try:
        problems = reasoning_task.generate(
            n, seed=split_seed(parsed.seed, split), difficulty=parsed.difficulty, split=split,
            holdout=parsed.holdout,
        )
    except ValueError as e:
        raise DatasetError(f"{parsed.raw}: {e}") from None
    records = []
    for problem in problems:
        for on in modes:
            messages = reasoning_task.render_messages(problem, on)
            messages.append({"role": "assistant", "content": reasoning_task.render_completion(problem, on)})
            records.append({"messages": messages, "answer": problem.answer})
    return records


def _read_jsonl(lines: Iterable[str], uri: str) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{uri}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{uri}: line {lineno} is a {type(record).__name__}, expected a JSON object")
        records.append(record)
    return records


def _hf_split(dataset_dict: Any, split: str, uri: str) -> Any:
    available = list(dataset_dict.keys())
    for name in _HF_SPLIT_ALIASES.get(split, (split,)):
        if name in dataset_dict:
            return dataset_dict[name]
    raise DatasetError(f"{uri}: no split {split!r}; the data set has {available}")


def _load_hf_dir(path: Path, split: str, uri: str, cache_dir: Path | None) -> list[dict[str, Any]]:
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(
                str(path), cache_dir=str(cache_dir / "datasets") if cache_dir else None
            )
    except Exception as e:  # the datasets library raises many types; all mean "unreadable"
        raise DatasetError(f"{uri}: could not read the data set at {path}: {e}") from e
    table = _hf_split(loaded, split, uri) if isinstance(loaded, datasets.DatasetDict) else loaded
    return [dict(row) for row in table]


def _load_hf(parsed: DatasetURI, split: str, cache_dir: Path | None) -> list[dict[str, Any]]:
    from huggingface_hub import constants, snapshot_download

    try:
        local = snapshot_download(
            parsed.repo_id, repo_type="dataset", revision=parsed.revision,
            cache_dir=str(cache_dir) if cache_dir else None,
            # Offline, read the cache directly (a commit-hash revision would still ask the hub).
            local_files_only=bool(constants.HF_HUB_OFFLINE),
        )
    except Exception as e:
        raise DatasetError(
            f"{parsed.raw}: could not fetch data set {parsed.repo_id!r} "
            f"(revision {parsed.revision or 'main'}): {type(e).__name__}: {e}. If the hub is not "
            "reachable, pre-populate the Hugging Face cache and set HF_HUB_OFFLINE=1, or use a "
            "local path / s3:// URI"
        ) from e
    return _load_hf_dir(Path(local), split, parsed.raw, cache_dir)


def _load_s3(parsed: DatasetURI, s3_endpoint_url: str | None) -> list[dict[str, Any]]:
    from anneal.data.s3 import s3_client

    client = s3_client(s3_endpoint_url)
    try:
        body = client.get_object(Bucket=parsed.bucket, Key=parsed.key)["Body"].read()
    except Exception as e:
        raise DatasetError(
            f"{parsed.raw}: could not read the object: {type(e).__name__}: {e}. Check the bucket, "
            "key and credentials, and ANNEAL_S3_ENDPOINT_URL for a non-AWS endpoint"
        ) from e
    return _read_jsonl(body.decode("utf-8").splitlines(), parsed.raw)


def _plain_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    return "".join(f"{m['content']}\n" for m in messages)


def _record_to_sample(record: Mapping[str, Any], index: int, fmt: str, uri: str, toggle: bool = True) -> Sample:
    where = f"{uri}: record {index}"
    if "question" in record and isinstance(record.get("answer"), str) and "messages" not in record:
        # GSM8K-style: the worked answer ends with `#### N`, the checkable figure.
        from anneal.data.reasoning import extract_answer

        record = {"prompt": record["question"], "completion": record["answer"],
                  "answer": extract_answer(record["answer"])}
    answer = record.get("answer")
    if answer is not None:
        try:
            answer = int(answer)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: answer {answer!r} is not an integer") from None
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages)):
            raise DatasetError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        if messages[-1]["role"] != "assistant":
            raise DatasetError(
                f"{where}: the last message is {messages[-1]['role']!r}; it must be the assistant's "
                "answer (the completion)"
            )
        prompt_messages = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        completion = messages[-1]["content"]
    elif "prompt" in record and "completion" in record:
        prompt_messages = [{"role": "user", "content": record["prompt"]}]
        completion = record["completion"]
    elif "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise DatasetError(f"{where}: text must be a string")
        return Sample(prompt="", completion=text.removesuffix(END_TOKEN), answer=answer)
    else:
        raise DatasetError(
            f"{where}: has fields {sorted(record)}; expected 'messages', 'prompt' and "
            "'completion', 'question' and 'answer' (GSM8K), or 'text'"
        )
    if not isinstance(completion, str):
        raise DatasetError(f"{where}: the completion must be a string")
    completion = completion.removesuffix(END_TOKEN)
    mode = reasoning_mode_of(prompt_messages)
    if not toggle:  # a model not trained with the toggle never sees its system message (the mode stays known)
        from anneal.modeling.chat import without_reasoning_toggle

        prompt_messages = without_reasoning_toggle(prompt_messages)
    if fmt == "chat":
        try:
            prompt = format_chat(prompt_messages, add_generation_prompt=True)
        except ValueError as e:
            raise DatasetError(f"{where}: {e}") from None
    elif "prompt" in record and "messages" not in record:
        prompt = str(record["prompt"])
    else:
        prompt = _plain_prompt(prompt_messages)
    if fmt == "text":
        prompt, completion = "", prompt + completion
    return Sample(prompt=prompt, completion=completion, answer=answer, reasoning=mode, chat=fmt == "chat",
                  messages=prompt_messages)


def _records(parsed: DatasetURI, uri: str, split: str, cache_dir: Path | None,
             s3_endpoint_url: str | None) -> list[dict[str, Any]]:
    """The raw records of a non-built-in data set: `hf://`, `s3://`, a data set directory or a .jsonl file."""
    if parsed.scheme == "hf":
        return _load_hf(parsed, split, cache_dir)
    if parsed.scheme == "s3":
        return _load_s3(parsed, s3_endpoint_url)
    path = parsed.path
    if path.is_dir():
        return _load_hf_dir(path, split, uri, cache_dir)
    if not path.exists():
        raise DatasetError(f"{uri}: no such file {path.resolve()}")
    if path.suffix != ".jsonl":
        raise DatasetError(f"{uri}: {path} is not a .jsonl file or a data set directory")
    with path.open(encoding="utf-8") as f:
        return _read_jsonl(f, uri)


def load_samples(
    uri: str,
    *,
    split: str = "train",
    format: str = "chat",  # noqa: A002 - the DatasetRef field is called `format`
    samples: int | None = None,
    reasoning: str = "both",
    cache_dir: Path | None = None,
    s3_endpoint_url: str | None = None,
    toggle: bool = True,
) -> list[Sample]:
    """Load a data set as samples.

    The built-in task draws disjoint problems per split (seeds derived from the URI's seed);
    `reasoning="both"` renders every problem twice (on, then off). Files and S3 objects are
    one split each, so `split` only selects among a Hugging Face data set's splits. For
    external data `reasoning="on"|"off"` drops samples whose system prompt asks for the other
    mode and keeps those without one.

    Args:
        uri: a dataset URI (see `parse_dataset_uri`).
        split: `train`, `eval` (alias `validation`) or `test`.
        format: `chat` (prompt rendered with the chat format), `prompt-completion` (plain
            prompt text) or `text` (everything is completion, loss on all of it).
        samples: cap on the number of samples returned.
        reasoning: `both`, `on` or `off`.
        cache_dir: cache for `hf://` downloads (a Hugging Face hub cache); None uses the default.
        s3_endpoint_url: S3 endpoint; None reads `ANNEAL_S3_ENDPOINT_URL` / `AWS_ENDPOINT_URL`.
        toggle: render the reasoning toggle's system message ("detailed thinking on/off") into the
            prompts; False for a model not trained with it (`reasoningToggle`): the message is
            dropped, the sample keeps its `reasoning` mode (which form its answer takes).

    Returns:
        The samples, at most `samples` of them.
    """
    if format not in FORMATS:
        raise DatasetError(f"{uri}: format {format!r} is not one of {list(FORMATS)}")
    if reasoning not in REASONING_CHOICES:
        raise DatasetError(f"{uri}: reasoning {reasoning!r} is not one of {list(REASONING_CHOICES)}")
    if samples is not None and samples < 1:
        raise DatasetError(f"{uri}: samples={samples} must be >= 1 (or omitted for all)")
    parsed = parse_dataset_uri(uri)
    if parsed.scheme == "builtin":
        try:
            reasoning_task.normalize_split(split)
        except ValueError as e:
            raise DatasetError(f"{uri}: {e}") from None
        records = _builtin_records(parsed, split, samples, reasoning)
    else:
        records = _records(parsed, uri, split, cache_dir, s3_endpoint_url)
    out = []
    for i, record in enumerate(records):
        sample = _record_to_sample(record, i, format, uri, toggle)
        if reasoning != "both" and sample.reasoning not in (None, reasoning):
            continue
        out.append(sample)
        if samples is not None and len(out) >= samples:
            break
    if not out:
        raise DatasetError(f"{uri}: no samples (split {split!r}, reasoning {reasoning!r})")
    return out


def load_texts(
    uri: str,
    *,
    split: str = "train",
    samples: int | None = None,
    reasoning: str = "both",
    cache_dir: Path | None = None,
    s3_endpoint_url: str | None = None,
) -> list[str]:
    """Load a data set as raw-text documents, for continued pretraining.

    Every record of a file, S3 object or Hugging Face data set (`load_from_disk` directory or
    `hf://datasets/...`) must have a string `text` field: a chat or prompt/completion record is
    an error here rather than silently flattened, since continued pretraining means "train on
    this text". The built-in task is rendered as text: its system/user prompt lines followed by
    the worked answer (what `format: text` gives every method).

    Args:
        uri: a dataset URI (see `parse_dataset_uri`).
        split: for the built-in task and Hugging Face data sets: `train`, `eval` or `test`.
        samples: cap on the number of documents.
        reasoning: built-in task only: `both`, `on` or `off`.
        cache_dir: cache for `hf://` downloads.
        s3_endpoint_url: S3 endpoint; None reads `ANNEAL_S3_ENDPOINT_URL` / `AWS_ENDPOINT_URL`.

    Returns:
        The documents, at most `samples` of them, none empty.
    """
    if samples is not None and samples < 1:
        raise DatasetError(f"{uri}: samples={samples} must be >= 1 (or omitted for all)")
    parsed = parse_dataset_uri(uri)
    if parsed.scheme == "builtin":
        loaded = load_samples(uri, split=split, format="text", samples=samples, reasoning=reasoning)
        return [s.completion for s in loaded]
    records = _records(parsed, uri, split, cache_dir, s3_endpoint_url)
    texts = []
    for i, record in enumerate(records):
        text = record.get("text")
        if "text" not in record:
            raise DatasetError(
                f"{uri}: record {i} has fields {sorted(record)}; continued pretraining (method cpt) reads "
                "raw text from a 'text' field. Give records like {\"text\": \"...\"}, or train on chat "
                "or prompt/completion records with method sft or kd"
            )
        if not isinstance(text, str):
            raise DatasetError(f"{uri}: record {i}: text must be a string, got {type(text).__name__}")
        if text.strip():
            texts.append(text)
        if samples is not None and len(texts) >= samples:
            break
    if not texts:
        raise DatasetError(f"{uri}: no non-empty 'text' records (split {split!r})")
    return texts


def pack_texts(tokenizer: Any, texts: Sequence[str], block_size: int) -> list[dict[str, list[int]]]:
    """Tokenize documents, join them with the tokenizer's eos, and cut the stream into blocks.

    This is how continued pretraining reads text: no padding inside the data, every token a
    label, a document boundary marked by eos (attention may cross it, as in GPT-style packing).
    The last block keeps the remainder (shorter, padded by `collate`) rather than dropping it.

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        texts: the documents.
        block_size: tokens per block (`maxSeqLength`).

    Returns:
        Blocks with `input_ids`, `labels` (equal to `input_ids`: loss on every token) and
        `attention_mask`; all but the last exactly `block_size` long.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token (e.g. '<|end|>')")
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: a block needs at least 2 tokens to predict one")
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    blocks = []
    for i in range(0, len(stream), block_size):
        chunk = stream[i : i + block_size]
        if len(chunk) < 2:  # a lone trailing token predicts nothing
            break
        blocks.append({"input_ids": chunk, "labels": list(chunk), "attention_mask": [1] * len(chunk)})
    return blocks


def tokenize_sample(tokenizer: Any, sample: Sample, max_seq_length: int) -> dict[str, list[int]]:
    """Tokenize a sample for causal-LM training with loss on the completion only.

    The completion is followed by the tokenizer's eos (`<|end|>`); the sequence is cut at
    `max_seq_length` from the right.

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        sample: the sample.
        max_seq_length: maximum number of tokens.

    Returns:
        `input_ids`, `labels` (IGNORE_INDEX on prompt tokens) and `attention_mask`, lists
        of equal length <= `max_seq_length`.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token (e.g. '<|end|>')")
    from anneal.modeling.chat import sample_prompt

    prompt = sample_prompt(tokenizer, sample)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    completion_ids = tokenizer(sample.completion, add_special_tokens=False)["input_ids"]
    completion_ids = [*completion_ids, tokenizer.eos_token_id]
    if len(prompt_ids) >= max_seq_length:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens, leaving no room for the completion within "
            f"max_seq_length={max_seq_length}; raise maxSeqLength or shorten the prompt"
        )
    input_ids = (prompt_ids + completion_ids)[:max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_seq_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad tokenized samples into a batch.

    Args:
        batch: outputs of `tokenize_sample`.
        pad_id: the pad token id for `input_ids`.

    Returns:
        `input_ids`, `labels` (padded with IGNORE_INDEX), `attention_mask` (0 on padding):
        LongTensors of shape (batch, longest).
    """
    import torch

    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(item["input_ids"]) for item in batch)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {
        key: torch.tensor(
            [list(item[key]) + [value] * (width - len(item[key])) for item in batch], dtype=torch.long
        )
        for key, value in fill.items()
    }
