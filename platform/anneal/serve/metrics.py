"""Per-variant serving metrics kept by the router: counters, latency histograms, a ring of recent requests.

`ServiceMetrics.stats(since)` produces the `GET /-/stats` document (contract 1, read by the
rollout controller; see docs/serving.md) and `prometheus_text()` the `GET /-/metrics` page.
The router runs on one asyncio loop, so nothing here takes a lock.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from anneal.serve.routing import percentile
from anneal.serve.shadow import Pair, merge_summaries, summarise

#: Latency histogram bucket upper bounds in ms: 0.25 ms · 1.25^k up to ~10 min (≈ 12% resolution).
LATENCY_BUCKETS_MS: tuple[float, ...] = tuple(round(0.25 * 1.25**k, 4) for k in range(80))
#: Recent request records kept for windowed stats.
DEFAULT_RING = 65536


@dataclass(slots=True)
class RequestRecord:
    time: float  # when the request finished (unix seconds)
    variant: str
    latency_ms: float
    error: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Totals:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum_ms: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    def add(self, r: RequestRecord) -> None:
        self.requests += 1
        self.errors += int(r.error)
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.latency_sum_ms += r.latency_ms
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, r.latency_ms)] += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-th percentile (0..100)."""
        if not self.requests:
            return None
        rank = max(1, int(-(-q * self.requests // 100)))
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank:
                return LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else float("inf")
        return None


def _summary(requests: int, errors: int, latencies: list[float] | None, prompt: int, completion: int,
             totals: _Totals | None = None) -> dict[str, Any]:
    if totals is not None:
        p50, p95, p99 = (totals.quantile(q) for q in (50, 95, 99))
    else:
        latencies = sorted(latencies or [])
        p50, p95, p99 = (percentile(latencies, q) for q in (50, 95, 99))
    return {
        "requests": requests,
        "errors": errors,
        "errorRate": (errors / requests) if requests else 0.0,
        "latencyP50Ms": _round(p50),
        "latencyP95Ms": _round(p95),
        "latencyP99Ms": _round(p99),
        "promptTokens": prompt,
        "completionTokens": completion,
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


class ServiceMetrics:
    """Counters of one router replica.

    Args:
        variants: variant names (each gets an entry in stats even before traffic).
        ring_size: how many recent request records are kept for windowed stats.
        clock: time source (unix seconds), replaceable in tests.
    """

    def __init__(self, variants: Iterable[str], ring_size: int = DEFAULT_RING, clock=time.time):
        self.clock = clock
        self.variants = list(variants)
        self.totals: dict[str, _Totals] = {v: _Totals() for v in self.variants}
        self.shadow_totals: dict[str, _Totals] = {}
        #: Requests pinned to a variant by a header or `model` (probes, a person trying a
        #: variant): counted apart, so they never feed a rollout's gates or minRequests.
        self.pinned_totals: dict[str, _Totals] = {}
        self.routes: Counter[str] = Counter()
        self.ring: deque[RequestRecord] = deque(maxlen=ring_size)
        self.shadow_ring: deque[RequestRecord] = deque(maxlen=max(1024, ring_size // 8))
        #: Mirrored answers paired with the answer the user got (`anneal.serve.shadow`).
        self.pair_ring: deque[Pair] = deque(maxlen=max(1024, ring_size // 16))
        self.started = clock()

    def record_pair(self, pair: Pair) -> None:
        self.pair_ring.append(pair)

    def pairs(self, since: float | None, samples: int = 20) -> dict[str, dict[str, Any]]:
        """Pair figures since `since` (the whole ring when None): ``{shadow: {primary: summary}}``."""
        groups: dict[tuple[str, str], list[Pair]] = {}
        for p in reversed(self.pair_ring):
            if since is not None and p.time < since:
                break
            groups.setdefault((p.shadow, p.primary), []).append(p)
        out: dict[str, dict[str, Any]] = {}
        for (shadow, primary), group in sorted(groups.items()):
            out.setdefault(shadow, {})[primary] = summarise(group, samples)
        return out

    def record_route(self, reason_prefix: str) -> None:
        self.routes[reason_prefix] += 1

    def record(self, variant: str, latency_ms: float, error: bool, prompt_tokens: int = 0,
               completion_tokens: int = 0, *, shadow: bool = False, pinned: bool = False) -> None:
        r = RequestRecord(self.clock(), variant, latency_ms, error, prompt_tokens, completion_tokens)
        if pinned:
            self.pinned_totals.setdefault(variant, _Totals()).add(r)
            return
        if shadow:
            self.shadow_totals.setdefault(variant, _Totals()).add(r)
            self.shadow_ring.append(r)
            return
        self.totals.setdefault(variant, _Totals()).add(r)
        self.ring.append(r)

    def window(self, since: float, shadow: bool = False) -> dict[str, list[RequestRecord]]:
        """Records that finished at or after `since`, by variant (newest records are at the right)."""
        ring = self.shadow_ring if shadow else self.ring
        out: dict[str, list[RequestRecord]] = {}
        for r in reversed(ring):
            if r.time < since:
                break
            out.setdefault(r.variant, []).append(r)
        return out

    def stats(self, since: float | None, weights: Mapping[str, int], pair_samples: int = 20) -> dict[str, Any]:
        """The `GET /-/stats` document (contract 1)."""
        now = self.clock()
        recent = self.window(since) if since is not None else {}
        recent_shadow = self.window(since, shadow=True) if since is not None else {}
        variants: dict[str, Any] = {}
        for name in sorted(set(self.variants) | set(self.totals)):
            t = self.totals.get(name, _Totals())
            entry = {"total": _summary(t.requests, t.errors, None, t.prompt_tokens, t.completion_tokens, t)}
            if since is not None:
                rs = recent.get(name, [])
                entry["window"] = _summary(
                    len(rs), sum(r.error for r in rs), [r.latency_ms for r in rs],
                    sum(r.prompt_tokens for r in rs), sum(r.completion_tokens for r in rs),
                )
            else:
                entry["window"] = entry["total"]
            variants[name] = entry
        shadow: dict[str, Any] = {}
        for name, t in sorted(self.shadow_totals.items()):
            shadow[name] = {"requests": t.requests, "errors": t.errors, "latencyP95Ms": _round(t.quantile(95))}
            if since is not None:
                rs = recent_shadow.get(name, [])
                shadow[name]["window"] = {
                    "requests": len(rs), "errors": sum(r.error for r in rs),
                    "latencyP95Ms": _round(percentile(sorted(r.latency_ms for r in rs), 95)),
                }
        pinned = {
            name: {"requests": t.requests, "errors": t.errors,
                   "errorRate": t.errors / t.requests if t.requests else 0.0,
                   "latencyP95Ms": _round(t.quantile(95))}
            for name, t in sorted(self.pinned_totals.items())
        }
        return {
            "time": now,
            "since": since,
            "weights": dict(weights),
            "variants": variants,
            "shadow": shadow,
            "pairs": self.pairs(since, pair_samples),
            "pinned": pinned,
            "routes": dict(sorted(self.routes.items())),
        }

    def prometheus_text(self, service: str, weights: Mapping[str, int]) -> bytes:
        """Prometheus exposition text of these metrics."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        metrics = self

        class _Collector:
            def collect(self):
                labels = ["service", "variant"]
                req = CounterMetricFamily("anneal_serve_requests", "Requests answered, by variant.", labels=labels)
                err = CounterMetricFamily("anneal_serve_errors", "Requests that failed, by variant.", labels=labels)
                tok = CounterMetricFamily("anneal_serve_tokens", "Tokens by variant and kind.",
                                          labels=[*labels, "kind"])
                lat = HistogramMetricFamily("anneal_serve_latency_ms", "Request latency in ms.", labels=labels)
                for name, t in sorted(metrics.totals.items()):
                    req.add_metric([service, name], t.requests)
                    err.add_metric([service, name], t.errors)
                    tok.add_metric([service, name, "prompt"], t.prompt_tokens)
                    tok.add_metric([service, name, "completion"], t.completion_tokens)
                    lat.add_metric([service, name], _cumulative(t.buckets), t.latency_sum_ms)
                yield from (req, err, tok, lat)
                sreq = CounterMetricFamily("anneal_serve_shadow_requests", "Mirrored requests, by variant.",
                                           labels=labels)
                serr = CounterMetricFamily("anneal_serve_shadow_errors", "Mirrored requests that failed.",
                                           labels=labels)
                for name, t in sorted(metrics.shadow_totals.items()):
                    sreq.add_metric([service, name], t.requests)
                    serr.add_metric([service, name], t.errors)
                yield from (sreq, serr)
                routes = CounterMetricFamily("anneal_serve_route_decisions", "Routing decisions by reason.",
                                             labels=["service", "reason"])
                for reason, n in sorted(metrics.routes.items()):
                    routes.add_metric([service, reason], n)
                yield routes
                w = GaugeMetricFamily("anneal_serve_weight", "Current weight of each variant.", labels=labels)
                for name, v in weights.items():
                    w.add_metric([service, name], v)
                yield w

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        return generate_latest(registry)


def _cumulative(buckets: list[int]) -> list[tuple[str, int]]:
    out, seen = [], 0
    for bound, n in zip((*LATENCY_BUCKETS_MS, float("inf")), buckets):
        seen += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), seen))
    return out


def merge_stats(docs: list[dict[str, Any]], pair_samples: int = 20) -> dict[str, Any]:
    """Combine the `/-/stats` documents of several router replicas into one.

    Counts and tokens add up; error rates are recomputed; latency percentiles take the
    maximum over replicas (an upper bound, which is what a latency gate needs); shadow pairs
    add up per direction, with up to `pair_samples` sample pairs pooled, disagreements first.
    """
    if not docs:
        raise ValueError("no stats to merge")
    if len(docs) == 1:
        return docs[0]
    out = {"time": max(d["time"] for d in docs), "since": docs[0].get("since"), "weights": docs[0]["weights"],
           "variants": {}, "shadow": {}, "pairs": {}, "pinned": {}, "routes": {}}
    pair_parts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in docs:
        for name, entry in d["variants"].items():
            target = out["variants"].setdefault(name, {})
            for part in ("total", "window"):
                _merge_summary(target.setdefault(part, {}), entry[part])
        for part in ("shadow", "pinned"):
            for name, s in (d.get(part) or {}).items():
                target = out[part].setdefault(name, {"requests": 0, "errors": 0, "latencyP95Ms": None})
                target["requests"] += s["requests"]
                target["errors"] += s["errors"]
                target["latencyP95Ms"] = _max(target["latencyP95Ms"], s["latencyP95Ms"])
                if "window" in s:
                    w = target.setdefault("window", {"requests": 0, "errors": 0, "latencyP95Ms": None})
                    w["requests"] += s["window"]["requests"]
                    w["errors"] += s["window"]["errors"]
                    w["latencyP95Ms"] = _max(w["latencyP95Ms"], s["window"]["latencyP95Ms"])
        for shadow_name, by_primary in (d.get("pairs") or {}).items():
            for primary, summary in by_primary.items():
                pair_parts.setdefault((shadow_name, primary), []).append(summary)
        for reason, n in d["routes"].items():
            out["routes"][reason] = out["routes"].get(reason, 0) + n
    for (shadow_name, primary), parts in sorted(pair_parts.items()):
        out["pairs"].setdefault(shadow_name, {})[primary] = merge_summaries(parts, pair_samples)
    return out


def _merge_summary(target: dict[str, Any], s: dict[str, Any]) -> None:
    for k in ("requests", "errors", "promptTokens", "completionTokens"):
        target[k] = target.get(k, 0) + s[k]
    for k in ("latencyP50Ms", "latencyP95Ms", "latencyP99Ms"):
        target[k] = _max(target.get(k), s[k])
    target["errorRate"] = target["errors"] / target["requests"] if target["requests"] else 0.0


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)
