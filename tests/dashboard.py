"""The shipped Grafana dashboard against what Anneal exports: every panel's PromQL must name
metrics a live router (`GET /-/metrics`) or operator (`/metrics`) page declares."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "anneal" / "dashboards" / "anneal.json"
_METRIC = re.compile(r"\b(anneal_[a-z0-9_]+)\b")


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that draws something (rows excluded, nested rows' panels included)."""
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels") or [])
        else:
            out.append(p)
    return out


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(p["title"], t.get("expr", "")) for p in panels(dash) for t in p.get("targets") or []]
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            out.append((f"variable {v['name']}", q.get("query", "") if isinstance(q, dict) else q or ""))
    return out


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def exported(pages: Iterable[str]) -> set[str]:
    """The series names Prometheus would store from these exposition pages (declared families
    count even before their first sample: a counter's ``_total``, a histogram's ``_bucket``...)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "unknown": ("",)}
    for page in pages:
        for fam in text_string_to_metric_families(page):
            names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
            names.update(s.name for s in fam.samples)
    return names


def unknown_metrics(dash: dict[str, Any], pages: Iterable[str], prefix: str = "anneal_") -> list[tuple[str, str]]:
    """(where, metric) for each metric starting with `prefix` that a query names and none of the pages exports."""
    known = exported(pages)
    return [(where, m) for where, expr in queries(dash) for m in sorted(metric_names(expr))
            if m.startswith(prefix) and m not in known]


def sample(page: str, metric: str, /, **labels: str) -> float | None:
    """The value of the series `metric` with exactly these labels on an exposition page, else None."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(page):
        for smp in fam.samples:
            if smp.name == metric and smp.labels == labels:
                return smp.value
    return None
