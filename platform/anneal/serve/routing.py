"""Routing decisions of a ModelService: weighted and sticky splits, overrides, shadow, reasoning, dynamic.

Everything here is pure (randomness comes in as an argument) so the router deployment and the
unit tests share one implementation.

The weighted split lays the variants on a line [0, 1) in a fixed order, each owning a segment
as long as its share. A request picks the variant whose segment holds a position: a random
draw for anonymous traffic, or a stable hash of the sticky key (blake2b → [0, 1)) so a user
keeps a variant while the weights stand. When two neighbouring variants trade weight only
the keys in the strip between the old and the new boundary move — exactly the share that
must move. With two variants (every rollout's stable/candidate pair) that is always the case;
`line_order` puts the rollout pair next to each other when there are more.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

ReasoningMode = Literal["on", "off"]

#: Route reasons (a reason may carry details in parentheses: `dynamic:large(score=0.71)`).
REASON_WEIGHTED = "weighted"
REASON_STICKY = "sticky"
REASON_OVERRIDE = "override"
REASON_DYNAMIC_LARGE = "dynamic:large"
REASON_DYNAMIC_SMALL = "dynamic:small"
REASON_DYNAMIC_CAP = "dynamic:cap"


class RoutingError(ValueError):
    """A request asked for something the routing cannot do (unknown variant, bad header value).

    `param` names the header or field at fault, for the 400 response.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ReasoningPolicy:
    """How the reasoning toggle is resolved (from `spec.routing.reasoning`)."""

    default: ReasoningMode = "on"
    header: str = "x-anneal-reasoning"
    on_prompt: str = "detailed thinking on"
    off_prompt: str = "detailed thinking off"
    max_tokens_on: int | None = None
    max_tokens_off: int | None = None


@dataclass(frozen=True)
class DynamicPolicy:
    """Difficulty-based routing between a small and a large variant."""

    small: str
    large: str
    threshold: float = 0.5
    large_share: float = 1.0
    #: How many recent dynamic decisions the `large_share` cap looks at.
    window: int = 200


@dataclass(frozen=True)
class RoutingPolicy:
    """The routing part of a ModelService spec, in a form the pure functions take."""

    weights: Mapping[str, int]
    order: tuple[str, ...] = ()
    sticky_header: str | None = None
    override_header: str = "x-anneal-variant"
    shadow_variant: str | None = None
    shadow_percent: float = 0.0
    reasoning: ReasoningPolicy = field(default_factory=ReasoningPolicy)
    dynamic: DynamicPolicy | None = None

    def line(self) -> tuple[str, ...]:
        return self.order or tuple(sorted(self.weights))


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes, and why.

    Attributes:
        variant: the variant whose answer is returned.
        reason: `weighted`, `sticky`, `override`, `dynamic:large(score=0.71)`, `dynamic:small(...)`
            or `dynamic:cap(...)`.
        reasoning: the resolved reasoning mode.
        reasoning_source: `header`, `system` or `default`.
        shadow: the variant that also receives a mirrored copy, or None.
        score: the difficulty score when the dynamic policy decided.
    """

    variant: str
    reason: str
    reasoning: ReasoningMode
    reasoning_source: str = "default"
    shadow: str | None = None
    score: float | None = None

    @property
    def reason_prefix(self) -> str:
        """The reason without its details: `dynamic:large(score=0.71)` → `dynamic:large`."""
        return self.reason.split("(", 1)[0]


# ----------------------------------------------------------------------------- the line


def line_order(names: Sequence[str], pair: tuple[str, str] | None = None) -> tuple[str, ...]:
    """The order of variants on the weight line: by name, with a rollout pair made neighbours.

    Args:
        names: variant names.
        pair: `(stable, candidate)` of a rollout, whose weights trade against each other.

    Returns:
        Names sorted, except that `candidate` directly follows `stable`.
    """
    ordered = sorted(names)
    if pair and pair[0] in ordered and pair[1] in ordered and pair[0] != pair[1]:
        ordered.remove(pair[1])
        ordered.insert(ordered.index(pair[0]) + 1, pair[1])
    return tuple(ordered)


def hash_position(key: str) -> float:
    """A stable position in [0, 1) for a sticky key (blake2b, the same on every replica and run)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def pick_on_line(weights: Mapping[str, int | float], position: float, order: Sequence[str] = ()) -> str:
    """The variant whose segment of the weight line holds `position`.

    Args:
        weights: variant → weight (any non-negative numbers; normalised here).
        position: a point in [0, 1).
        order: the order of the segments; default sorted names.

    Returns:
        The variant name.

    Raises:
        RoutingError: every weight is zero.
    """
    names = tuple(order) or tuple(sorted(weights))
    total = float(sum(max(0.0, float(weights.get(n, 0))) for n in names))
    if total <= 0:
        raise RoutingError("no variant has a weight above 0; set weights that sum to 100")
    target = position * total
    cumulative = 0.0
    last = None
    for name in names:
        w = max(0.0, float(weights.get(name, 0)))
        if w <= 0:
            continue
        cumulative += w
        last = name
        if target < cumulative:
            return name
    return last  # position rounding at the very end of the line


