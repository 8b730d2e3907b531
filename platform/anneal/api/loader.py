"""Reading manifest files: multi-document YAML, each document validated, every problem located."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from anneal.api.advice import advice
from anneal.api.resources import FieldError, Manifest, ManifestError, parse_manifest


@dataclass
class DocumentReport:
    """The outcome of one YAML document."""

    file: str
    index: int  # 1-based document number in the file
    label: str  # Kind/name, or what is known of it
    manifest: Manifest | None = None
    errors: list[FieldError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        where = f"{self.file}: document {self.index} ({self.label})"
        return [f"{where}: error: {e}" for e in self.errors] + [f"{where}: warning: {w}" for w in self.warnings]


def _label(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "?"
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    return f"{doc.get('kind') or '?'}/{name or '?'}"


def load_file(path: str | Path, default_namespace: str = "default") -> list[DocumentReport]:
    """Parse and validate every document of a manifest file."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        return [DocumentReport(name, 0, "?", errors=[FieldError("(file)", name, f"cannot read: {exc.strerror or exc}")])]
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        return [DocumentReport(name, 0, "?", errors=[FieldError("(yaml)", where, f"YAML syntax error: {problem}")])]
    reports = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        report = DocumentReport(name, i, _label(doc))
        try:
            report.manifest = parse_manifest(doc, default_namespace)
            report.warnings = advice(report.manifest.kind, report.manifest.spec, path.parent)
        except ManifestError as exc:
            report.errors = exc.errors
        reports.append(report)
    if not reports:
        reports.append(DocumentReport(name, 0, "?", errors=[FieldError("(file)", name, "no resources in the file (empty)")]))
    return reports
