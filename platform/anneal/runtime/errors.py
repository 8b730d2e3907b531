"""Turning failures into one-line status messages (no tracebacks in status, events or CLI output)."""

from __future__ import annotations


def short_error(exc: BaseException, limit: int = 2000) -> str:
    """The root cause of an exception as ``Type: message``, even when Ray wrapped it with a traceback.

    Ray Train and Ray tasks re-raise worker failures as their own errors whose text embeds the
    remote traceback; the line that matters is the last one of that traceback.
    """
    root = exc
    seen = set()
    while id(root) not in seen:
        seen.add(id(root))
        nxt = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if nxt is None:
            break
        root = nxt
    text = f"{type(root).__name__}: {root}"
    if "Traceback (most recent call last)" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        candidates = [ln for ln in lines if not ln.startswith(("File ", "^", "~", "Traceback"))]
        text = candidates[-1] if candidates else lines[-1]
    return text[:limit]