# ------------------------------------------------------------------------- reasoning

_TRUE = {"on", "true", "1", "yes"}
_FALSE = {"off", "false", "0", "no"}


def reasoning_from_header(value: str | None, header: str) -> ReasoningMode | None:
    """`on`/`off` from a header value (also true/false, 1/0, yes/no); None when absent.

    Raises:
        RoutingError: the header holds something else.
    """
    if value is None or not value.strip():
        return None
    v = value.strip().lower()
    if v in _TRUE:
        return "on"
    if v in _FALSE:
        return "off"
    raise RoutingError(f"header {header}: {value!r} is not a reasoning mode; use on or off", param=header)


def reasoning_from_messages(messages: Sequence[Mapping[str, object]], policy: ReasoningPolicy) -> ReasoningMode | None:
    """`on`/`off` when a system message is the on or off prompt (case and spaces ignored)."""
    on, off = policy.on_prompt.strip().lower(), policy.off_prompt.strip().lower()
    for m in messages:
        if m.get("role") != "system" or not isinstance(m.get("content"), str):
            continue
        content = str(m["content"]).strip().lower()
        if content == on:
            return "on"
        if content == off:
            return "off"
    return None


def resolve_reasoning(
    header_value: str | None, messages: Sequence[Mapping[str, object]] | None, policy: ReasoningPolicy
) -> tuple[ReasoningMode, str]:
    """The reasoning mode of a request: header, then a system message, then the spec default.

    Returns:
        `(mode, source)` with source `header`, `system` or `default`.
    """
    mode = reasoning_from_header(header_value, policy.header)
    if mode is not None:
        return mode, "header"
    mode = reasoning_from_messages(messages or (), policy)
    if mode is not None:
        return mode, "system"
    return policy.default, "default"


def apply_reasoning(
    messages: Sequence[Mapping[str, object]], mode: ReasoningMode, policy: ReasoningPolicy
) -> list[dict[str, object]]:
    """The messages with the system prompt the model was trained with for `mode`.

    A system message that is itself a toggle (on or off prompt) is replaced; otherwise the
    toggle goes first, as its own system message, before the caller's messages.
    """
    prompt = policy.on_prompt if mode == "on" else policy.off_prompt
    toggles = {policy.on_prompt.strip().lower(), policy.off_prompt.strip().lower()}
    out = [
        dict(m)
        for m in messages
        if not (m.get("role") == "system" and str(m.get("content", "")).strip().lower() in toggles)
    ]
    return [{"role": "system", "content": prompt}, *out]


