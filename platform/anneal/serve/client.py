"""Client helpers behind `anneal serve call` and `anneal serve stats`."""

from __future__ import annotations

from typing import Any

import httpx


class ServeClientError(RuntimeError):
    """The service answered with an error, or could not be reached; the message says which."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _url(endpoint: str, path: str) -> str:
    if not endpoint.startswith(("http://", "https://")):
        endpoint = "http://" + endpoint
    return endpoint.rstrip("/") + path


def auth_headers(api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer <key>` when there is a key (a service with `spec.auth`)."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json().get("error") or {}
        return err.get("message") or r.text
    except ValueError:
        return r.text[:500]


def call(
    endpoint: str,
    prompt: str,
    reasoning: str | None = None,
    variant: str | None = None,
    *,
    max_tokens: int | None = None,
    user: str | None = None,
    sticky_header: str = "x-user-id",
    timeout: float = 120.0,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Send one chat message to a ModelService and say who answered.

    Args:
        endpoint: the service endpoint (`http://127.0.0.1:8000`, status.endpoint).
        prompt: the user message.
        reasoning: `on` / `off` (the `x-anneal-reasoning` header), None: the service default.
        variant: pin a variant (the `x-anneal-variant` header).
        max_tokens: cap on the answer.
        user: a sticky key, sent in `sticky_header`.
        timeout: seconds.
        api_key: the service's API key (the admin key to pin a `variant`), when it has `spec.auth`.

    Returns:
        `{"text", "variant", "reason", "reasoning", "usage", "id"}`.

    Raises:
        ServeClientError: an error answer (with its status) or a connection failure.
    """
    headers = auth_headers(api_key)
    if reasoning is not None:
        if reasoning not in ("on", "off"):
            raise ServeClientError(f"--reasoning {reasoning!r}: use on or off")
        headers["x-anneal-reasoning"] = reasoning
    if variant:
        headers["x-anneal-variant"] = variant
    if user:
        headers[sticky_header] = user
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    try:
        r = httpx.post(_url(endpoint, "/v1/chat/completions"), json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise ServeClientError(f"cannot reach {endpoint}: {e}; is the service running (anneal run service.yaml)?") from None
    if r.status_code != 200:
        raise ServeClientError(f"{endpoint} answered {r.status_code}: {_error_text(r)}", r.status_code)
    data = r.json()
    return {
        "id": data.get("id"),
        "text": data["choices"][0]["message"]["content"],
        "variant": r.headers.get("x-anneal-variant"),
        "reason": r.headers.get("x-anneal-route-reason"),
        "reasoning": r.headers.get("x-anneal-reasoning"),
        "usage": data.get("usage", {}),
    }


def stats(endpoint: str, since: float | None = None, *, timeout: float = 30.0,
          http: httpx.Client | None = None, api_key: str | None = None) -> dict[str, Any]:
    """The service's `GET /-/stats` document (contract 1; see docs/serving.md).

    Args:
        endpoint: the service's base URL.
        since: the window's start (unix seconds); None for the totals since start-up.
        timeout: seconds.
        http: a client to reuse (a controller asking every second keeps one connection pool).
        api_key: the service's admin key, when it has `spec.auth`.

    Raises:
        ServeClientError: an error answer or a connection failure.
    """
    params = {"since": f"{since:.6f}"} if since is not None else None
    try:
        r = (http or httpx).get(_url(endpoint, "/-/stats"), params=params, timeout=timeout,
                                headers=auth_headers(api_key))
    except httpx.HTTPError as e:
        raise ServeClientError(f"cannot reach {endpoint}: {e}; is the service running?") from None
    if r.status_code != 200:
        raise ServeClientError(f"{endpoint} answered {r.status_code}: {_error_text(r)}", r.status_code)
    return r.json()


def stats_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant for a table: weight, requests, error rate, latency p50/p95/p99, tokens.

    `requests` counts the routed traffic (what a rollout's gates read); `pinnedRequests` the
    requests pinned to the variant by a header or `model` (probes, a person trying it).
    """
    rows = []
    for name, entry in doc.get("variants", {}).items():
        t = entry["total"]
        shadow = doc.get("shadow", {}).get(name, {})
        rows.append({
            "variant": name,
            "weight": doc.get("weights", {}).get(name, 0),
            "requests": t["requests"],
            "errorRate": round(t["errorRate"], 4),
            "p50Ms": t["latencyP50Ms"],
            "p95Ms": t["latencyP95Ms"],
            "p99Ms": t["latencyP99Ms"],
            "promptTokens": t["promptTokens"],
            "completionTokens": t["completionTokens"],
            "shadowRequests": shadow.get("requests", 0),
            "pinnedRequests": doc.get("pinned", {}).get(name, {}).get("requests", 0),
        })
    return rows


def format_stats(doc: dict[str, Any]) -> str:
    """A plain-text table of `stats_rows`, then the route decisions by reason."""
    rows = stats_rows(doc)
    cols = ["variant", "weight", "requests", "errorRate", "p50Ms", "p95Ms", "p99Ms", "completionTokens",
            "shadowRequests", "pinnedRequests"]
    cells = [cols] + [["-" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    routes = doc.get("routes") or {}
    if routes:
        lines.append("routes: " + ", ".join(f"{k}={v}" for k, v in routes.items()))
    return "\n".join(lines)
