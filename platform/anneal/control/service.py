"""A ModelService's pure decisions shared by both drivers: the Serve app's name and route, and its live weights."""

from __future__ import annotations

from typing import Any, Mapping


def app_name(namespace: str, name: str) -> str:
    """The Serve application name of a ModelService, unique on a shared Ray cluster.

    ``_`` can appear in neither a namespace (a DNS label) nor a resource name (a DNS
    subdomain), so ``a-b/c`` and ``a/b-c`` get different apps.
    """
    return f"{namespace}_{name}"


def route_prefix(namespace: str, name: str) -> str:
    """The HTTP route of the service's app (a namespace cannot contain ``/``: unique too)."""
    return f"/{namespace}/{name}"


def live_weights(spec: Any, status_weights: Mapping[str, int] | None) -> dict[str, int]:
    """The weights the Serve app should run with.

    Without a rollout, the spec's (an edit to them is applied in place); with one, the
    rollout's (kept in status), unless those do not name exactly the spec's variants.
    """
    current = dict(status_weights or {})
    if spec.rollout is None or set(current) != {v.name for v in spec.variants}:
        return spec.weights()
    return current