def cap_max_tokens(requested: int | None, default: int, mode: ReasoningMode, policy: ReasoningPolicy,
                   over: Literal["clamp", "reject"] = "clamp") -> int:
    """The max tokens of a request: asked for (or the variant default), capped by the mode's limit.

    The variant's `default` (`generation.maxTokens`) is also its cap: a request asking for more
    gets `default` (`over="clamp"`; the answer ends with `finish_reason: length`) or is refused
    (`over="reject"`).

    Raises:
        RoutingError: `over="reject"` and more than `default` tokens asked for (param `max_tokens`).
    """
    if requested is not None and requested > default:
        if over == "reject":
            raise RoutingError(f"max_tokens: {requested} is over this service's limit of {default} tokens; "
                               f"ask for at most {default}", param="max_tokens")
        requested = default
    n = requested if requested is not None else default
    cap = policy.max_tokens_on if mode == "on" else policy.max_tokens_off
    return min(n, cap) if cap is not None else n


# --------------------------------------------------------------------------- dynamic

_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_OPERATION_RE = re.compile(
    r"[+\-*/×÷^=]|\b(?:more|less|fewer|times|twice|double[sd]?|triple[sd]?|half|gives?|loses?|"
    r"uses?|sells?|buys?|finds?|gets?|receives?|each|per|total|sum|product|difference|"
    r"remain(?:s|ing)?|left)\b",
    re.IGNORECASE,
)

#: Saturation points of the difficulty features: at or above these a feature counts fully.
SCORE_NUMBERS_FULL = 8
SCORE_OPERATIONS_FULL = 6
SCORE_CHARS_FULL = 600


def difficulty_score(text: str) -> float:
    """A cheap difficulty score in [0, 1] for dynamic routing (regexes over the prompt, no model).

    score = 0.5 · min(numbers / 8, 1) + 0.3 · min(operations / 6, 1) + 0.2 · min(chars / 600, 1)

    where `numbers` counts the quantities in the text, `operations` counts arithmetic symbols
    and step words (`more`, `times`, `gives`, `each`, `left`, ...) and `chars` is its length.
    A one-step question scores about 0.2, a five-step word problem 0.6 to 0.9.
    """
    numbers = len(_NUMBER_RE.findall(text))
    operations = len(_OPERATION_RE.findall(text))
    score = (
        0.5 * min(numbers / SCORE_NUMBERS_FULL, 1.0)
        + 0.3 * min(operations / SCORE_OPERATIONS_FULL, 1.0)
        + 0.2 * min(len(text) / SCORE_CHARS_FULL, 1.0)
    )
    return round(min(max(score, 0.0), 1.0), 4)


def scored_text(messages: Sequence[Mapping[str, object]] | None, prompt: str | None) -> str:
    """The text the difficulty score reads: the last user message, or a completion prompt."""
    if messages:
        for m in reversed(messages):
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                return str(m["content"])
        return ""
    return prompt or ""


class LargeShareTracker:
    """The share of recent dynamic decisions that went to the large variant (for the cap)."""

    def __init__(self, window: int = 200):
        self._recent: deque[bool] = deque(maxlen=max(1, window))
        self._large = 0

    @property
    def share(self) -> float:
        return self._large / len(self._recent) if self._recent else 0.0

    def would_exceed(self, cap: float) -> bool:
        """Whether sending the next request to large would put the share above `cap`."""
        n = len(self._recent)
        dropped = 1 if n == self._recent.maxlen and self._recent[0] else 0
        n_after = min(n + 1, self._recent.maxlen)
        return (self._large - dropped + 1) / n_after > cap + 1e-9

    def record(self, large: bool) -> None:
        if len(self._recent) == self._recent.maxlen and self._recent[0]:
            self._large -= 1
        self._recent.append(large)
        if large:
            self._large += 1


