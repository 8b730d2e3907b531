"""The OpenAI-compatible wire format: request validation, response and error bodies, SSE chunks."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 512
MAX_STOP = 4
#: Longest integer literal a body may hold. Python refuses to parse more than 4300 digits (a
#: ValueError), and a few hundred already overflow a float: no field here needs more than 20.
MAX_INT_DIGITS = 64


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "server_error")
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          500: "server_error", 502: "upstream_error", 503: "service_unavailable", 504: "timeout"}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass
class ParsedRequest:
    """A validated chat or completion request."""

    kind: str  # "chat" | "completion"
    model: str | None
    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stream: bool
    stop: list[str]
    seed: int | None
    ignore_eos: bool
    include_usage: bool


def too_large(size: int | str, limit: int) -> ApiError:
    return ApiError(413, f"request body is {size} bytes; the limit is {limit}", code="request_too_large")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _int_literal(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits; the limit is {MAX_INT_DIGITS}")
    return int(text)


def parse_json(body: bytes, limit: int) -> dict[str, Any]:
    """The JSON object of a request body.

    Strict where Python's `json` is lenient: `NaN`, `Infinity` and integers of more than
    `MAX_INT_DIGITS` digits are refused, and nesting too deep to parse is a 400, not a
    RecursionError.

    Raises:
        ApiError: 413 over `limit` bytes, 400 when it is not a JSON object.
    """
    if len(body) > limit:
        raise too_large(len(body), limit)
    try:
        data = json.loads(body, parse_constant=_refuse_constant, parse_int=_int_literal)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply", param="body",
                       code="invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"request body is not valid JSON: {e}", param="body", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", param="body", code="invalid_json")
    return data


def _number(data: dict, name: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False) -> Any:
    v = data.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            integer and isinstance(v, float) and not (math.isfinite(v) and v.is_integer())):
        raise invalid(name, f"{brief(v)} must be {'an integer' if integer else 'a number'}")
    if isinstance(v, float) and not math.isfinite(v):  # 1e999 parses as inf
        raise invalid(name, f"{v!r} must be a finite number")
    if v < lo or v > hi or (lo_open and v == lo):
        raise invalid(name, f"{brief(v)} must be {'>' if lo_open else '>='} {lo} and <= {hi}")
    return int(v) if integer else float(v)


def brief(v: Any) -> str:
    """A value for a message, cut short (a client may send a very long one)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(value: str, path: str) -> str:
    """`value`, refused when it holds a lone UTF-16 surrogate (`"\\ud800"` in JSON), which no
    tokenizer and no UTF-8 answer can carry."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid(path, f"holds a lone surrogate (\\u{ord(value[e.start]):04x} at {e.start}); "
                            "send valid Unicode") from None
    return value


def _content(value: Any, path: str) -> str:
    if isinstance(value, str):
        return _text(value, path)
    if isinstance(value, list):  # OpenAI content parts: only text is understood here
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{path}[{j}]", "only {\"type\": \"text\", \"text\": ...} content parts are supported")
            texts.append(_text(part["text"], f"{path}[{j}].text"))
        return "".join(texts)
    raise invalid(path, f"must be a string, got {type(value).__name__}")


def parse_request(data: dict[str, Any], kind: str, max_tokens_limit: int) -> ParsedRequest:
    """Validate a `/v1/chat/completions` (kind `chat`) or `/v1/completions` body.

    Raises:
        ApiError: 400 naming the first bad field (`messages`, `messages[1].role`, `max_tokens`, ...).
    """
    messages = prompt = None
    if kind == "chat":
        raw = data.get("messages")
        if raw is None:
            raise invalid("messages", "required field is missing")
        if not isinstance(raw, list) or not raw:
            raise invalid("messages", "must be a non-empty list of {role, content} objects")
        if len(raw) > MAX_MESSAGES:
            raise invalid("messages", f"{len(raw)} messages; the limit is {MAX_MESSAGES}")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise invalid(f"messages[{i}]", "must be an object with role and content")
            role = m.get("role")
            if role not in ROLES:
                raise invalid(f"messages[{i}].role", f"{brief(role)} must be one of {', '.join(ROLES)}")
            if "content" not in m or m["content"] is None:
                raise invalid(f"messages[{i}].content", "required field is missing")
            messages.append({"role": role, "content": _content(m["content"], f"messages[{i}].content")})
    else:
        raw = data.get("prompt")
        if raw is None:
            raise invalid("prompt", "required field is missing")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if not isinstance(raw, str):
            raise invalid("prompt", "must be a string (batched prompts are not supported)")
        prompt = _text(raw, "prompt")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "must be a string")
    if model is not None:
        _text(model, "model")
    max_tokens = _number(data, "max_tokens", 1, max_tokens_limit, integer=True)
    if max_tokens is None and kind == "chat":
        max_tokens = _number(data, "max_completion_tokens", 1, max_tokens_limit, integer=True)
    n = _number(data, "n", 1, 1, integer=True)
    del n  # only n=1 is served; anything else was refused above
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream", f"{brief(stream)} must be true or false")
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP):
        raise invalid("stop", f"must be a string or a list of at most {MAX_STOP} strings")
    stop = [_text(s, f"stop[{i}]") for i, s in enumerate(stop)]
    ignore_eos = data.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise invalid("ignore_eos", f"{brief(ignore_eos)} must be true or false")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "must be an object")
    return ParsedRequest(
        kind=kind,
        model=model,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 0, 2),
        top_p=_number(data, "top_p", 0, 1, lo_open=True),
        stream=stream,
        stop=stop,
        seed=_number(data, "seed", -(2**63), 2**63 - 1, integer=True),
        ignore_eos=ignore_eos,
        include_usage=bool(options.get("include_usage", False)),
    )


def new_id(kind: str, request_id: str | None = None) -> str:
    """An OpenAI-style id (`chatcmpl-…`, `cmpl-…`) carrying the request id when there is one."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + (request_id or uuid.uuid4().hex[:24])


def completion_body(kind: str, rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage}


def chunk_body(kind: str, rid: str, model: str, text: str | None, finish: str | None, *, first: bool = False,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        obj = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["choices"] = []
        body["usage"] = usage
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def read_body(chunks: Any, limit: int) -> bytes:
    """A request body read piece by piece from `chunks` (Starlette's `request.stream()`), stopping
    as soon as it passes `limit` bytes: a chunked upload without `Content-Length` is refused
    without being held in memory.

    Raises:
        ApiError: 413 once more than `limit` bytes arrived.
    """
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over {limit} bytes; the limit is {limit}",
                           code="request_too_large")
    return bytes(body)
