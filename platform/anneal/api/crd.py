"""CustomResourceDefinitions generated from the pydantic models (structural OpenAPI v3 + CEL)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from anneal import API_GROUP, API_VERSION
from anneal.api.resources import KINDS, KindInfo

# Keys of pydantic's JSON schema that a Kubernetes structural schema does not take.
_DROP = {"title", "discriminator", "examples", "format", "$schema", "readOnly", "writeOnly"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every $ref (the models have no recursion)."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        merged = _resolve(target, defs)
        merged.update(_resolve(extra, defs))
        return merged
    return {k: _resolve(v, defs) for k, v in node.items() if k != "$defs"}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Turn one (resolved) JSON-schema node into a Kubernetes structural schema node."""
    node = {k: v for k, v in node.items() if k not in _DROP}
    description = node.pop("description", None)
    default = node.pop("default", None)
    validations = node.pop("x-kubernetes-validations", None)

    if "anyOf" in node or "oneOf" in node:
        branches = [b for b in node.pop("anyOf", node.pop("oneOf", [])) if b.get("type") != "null"]
        if len(branches) == 1:
            node = {**_strip_union_meta(node), **branches[0]}
            out = _structural(node)
        else:
            # Different types in one field (e.g. an int or a list of ints): the schema cannot say it
            # structurally; the API server keeps the value and the operator validates it.
            out = {"x-kubernetes-preserve-unknown-fields": True}
            kinds = sorted({b.get("type", "object") for b in branches})
            description = f"{description or ''} (one of: {', '.join(kinds)})".strip()
    elif "const" in node:
        value = node.pop("const")
        out = {"type": _json_type(value), "enum": [value]}
    else:
        out = {}
        t = node.get("type")
        if t is None and "enum" in node:
            t = _json_type(node["enum"][0])
        if t is not None:
            out["type"] = t
        for key in ("enum", "pattern", "minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum"):
            if key in node:
                out[key] = node[key]
        for key, base in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if key in node:
                out[base] = node[key]
                out[key] = True
        if t == "object":
            props = node.get("properties")
            if props:
                out["properties"] = {k: _structural(v) for k, v in props.items()}
                if node.get("required"):
                    out["required"] = list(node["required"])
            addl = node.get("additionalProperties")
            if isinstance(addl, dict) and not props:
                out["additionalProperties"] = _structural(addl) if addl else {"x-kubernetes-preserve-unknown-fields": True}
            elif not props and addl is not False:
                out["x-kubernetes-preserve-unknown-fields"] = True
        if t == "array":
            out["items"] = _structural(node.get("items", {"type": "string"}))
        if t is None and not out:
            out = {"x-kubernetes-preserve-unknown-fields": True}
    if description:
        out["description"] = " ".join(description.split())
    if default is not None and not isinstance(default, (dict, list)) and "type" in out:
        out["default"] = default
    if validations:
        validations = _typed_rules(validations, out.get("properties") or {})
        if validations:
            out["x-kubernetes-validations"] = validations
    return out


def _typed_rules(rules: list[dict[str, Any]], props: dict[str, Any]) -> list[dict[str, Any]]:
    """Drop CEL rules that read a field without a type (CEL cannot compile them).

    A field that takes two types (``keepLayers: 3`` or ``keepLayers: [0, 2]``; ``pause: 30s`` or
    ``pause: {}``) has no structural type, so the API server rejects any rule mentioning it; those
    rules stay enforced by the models (`anneal validate`, the operator's InvalidSpec).
    """
    untyped = [name for name, schema in props.items() if "type" not in schema]
    return [r for r in rules if not any(re.search(rf"\bself\.{re.escape(n)}\b", r["rule"]) for n in untyped)]


def _strip_union_meta(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model (camelCase names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    resolved = _resolve(raw, raw.get("$defs", {}))
    return _structural(resolved)


def build_crd(info: KindInfo) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    spec_schema = openapi_schema(info.spec)
    status_schema = openapi_schema(info.status)
    # Status is written by the operator only; keep fields a newer operator adds.
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    schema = {
        "type": "object",
        "description": (info.spec.__doc__ or info.kind).strip().splitlines()[0],
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/part-of": "anneal"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind,
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": ["anneal"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": c.name, "type": c.type, "jsonPath": c.json_path}
                        | ({"priority": c.priority} if c.priority else {})
                        for c in info.columns
                    ],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


HEADER = "# Generated by `anneal crds` from anneal.api — do not edit by hand.\n"


def render_crds() -> dict[str, str]:
    """File name → YAML text of every CRD."""
    out = {}
    for info in KINDS.values():
        crd = build_crd(info)
        out[f"{crd['metadata']['name']}.yaml"] = HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)
    return out


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crds().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def diff_crds(directory: Path) -> list[str]:
    """Names of CRD files that are missing or differ from what the models generate."""
    stale = []
    expected = render_crds()
    for name, text in expected.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    for path in directory.glob("*.anneal.dev.yaml"):
        if path.name not in expected:
            stale.append(path.name)
    return stale