def dynamic_choice(score: float, policy: DynamicPolicy, tracker: LargeShareTracker) -> tuple[str, str]:
    """Small or large by score, with the large share capped; records the decision in `tracker`.

    Returns:
        `(variant, reason)`.
    """
    detail = f"(score={score:.2f})"
    if score > policy.threshold:
        if tracker.would_exceed(policy.large_share):
            tracker.record(False)
            return policy.small, REASON_DYNAMIC_CAP + detail
        tracker.record(True)
        return policy.large, REASON_DYNAMIC_LARGE + detail
    tracker.record(False)
    return policy.small, REASON_DYNAMIC_SMALL + detail


# --------------------------------------------------------------------------- decide


def decide(
    policy: RoutingPolicy,
    *,
    headers: Mapping[str, str],
    messages: Sequence[Mapping[str, object]] | None = None,
    prompt: str | None = None,
    draw: float,
    shadow_draw: float,
    tracker: LargeShareTracker | None = None,
) -> RouteDecision:
    """Route one request.

    Precedence: the override header pins a variant; else the dynamic policy (when set) picks
    by difficulty; else a sticky key picks by its hash; else the weighted split uses `draw`.
    A shadow copy is sent with probability `shadow_percent` (by `shadow_draw`) unless the
    primary variant is the shadow variant itself.

    Args:
        policy: the routing policy.
        headers: request headers with lower-case names.
        messages: chat messages (chat completions), or None.
        prompt: the prompt (completions), or None.
        draw: uniform [0, 1) draw for the weighted split.
        shadow_draw: uniform [0, 1) draw for shadow sampling.
        tracker: the dynamic policy's recent large share (required with a dynamic policy).

    Raises:
        RoutingError: unknown pinned variant or bad reasoning header (→ HTTP 400).
    """
    mode, source = resolve_reasoning(headers.get(policy.reasoning.header.lower()), messages, policy.reasoning)
    score = None
    pinned = headers.get(policy.override_header.lower())
    if pinned is not None and pinned.strip():
        pinned = pinned.strip()
        if pinned not in policy.weights:
            raise RoutingError(
                f"header {policy.override_header}: unknown variant {pinned!r}; "
                f"use one of {sorted(policy.weights)}",
                param=policy.override_header,
            )
        variant, reason = pinned, REASON_OVERRIDE
    elif policy.dynamic is not None:
        if tracker is None:
            raise ValueError("the dynamic policy needs a LargeShareTracker")
        score = difficulty_score(scored_text(messages, prompt))
        variant, reason = dynamic_choice(score, policy.dynamic, tracker)
    elif policy.sticky_header and headers.get(policy.sticky_header.lower()):
        key = headers[policy.sticky_header.lower()]
        variant, reason = pick_on_line(policy.weights, hash_position(key), policy.line()), REASON_STICKY
    else:
        variant, reason = pick_on_line(policy.weights, draw, policy.line()), REASON_WEIGHTED
    shadow = None
    if (
        policy.shadow_variant
        and policy.shadow_variant != variant
        and shadow_draw * 100.0 < policy.shadow_percent
    ):
        shadow = policy.shadow_variant
    return RouteDecision(variant, reason, mode, source, shadow, score)


def weights_summary(weights: Mapping[str, int]) -> str:
    """`a=90,b=10`, in the order given."""
    return ",".join(f"{k}={v}" for k, v in weights.items())


def normalise_weights(weights: Mapping[str, object], known: Sequence[str]) -> dict[str, int]:
    """Validate new weights: known variant names, integers 0..100, summing to 100.

    Variants left out get 0.

    Raises:
        ValueError: naming the variant or the sum at fault.
    """
    out = {name: 0 for name in known}
    for name, w in weights.items():
        if name not in out:
            raise ValueError(f"weights.{name}: unknown variant; use one of {sorted(known)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w != int(w) or not 0 <= w <= 100:
            raise ValueError(f"weights.{name}: {w!r} must be an integer 0..100")
        out[name] = int(w)
    total = sum(out.values())
    if total != 100:
        raise ValueError(f"weights: {weights_summary(out)} sum to {total}; they must sum to 100")
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by the nearest-rank method; None for no values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])
